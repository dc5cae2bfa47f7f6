//! The inode table: stable inode numbers for the life of the mount, journaled so that a
//! successor engine can take the kernel's node ids over.
//!
//! The kernel holds node ids across an engine crash (when a holder keeps the /dev/fuse fd), so
//! the mapping ino -> (parent, name) must outlive the process that made it. Every new inode and
//! every rename is appended to a journal file (under the state dir, normally tmpfs /run) before
//! the kernel learns of it; [`InodeTable::recover`] replays it. Numbers are never reused.
//!
//! Journal format: an 8-byte magic and a u32 version, then records
//! `[tag u8][ino u64][parent u64][kind u8][len u16][name][crc32 of the preceding bytes]`,
//! little-endian. A torn or corrupt tail (a crash mid-write) ends the replay; it never
//! produces a wrong mapping.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::store::PosixMeta;

pub const ROOT_INO: u64 = 1;
const MAGIC: &[u8; 8] = b"BERTHINO";
const VERSION: u32 = 1;
const TAG_INSERT: u8 = b'I';
const TAG_RENAME: u8 = b'R';

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// What the store last said about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStat {
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<String>,
    /// The POSIX attributes stored on the object (for a directory: on its marker); `None`
    /// until a HEAD said (a listing does not).
    pub meta: Option<PosixMeta>,
}

impl ObjectStat {
    /// Nothing in the store (yet): no bytes, no attributes.
    pub fn empty(mtime: SystemTime) -> ObjectStat {
        ObjectStat {
            size: 0,
            mtime,
            etag: None,
            meta: Some(PosixMeta::default()),
        }
    }

    /// Known to exist, attributes not asked yet (a listing's directory, a journaled inode).
    pub fn unknown(mtime: SystemTime) -> ObjectStat {
        ObjectStat {
            meta: None,
            ..ObjectStat::empty(mtime)
        }
    }
}

/// A copy of one inode's state.
#[derive(Clone, Debug)]
pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub name: Arc<str>,
    /// Key relative to the mount prefix; `""` for the root.
    pub key: Arc<str>,
    pub kind: Kind,
    pub stat: ObjectStat,
    /// When the store last confirmed `kind` and `stat`; `None` means "ask again".
    pub validated: Option<Instant>,
}

struct Inner {
    nodes: HashMap<u64, Node>,
    children: HashMap<(u64, Arc<str>), u64>,
    next_ino: u64,
    journal: Option<File>,
}

pub struct InodeTable {
    inner: Mutex<Inner>,
}

/// What a caller wants recorded for one child.
pub struct ChildUpdate {
    pub name: String,
    pub kind: Kind,
    pub stat: ObjectStat,
}

impl InodeTable {
    /// A fresh table with only the root; the journal at `journal` (if any) starts empty.
    pub fn create(journal: Option<&Path>, root_mtime: SystemTime) -> io::Result<InodeTable> {
        let journal = match journal {
            Some(path) => {
                if let Some(dir) = path.parent() {
                    crate::sys::files::private_dir(dir)?;
                }
                // It lists every object name the kernel was told of: root only.
                let mut f = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(path)?;
                f.write_all(MAGIC)?;
                f.write_all(&VERSION.to_le_bytes())?;
                Some(f)
            }
            None => None,
        };
        Ok(Self::with_root(journal, root_mtime))
    }

    /// Rebuilds the table a previous engine journaled, and keeps appending to that journal.
    pub fn recover(path: &Path, root_mtime: SystemTime) -> io::Result<(InodeTable, usize)> {
        let mut data = Vec::new();
        File::open(path)?.read_to_end(&mut data)?;
        if data.len() < 12 || &data[..8] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a berth inode journal",
            ));
        }
        if u32::from_le_bytes(data[8..12].try_into().unwrap_or_default()) != VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unsupported journal version",
            ));
        }
        let journal = OpenOptions::new().append(true).open(path)?;
        let table = Self::with_root(Some(journal), root_mtime);
        let mut replayed = 0;
        {
            let mut inner = table.lock();
            let mut rest = &data[12..];
            while let Some((record, len)) = Record::decode(rest) {
                inner.apply(record, root_mtime);
                rest = &rest[len..];
                replayed += 1;
            }
            if !rest.is_empty() {
                tracing::warn!(bytes = rest.len(), "inode journal has a torn tail; ignored");
            }
        }
        Ok((table, replayed))
    }

    fn with_root(journal: Option<File>, root_mtime: SystemTime) -> InodeTable {
        let root = Node {
            ino: ROOT_INO,
            parent: ROOT_INO,
            name: Arc::from(""),
            key: Arc::from(""),
            kind: Kind::Dir,
            stat: ObjectStat::empty(root_mtime),
            validated: None,
        };
        InodeTable {
            inner: Mutex::new(Inner {
                nodes: HashMap::from([(ROOT_INO, root)]),
                children: HashMap::new(),
                next_ino: ROOT_INO + 1,
                journal,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the whole mount down with a poisoned lock.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, ino: u64) -> Option<Node> {
        self.lock().nodes.get(&ino).cloned()
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<Node> {
        let inner = self.lock();
        let ino = inner.children.get(&(parent, Arc::from(name)))?;
        inner.nodes.get(ino).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        false // the root is always there
    }

    /// Records what the store said about children of `parent` (allocating inodes as needed,
    /// with one journal write for the batch) and returns their nodes in the same order.
    pub fn upsert(&self, parent: u64, updates: Vec<ChildUpdate>) -> io::Result<Vec<Node>> {
        let mut inner = self.lock();
        let parent_key = inner
            .nodes
            .get(&parent)
            .map(|p| p.key.clone())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?;
        let now = Instant::now();
        let mut journal = Vec::new();
        let mut out = Vec::with_capacity(updates.len());
        for u in updates {
            let name: Arc<str> = Arc::from(u.name);
            let ino = match inner.children.get(&(parent, name.clone())) {
                Some(&ino) => ino,
                None => {
                    let ino = inner.next_ino;
                    let record = Record::Insert {
                        ino,
                        parent,
                        kind: u.kind,
                        name: name.to_string(),
                    };
                    record.encode(&mut journal);
                    inner.apply(record, u.stat.mtime);
                    ino
                }
            };
            let node = inner
                .nodes
                .get_mut(&ino)
                .expect("child map points at a node");
            // A listing says nothing of attributes: what a HEAD said of the same object stays.
            let same_object =
                node.kind == u.kind && (u.kind == Kind::Dir || node.stat.etag == u.stat.etag);
            let keep_meta = u.stat.meta.is_none() && same_object;
            let meta = keep_meta.then(|| node.stat.meta.take()).flatten();
            node.kind = u.kind;
            node.stat = u.stat;
            if meta.is_some() {
                node.stat.meta = meta;
            }
            node.validated = Some(now);
            debug_assert_eq!(&*node.key, super::keys::join(&parent_key, &name));
            out.push(node.clone());
        }
        inner.write_journal(&journal)?;
        Ok(out)
    }

    /// Forgets what the store said about `ino` so the next use asks again.
    pub fn invalidate(&self, ino: u64) {
        if let Some(node) = self.lock().nodes.get_mut(&ino) {
            node.validated = None;
        }
    }

    /// The attributes of `ino` are now `meta` (set by this mount: no need to ask again).
    pub fn set_meta(&self, ino: u64, meta: PosixMeta) {
        if let Some(node) = self.lock().nodes.get_mut(&ino) {
            node.stat.meta = Some(meta);
        }
    }

    pub fn set_stat(&self, ino: u64, stat: ObjectStat) {
        if let Some(node) = self.lock().nodes.get_mut(&ino) {
            node.stat = stat;
            node.validated = Some(Instant::now());
        }
    }

    /// Moves `ino` to `new_parent/new_name` (after a successful rename in the store). An inode
    /// that was at the target keeps its number but is detached from the tree.
    pub fn rename(&self, ino: u64, new_parent: u64, new_name: &str) -> io::Result<()> {
        let mut inner = self.lock();
        let record = Record::Rename {
            ino,
            parent: new_parent,
            name: new_name.to_string(),
        };
        let mut journal = Vec::new();
        record.encode(&mut journal);
        inner.write_journal(&journal)?;
        inner.apply(record, SystemTime::UNIX_EPOCH);
        Ok(())
    }
}

impl Inner {
    fn write_journal(&mut self, bytes: &[u8]) -> io::Result<()> {
        match (&mut self.journal, bytes.is_empty()) {
            (Some(f), false) => f.write_all(bytes),
            _ => Ok(()),
        }
    }

    fn apply(&mut self, record: Record, mtime: SystemTime) {
        match record {
            Record::Insert {
                ino,
                parent,
                kind,
                name,
            } => {
                let Some(parent_key) = self.nodes.get(&parent).map(|p| p.key.clone()) else {
                    return;
                };
                let name: Arc<str> = Arc::from(name);
                let node = Node {
                    ino,
                    parent,
                    key: Arc::from(super::keys::join(&parent_key, &name)),
                    name: name.clone(),
                    kind,
                    stat: ObjectStat::unknown(mtime),
                    validated: None,
                };
                self.nodes.insert(ino, node);
                self.children.insert((parent, name), ino);
                self.next_ino = self.next_ino.max(ino + 1);
            }
            Record::Rename { ino, parent, name } => {
                let Some(parent_key) = self.nodes.get(&parent).map(|p| p.key.clone()) else {
                    return;
                };
                let Some(node) = self.nodes.get(&ino) else {
                    return;
                };
                let old = (node.parent, node.name.clone());
                let name: Arc<str> = Arc::from(name);
                self.children.remove(&old);
                self.children.insert((parent, name.clone()), ino);
                if let Some(node) = self.nodes.get_mut(&ino) {
                    node.parent = parent;
                    node.key = Arc::from(super::keys::join(&parent_key, &name));
                    node.name = name;
                    node.validated = None;
                }
            }
        }
    }
}

enum Record {
    Insert {
        ino: u64,
        parent: u64,
        kind: Kind,
        name: String,
    },
    Rename {
        ino: u64,
        parent: u64,
        name: String,
    },
}

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let (tag, ino, parent, kind, name) = match self {
            Record::Insert {
                ino,
                parent,
                kind,
                name,
            } => (TAG_INSERT, *ino, *parent, *kind, name),
            Record::Rename { ino, parent, name } => (TAG_RENAME, *ino, *parent, Kind::File, name),
        };
        out.push(tag);
        out.extend_from_slice(&ino.to_le_bytes());
        out.extend_from_slice(&parent.to_le_bytes());
        out.push(match kind {
            Kind::File => 0,
            Kind::Dir => 1,
        });
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one record, returning it and its length; `None` at a torn or corrupt record.
    fn decode(buf: &[u8]) -> Option<(Record, usize)> {
        const FIXED: usize = 1 + 8 + 8 + 1 + 2;
        if buf.len() < FIXED {
            return None;
        }
        let name_len = u16::from_le_bytes([buf[18], buf[19]]) as usize;
        let total = FIXED + name_len + 4;
        if buf.len() < total {
            return None;
        }
        let crc = u32::from_le_bytes(buf[total - 4..total].try_into().ok()?);
        if crc32fast::hash(&buf[..total - 4]) != crc {
            return None;
        }
        let ino = u64::from_le_bytes(buf[1..9].try_into().ok()?);
        let parent = u64::from_le_bytes(buf[9..17].try_into().ok()?);
        let kind = if buf[17] == 1 { Kind::Dir } else { Kind::File };
        let name = String::from_utf8(buf[FIXED..FIXED + name_len].to_vec()).ok()?;
        let record = match buf[0] {
            TAG_INSERT => Record::Insert {
                ino,
                parent,
                kind,
                name,
            },
            TAG_RENAME => Record::Rename { ino, parent, name },
            _ => return None,
        };
        Some((record, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> ChildUpdate {
        ChildUpdate {
            name: name.into(),
            kind: Kind::File,
            stat: ObjectStat::empty(SystemTime::UNIX_EPOCH),
        }
    }

    fn dir(name: &str) -> ChildUpdate {
        ChildUpdate {
            kind: Kind::Dir,
            ..file(name)
        }
    }

    #[test]
    fn numbers_are_stable_and_never_reused() {
        let t = InodeTable::create(None, SystemTime::UNIX_EPOCH).unwrap();
        let a = t.upsert(ROOT_INO, vec![dir("a")]).unwrap()[0].ino;
        let b = t.upsert(a, vec![file("b")]).unwrap()[0].ino;
        assert_eq!(t.upsert(ROOT_INO, vec![dir("a")]).unwrap()[0].ino, a);
        assert_eq!(t.child(a, "b").unwrap().ino, b);
        assert_eq!(&*t.get(b).unwrap().key, "a/b");
        t.rename(b, ROOT_INO, "c").unwrap();
        assert_eq!(&*t.get(b).unwrap().key, "c");
        assert!(t.child(a, "b").is_none());
        let again = t.upsert(a, vec![file("b")]).unwrap()[0].ino;
        assert!(again > b, "a name that comes back gets a new number");
    }

    #[test]
    fn a_successor_recovers_the_same_mapping_and_ignores_a_torn_tail() {
        let dir_ = tempfile::tempdir().unwrap();
        let path = dir_.path().join("inodes");
        let t = InodeTable::create(Some(&path), SystemTime::UNIX_EPOCH).unwrap();
        let a = t.upsert(ROOT_INO, vec![dir("a")]).unwrap()[0].ino;
        let kids = t
            .upsert(a, (0..100).map(|i| file(&format!("f{i}"))).collect())
            .unwrap();
        t.rename(kids[5].ino, ROOT_INO, "moved").unwrap();
        drop(t);
        // Simulate a crash in the middle of the next record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[TAG_INSERT, 1, 2, 3]).unwrap();
        drop(f);

        let (r, replayed) = InodeTable::recover(&path, SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(replayed, 102);
        assert_eq!(r.child(ROOT_INO, "a").unwrap().ino, a);
        assert_eq!(r.child(a, "f42").unwrap().ino, kids[42].ino);
        assert_eq!(r.child(ROOT_INO, "moved").unwrap().ino, kids[5].ino);
        assert!(r.child(a, "f5").is_none());
        let new = r.upsert(ROOT_INO, vec![file("new")]).unwrap()[0].ino;
        assert!(
            new > kids[99].ino,
            "numbers continue after the recovered ones"
        );
    }

    #[test]
    fn a_corrupt_record_ends_the_replay() {
        let dir_ = tempfile::tempdir().unwrap();
        let path = dir_.path().join("inodes");
        let t = InodeTable::create(Some(&path), SystemTime::UNIX_EPOCH).unwrap();
        t.upsert(ROOT_INO, vec![file("x"), file("y")]).unwrap();
        drop(t);
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 6;
        data[last] ^= 0xff; // flip a byte in the second record's name
        std::fs::write(&path, data).unwrap();
        let (r, replayed) = InodeTable::recover(&path, SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(replayed, 1);
        assert!(r.child(ROOT_INO, "x").is_some());
        assert!(r.child(ROOT_INO, "y").is_none());
    }
}
