//! The /dev/fuse door: mounting, cloned queues, queue workers and unmounting.
//!
//! berth mounts with the mount(2) syscall itself (root only) rather than through a session
//! object, because the connection fds must be ours to hand around: the holder process keeps
//! them and passes them to a replaceable engine (see `heal`). Each worker thread reads its own
//! clone (`FUSE_DEV_IOC_CLONE`), so requests are spread over queues, not one fd.

pub mod connection_state;
pub mod protocol;
pub mod worker;

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sys::mounts::{self, cpath};

/// `_IOR(229, 0, uint32_t)`
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;
/// The filesystem type berth mounts as (`fuse.` + subtype).
pub const FSTYPE: &str = "fuse.berth";

#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Shown as the mount source in /proc/mounts.
    pub fsname: String,
    pub read_only: bool,
    pub allow_other: bool,
}

/// A mounted FUSE connection: the mountpoint and the connection's first /dev/fuse fd.
pub struct FuseMount {
    mountpoint: PathBuf,
    device: File,
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains NUL"))
}

fn open_fuse_device() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("open /dev/fuse: {e}")))
}

impl FuseMount {
    pub fn mount(mountpoint: &Path, opts: &MountOptions) -> io::Result<FuseMount> {
        let meta = std::fs::metadata(mountpoint)?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "mountpoint is not a directory",
            ));
        }
        let device = open_fuse_device()?;
        let mut data = format!(
            "fd={},rootmode={:o},user_id=0,group_id=0,default_permissions,max_read={}",
            device.as_raw_fd(),
            meta.mode() & libc::S_IFMT,
            1 << 20
        );
        if opts.allow_other {
            data.push_str(",allow_other");
        }
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
        if opts.read_only {
            flags |= libc::MS_RDONLY;
        }
        let target = cpath(mountpoint)?;
        let source = cstring(&opts.fsname)?;
        let fstype = cstring(FSTYPE)?;
        let data = cstring(&data)?;
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::EPERM) {
                " (berth mount needs root or CAP_SYS_ADMIN)"
            } else {
                ""
            };
            return Err(io::Error::new(
                e.kind(),
                format!("mount {}: {e}{hint}", mountpoint.display()),
            ));
        }
        Ok(FuseMount {
            mountpoint: mountpoint.to_path_buf(),
            device,
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The connection's first fd (the one given to mount(2)).
    pub fn device(&self) -> &File {
        &self.device
    }

    /// A new queue on the same connection.
    pub fn clone_queue(&self) -> io::Result<File> {
        clone_queue(&self.device)
    }

    /// `count` queues: the mount's own fd first, then clones. These are what a holder keeps.
    pub fn queues(&self, count: usize) -> io::Result<Vec<File>> {
        let mut queues = vec![self.device.try_clone()?];
        for _ in 1..count.max(1) {
            queues.push(self.clone_queue()?);
        }
        Ok(queues)
    }

    /// Unmounts. Fails with EBUSY while files or working directories are open inside.
    pub fn unmount(&self, lazy: bool) -> io::Result<()> {
        mounts::unmount(&self.mountpoint, lazy)
    }

    /// Aborts the connection through fusectl, failing every pending request at once; used when
    /// the engine must go away while requests are stuck.
    pub fn abort_connection(&self) {
        if let Some(conn) = self.connection_id() {
            abort_connection(conn);
        }
    }

    /// The fusectl connection id: the minor device number of the mount (read from mountinfo,
    /// because a stat of the mount root would wait for the engine).
    pub fn connection_id(&self) -> Option<u32> {
        mounts::mount_at(&self.mountpoint)
            .ok()
            .flatten()
            .filter(|m| m.fstype == FSTYPE)
            .map(|m| m.device.1)
    }
}

/// A new queue on the connection of `device`.
pub fn clone_queue(device: &File) -> io::Result<File> {
    let clone = open_fuse_device()?;
    let source: u32 = device.as_raw_fd() as u32;
    // SAFETY: the ioctl reads one u32 (the fd to clone) from a valid pointer.
    let rc = unsafe { libc::ioctl(clone.as_raw_fd(), FUSE_DEV_IOC_CLONE, &source) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(clone)
}

/// Fails every request of connection `conn` and refuses new ones (fusectl `abort`).
pub fn abort_connection(conn: u32) {
    ensure_fusectl();
    let _ = std::fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
}

/// Requests of connection `conn` the kernel is waiting on (fusectl `waiting`).
pub fn waiting_requests(conn: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/fs/fuse/connections/{conn}/waiting"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Mounts fusectl at /sys/fs/fuse/connections if it is not there yet. Best effort.
pub fn ensure_fusectl() {
    let dir = Path::new("/sys/fs/fuse/connections");
    if mounts::is_mountpoint(dir).unwrap_or(false) {
        return;
    }
    let (Ok(src), Ok(target), Ok(fstype)) = (
        cstring("fusectl"),
        cstring("/sys/fs/fuse/connections"),
        cstring("fusectl"),
    ) else {
        return;
    };
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not mount fusectl");
    }
}

/// Whether the connection behind a held queue fd is gone (aborted or unmounted): poll
/// reports POLLERR on it then. Reads nothing.
pub fn connection_lost(queue: &File) -> bool {
    let mut fd = libc::pollfd {
        fd: queue.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd without waiting.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}
