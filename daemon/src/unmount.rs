//! `berth unmount TARGET` without a daemon: a safe unmount of a berth mount.
//!
//! Safe means: only berth mounts are touched, every layer stacked at the path goes (a
//! last-resort remount may have stacked a fresh mount on a stale one), and never lazily — a lazy
//! unmount hides the mount from new lookups while open files keep writing into it, which is
//! how data gets lost without an error. While files are open the unmount fails with EBUSY and
//! nothing changes. A foreground `berth mount` whose mountpoint goes this way exits by itself.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::sys::mounts;

/// `berth unmount TARGET`.
pub fn run(target: &Path) -> anyhow::Result<()> {
    let target = absolute(target);
    let top = mounts::mount_at(&target).context("reading the mount table")?;
    let Some(top) = top else {
        println!("berth: nothing is mounted at {}", target.display());
        return Ok(());
    };
    if top.fstype != crate::fuse::FSTYPE {
        bail!(
            "{} is a {} mount, not a berth mount; leaving it alone",
            target.display(),
            top.fstype
        );
    }
    match mounts::unmount_all(&target) {
        Ok(layers) => {
            println!(
                "berth: unmounted {} ({layers} mount{})",
                target.display(),
                if layers == 1 { "" } else { "s" }
            );
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(
            "{} is busy (files or directories in it are open): nothing was unmounted; \
             close them and run berth unmount again",
            target.display()
        ),
        Err(e) => Err(e).with_context(|| format!("unmounting {}", target.display())),
    }
}

/// The path as the mount table shows it: symlinks resolved where the path can be resolved
/// (a dead FUSE mount cannot: then its parent is resolved and the last component kept).
pub fn absolute(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = match parent {
        Some(p) => p.canonicalize().ok(),
        None => std::env::current_dir().ok(),
    };
    match (parent, path.file_name()) {
        (Some(parent), Some(name)) => parent.join(name),
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_resolves_what_exists_and_keeps_the_missing_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        assert_eq!(absolute(dir.path()), real);
        assert_eq!(absolute(&dir.path().join("nope")), real.join("nope"));
        assert!(absolute(Path::new("relative-x")).is_absolute());
    }

    #[test]
    fn an_unmounted_path_is_left_alone_and_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        run(dir.path()).unwrap();
    }

    #[test]
    fn a_non_berth_mount_is_refused() {
        // `/` is always a mount, and never a berth one.
        let err = run(Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("not a berth mount"), "{err}");
    }
}
