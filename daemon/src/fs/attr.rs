//! File attributes as the kernel sees them. Objects have no owner or mode of their own, so
//! both come from the mount's configuration.

use std::time::UNIX_EPOCH;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64};

use crate::namespace::{Kind, Node};

#[derive(Clone, Debug)]
pub struct AttrConfig {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u32,
    pub dir_mode: u32,
}

/// Preferred I/O size reported to applications (cp, stdio buffer sizes follow it).
const BLKSIZE: i64 = 1 << 20;

fn zeroed_stat() -> stat64 {
    // SAFETY: stat64 is a plain C struct of integers (with private padding fields, so it cannot
    // be built with a literal); all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

impl AttrConfig {
    pub fn stat(&self, node: &Node) -> stat64 {
        let mut st = zeroed_stat();
        st.st_ino = node.ino;
        st.st_uid = self.uid;
        st.st_gid = self.gid;
        st.st_blksize = BLKSIZE;
        match node.kind {
            Kind::Dir => {
                st.st_mode = libc::S_IFDIR | (self.dir_mode & 0o7777);
                st.st_nlink = 2;
                st.st_size = 4096;
            }
            Kind::File => {
                st.st_mode = libc::S_IFREG | (self.file_mode & 0o7777);
                st.st_nlink = 1;
                st.st_size = node.stat.size as i64;
                st.st_blocks = node.stat.size.div_ceil(512) as i64;
            }
        }
        let (secs, nsecs) = match node.stat.mtime.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(_) => (0, 0),
        };
        st.st_mtime = secs;
        st.st_mtime_nsec = nsecs;
        st.st_ctime = secs;
        st.st_ctime_nsec = nsecs;
        st.st_atime = secs;
        st.st_atime_nsec = nsecs;
        st
    }

    /// Attributes of a negative lookup entry (ignored by the kernel, but must be valid).
    pub fn empty(&self) -> stat64 {
        zeroed_stat()
    }
}

pub fn dirent_type(kind: Kind) -> u32 {
    match kind {
        Kind::Dir => libc::DT_DIR as u32,
        Kind::File => libc::DT_REG as u32,
    }
}

/// Object storage has no fixed capacity: report a large, mostly free filesystem so that tools
/// which check free space before writing go ahead.
pub fn statfs() -> statvfs64 {
    // SAFETY: statvfs64 is a plain C struct of integers; all-zero is a valid value.
    let mut st: statvfs64 = unsafe { std::mem::zeroed() };
    st.f_bsize = 4096;
    st.f_frsize = 4096;
    st.f_blocks = 1 << 40;
    st.f_bfree = 1 << 40;
    st.f_bavail = 1 << 40;
    st.f_files = 1 << 32;
    st.f_ffree = 1 << 32;
    st.f_favail = 1 << 32;
    st.f_namemax = crate::namespace::keys::NAME_MAX as u64;
    st
}
