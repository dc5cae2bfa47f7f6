//! POSIX metadata operations: chmod, chown and utimes (SETATTR), symbolic links (SYMLINK,
//! READLINK), and the attributes new files and directories start with.
//!
//! Attributes live on the objects (see `store::meta`). A file being written keeps them in its
//! upload and sends them with the object at commit, at no extra request; a stored object gets
//! them through a copy onto itself (`Namespace::change_meta`). A symbolic link is an object
//! whose body is the target and whose stored mode says `S_IFLNK`; berth never resolves one
//! (the reader's kernel does, in the reader's namespace).

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fuse_backend_rs::abi::fuse_abi::stat64;
use fuse_backend_rs::api::filesystem::{Context, Entry, SetattrValid};

use super::attr::{is_symlink, MAX_LINK_TARGET};
use super::handles::Handle;
use super::{errno, BerthFs};
use crate::namespace::{keys, store_error, Kind, Node, ObjectStat};
use crate::store::PosixMeta;

/// What one SETATTR changes in the stored attributes: the fields it sets, the others `None`
/// (applied with [`PosixMeta::overlay`]).
fn requested_change(node: &Node, attr: &stat64, valid: SetattrValid) -> PosixMeta {
    let type_bits = match node.kind {
        Kind::Dir => libc::S_IFDIR,
        Kind::File if is_symlink(node) => libc::S_IFLNK,
        Kind::File => libc::S_IFREG,
    };
    let mut change = PosixMeta::default();
    if valid.contains(SetattrValid::MODE) {
        change.mode = Some(type_bits | (attr.st_mode & 0o7777));
    }
    if valid.contains(SetattrValid::UID) {
        change.uid = Some(attr.st_uid);
    }
    if valid.contains(SetattrValid::GID) {
        change.gid = Some(attr.st_gid);
    }
    if valid.contains(SetattrValid::MTIME_NOW) {
        change.mtime = Some(SystemTime::now());
    } else if valid.contains(SetattrValid::MTIME) {
        change.mtime = Some(time_of(attr.st_mtime, attr.st_mtime_nsec));
    }
    change
}

/// A time from the kernel (times before 1970 are kept as the epoch).
fn time_of(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs).unwrap_or(0).min(999_999_999);
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH
            .checked_add(Duration::new(s, nanos))
            .unwrap_or(UNIX_EPOCH),
        Err(_) => UNIX_EPOCH,
    }
}

/// The attributes a new file, directory or link starts with: the mode asked for (less the
/// umask) and the caller as owner, as any filesystem.
pub(super) fn new_meta(ctx: &Context, type_bits: u32, mode: u32, umask: u32) -> PosixMeta {
    PosixMeta {
        mode: Some(type_bits | (mode & !umask & 0o7777)),
        uid: Some(ctx.uid),
        gid: Some(ctx.gid),
        mtime: None,
    }
}

impl BerthFs {
    /// chmod, chown and utimes of `node`. Access time is not kept (accepted, ignored).
    pub(super) fn set_attributes(
        &self,
        node: &Node,
        attr: &stat64,
        valid: SetattrValid,
    ) -> io::Result<Node> {
        let change = requested_change(node, attr, valid);
        if change.is_empty() {
            return Ok(node.clone());
        }
        if self.ns.is_pending(node.ino) {
            let ino = node.ino;
            // The handle whose upload writes the file now (an earlier one, committed by its
            // flush, may not be released yet).
            let upload = self.handles.find_where(|h| {
                matches!(h, Handle::Write { ino: i, upload }
                    if *i == ino && !self.ns.pending_elsewhere(ino, &upload.written()))
            });
            let Some(handle) = upload else {
                tracing::info!(path = %node.key, "refused: attributes of a file another client (VMM) is writing");
                return Err(errno(libc::EBUSY));
            };
            let Handle::Write { upload, .. } = &*handle else {
                return Err(errno(libc::EBADF));
            };
            if let Some(meta) = self.rt.block_on(upload.set_meta(|m| m.overlay(&change)))? {
                tracing::debug!(path = %node.key, ?meta, "attributes kept for the commit");
                self.ns.set_pending_meta(ino, meta);
                return self.ns.node(ino);
            }
            // Committed already (a flush): the stored object is changed.
        }
        let changed = self
            .rt
            .block_on(self.ns.change_meta(node.ino, |m| m.overlay(&change)))?;
        tracing::debug!(path = %node.key, meta = ?changed.stat.meta, "attributes stored");
        Ok(changed)
    }

    /// SYMLINK: a new object `parent/name` whose body is `target`.
    pub(super) fn make_symlink(
        &self,
        ctx: &Context,
        target: &[u8],
        parent: u64,
        name: &str,
    ) -> io::Result<Entry> {
        if target.is_empty() {
            return Err(errno(libc::ENOENT));
        }
        if target.len() as u64 > MAX_LINK_TARGET {
            return Err(errno(libc::ENAMETOOLONG));
        }
        if !keys::is_valid_name(name) {
            return Err(errno(libc::EINVAL));
        }
        match self.rt.block_on(self.ns.lookup(parent, name)) {
            Ok(_) => return Err(errno(libc::EEXIST)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let dir = self.ns.dir_node(parent)?;
        let key = format!("{}{name}", self.ns.dir_prefix(&dir));
        if self.ns.store().is_reserved(&key) {
            tracing::info!(key, "refused: the name is reserved by the store");
            return Err(errno(libc::EACCES));
        }
        let meta = new_meta(ctx, libc::S_IFLNK, 0o777, 0);
        let etag = self
            .rt
            .block_on(
                self.ns
                    .store()
                    .put(&key, Bytes::copy_from_slice(target), &meta),
            )
            .map_err(|e| store_error("symlink", &key, e))?;
        let stat = ObjectStat {
            size: target.len() as u64,
            mtime: SystemTime::now(),
            etag,
            meta: Some(meta),
        };
        let node = self.ns.add_file(parent, name, stat)?;
        tracing::debug!(key, "symbolic link stored");
        Ok(self.entry(&node))
    }

    /// READLINK: the target stored as the link's body, as it is (never resolved here).
    pub(super) fn read_symlink(&self, ino: u64) -> io::Result<Vec<u8>> {
        let node = self.rt.block_on(self.ns.getattr(ino))?;
        if !is_symlink(&node) {
            return Err(errno(libc::EINVAL));
        }
        let key = self.ns.object_key(&node);
        if node.stat.size > MAX_LINK_TARGET {
            tracing::warn!(
                key,
                size = node.stat.size,
                "a symbolic link's object is longer than any target can be; refused"
            );
            return Err(errno(libc::EIO));
        }
        let body = self
            .rt
            .block_on(
                self.ns
                    .store()
                    .get_range(&key, 0..node.stat.size, node.stat.etag.as_deref()),
            )
            .map_err(|e| store_error("readlink", &key, e))?;
        Ok(body.to_vec())
    }
}
