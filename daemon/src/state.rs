//! The layout of `--state-dir` (default /run/berth), in one place. Every process of a node
//! (daemon, holders, engines, `berth status`, `berth upgrade`) finds what the others left
//! there through these functions, so they must not change between berth versions without a
//! way for the new version to find the old names.
//!
//! ```text
//! <state-dir>/                             0700: only root reaches anything below
//!   mounts/<digest>/mountpoint             the mountpoint this directory belongs to
//!   mounts/<digest>/lock                   flock'ed by the holder (or `berth share`) using it
//!   mounts/<digest>/inodes                 inode journal of one mount (a successor replays it)
//!   mounts/<digest>/status.json            what `berth status` shows, refreshed every 2 s
//!   holders/<hash>.sock                    the control socket of a mount's holder
//!   cache.sock                             the daemon's node cache
//!   node.key                               the daemon's secret that names volumes (0600)
//!   volumes/<key>/volume.json              a daemon volume: source, options, targets, shares
//!   volumes/<key>/secrets.json             its credentials (0600)
//!   volumes/<key>/mnt                      where the daemon mounts it
//! ```
//!
//! `<digest>` is a SHA-256 of the canonical mountpoint, so two mountpoints never share a
//! journal (`/mnt/a-b` and `/mnt/a_b` once did, when the name was the path with every
//! non-alphanumeric character made `_`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::sys::files::{digest, private_dir, write_atomic, Fnv1a};

/// The directory of one mount's own state (inode journal, status file).
pub fn mount_dir(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    state_dir
        .join("mounts")
        .join(digest([mountpoint.as_os_str().as_encoded_bytes()]))
}

/// Where berth versions before the digest kept a mount's state: an engine handed a
/// connection by an older holder finds its predecessor's journal there.
pub fn legacy_mount_dir(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    let name: String = mountpoint
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    state_dir.join("mounts").join(name)
}

/// The inode journal in a mount's state directory.
pub fn inode_journal(mount_dir: &Path) -> PathBuf {
    mount_dir.join("inodes")
}

/// Where a mount's files being written keep their spools (see `upload::spool`).
pub fn write_spools(mount_dir: &Path) -> PathBuf {
    mount_dir.join("writes")
}

/// The status file in a mount's (or standalone share's) state directory.
pub fn status_file(mount_dir: &Path) -> PathBuf {
    mount_dir.join("status.json")
}

/// The status file of the mount at `mountpoint`, where a running berth of this version or an
/// older one keeps it.
pub fn find_status_file(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    let current = status_file(&mount_dir(state_dir, mountpoint));
    let legacy = status_file(&legacy_mount_dir(state_dir, mountpoint));
    if !current.exists() && legacy.exists() {
        return legacy;
    }
    current
}

/// A mount's state directory, held: while this lives no other berth process can claim the
/// same directory (the kernel drops the lock when the holder dies, so a successor can).
#[derive(Debug)]
pub struct MountDir {
    pub path: PathBuf,
    _lock: File,
}

impl MountDir {
    /// Creates (0700) and locks the state directory of `mountpoint`, recording the mountpoint
    /// in it. Fails if another live process holds it.
    pub fn claim(state_dir: &Path, mountpoint: &Path) -> io::Result<MountDir> {
        let path = mount_dir(state_dir, mountpoint);
        private_dir(&path)?;
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path.join("lock"))?;
        // SAFETY: flock on a valid fd has no memory-safety preconditions.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "the state of {} in {} is in use by another berth process ({e})",
                    mountpoint.display(),
                    path.display()
                ),
            ));
        }
        write_atomic(
            &path.join("mountpoint"),
            mountpoint.as_os_str().as_encoded_bytes(),
            0o600,
        )?;
        Ok(MountDir { path, _lock: lock })
    }

    /// Removes what a mount left in its state directory, and the directory.
    pub fn remove(self) {
        for name in ["status.json", "inodes", "mountpoint", "lock"] {
            let _ = std::fs::remove_file(self.path.join(name));
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The holder's control socket for `mountpoint`: `<state-dir>/holders/<hash>.sock`. A unix
/// socket path must fit in 108 bytes, and mountpoints (kubelet's staging paths) are long, so
/// the name is a hash of the mountpoint, not the mountpoint.
pub fn control_socket(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    let hash = Fnv1a::new()
        .write(mountpoint.as_os_str().as_encoded_bytes())
        .finish();
    state_dir.join("holders").join(format!("{hash:016x}.sock"))
}

/// The daemon's secret that names volumes (see `sys::files::NodeKey`).
pub fn node_key(state_dir: &Path) -> PathBuf {
    state_dir.join("node.key")
}

/// The daemon's node cache socket.
pub fn node_cache_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("cache.sock")
}

/// Where the daemon keeps its volumes.
pub fn volumes_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("volumes")
}

/// The directory of daemon volume `key` (its record, secrets and mountpoint).
pub fn volume_dir(state_dir: &Path, key: &str) -> PathBuf {
    volumes_dir(state_dir).join(key)
}

/// Where the daemon mounts volume `key`.
pub fn volume_mountpoint(state_dir: &Path, key: &str) -> PathBuf {
    volume_dir(state_dir, key).join("mnt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountpoints_that_look_alike_get_their_own_state() {
        let state = Path::new("/run/berth");
        let names: Vec<PathBuf> = ["/mnt/a-b", "/mnt/a_b", "/mnt/a/b", "/mnt/a b"]
            .iter()
            .map(|m| mount_dir(state, Path::new(m)))
            .collect();
        for (i, a) in names.iter().enumerate() {
            assert!(a.starts_with("/run/berth/mounts"));
            for b in &names[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // The old naming collided; it stays only to find an older holder's journal.
        assert_eq!(
            legacy_mount_dir(state, Path::new("/mnt/a-b")),
            legacy_mount_dir(state, Path::new("/mnt/a_b"))
        );
        assert_eq!(
            inode_journal(&legacy_mount_dir(state, Path::new("/mnt/a b"))),
            Path::new("/run/berth/mounts/_mnt_a_b/inodes")
        );
    }

    #[test]
    fn a_mount_dir_is_held_by_one_process_at_a_time() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mnt = Path::new("/mnt/x");
        let held = MountDir::claim(dir.path(), mnt).unwrap();
        let mode = std::fs::metadata(&held.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(
            std::fs::read(held.path.join("mountpoint")).unwrap(),
            b"/mnt/x"
        );
        // flock is per open file description: a second claim fails while the first holds it.
        let err = MountDir::claim(dir.path(), mnt).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        let path = held.path.clone();
        held.remove();
        assert!(!path.exists());
        MountDir::claim(dir.path(), mnt).unwrap();
    }

    #[test]
    fn control_sockets_are_short_stable_and_one_per_mountpoint() {
        let long = Path::new("/var/lib/kubelet/plugins/kubernetes.io/csi/csi.berth.dev/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/globalmount");
        let a = control_socket(Path::new("/run/berth"), long);
        assert!(a.as_os_str().len() < 60, "{}", a.display());
        assert_eq!(a, control_socket(Path::new("/run/berth"), long), "stable");
        assert_ne!(
            a,
            control_socket(Path::new("/run/berth"), Path::new("/mnt/other"))
        );
        assert!(a.starts_with("/run/berth/holders"));
        // The name older berth versions gave it (FNV-1a of the path bytes): an upgrade's new
        // binary must find a holder the old one started.
        assert_eq!(
            control_socket(Path::new("/s"), Path::new("/mnt/x")),
            Path::new("/s/holders/5af2d1bcdc204eb4.sock")
        );
    }
}
