//! The /dev/fuse door: mounting, worker threads on cloned queues, and unmounting.
//!
//! berth mounts with the mount(2) syscall itself (root only) rather than through a session
//! object, because the connection fd must be ours to hand around: the self-healing work keeps
//! it in a holder process and passes clones to a replaceable engine. Each worker thread reads
//! its own clone (`FUSE_DEV_IOC_CLONE`), so requests are spread over queues, not one fd.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};

use crate::fs::BerthFs;

/// Largest request: 1 MiB of data (max_pages 256) plus headers.
const REQUEST_BUFFER: usize = (1 << 20) + (64 << 10);
/// `_IOR(229, 0, uint32_t)`
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Shown as the mount source in /proc/mounts.
    pub fsname: String,
    pub read_only: bool,
    pub allow_other: bool,
}

/// A mounted FUSE connection.
pub struct FuseMount {
    mountpoint: PathBuf,
    device: File,
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains NUL"))
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
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/fuse")
            .map_err(|e| io::Error::new(e.kind(), format!("open /dev/fuse: {e}")))?;
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
        let target = cstring(&mountpoint.to_string_lossy())?;
        let source = cstring(&opts.fsname)?;
        let fstype = cstring("fuse.berth")?;
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

    /// A new queue on the same connection.
    pub fn clone_queue(&self) -> io::Result<File> {
        let clone = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/fuse")?;
        let source: u32 = self.device.as_raw_fd() as u32;
        // SAFETY: the ioctl reads one u32 (the fd to clone) from a valid pointer.
        let rc = unsafe { libc::ioctl(clone.as_raw_fd(), FUSE_DEV_IOC_CLONE, &source) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(clone)
    }

    /// Starts `threads` workers, the first on the mount's own fd, the rest on clones.
    pub fn serve(&self, fs: Arc<BerthFs>, threads: usize) -> io::Result<Vec<JoinHandle<()>>> {
        let server = Arc::new(Server::new(fs));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let queue = if i == 0 {
                self.device.try_clone()?
            } else {
                self.clone_queue()?
            };
            let server = server.clone();
            let worker = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || serve_queue(queue, &server))?;
            workers.push(worker);
        }
        Ok(workers)
    }

    /// Unmounts. Fails with EBUSY while files or working directories are open inside.
    pub fn unmount(&self, lazy: bool) -> io::Result<()> {
        let target = cstring(&self.mountpoint.to_string_lossy())?;
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        // SAFETY: target is a valid NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), flags) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(()); // not mounted any more
            }
            return Err(e);
        }
        Ok(())
    }

    /// Aborts the connection through fusectl, failing every pending request at once; used when
    /// the engine must go away while requests are stuck.
    pub fn abort_connection(&self) {
        if let Some(minor) = self.connection_id() {
            let path = format!("/sys/fs/fuse/connections/{minor}/abort");
            let _ = std::fs::write(path, "1");
        }
    }

    /// The fusectl connection id: the minor device number of the mount.
    fn connection_id(&self) -> Option<u64> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let target = mountinfo_escape(&self.mountpoint.to_string_lossy());
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(&*target))?;
        let devno = line.split(' ').nth(2)?;
        devno.split(':').nth(1)?.parse().ok()
    }
}

/// Whether `path` (canonical) is the target of a mount in this mount namespace.
pub fn is_mountpoint(path: &Path) -> bool {
    let target = mountinfo_escape(&path.to_string_lossy());
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| info.lines().any(|l| l.split(' ').nth(4) == Some(&*target)))
        .unwrap_or(false)
}

/// The filesystem type of the mount that holds `path` (canonical), e.g. `fuse.berth`.
pub fn fstype_of(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The mount with the longest mountpoint that is a prefix of `path` (the last one mounted
    // wins among equals, as later lines stack on earlier ones).
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let target = line.split(' ').nth(4)?;
        let covers = path.starts_with(mountinfo_unescape(target));
        let fstype = line.split(" - ").nth(1)?.split(' ').next()?;
        if covers && best.as_ref().is_none_or(|(len, _)| target.len() >= *len) {
            best = Some((target.len(), fstype.to_string()));
        }
    }
    best.map(|(_, t)| t)
}

fn mountinfo_unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
fn mountinfo_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

/// One worker: read a request, serve it, reply; until the connection goes away.
fn serve_queue(mut queue: File, server: &Server<Arc<BerthFs>>) {
    let fd: RawFd = queue.as_raw_fd();
    let mut request = vec![0u8; REQUEST_BUFFER];
    let mut reply = vec![0u8; REQUEST_BUFFER];
    loop {
        let len = match queue.read(&mut request) {
            Ok(len) => len,
            Err(e) => match e.raw_os_error() {
                // Interrupted request or signal: just read the next one.
                Some(libc::ENOENT) | Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                // The filesystem was unmounted or the connection aborted.
                Some(libc::ENODEV) => return,
                _ => {
                    tracing::error!(error = %e, "reading from /dev/fuse failed; worker stops");
                    return;
                }
            },
        };
        let reader = match Reader::from_fuse_buffer(FuseBuf::new(&mut request[..len])) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "malformed FUSE request buffer");
                continue;
            }
        };
        let writer = match FuseDevWriter::<()>::new(fd, &mut reply) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot build FUSE reply buffer");
                continue;
            }
        };
        if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
            // ENOENT on reply: the request was interrupted and the kernel forgot it.
            tracing::debug!(error = ?e, "FUSE request not answered cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_escaped_like_the_kernel_does() {
        assert_eq!(mountinfo_escape("/mnt/a b\\c"), "/mnt/a\\040b\\134c");
        assert!(is_mountpoint(Path::new("/proc")));
        assert!(!is_mountpoint(Path::new("/proc/self")));
        assert_eq!(fstype_of(Path::new("/proc/self")).as_deref(), Some("proc"));
        assert_eq!(mountinfo_unescape("/mnt/a\\040b"), "/mnt/a b");
    }
}
