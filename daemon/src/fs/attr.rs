//! File attributes as the kernel sees them: what an object stores (s3fs's `mode`, `uid`,
//! `gid`, `mtime` user metadata, see `store::meta`), else the mount's configuration.
//!
//! The type comes from the namespace (a directory is a key prefix) and, for a file object,
//! from its stored mode: `S_IFLNK` makes it a symbolic link whose target is its body. No
//! other type is ever shown, whatever a bucket says.

use std::time::UNIX_EPOCH;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64};

use crate::namespace::{Kind, Node};
use crate::store::meta::{PosixMeta, StoredType};

/// Whether `node` is a symbolic link (a file object whose stored mode says so).
pub fn is_symlink(node: &Node) -> bool {
    node.kind == Kind::File
        && node
            .stat
            .meta
            .as_ref()
            .is_some_and(|m| m.stored_type() == StoredType::Symlink)
}

#[derive(Clone, Debug)]
pub struct AttrConfig {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u32,
    pub dir_mode: u32,
    /// Show the four above whatever the objects store (types and times still count).
    pub ignore_stored: bool,
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
        let none = PosixMeta::default();
        let meta = node.stat.meta.as_ref().unwrap_or(&none);
        let owned = (!self.ignore_stored).then_some(meta);
        st.st_ino = node.ino;
        st.st_uid = owned.and_then(|m| m.uid).unwrap_or(self.uid);
        st.st_gid = owned.and_then(|m| m.gid).unwrap_or(self.gid);
        st.st_blksize = BLKSIZE;
        let perm = |default: u32| owned.and_then(|m| m.mode).unwrap_or(default) & 0o7777;
        match node.kind {
            Kind::Dir => {
                st.st_mode = libc::S_IFDIR | perm(self.dir_mode);
                st.st_nlink = 2;
                st.st_size = 4096;
            }
            Kind::File if is_symlink(node) => {
                // Links have no permissions of their own (the kernel ignores them).
                st.st_mode = libc::S_IFLNK | 0o777;
                st.st_nlink = 1;
                st.st_size = node.stat.size as i64;
            }
            Kind::File => {
                st.st_mode = libc::S_IFREG | perm(self.file_mode);
                st.st_nlink = 1;
                st.st_size = node.stat.size as i64;
                st.st_blocks = node.stat.size.div_ceil(512) as i64;
            }
        }
        let mtime = meta.mtime.unwrap_or(node.stat.mtime);
        let (secs, nsecs) = match mtime.duration_since(UNIX_EPOCH) {
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

/// The type a directory entry shows. A listed file whose attributes were not asked yet
/// might be a symbolic link: unknown (readers stat it), unless it is too large to be one.
pub fn dirent_type(node: &Node) -> u32 {
    match node.kind {
        Kind::Dir => libc::DT_DIR as u32,
        Kind::File if is_symlink(node) => libc::DT_LNK as u32,
        Kind::File if node.stat.meta.is_none() && node.stat.size <= MAX_LINK_TARGET => {
            libc::DT_UNKNOWN as u32
        }
        Kind::File => libc::DT_REG as u32,
    }
}

/// The longest target a symbolic link may have (PATH_MAX less its NUL).
pub const MAX_LINK_TARGET: u64 = libc::PATH_MAX as u64 - 1;

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
