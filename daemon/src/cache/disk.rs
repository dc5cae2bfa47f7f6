//! A disk tier opened in a directory this process owns: its lock (one owner at a time), its
//! fixed-size data file and its index.

use std::path::{Path, PathBuf};

use super::index::Index;

/// A disk tier opened in a directory: its lock, its data file and its index.
pub(super) struct Disk {
    pub(super) lock: std::fs::File,
    pub(super) data: PathBuf,
    pub(super) data_len: u64,
    pub(super) index: Index,
    pub(super) replayed: usize,
}

impl Disk {
    pub(super) fn open(dir: &Path, size: u64, block_size: u64) -> std::io::Result<Disk> {
        crate::sys::files::private_dir(dir)?;
        let lock = lock_dir(dir)?;
        let slots = (size / block_size).min(u32::MAX as u64) as u32;
        if slots == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "cache size is smaller than one block",
            ));
        }
        let (index, replayed) = Index::open(&dir.join("index"), block_size, slots)?;
        Ok(Disk {
            lock,
            data: dir.join("data"),
            data_len: slots as u64 * block_size,
            index,
            replayed,
        })
    }
}

/// Takes an exclusive lock on the cache dir so that two processes never share slots.
fn lock_dir(dir: &Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join("lock"))?;
    // One an older berth made under a loose umask is narrowed too.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    // SAFETY: flock on a valid fd has no memory-safety preconditions.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                CacheInUse {
                    dir: dir.to_path_buf(),
                },
            ));
        }
        return Err(e);
    }
    Ok(file)
}

/// Another process holds the cache dir's lock (a running mount, a warm-up, or a predecessor
/// engine that is still going away).
#[derive(Debug, thiserror::Error)]
#[error(
    "cache dir {} is in use by another berth process; to share the cache of a berth daemon, \
     use --cache-socket",
    dir.display()
)]
pub struct CacheInUse {
    pub dir: PathBuf,
}

/// Whether `e` says the cache dir is locked by another process.
pub fn is_in_use(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<CacheInUse>())
}
