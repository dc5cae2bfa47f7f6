//! The filesystem both doors serve: the fuse-backend-rs `FileSystem` trait over the namespace,
//! the prefetching readers and the uploads.
//!
//! Requests arrive on FUSE worker threads and on virtio-fs queue threads and run their
//! store I/O on the engine's tokio runtime with `block_on`. Every operation object storage
//! cannot do well fails at once with a fixed errno and one log line naming it; see the
//! semantics table in the README.

mod attr;
mod data;
#[cfg(test)]
mod guest_tests;
mod handles;
mod meta;
#[cfg(test)]
mod read_tests;

use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, OpenOptions, SetattrValid, ZeroCopyReader,
    ZeroCopyWriter,
};

use crate::memory::MemoryLimiter;
use crate::namespace::{store_error, Kind, Namespace, Node};
use crate::prefetch::{Fetcher, ObjectReader};
use crate::store::MAX_COPY_SIZE;
use crate::upload::SpoolDir;
pub use attr::AttrConfig;

thread_local! {
    /// Set while a FUSE worker serves again a request a dead engine read and may have answered
    /// (a takeover without RESEND, from the request slots): what such a request finds gone
    /// may simply be done.
    static SERVING_AGAIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `serve` as the serving again of a request a dead engine read (see `SERVING_AGAIN`).
pub fn serve_again<T>(serve: impl FnOnce() -> T) -> T {
    SERVING_AGAIN.with(|c| c.set(true));
    let out = serve();
    SERVING_AGAIN.with(|c| c.set(false));
    out
}

fn serving_again() -> bool {
    SERVING_AGAIN.with(|c| c.get())
}
use handles::{Handle, HandleKind, HandleTable, FUSE_DOOR};

/// Most handles the FUSE door holds at once (the kernel's open files of every application).
const MAX_FUSE_HANDLES: usize = 1 << 20;
/// Most handles one virtio-fs connection holds at once (a guest's open files). A handle of a
/// local-directory store holds a file descriptor: well below the engine's fd limit, so that
/// a guest cannot starve the other doors of descriptors.
const MAX_GUEST_HANDLES: usize = 4096;
/// The largest READ or WRITE payload berth accepts (what it negotiates at FUSE INIT,
/// fuse-backend-rs's max_write and berth's max_read mount option): a guest asking for more
/// gets less (READ) or EINVAL (WRITE), before anything is fetched or allocated.
pub const MAX_IO: usize = 1 << 20;

/// Kernel cache lifetime standing in for "forever".
const INDEFINITE: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Clone, Debug)]
pub struct FsConfig {
    pub read_only: bool,
    pub part_size: usize,
    pub attr: AttrConfig,
}

/// One door of the filesystem: the FUSE door, or one virtio-fs connection. Doors share the
/// namespace, readers' fetcher, memory budget and settings; each has its own handles (see
/// [`BerthFs::door`]).
pub struct BerthFs {
    rt: tokio::runtime::Handle,
    ns: Arc<Namespace>,
    fetcher: Arc<Fetcher>,
    memory: Arc<MemoryLimiter>,
    config: FsConfig,
    /// Where files being written keep what an engine crash must not lose.
    spools: Arc<SpoolDir>,
    handles: HandleTable,
    generation: u64,
    /// The capability flags the kernel offered at FUSE INIT (0 until then).
    init_capable: AtomicU64,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Logs an operation berth refuses by design, and returns its errno.
fn unsupported(op: &str, what: &str, why: &str, code: i32) -> io::Error {
    tracing::info!(op, target_path = what, errno = code, "unsupported: {why}");
    errno(code)
}

/// A name from a request as one path component. Object keys are UTF-8, so a name that is
/// not cannot exist in the store. The kernel never sends `.`, `..`, empty names or names with
/// `/`, but a virtio-fs guest is untrusted and may: such a name would step outside its
/// directory, so it is refused before it reaches the namespace.
fn name_of(name: &CStr) -> io::Result<&str> {
    let name = name.to_str().map_err(|_| errno(libc::EINVAL))?;
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(errno(libc::EINVAL));
    }
    Ok(name)
}

impl BerthFs {
    pub fn new(
        rt: tokio::runtime::Handle,
        ns: Arc<Namespace>,
        fetcher: Arc<Fetcher>,
        memory: Arc<MemoryLimiter>,
        config: FsConfig,
        spools: Arc<SpoolDir>,
    ) -> BerthFs {
        BerthFs {
            rt,
            ns,
            fetcher,
            memory,
            config,
            spools,
            handles: HandleTable::new(1, FUSE_DOOR, MAX_FUSE_HANDLES),
            generation: 1,
            init_capable: AtomicU64::new(0),
        }
    }

    /// Serve as engine generation `generation` (a successor's handles never collide with the
    /// ones its predecessors gave the kernel).
    pub fn with_generation(mut self, generation: u64) -> BerthFs {
        self.handles = HandleTable::new(generation, FUSE_DOOR, MAX_FUSE_HANDLES);
        self.generation = generation;
        self
    }

    /// Another door onto the same filesystem, for virtio-fs connection `tag` (1..=255): same
    /// namespace and caches, its own handles and FUSE INIT. When it is dropped (the VMM left),
    /// the files it was writing are aborted, never committed half-written.
    pub fn door(&self, tag: u8) -> BerthFs {
        BerthFs {
            rt: self.rt.clone(),
            ns: self.ns.clone(),
            fetcher: self.fetcher.clone(),
            memory: self.memory.clone(),
            config: self.config.clone(),
            spools: self.spools.clone(),
            handles: HandleTable::new(self.generation, tag.max(1), MAX_GUEST_HANDLES),
            generation: self.generation,
            init_capable: AtomicU64::new(0),
        }
    }

    /// What the kernel offered at FUSE INIT, once it has been answered.
    pub fn init_capable(&self) -> Option<u64> {
        Some(self.init_capable.load(Ordering::Acquire)).filter(|&c| c != 0)
    }

    /// A successor never sees FUSE INIT (the kernel sends it once per connection): it is
    /// given the flags its predecessor saw and sets itself up as if it had answered.
    pub fn resume_init(&self, capable: u64) -> io::Result<()> {
        self.init(FsOptions::from_bits_truncate(capable))
            .map(|_| ())
    }

    /// Files open for writing (their data lives only in this engine until committed).
    pub fn open_writes(&self) -> usize {
        self.handles.count(|h| matches!(h, Handle::Write { .. }))
    }

    pub fn read_only(&self) -> bool {
        self.config.read_only
    }

    pub fn namespace(&self) -> &Arc<Namespace> {
        &self.ns
    }

    fn ttl(&self) -> Duration {
        self.ns.ttl().unwrap_or(INDEFINITE)
    }

    fn add_handle(&self, handle: Handle) -> io::Result<u64> {
        self.handles.add(handle)
    }

    /// The handle `fh` of node `ino`. A handle a predecessor engine gave the kernel is taken
    /// over on first use: reads and directory listings go on where they were, and so does a
    /// file being written (from its spool, see [`crate::upload`]).
    fn handle(&self, ino: u64, fh: u64) -> io::Result<Arc<Handle>> {
        if let Some(h) = self.handles.get(fh, ino) {
            if let Handle::Write { upload, .. } = &*h {
                upload.claim();
            }
            return Ok(h);
        }
        let Some(kind) = self.handles.predecessors(fh) else {
            return Err(errno(libc::EBADF));
        };
        let adopted = match kind {
            HandleKind::Read => Handle::Read {
                ino,
                reader: self.reader_for(ino)?,
            },
            HandleKind::Dir => Handle::Dir {
                ino,
                stream: Mutex::new(self.ns.open_dir(ino)?),
            },
            HandleKind::Write => {
                let h = self.adopt_write(fh, Some(ino))?;
                if let Handle::Write { upload, .. } = &*h {
                    upload.claim();
                }
                return Ok(h);
            }
        };
        tracing::debug!(ino, fh, ?kind, "took over a handle of an earlier engine");
        self.handles.adopt(fh, adopted)
    }

    fn entry(&self, node: &Node) -> Entry {
        // A file being written changes size with every write: let the kernel ask each time.
        let ttl = if self.ns.is_pending(node.ino) {
            Duration::ZERO
        } else {
            self.ttl()
        };
        Entry {
            inode: node.ino,
            generation: 0,
            attr: self.config.attr.stat(node),
            attr_flags: 0,
            attr_timeout: ttl,
            entry_timeout: ttl,
        }
    }

    /// An entry without a node (inode 0): a negative lookup the kernel may cache for `ttl`,
    /// or a READDIRPLUS entry whose attributes the kernel must look up itself.
    fn no_entry(&self, ttl: Duration) -> Entry {
        Entry {
            inode: 0,
            generation: 0,
            attr: self.config.attr.empty(),
            attr_flags: 0,
            attr_timeout: ttl,
            entry_timeout: ttl,
        }
    }

    fn read_only_guard(&self, op: &str) -> io::Result<()> {
        if self.config.read_only {
            tracing::debug!(op, "refused: mounted read-only");
            return Err(errno(libc::EROFS));
        }
        Ok(())
    }

    fn readdir_with(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut emit: impl FnMut(&crate::namespace::DirItem, u64) -> io::Result<usize>,
    ) -> io::Result<()> {
        let handle = self.handle(ino, fh)?;
        let Handle::Dir { stream, .. } = &*handle else {
            return Err(errno(libc::EBADF));
        };
        let mut stream = stream.lock().unwrap_or_else(|e| e.into_inner());
        self.rt.block_on(async {
            stream.seek(&self.ns, offset).await?;
            loop {
                let next_offset = stream.position() + 1;
                let Some(item) = stream.peek(&self.ns).await? else {
                    return Ok(());
                };
                if emit(item, next_offset)? == 0 {
                    return Ok(()); // the kernel's buffer is full; this entry comes next time
                }
                stream.advance();
            }
        })
    }
}

impl Drop for BerthFs {
    /// A virtio-fs door goes when its VMM leaves: what it was writing is aborted and no
    /// longer busy for the other doors. (The FUSE door is shut down by its engine.)
    fn drop(&mut self) {
        if !self.handles.is_fuse_door() {
            self.shutdown();
        }
    }
}

impl FileSystem for BerthFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let want = FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::ATOMIC_O_TRUNC
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::AUTO_INVAL_DATA;
        tracing::debug!(?capable, "FUSE INIT");
        // The first INIT is the FUSE kernel's (or the predecessor's, via `resume_init`): a
        // successor needs exactly those flags. A virtio-fs guest of the same volume (a share
        // served by this engine) sends its own INIT later; it must not replace them.
        let _ = self.init_capable.compare_exchange(
            0,
            capable.bits(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        Ok(capable & want)
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let name = name_of(name)?;
        match self.rt.block_on(self.ns.lookup(parent, name)) {
            Ok(node) => Ok(self.entry(&node)),
            // A negative entry the kernel may cache for the metadata TTL.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(self.no_entry(self.ttl())),
            Err(e) => Err(e),
        }
    }

    fn forget(&self, _ctx: &Context, _inode: u64, _count: u64) {
        // Inode numbers stay valid for the life of the mount, so nothing is dropped.
    }

    fn batch_forget(&self, _ctx: &Context, _requests: Vec<(u64, u64)>) {}

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let node = self.rt.block_on(self.ns.getattr(inode))?;
        let entry = self.entry(&node);
        Ok((entry.attr, entry.attr_timeout))
    }

    fn setattr(
        &self,
        _ctx: &Context,
        inode: u64,
        attr: stat64,
        _handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.read_only_guard("setattr")?;
        let node = self.rt.block_on(self.ns.getattr(inode))?;
        if valid.contains(SetattrValid::SIZE) && attr.st_size as u64 != node.stat.size {
            return Err(unsupported(
                "truncate",
                &node.key,
                "objects cannot be resized in place; open with O_TRUNC to replace one",
                libc::EOPNOTSUPP,
            ));
        }
        let node = self.set_attributes(&node, &attr, valid)?;
        let entry = self.entry(&node);
        Ok((entry.attr, entry.attr_timeout))
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.read_only_guard("symlink")?;
        let name = name_of(name)?;
        self.make_symlink(ctx, linkname.to_bytes(), parent, name)
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.read_symlink(inode)
    }

    fn mknod(
        &self,
        _ctx: &Context,
        _parent: u64,
        name: &CStr,
        _mode: u32,
        _rdev: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        self.read_only_guard("mknod")?;
        Err(unsupported(
            "mknod",
            &name.to_string_lossy(),
            "only regular files, directories and symbolic links exist in object storage",
            libc::EPERM,
        ))
    }

    fn link(
        &self,
        _ctx: &Context,
        _inode: u64,
        _newparent: u64,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.read_only_guard("link")?;
        Err(unsupported(
            "link",
            &newname.to_string_lossy(),
            "hard links cannot be stored as objects",
            libc::EPERM,
        ))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.read_only_guard("mkdir")?;
        let name = name_of(name)?;
        let dir = self.ns.dir_node(parent)?;
        let marker = format!("{}{name}/", self.ns.dir_prefix(&dir));
        let meta = meta::new_meta(ctx, libc::S_IFDIR, mode, umask);
        self.rt
            .block_on(self.ns.store().put(&marker, bytes::Bytes::new(), &meta))
            .map_err(|e| store_error("mkdir", &marker, e))?;
        let node = self.ns.add_dir(parent, name, meta)?;
        Ok(self.entry(&node))
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.read_only_guard("unlink")?;
        let name = name_of(name)?;
        let node = self.rt.block_on(self.ns.lookup(parent, name))?;
        if node.kind == Kind::Dir {
            return Err(errno(libc::EISDIR));
        }
        if self.ns.is_pending(node.ino) {
            return Err(errno(libc::EBUSY));
        }
        let key = self.ns.object_key(&node);
        self.rt
            .block_on(self.ns.store().delete(&key))
            .map_err(|e| store_error("delete", &key, e))?;
        self.ns.invalidate(node.ino);
        Ok(())
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.read_only_guard("rmdir")?;
        let name = name_of(name)?;
        // A directory the kernel knows may have been implicit and vanished from the store with
        // its last file; removing it then is a no-op that succeeds.
        let node = match self.ns.child(parent, name) {
            Some(node) if node.kind == Kind::Dir => node,
            _ => self.rt.block_on(self.ns.lookup(parent, name))?,
        };
        if node.kind != Kind::Dir {
            return Err(errno(libc::ENOTDIR));
        }
        let prefix = self.ns.dir_prefix(&node);
        // Two keys tell "only the marker" from "marker and something else".
        let page = self
            .rt
            .block_on(self.ns.store().list(&prefix, None, 2))
            .map_err(|e| store_error("list", &prefix, e))?;
        let has_children =
            !page.prefixes.is_empty() || page.objects.iter().any(|o| o.key != prefix);
        let has_local = !self.ns.files_being_written_in(node.ino).is_empty();
        if has_children || has_local {
            return Err(errno(libc::ENOTEMPTY));
        }
        self.rt
            .block_on(self.ns.store().delete(&prefix))
            .map_err(|e| store_error("rmdir", &prefix, e))?;
        self.ns.invalidate(node.ino);
        Ok(())
    }

    fn rename(
        &self,
        _ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.read_only_guard("rename")?;
        let (oldname, newname) = (name_of(oldname)?, name_of(newname)?);
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(unsupported(
                "rename",
                oldname,
                "RENAME_EXCHANGE and RENAME_WHITEOUT need atomic renames",
                libc::EINVAL,
            ));
        }
        let node = self.rt.block_on(self.ns.lookup(olddir, oldname))?;
        if node.kind == Kind::Dir {
            return Err(unsupported(
                "rename",
                &node.key,
                "renaming a directory means copying every object below it",
                libc::EOPNOTSUPP,
            ));
        }
        if self.ns.is_pending(node.ino) {
            return Err(errno(libc::EBUSY));
        }
        if node.stat.size > MAX_COPY_SIZE {
            return Err(unsupported(
                "rename",
                &node.key,
                "objects over 5 GiB cannot be copied in one request",
                libc::EOPNOTSUPP,
            ));
        }
        match self.rt.block_on(self.ns.lookup(newdir, newname)) {
            Ok(target) if target.kind == Kind::Dir => return Err(errno(libc::EISDIR)),
            Ok(target) if self.ns.is_pending(target.ino) => return Err(errno(libc::EBUSY)),
            Ok(_) if flags & libc::RENAME_NOREPLACE != 0 => return Err(errno(libc::EEXIST)),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let target_dir = self.ns.dir_node(newdir)?;
        let from = self.ns.object_key(&node);
        let to = format!("{}{newname}", self.ns.dir_prefix(&target_dir));
        if from == to {
            // rename(2) onto itself does nothing (a copy then a delete would lose the file).
            return Ok(());
        }
        // Not atomic: copy, then delete. A crash in between leaves both names, never neither.
        self.rt
            .block_on(self.ns.store().copy(&from, &to))
            .map_err(|e| store_error("copy", &from, e))?;
        self.rt
            .block_on(self.ns.store().delete(&from))
            .map_err(|e| store_error("delete", &from, e))?;
        if let Some(replaced) = self.ns.child(newdir, newname) {
            self.ns.invalidate(replaced.ino);
        }
        self.ns.rename(node.ino, newdir, newname)?;
        tracing::debug!(from, to, "renamed by copy and delete");
        Ok(())
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let node = self.rt.block_on(self.ns.getattr(inode))?;
        if node.kind == Kind::Dir {
            return Err(errno(libc::EISDIR));
        }
        if flags as i32 & libc::O_ACCMODE != libc::O_RDONLY {
            self.drop_orphan_write(inode);
        }
        if self.ns.is_pending(inode) {
            tracing::info!(path = %node.key, "refused: file is being written by another handle");
            return Err(errno(libc::EBUSY));
        }
        let flags = flags as i32;
        let access = flags & libc::O_ACCMODE;
        if access != libc::O_RDONLY {
            self.read_only_guard("open for write")?;
            if flags & libc::O_TRUNC != 0 {
                let key = self.ns.object_key(&node);
                // Truncating keeps the file's owner and mode.
                let meta = node.stat.meta.clone().unwrap_or_default();
                let (_, fh) = self.open_upload(node.parent, &node.name, key, meta)?;
                return Ok((Some(fh), OpenOptions::empty(), None));
            }
            // O_APPEND, or write-only without O_TRUNC: writes go on at the object's end.
            if flags & libc::O_APPEND != 0 || access == libc::O_WRONLY {
                let key = self.ns.object_key(&node);
                let fh = self.open_append(node.parent, &node.name, key)?;
                return Ok((Some(fh), OpenOptions::empty(), None));
            }
            // O_RDWR without O_TRUNC: reads work, writes are refused one by one.
        }
        let key = self.ns.object_key(&node);
        let reader = ObjectReader::new(
            self.fetcher.clone(),
            &key,
            node.stat.etag.as_deref(),
            node.stat.size,
        );
        let fh = self.add_handle(Handle::Read { ino: inode, reader })?;
        let opts = if self.ns.ttl().is_none() {
            OpenOptions::KEEP_CACHE
        } else {
            OpenOptions::empty()
        };
        Ok((Some(fh), opts, None))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.read_only_guard("create")?;
        let name = name_of(name)?;
        let flags = args.flags as i32;
        // The kernel sends CREATE while its negative dentry is cached (for the metadata
        // TTL): another client may have made the object since. Without O_TRUNC a create
        // must not replace it: ask the store, and open what is there.
        if flags & libc::O_TRUNC == 0 || flags & libc::O_EXCL != 0 {
            match self.rt.block_on(self.ns.lookup(parent, name)) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(errno(libc::EEXIST)),
                Ok(node) if node.kind == Kind::Dir => return Err(errno(libc::EISDIR)),
                Ok(node) => {
                    tracing::debug!(path = %node.key, "create of an object that exists: opened");
                    let (fh, opts, _) = self.open(ctx, node.ino, args.flags, args.fuse_flags)?;
                    return Ok((self.entry(&node), fh, opts, None));
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        let dir = self.ns.dir_node(parent)?;
        let key = format!("{}{name}", self.ns.dir_prefix(&dir));
        let meta = meta::new_meta(ctx, libc::S_IFREG, args.mode, args.umask);
        let (node, fh) = self.open_upload(parent, name, key, meta)?;
        Ok((self.entry(&node), Some(fh), OpenOptions::empty(), None))
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let handle = self.handle(inode, handle)?;
        self.read_handle(&handle, w, size, offset)
    }

    fn write(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<usize> {
        let handle = self.handle(inode, handle)?;
        self.write_handle(&handle, r, size, offset)
    }

    fn flush(&self, _ctx: &Context, inode: u64, handle: u64, _lock_owner: u64) -> io::Result<()> {
        let handle = self.handle(inode, handle)?;
        if let Handle::Write { ino, upload } = &*handle {
            // Commit on close, so the object is in the store when close() returns. A flush
            // with nothing written may come before the writes (a shell closing the original
            // fd after dup2); the empty object it commits is replaced by the writes that follow.
            return self.commit(*ino, upload);
        }
        Ok(())
    }

    fn fsync(&self, _ctx: &Context, inode: u64, _datasync: bool, handle: u64) -> io::Result<()> {
        let handle = self.handle(inode, handle)?;
        if let Handle::Write { ino, upload } = &*handle {
            return self.commit(*ino, upload);
        }
        Ok(())
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _mode: u32,
        _offset: u64,
        _length: u64,
    ) -> io::Result<()> {
        Err(unsupported(
            "fallocate",
            "",
            "objects cannot be preallocated",
            libc::EOPNOTSUPP,
        ))
    }

    fn release(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let mut removed = self.handles.remove(handle, inode);
        if removed.is_none() && self.handles.predecessors(handle) == Some(HandleKind::Write) {
            if !self.spools.has(handle) {
                // Released already: the predecessor removed the spool and died before its
                // reply; this is the resent RELEASE. Nothing is left to do.
                tracing::debug!(
                    inode,
                    handle,
                    "release of a write handle a dead engine had released already"
                );
                return Ok(());
            }
            // A predecessor's file being written, closed before this engine saw it.
            removed = self
                .adopt_write(handle, Some(inode))
                .ok()
                .and_then(|_| self.handles.remove(handle, inode));
        }
        if let Some(handle) = removed {
            if let Handle::Write { ino, upload } = &*handle {
                // Errors here reach no application (close has returned); commit logs them.
                let _ = self.commit(*ino, upload);
                self.rt.block_on(upload.release());
            }
        }
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        Ok(attr::statfs())
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let stream = self.ns.open_dir(inode)?;
        let fh = self.add_handle(Handle::Dir {
            ino: inode,
            stream: Mutex::new(stream),
        })?;
        Ok((Some(fh), OpenOptions::empty()))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.readdir_with(inode, handle, offset, |item, next| {
            add_entry(DirEntry {
                ino: item.node.ino,
                offset: next,
                type_: attr::dirent_type(&item.node),
                name: item.name.as_bytes(),
            })
        })
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.readdir_with(inode, handle, offset, |item, next| {
            // Attributes not asked yet (a listing has none): no entry, so the kernel looks the
            // name up when it needs them, and the lookup asks the store.
            let entry = if item.node.stat.meta.is_some() || self.ns.is_pending(item.node.ino) {
                self.entry(&item.node)
            } else {
                self.no_entry(Duration::ZERO)
            };
            add_entry(
                DirEntry {
                    ino: item.node.ino,
                    offset: next,
                    type_: attr::dirent_type(&item.node),
                    name: item.name.as_bytes(),
                },
                entry,
            )
        })
    }

    fn releasedir(&self, _ctx: &Context, inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.handles.remove(handle, inode);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    #[test]
    fn names_are_single_components() {
        let ok = |n: &[u8]| name_of(&CString::new(n).unwrap()).is_ok();
        assert!(ok(b"file.txt"));
        assert!(ok(b"..hidden"));
        assert!(ok(b"a.b"));
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"../x", b"\xff\xfe"] {
            assert!(!ok(bad), "{:?} accepted", String::from_utf8_lossy(bad));
        }
    }
}
