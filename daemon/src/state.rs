//! The layout of `--state-dir` (default /run/berth), in one place. Every process of a node
//! (daemon, holders, engines, `berth status`, `berth upgrade`) finds what the others left
//! there through these functions, so they must not change between berth versions without a
//! way for the new version to find the old names.
//!
//! ```text
//! <state-dir>/
//!   mounts/<mountpoint name>/inodes        inode journal of one mount (a successor replays it)
//!   mounts/<mountpoint name>/status.json   what `berth status` shows, refreshed every 2 s
//!   holders/<hash>.sock                    the control socket of a mount's holder
//!   cache.sock                             the daemon's node cache
//!   volumes/<key>/volume.json              a daemon volume: source, options, targets, shares
//!   volumes/<key>/secrets.json             its credentials (0600)
//!   volumes/<key>/mnt                      where the daemon mounts it
//! ```

use std::path::{Path, PathBuf};

use crate::sys::files::Fnv1a;

/// The directory of one mount's own state (inode journal, status file).
pub fn mount_dir(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    let name: String = mountpoint
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    state_dir.join("mounts").join(name)
}

/// The inode journal of the mount at `mountpoint`.
pub fn inode_journal(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    mount_dir(state_dir, mountpoint).join("inodes")
}

/// The status file of the mount (or standalone share) at `mountpoint`.
pub fn status_file(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    mount_dir(state_dir, mountpoint).join("status.json")
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
    fn mount_state_is_one_component_per_mountpoint() {
        let p = inode_journal(Path::new("/run/berth"), Path::new("/mnt/a b"));
        assert_eq!(p, Path::new("/run/berth/mounts/_mnt_a_b/inodes"));
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
