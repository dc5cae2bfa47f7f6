//! The last resort, when a FUSE connection itself is gone (holder killed, connection
//! aborted): the kernel then fails every access with ENOTCONN until someone unmounts. We
//! detach the dead mount and every bind of it, mount afresh, and bind the new mount over each
//! old bind target, so that pods whose volume is a bind target (HostToContainer propagation)
//! see the volume again without a restart. Open files on the dead mount are lost.

use std::io;
use std::path::{Path, PathBuf};

use crate::fuse;
use crate::sys::mounts;

/// A place the dead mount was bound to, to bind the new mount to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindTarget {
    pub target: PathBuf,
    /// The directory of the filesystem the bind showed (`/` for all of it).
    pub root: PathBuf,
    /// Its per-mount flags (read-only, nosuid, ...), restored on the new bind.
    pub flags: libc::c_ulong,
}

/// Whether `path` is a berth mount whose connection is dead.
pub fn is_dead_berth_mount(path: &Path) -> bool {
    let Ok(Some(entry)) = mounts::mount_at(path) else {
        return false;
    };
    if entry.fstype != fuse::FSTYPE {
        return false;
    }
    let not_connected = |e: &io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    if std::fs::metadata(path).as_ref().is_err_and(not_connected) {
        return true;
    }
    // stat may answer from attributes the kernel still caches (for the metadata TTL) without
    // asking the dead connection; statfs always asks. A live but hung mount would not answer
    // at all: give up on it after a while (it is not dead).
    let path = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("statfs-probe".into())
        .spawn(move || {
            let _ = tx.send(statfs(&path));
        });
    spawned.is_ok()
        && rx
            .recv_timeout(STATFS_PROBE_TIMEOUT)
            .is_ok_and(|r| r.as_ref().is_err_and(not_connected))
}

const STATFS_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn statfs(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the berth mount at `mountpoint` and every bind of it in this mount namespace;
/// returns the bind targets, to re-bind once a new mount is up.
pub fn detach_with_binds(mountpoint: &Path) -> io::Result<Vec<BindTarget>> {
    let entries = mounts::read()?;
    let Some(entry) = entries.iter().rev().find(|m| m.target == mountpoint) else {
        return Ok(Vec::new());
    };
    let targets: Vec<BindTarget> = mounts::bind_targets(&entries, entry.device, mountpoint)
        .into_iter()
        .map(|m| BindTarget {
            target: m.target,
            root: m.root,
            flags: m.flags,
        })
        .collect();
    for t in &targets {
        if let Err(e) = mounts::unmount(&t.target, true) {
            tracing::warn!(target_path = %t.target.display(), error = %e, "could not detach a stale bind");
        }
    }
    mounts::unmount(mountpoint, true)?;
    Ok(targets)
}

/// Binds the (new) mount at `mountpoint` over every old target. Returns how many worked.
pub fn rebind(mountpoint: &Path, targets: &[BindTarget]) -> usize {
    let mut done = 0;
    for t in targets {
        let rel = t.root.strip_prefix("/").unwrap_or(&t.root);
        let source = mountpoint.join(rel);
        match mounts::bind(&source, &t.target, t.flags) {
            Ok(()) => {
                done += 1;
                tracing::info!(target_path = %t.target.display(), read_only = t.flags & libc::MS_RDONLY != 0, "re-bound the new mount over a stale bind target");
            }
            Err(e) => {
                tracing::error!(target_path = %t.target.display(), error = %e, "could not re-bind; whoever uses this path must remount it")
            }
        }
    }
    done
}
