//! The node plugin's publish targets: where each volume is bound, from which staging path,
//! read-only or not. The recovery hook re-binds them after a remount, so the list is kept in
//! a file (next to the CSI socket by default, a hostPath) and survives a plugin restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A publish target: the staging path it was bound from, and whether read-only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub staging: PathBuf,
    pub read_only: bool,
}

/// The publish targets of this node plugin, saved to `file` on every change.
#[derive(Default)]
pub struct Published {
    targets: Mutex<BTreeMap<PathBuf, Target>>,
    file: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    targets: BTreeMap<PathBuf, Target>,
}

impl Published {
    /// The list saved in `file` (targets whose directory is gone are dropped: kubelet removed
    /// the pod). A missing file is an empty list; an unreadable one is logged and replaced.
    pub fn load(file: &Path) -> Published {
        let mut targets = match std::fs::read(file) {
            Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                Ok(saved) => saved.targets,
                Err(e) => {
                    tracing::error!(file = %file.display(), "ignoring an unreadable list of publish targets (targets published before are not re-bound after a remount): {e}");
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::error!(file = %file.display(), "reading the list of publish targets: {e}");
                BTreeMap::new()
            }
        };
        let before = targets.len();
        targets.retain(|target, _| target.exists());
        tracing::info!(file = %file.display(), targets = targets.len(), dropped = before - targets.len(), "publish targets loaded");
        Published {
            targets: Mutex::new(targets),
            file: Some(file.to_path_buf()),
        }
    }

    pub fn insert(&self, target: &Path, staging: &Path, read_only: bool) {
        let target_entry = Target {
            staging: staging.to_path_buf(),
            read_only,
        };
        self.change(|t| t.insert(target.to_path_buf(), target_entry.clone()) != Some(target_entry));
    }

    pub fn remove(&self, target: &Path) {
        self.change(|t| t.remove(target).is_some());
    }

    pub fn of_staging(&self, staging: &Path) -> Vec<(PathBuf, Target)> {
        self.targets
            .lock()
            .map(|t| {
                t.iter()
                    .filter(|(_, v)| v.staging == staging)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies `f` and, if it changed something, saves the list (under the lock, so saves
    /// never interleave).
    fn change(&self, f: impl FnOnce(&mut BTreeMap<PathBuf, Target>) -> bool) {
        let Ok(mut targets) = self.targets.lock() else {
            return;
        };
        if !f(&mut targets) {
            return;
        }
        if let Some(file) = &self.file {
            if let Err(e) = save(file, &targets) {
                tracing::error!(file = %file.display(), "saving the list of publish targets (a plugin restart forgets the change): {e}");
            }
        }
    }
}

/// Saves the list whole (written beside `file`, then renamed over it).
fn save(file: &Path, targets: &BTreeMap<PathBuf, Target>) -> std::io::Result<()> {
    let saved = Saved {
        targets: targets.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&saved).map_err(std::io::Error::other)?;
    berth::sys::files::write_atomic(file, &bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_survive_a_reload_and_removals_are_saved() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("published.json");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let staging = dir.path().join("staging");
        let first = Published::load(&file);
        first.insert(&a, &staging, false);
        first.insert(&b, &staging, true);
        first.remove(&a);
        let second = Published::load(&file);
        assert_eq!(
            second.of_staging(&staging),
            vec![(
                b.clone(),
                Target {
                    staging: staging.clone(),
                    read_only: true
                }
            )]
        );
    }

    #[test]
    fn gone_targets_are_dropped_and_a_corrupt_file_is_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("published.json");
        let staging = dir.path().join("staging");
        let gone = dir.path().join("gone");
        std::fs::create_dir_all(&gone).unwrap();
        Published::load(&file).insert(&gone, &staging, false);
        std::fs::remove_dir(&gone).unwrap();
        assert!(Published::load(&file).of_staging(&staging).is_empty());
        std::fs::write(&file, b"{not json").unwrap();
        let fresh = Published::load(&file);
        assert!(fresh.of_staging(&staging).is_empty());
        // The next change replaces the corrupt file.
        fresh.insert(dir.path(), &staging, false);
        assert_eq!(Published::load(&file).of_staging(&staging).len(), 1);
    }
}
