//! The daemon's volume table on disk, so that a restarted daemon brings every volume back:
//! `<state-dir>/volumes/<key>/volume.json` (source, options, targets, shares) and, when the
//! volume has credentials, `secrets.json` beside it, readable by root only (mode 0600).
//! Each file is written whole ([`write_atomic`]), so a crash leaves the old version or the
//! new one, never half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state;
use crate::sys::files::write_atomic;

/// One volume as the daemon must restore it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub source: String,
    pub options: BTreeMap<String, String>,
    pub volume_id: String,
    /// target -> read-only
    pub targets: BTreeMap<PathBuf, bool>,
    pub shares: Vec<ShareSpec>,
    pub remount_generation: u64,
    /// Where the volume is mounted, when not where its key says
    /// ([`state::volume_mountpoint`]): a volume an older berth recorded under its old name
    /// keeps its mountpoint (pods' binds and its holder's state point there) under its new
    /// name, until it stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<PathBuf>,
}

/// A virtio-fs share of a volume: its vhost-user socket and how it is offered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareSpec {
    pub socket: PathBuf,
    pub request_queues: usize,
    pub queue_size: u16,
    pub share_id: String,
}

/// Writes the record (and the secrets, if any) of volume `key`.
pub fn save(
    state_dir: &Path,
    key: &str,
    record: &Record,
    secrets: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let dir = state::volume_dir(state_dir, key);
    std::fs::create_dir_all(&dir)?;
    write_atomic(
        &dir.join("volume.json"),
        &serde_json::to_vec_pretty(record)?,
        0o644,
    )?;
    let secrets_file = dir.join("secrets.json");
    if secrets.is_empty() {
        let _ = std::fs::remove_file(secrets_file);
        Ok(())
    } else {
        write_atomic(&secrets_file, &serde_json::to_vec(secrets)?, 0o600)
    }
}

/// Forgets volume `key` (its mountpoint directory is removed by whoever stops it).
pub fn remove(state_dir: &Path, key: &str) {
    let dir = state::volume_dir(state_dir, key);
    for name in ["volume.json", "secrets.json"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    // Gone when nothing else is left in it (a volume's mountpoint goes when it stops).
    let _ = std::fs::remove_dir(&dir);
}

/// Every recorded volume: (key, record, secrets). Unreadable records are logged and skipped.
pub fn load_all(state_dir: &Path) -> Vec<(String, Record, BTreeMap<String, String>)> {
    let Ok(entries) = std::fs::read_dir(state::volumes_dir(state_dir)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let key = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path().join("volume.json");
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let record = match serde_json::from_slice::<Record>(&text) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(path = %path.display(), "unreadable volume record, skipped: {e}");
                continue;
            }
        };
        let secrets = std::fs::read(entry.path().join("secrets.json"))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .unwrap_or_default();
        out.push((key, record, secrets));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_of_older_daemons_have_no_mountpoint() {
        let old = r#"{"source":"s3://b","options":{},"volume_id":"v","targets":{},"shares":[],"remount_generation":0}"#;
        let record: Record = serde_json::from_str(old).unwrap();
        assert_eq!(record.mountpoint, None);
        assert!(!serde_json::to_string(&record)
            .unwrap()
            .contains("mountpoint"));
    }

    #[test]
    fn records_round_trip_and_secrets_are_private() {
        let state = tempfile::tempdir().unwrap();
        let record = Record {
            source: "s3://b/p".into(),
            options: BTreeMap::from([("read-only".into(), "true".into())]),
            volume_id: "vol".into(),
            targets: BTreeMap::from([(PathBuf::from("/t"), false)]),
            shares: vec![ShareSpec {
                socket: "/run/vm.sock".into(),
                request_queues: 2,
                queue_size: 1024,
                share_id: "pod".into(),
            }],
            remount_generation: 3,
            mountpoint: Some("/run/berth/volumes/old/mnt".into()),
        };
        let secrets = BTreeMap::from([("accessKeyId".to_string(), "AKIA".to_string())]);
        save(state.path(), "k1", &record, &secrets).unwrap();
        let volume_json = std::fs::read_to_string(state.path().join("volumes/k1/volume.json"));
        assert!(!volume_json.unwrap().contains("AKIA"));
        let mode = std::fs::metadata(state.path().join("volumes/k1/secrets.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A directory without a record (a volume being stopped) and a broken record are skipped.
        std::fs::create_dir_all(state.path().join("volumes/k2/mnt")).unwrap();
        std::fs::create_dir_all(state.path().join("volumes/k3")).unwrap();
        std::fs::write(state.path().join("volumes/k3/volume.json"), b"{garbage").unwrap();
        let all = load_all(state.path());
        assert_eq!(all, vec![("k1".to_string(), record.clone(), secrets)]);
        // Without secrets the file goes.
        save(state.path(), "k1", &record, &BTreeMap::new()).unwrap();
        assert!(!state.path().join("volumes/k1/secrets.json").exists());
        remove(state.path(), "k1");
        assert!(load_all(state.path()).is_empty());
    }
}
