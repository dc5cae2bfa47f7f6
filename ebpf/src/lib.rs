//! eBPF detection of dead and hung FUSE servers.
//!
//! C CO-RE programs (`src/bpf/fusewatch.bpf.c`, compiled by `build.rs` with
//! clang) loaded with aya. They watch three kernel hooks and report:
//!
//! - [`Event::EngineExited`]: the last thread of a registered process exited
//!   (with its wait status), seen in-kernel at `sched_process_exit`;
//! - [`Event::ConnectionAborted`]: a request of a registered FUSE connection
//!   ended with `-ECONNABORTED`/`-ENOTCONN` (fusectl `abort`, request timeout,
//!   last /dev/fuse fd closed);
//! - [`Event::RequestStalled`]: a request of a registered connection has been in
//!   flight (sent to the server, no answer yet) longer than the stall threshold:
//!   the server is hung or stopped.
//!
//! The crate knows nothing of the daemon. Typical use from a plain thread:
//!
//! ```no_run
//! use std::time::Duration;
//! use berth_ebpf::{connection_id, Event, FuseWatch};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut watch = FuseWatch::load(Duration::from_secs(2))?; // fentry, else tp_btf
//! watch.watch_process(12345)?;                               // the engine
//! let epoch = watch.watch_connection(connection_id("/mnt/data".as_ref())?)?;
//! loop {
//!     for ev in watch.next_events(Duration::from_millis(500))? {
//!         match ev {
//!             Event::EngineExited { tgid, status, .. } => { /* start a successor */ }
//!             Event::RequestStalled { conn, epoch: e, .. } if e == epoch => { /* hung */ }
//!             _ => {}
//!         }
//!     }
//! }
//! # }
//! ```
//!
//! Instead of a watcher thread, a caller's own event loop can poll the
//! watch's fd (`AsFd`, readable when the kernel queued events) with at most
//! [`FuseWatch::poll_timeout`] as timeout, then call
//! `next_events(Duration::ZERO)`.
//!
//! # Attach modes
//! [`FuseWatch::load`] tries fentry on `taskstats_exit`, `fuse_dev_queue_req`
//! and `fuse_request_end`; if the kernel refuses (this sandbox kernel answers
//! EPERM), it unloads them and attaches BTF tracepoints `sched_process_exit`,
//! `fuse_request_send`, `fuse_request_end` instead. [`FuseWatch::attach_mode`]
//! says which, [`FuseWatch::fentry_refusal`] why fentry was not used. If neither
//! works, `load` returns an [`Error`] and the caller uses its no-eBPF detector.
//!
//! # Connection identity
//! A connection is named by its fusectl id (`/sys/fs/fuse/connections/<id>`,
//! the minor of the mount's anonymous device: [`connection_id`]). The kernel
//! reuses an id as soon as the connection is gone, so each
//! [`FuseWatch::watch_connection`] gets a fresh *epoch*; in-flight entries and
//! events carry the epoch they were recorded under, entries of any other epoch
//! are deleted instead of reported, and events carry it so the caller can match
//! them to the mount it registered. In-flight requests are keyed in the kernel
//! by their `struct fuse_req` address (unique while the request lives; a reused
//! address overwrites the old entry), not by the FUSE `unique`, which on some
//! kernels is not yet assigned when `fuse_request_send` fires.

mod attach;
mod error;
mod event;
mod watch;

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub use attach::AttachMode;
pub use error::Error;
pub use event::{monotonic_now, opcode_name, Event};
pub use watch::{FuseWatch, Options};

/// The fusectl connection id of the FUSE filesystem mounted at `mountpoint`
/// (the directory name under `/sys/fs/fuse/connections/`).
///
/// It is the minor number of the mount's anonymous device, read from
/// `/proc/self/mountinfo` rather than by `stat`, which would send the server a
/// GETATTR and hang if it is not answering. `mountpoint` must be absolute and
/// spelled as in mountinfo (no symlinks, no trailing `/`); if several mounts are
/// stacked there, the top one counts. Fails with `NotFound` if no FUSE
/// filesystem is mounted there.
pub fn connection_id(mountpoint: &Path) -> io::Result<u32> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    connection_id_in(&mountinfo, mountpoint).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no FUSE filesystem mounted at {}", mountpoint.display()),
        )
    })
}

/// [`connection_id`] over the text of a mountinfo file.
fn connection_id_in(mountinfo: &str, mountpoint: &Path) -> Option<u32> {
    let want = mountpoint.as_os_str().as_bytes();
    let mut found = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source super
        let mut fields = line.split(' ');
        let dev = fields.nth(2)?;
        let point = fields.nth(1)?;
        let Some((_, after)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = after.split(' ').next().unwrap_or("");
        let is_fuse = fstype == "fuse" || fstype.starts_with("fuse.") || fstype == "fuseblk";
        if !is_fuse || unescape(point) != want {
            continue;
        }
        let (_, minor) = dev.split_once(':')?;
        // Later lines are mounted on top of earlier ones.
        found = minor.parse().ok().or(found);
    }
    found
}

/// Undoes mountinfo's octal escapes (`\040` for space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// False if berth-ebpf was built without clang: [`FuseWatch::load`] then
/// always fails with [`Error::NotBuilt`].
pub fn programs_built() -> bool {
    watch::programs_built()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{connection_id_in, unescape};

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
45 22 0:44 / /mnt/a rw,nosuid,nodev shared:30 - fuse.berth berth rw,user_id=0,group_id=0
46 22 0:45 / /mnt/with\\040space rw - fuse s3 rw
47 45 0:46 / /mnt/a rw - fuse.berth berth rw
48 22 0:47 / /mnt/tmp rw - tmpfs tmpfs rw
";

    #[test]
    fn finds_fuse_connection_ids() {
        assert_eq!(
            connection_id_in(MOUNTINFO, Path::new("/mnt/with space")),
            Some(45)
        );
        // Stacked mounts: the top (last) one wins.
        assert_eq!(connection_id_in(MOUNTINFO, Path::new("/mnt/a")), Some(46));
        // Not FUSE, or not mounted.
        assert_eq!(connection_id_in(MOUNTINFO, Path::new("/mnt/tmp")), None);
        assert_eq!(connection_id_in(MOUNTINFO, Path::new("/mnt/b")), None);
        assert_eq!(connection_id_in(MOUNTINFO, Path::new("/")), None);
    }

    #[test]
    fn unescapes_mountinfo_octal() {
        assert_eq!(unescape("a\\040b\\134c"), b"a b\\c");
        assert_eq!(unescape("trailing\\04"), b"trailing\\04");
        assert_eq!(unescape("\\999"), b"\\999");
    }

    #[test]
    fn watch_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<super::FuseWatch>();
    }
}
