//! The namespace: object keys seen as a tree of directories and files.
//!
//! Keys map to paths under the mount prefix; `/` makes directories, both implicit (a key below
//! them exists) and explicit (a `dir/` marker object). A directory shadows a file of the same
//! name. What the store said is cached on each inode for the metadata TTL (forever in read-only
//! dataset mode); files being written exist locally until their upload commits.

mod inodes;
pub mod keys;
mod listing;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use inodes::{ChildUpdate, InodeTable, Kind, Node, ObjectStat, ROOT_INO};
use listing::{Listed, ListingMerger};

use crate::store::{ObjectInfo, ObjectStore, PosixMeta, StoreError};

/// Keys asked for per LIST call.
const LIST_PAGE: usize = 1000;

pub struct Namespace {
    store: Arc<dyn ObjectStore>,
    /// Mount prefix in the bucket: `""` or ending in `/`.
    prefix: String,
    /// `None`: cache forever (read-only datasets).
    ttl: Option<Duration>,
    table: InodeTable,
    /// Files being written: inode -> bytes written so far.
    pending: Mutex<HashMap<u64, Arc<AtomicU64>>>,
    skipped_keys: AtomicU64,
}

/// Logs a store error with its context and turns it into the errno the caller sees.
/// An object's stat as the store reported it.
impl From<ObjectInfo> for ObjectStat {
    fn from(info: ObjectInfo) -> ObjectStat {
        ObjectStat {
            size: info.size,
            mtime: info.last_modified,
            etag: info.etag,
            meta: info.meta,
        }
    }
}

pub fn store_error(op: &str, key: &str, e: StoreError) -> io::Error {
    match e {
        StoreError::NotFound => {}
        _ => tracing::warn!(op, key, error = %e, "store request failed"),
    }
    io::Error::from_raw_os_error(e.errno())
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl Namespace {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: String,
        ttl: Option<Duration>,
        journal: Option<&Path>,
    ) -> io::Result<Namespace> {
        Ok(Namespace {
            store,
            prefix,
            ttl,
            table: InodeTable::create(journal, SystemTime::now())?,
            pending: Mutex::new(HashMap::new()),
            skipped_keys: AtomicU64::new(0),
        })
    }

    /// The namespace a previous engine journaled at `journal`: same inode numbers for the
    /// same paths, so node ids the kernel holds stay valid. Returns the records replayed.
    pub fn recover(
        store: Arc<dyn ObjectStore>,
        prefix: String,
        ttl: Option<Duration>,
        journal: &Path,
    ) -> io::Result<(Namespace, usize)> {
        let (table, replayed) = InodeTable::recover(journal, SystemTime::now())?;
        Ok((
            Namespace {
                store,
                prefix,
                ttl,
                table,
                pending: Mutex::new(HashMap::new()),
                skipped_keys: AtomicU64::new(0),
            },
            replayed,
        ))
    }

    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Keys skipped so far in listings: those that cannot be paths, and entries the store
    /// does not serve (a local directory's symlinks, FIFOs, sockets and device nodes).
    pub fn skipped_keys(&self) -> u64 {
        self.skipped_keys.load(Ordering::Relaxed)
    }

    /// The store key of a file node.
    pub fn object_key(&self, node: &Node) -> String {
        format!("{}{}", self.prefix, node.key)
    }

    /// The store prefix listing a directory node's children.
    pub fn dir_prefix(&self, node: &Node) -> String {
        if node.key.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}{}/", self.prefix, node.key)
        }
    }

    pub fn node(&self, ino: u64) -> io::Result<Node> {
        // An id the kernel holds but this table never issued: ESTALE, never ENOENT.
        self.table.get(ino).ok_or_else(|| errno(libc::ESTALE))
    }

    /// Node `ino`, which must be a directory (ENOTDIR otherwise).
    pub fn dir_node(&self, ino: u64) -> io::Result<Node> {
        let node = self.node(ino)?;
        match node.kind {
            Kind::Dir => Ok(node),
            Kind::File => Err(errno(libc::ENOTDIR)),
        }
    }

    fn is_fresh(&self, node: &Node) -> bool {
        match (node.validated, self.ttl) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(at), Some(ttl)) => at.elapsed() < ttl,
        }
    }

    fn with_pending_size(&self, mut node: Node) -> Node {
        if let Some(written) = self.pending_lock().get(&node.ino) {
            node.stat.size = written.load(Ordering::Acquire);
        }
        node
    }

    fn pending_lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<AtomicU64>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_pending(&self, ino: u64) -> bool {
        self.pending_lock().contains_key(&ino)
    }

    /// Finds `name` in `parent`: local files being written, then the cache, then the store
    /// (HEAD of the key and LIST of `key/` at once; a directory wins over a file).
    pub async fn lookup(&self, parent: u64, name: &str) -> io::Result<Node> {
        let dir = self.dir_node(parent)?;
        if !keys::is_valid_name(name) {
            return Err(errno(libc::ENOENT));
        }
        if let Some(node) = self.table.child(parent, name) {
            if self.is_pending(node.ino) {
                return Ok(self.with_pending_size(node));
            }
            if self.is_fresh(&node) {
                if node.stat.meta.is_some() {
                    return Ok(node);
                }
                // Listed, its attributes (and whether it is a symbolic link) not asked yet.
                return self.refresh(node).await;
            }
        }
        let key = keys::join(&dir.key, name);
        let object_key = format!("{}{}", self.prefix, key);
        if self.store.is_reserved(&object_key) {
            return Err(errno(libc::ENOENT));
        }
        let dir_prefix = format!("{object_key}/");
        let (head, list) = tokio::join!(
            self.store.head(&object_key),
            self.store.list(&dir_prefix, None, 1)
        );
        let list = list.map_err(|e| store_error("list", &dir_prefix, e))?;
        let update = if !list.objects.is_empty() || !list.prefixes.is_empty() {
            ChildUpdate {
                name: name.to_string(),
                kind: Kind::Dir,
                stat: self.marker_stat(&dir_prefix).await?,
            }
        } else {
            let info = head.map_err(|e| store_error("head", &object_key, e))?;
            ChildUpdate {
                name: name.to_string(),
                kind: Kind::File,
                stat: info.into(),
            }
        };
        self.record(parent, update)
    }

    /// A directory's stat from its marker object (`prefix`, ending in `/`): the attributes
    /// stored there, or none if there is no marker (an implicit directory).
    async fn marker_stat(&self, marker: &str) -> io::Result<ObjectStat> {
        if marker.is_empty() {
            // The bucket's root has no marker.
            return Ok(ObjectStat::empty(SystemTime::now()));
        }
        match self.store.head(marker).await {
            Ok(info) => Ok(ObjectStat::from(info)),
            Err(StoreError::NotFound) => Ok(ObjectStat::empty(SystemTime::now())),
            Err(e) => Err(store_error("head", marker, e)),
        }
    }

    /// `node` with what the store says now of its object (a file's HEAD, a directory's
    /// marker); a file that is gone is ENOENT.
    async fn refresh(&self, node: Node) -> io::Result<Node> {
        let stat = match node.kind {
            Kind::Dir => self.marker_stat(&self.dir_prefix(&node)).await?,
            Kind::File => {
                let key = self.object_key(&node);
                match self.store.head(&key).await {
                    Ok(info) => ObjectStat::from(info),
                    // Credentials that may list but not read (a volume served from a node
                    // cache): what the listing said, without stored attributes.
                    Err(StoreError::AccessDenied(_)) if node.validated.is_some() => {
                        tracing::debug!(key, "HEAD refused; the listing's attributes stand");
                        ObjectStat {
                            meta: Some(PosixMeta::default()),
                            ..node.stat.clone()
                        }
                    }
                    Err(e) => {
                        if matches!(e, StoreError::NotFound) {
                            self.table.invalidate(node.ino);
                        }
                        return Err(store_error("head", &key, e));
                    }
                }
            }
        };
        self.table.set_stat(node.ino, stat);
        self.node(node.ino)
    }

    /// Changes the stored POSIX attributes of `ino`, a file not being written or a
    /// directory: `change` is applied to what the object carries, and the object rewritten
    /// with them (a copy onto itself, conditional on its ETag: asked again and retried once
    /// if another client changed it meanwhile). A directory's go on its marker, made if
    /// missing; the root of a mount of a whole bucket keeps them in memory only.
    pub async fn change_meta(&self, ino: u64, change: impl Fn(&mut PosixMeta)) -> io::Result<Node> {
        let node = self.node(ino)?;
        if node.kind == Kind::Dir {
            return self.change_dir_meta(node, change).await;
        }
        let key = self.object_key(&node);
        // Asked afresh: the ETag does not change with the attributes (the bytes stay), so a
        // cached copy could undo another client's change.
        let mut stat = self.refresh(node.clone()).await?.stat;
        for attempt in 0..2 {
            let mut meta = stat.meta.clone().unwrap_or_default();
            change(&mut meta);
            match self
                .store
                .set_meta(&key, stat.etag.as_deref(), stat.size, &meta)
                .await
            {
                Ok(etag) => {
                    if etag.is_some() {
                        stat.etag = etag;
                    }
                    stat.meta = Some(meta);
                    self.table.set_stat(ino, stat);
                    return self.node(ino);
                }
                Err(StoreError::Changed) if attempt == 0 => {
                    tracing::debug!(
                        key,
                        "object changed since last asked; attributes set on what is there now"
                    );
                    stat = self.refresh(node.clone()).await?.stat;
                }
                Err(e) => return Err(store_error("set attributes", &key, e)),
            }
        }
        tracing::warn!(
            key,
            "object changed twice while its attributes were being set; refused"
        );
        Err(errno(libc::EIO))
    }

    async fn change_dir_meta(
        &self,
        node: Node,
        change: impl Fn(&mut PosixMeta),
    ) -> io::Result<Node> {
        let marker = self.dir_prefix(&node);
        if marker.is_empty() {
            // The root of a whole bucket has no object to keep them on: kept here, for the
            // life of this engine (so that `tar x` of an archive holding `./` succeeds).
            let mut meta = node.stat.meta.clone().unwrap_or_default();
            change(&mut meta);
            tracing::info!(?meta, "attributes of the root of a whole-bucket mount are kept in memory only (no marker object can hold them)");
            self.table.set_meta(node.ino, meta);
            return self.node(node.ino);
        }
        let mut stat = self.marker_stat(&marker).await?;
        let mut meta = stat.meta.clone().unwrap_or_default();
        change(&mut meta);
        // A marker is empty: written again with the attributes (some stores, SeaweedFS among
        // them, cannot copy a marker onto itself). One with a body is copied, conditionally.
        let result = match &stat.etag {
            Some(etag) if stat.size > 0 => {
                self.store
                    .set_meta(&marker, Some(etag), stat.size, &meta)
                    .await
            }
            _ => self.store.put(&marker, bytes::Bytes::new(), &meta).await,
        };
        let etag = result.map_err(|e| store_error("set attributes", &marker, e))?;
        stat.etag = etag.or(stat.etag);
        stat.meta = Some(meta);
        self.table.set_stat(node.ino, stat);
        self.node(node.ino)
    }

    /// The attributes of `ino`, a file being written, are now `meta` (kept by its upload until
    /// it commits).
    pub fn set_pending_meta(&self, ino: u64, meta: PosixMeta) {
        self.table.set_meta(ino, meta);
    }

    fn record(&self, parent: u64, update: ChildUpdate) -> io::Result<Node> {
        let mut nodes = self.table.upsert(parent, vec![update])?;
        nodes.pop().ok_or_else(|| errno(libc::EIO))
    }

    /// Attributes of `ino`, asking the store again once the TTL has passed.
    pub async fn getattr(&self, ino: u64) -> io::Result<Node> {
        let node = self.node(ino)?;
        if self.is_pending(ino) {
            return Ok(self.with_pending_size(node));
        }
        if node.kind == Kind::Dir {
            if node.stat.meta.is_some() {
                return Ok(node);
            }
            return self.refresh(node).await;
        }
        if self.is_fresh(&node) && node.stat.meta.is_some() {
            return Ok(node);
        }
        let key = self.object_key(&node);
        let info = self
            .store
            .head(&key)
            .await
            .map_err(|e| store_error("head", &key, e))?;
        let stat = ObjectStat::from(info);
        self.table.set_stat(ino, stat);
        self.node(ino)
    }

    /// Registers a file about to be written as `parent/name`; it is visible at once with the
    /// size written so far. Refuses a second writer of the same file (EBUSY).
    pub fn begin_write(
        &self,
        parent: u64,
        name: &str,
        written: Arc<AtomicU64>,
        meta: PosixMeta,
    ) -> io::Result<Node> {
        let dir = self.dir_node(parent)?;
        if !keys::is_valid_name(name) {
            return Err(errno(libc::EINVAL));
        }
        let object_key = format!("{}{}", self.prefix, keys::join(&dir.key, name));
        if self.store.is_reserved(&object_key) {
            tracing::info!(key = %object_key, "refused: the name is reserved by the store");
            return Err(errno(libc::EACCES));
        }
        if let Some(existing) = self.table.child(parent, name) {
            if existing.kind == Kind::Dir {
                return Err(errno(libc::EISDIR));
            }
            if self.is_pending(existing.ino) {
                return Err(errno(libc::EBUSY));
            }
        }
        let node = self.record(
            parent,
            ChildUpdate {
                name: name.to_string(),
                kind: Kind::File,
                stat: ObjectStat {
                    meta: Some(meta),
                    ..ObjectStat::empty(SystemTime::now())
                },
            },
        )?;
        self.pending_lock().insert(node.ino, written);
        Ok(node)
    }

    /// Whether `ino` is being written through another upload than the one counting `written`.
    pub fn pending_elsewhere(&self, ino: u64, written: &Arc<AtomicU64>) -> bool {
        self.pending_lock()
            .get(&ino)
            .is_some_and(|w| !Arc::ptr_eq(w, written))
    }

    /// A committed file is being written again (see `Upload::reopen_after_commit`).
    pub fn resume_write(&self, ino: u64, written: Arc<AtomicU64>) {
        self.pending_lock().insert(ino, written);
    }

    /// The write of `ino` ended: with the committed object's stat, or `None` if it failed.
    pub fn end_write(&self, ino: u64, committed: Option<ObjectStat>) {
        self.pending_lock().remove(&ino);
        match committed {
            Some(stat) => self.table.set_stat(ino, stat),
            None => self.table.invalidate(ino),
        }
    }

    /// A directory now exists (made by mkdir, its marker carrying `meta`).
    pub fn add_dir(&self, parent: u64, name: &str, meta: PosixMeta) -> io::Result<Node> {
        self.record(
            parent,
            ChildUpdate {
                name: name.to_string(),
                kind: Kind::Dir,
                stat: ObjectStat {
                    meta: Some(meta),
                    ..ObjectStat::empty(SystemTime::now())
                },
            },
        )
    }

    /// A file now exists in the store as `stat` says (a symbolic link made here).
    pub fn add_file(&self, parent: u64, name: &str, stat: ObjectStat) -> io::Result<Node> {
        self.record(
            parent,
            ChildUpdate {
                name: name.to_string(),
                kind: Kind::File,
                stat,
            },
        )
    }

    /// Something changed in the store under our feet (delete, rmdir): ask again next time.
    pub fn invalidate(&self, ino: u64) {
        self.table.invalidate(ino);
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<Node> {
        self.table.child(parent, name)
    }

    pub fn rename(&self, ino: u64, new_parent: u64, new_name: &str) -> io::Result<()> {
        self.table.rename(ino, new_parent, new_name)
    }

    pub fn inode_count(&self) -> usize {
        self.table.len()
    }

    /// Starts reading directory `ino` from the beginning.
    pub fn open_dir(&self, ino: u64) -> io::Result<DirStream> {
        let dir = self.dir_node(ino)?;
        let local = self.files_being_written_in(ino);
        let prefix = self.dir_prefix(&dir);
        Ok(DirStream::new(dir, prefix, local))
    }

    /// Files being written in directory `ino` (they exist only here until committed).
    pub fn files_being_written_in(&self, ino: u64) -> Vec<Node> {
        let pending = self.pending_lock();
        pending
            .keys()
            .filter_map(|&i| self.table.get(i))
            .filter(|n| n.parent == ino)
            .collect()
    }

    /// Fetches the next page of a directory listing into `stream`.
    async fn fill(&self, stream: &mut DirStream) -> io::Result<()> {
        let page = self
            .store
            .list(&stream.prefix, stream.token.as_deref(), LIST_PAGE)
            .await
            .map_err(|e| store_error("list", &stream.prefix, e))?;
        stream.token = page.next_token.clone();
        let mut listed = VecDeque::new();
        let skipped_before = stream.merger.skipped;
        // Entries the store itself left out (a local directory's symlinks and special files).
        let not_served = page.skipped;
        stream.merger.push_page(&stream.prefix, page, &mut listed);
        if stream.token.is_none() {
            stream.merger.finish(&mut listed);
            stream.done = true;
        }
        let odd = stream.merger.skipped - skipped_before;
        let skipped = odd + not_served;
        if skipped > 0 {
            let total = self.skipped_keys.fetch_add(skipped, Ordering::Relaxed) + skipped;
            if odd > 0 {
                tracing::warn!(
                    prefix = %stream.prefix,
                    skipped = odd,
                    total,
                    "skipped keys that cannot be paths (empty, '.', '..' or over-long components, NUL)"
                );
            }
            if not_served > 0 {
                tracing::info!(
                    prefix = %stream.prefix,
                    skipped = not_served,
                    total,
                    "skipped entries the store does not serve (symlinks, FIFOs, sockets, devices)"
                );
            }
        }
        let now = SystemTime::now();
        let updates: Vec<ChildUpdate> = listed
            .into_iter()
            .filter(|e| !stream.local_names.contains(&e.name))
            .map(|e| match e.what {
                Listed::Dir => ChildUpdate {
                    name: e.name,
                    kind: Kind::Dir,
                    stat: ObjectStat::unknown(now),
                },
                Listed::File(info) => ChildUpdate {
                    name: e.name,
                    kind: Kind::File,
                    stat: info.into(),
                },
            })
            .collect();
        let nodes = self.table.upsert(stream.dir.ino, updates)?;
        stream.ready.extend(nodes.into_iter().map(|n| DirItem {
            name: n.name.clone(),
            node: n,
        }));
        Ok(())
    }
}

/// One entry of a directory stream.
#[derive(Clone, Debug)]
pub struct DirItem {
    pub name: Arc<str>,
    pub node: Node,
}

/// A directory being read: at most one page of the listing in memory, whatever its size.
///
/// Entry `i` (0-based: `.`, `..`, files being written, then the listing) has offset `i + 1`.
/// Reading on from the last offset continues the listing; any other offset restarts it and
/// skips ahead, which is correct (listings are ordered) if slow, and rare.
pub struct DirStream {
    dir: Node,
    prefix: String,
    local: Vec<Node>,
    local_names: HashSet<String>,
    position: u64,
    ready: VecDeque<DirItem>,
    token: Option<String>,
    started: bool,
    done: bool,
    merger: ListingMerger,
}

impl DirStream {
    fn new(dir: Node, prefix: String, local: Vec<Node>) -> DirStream {
        let local_names = local.iter().map(|n| n.name.to_string()).collect();
        DirStream {
            dir,
            prefix,
            local,
            local_names,
            position: 0,
            ready: VecDeque::new(),
            token: None,
            started: false,
            done: false,
            merger: ListingMerger::default(),
        }
    }

    fn rewind(&mut self) {
        self.position = 0;
        self.ready.clear();
        self.token = None;
        self.started = false;
        self.done = false;
        self.merger = ListingMerger::default();
    }

    /// The offset the kernel passes to continue after the last entry returned.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Positions the stream at `offset`.
    pub async fn seek(&mut self, ns: &Namespace, offset: u64) -> io::Result<()> {
        if offset == self.position {
            return Ok(());
        }
        self.rewind();
        while self.position < offset {
            if self.peek(ns).await?.is_none() {
                break;
            }
            self.advance();
        }
        Ok(())
    }

    /// The next entry, fetching a page if needed; `None` at the end.
    pub async fn peek(&mut self, ns: &Namespace) -> io::Result<Option<&DirItem>> {
        if !self.started {
            self.started = true;
            let parent = ns.node(self.dir.parent)?;
            self.ready.push_back(DirItem {
                name: Arc::from("."),
                node: self.dir.clone(),
            });
            self.ready.push_back(DirItem {
                name: Arc::from(".."),
                node: parent,
            });
            for node in &self.local {
                self.ready.push_back(DirItem {
                    name: node.name.clone(),
                    node: ns.with_pending_size(node.clone()),
                });
            }
        }
        while self.ready.is_empty() && !self.done {
            ns.fill(self).await?;
        }
        Ok(self.ready.front())
    }

    pub fn advance(&mut self) {
        if self.ready.pop_front().is_some() {
            self.position += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    async fn names(ns: &Namespace, ino: u64) -> Vec<String> {
        let mut stream = ns.open_dir(ino).unwrap();
        let mut out = Vec::new();
        while let Some(item) = stream.peek(ns).await.unwrap() {
            out.push(item.name.to_string());
            stream.advance();
        }
        out
    }

    /// What a local store leaves out of a listing (symlinks, special files) is counted with
    /// the odd keys, and its staging directory is no name a client can look up or create.
    #[tokio::test]
    async fn store_skips_are_counted_and_reserved_names_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("ok"), b"ok").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink("ok", root.join("link")).unwrap();
        std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        std::fs::create_dir_all(root.join(".berth-uploads/mpu-1")).unwrap();
        std::fs::write(root.join(".berth-uploads/mpu-1/00001"), b"staged").unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(root).unwrap());
        let ns = Namespace::new(store, String::new(), Some(Duration::from_secs(60)), None).unwrap();
        assert_eq!(names(&ns, ROOT_INO).await, [".", "..", "ok"]);
        assert_eq!(ns.skipped_keys(), 3, "etc, link and sock");
        for name in ["etc", "link", "sock", ".berth-uploads"] {
            let err = ns.lookup(ROOT_INO, name).await.unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{name}");
        }
        let err = ns
            .begin_write(
                ROOT_INO,
                ".berth-uploads",
                Arc::new(AtomicU64::new(0)),
                PosixMeta::default(),
            )
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        // Deeper down the name is an ordinary one.
        let sub = ns
            .begin_write(
                ROOT_INO,
                "ok2",
                Arc::new(AtomicU64::new(0)),
                PosixMeta::default(),
            )
            .unwrap();
        ns.end_write(sub.ino, None);
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::create_dir(root.join("d/.berth-uploads")).unwrap();
        std::fs::write(root.join("d/.berth-uploads/f"), b"mine").unwrap();
        let d = ns.lookup(ROOT_INO, "d").await.unwrap();
        ns.lookup(d.ino, ".berth-uploads").await.unwrap();
    }
}
