//! The node cache shared by every mount process of a node.
//!
//! `berth daemon --cache-dir DIR` opens the disk tier once: it holds the directory lock and the
//! index (which block lives in which slot, the CLOCK hand, the one quota) and serves that index
//! on a unix socket ([`CacheServer`]). Each mount process is a client ([`CacheClient`]): it asks
//! where blocks are, reserves slots for new blocks and commits them, and reads and writes the
//! data file itself with its own I/O engine, so block bytes never cross the socket and a slow
//! client never holds up another one's reads.
//!
//! Why this is safe across processes:
//! - A slot can be evicted and reused by another process between a client's lookup and its read.
//!   The per-chunk CRCs of the entry it looked up then fail, and the block is fetched again: the
//!   same check that catches a torn write or a corrupt disk.
//! - A reserved slot belongs to its reservation (a token) until committed or given back; it is
//!   neither evicted nor handed out twice. A client whose connection drops loses its
//!   reservations, and a commit with a token the server no longer knows is refused.
//! - A mount process remembers where blocks are and reads them without asking again, guarded
//!   by slot generations in a file every process maps ([`super::generations`]); the blocks it
//!   read that way are reported to the daemon in batches, so that CLOCK sees them used.
//! - When the daemon is away (restarting), lookups miss and new blocks are not cached: reads go
//!   to the store and never fail because of the cache. Clients reconnect on their own and check
//!   that the daemon still serves the same data file with the same block size.

use std::collections::HashMap;
use std::io::{self, Read as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::generations::Generations;
use super::index::{BlockKey, Index, SlotEntry};
use super::{lock, Summary};

/// Largest message accepted (a lookup of many keys); anything bigger is a broken peer.
const MAX_FRAME: usize = 16 << 20;
/// After a failed connection, calls fail at once for this long (no connect storm per read).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Idle connections a client keeps for later calls.
const MAX_IDLE: usize = 16;
/// Block locations a client remembers (then it forgets them all and asks again).
const MAX_KNOWN: usize = 1 << 16;
/// Blocks read from remembered locations before the client tells the daemon they were used.
const TOUCH_BATCH: usize = 256;

/// What a server tells each new connection: the data file to read and write, and its geometry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub data: PathBuf,
    pub data_len: u64,
    pub block_size: u64,
    /// The slot generations file (see [`super::generations`]).
    pub generations: PathBuf,
    /// Device and inode of the data file: a client must use the very file the server indexes.
    pub dev: u64,
    pub ino: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireEntry {
    slot: u32,
    len: u32,
    crcs: Vec<u32>,
    generation: u64,
}

impl From<SlotEntry> for WireEntry {
    fn from(e: SlotEntry) -> WireEntry {
        WireEntry {
            slot: e.slot,
            len: e.len,
            crcs: e.crcs.to_vec(),
            generation: e.generation,
        }
    }
}

impl From<WireEntry> for SlotEntry {
    fn from(e: WireEntry) -> SlotEntry {
        SlotEntry {
            slot: e.slot,
            len: e.len,
            crcs: e.crcs.into(),
            generation: e.generation,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// Where `keys` are; `touched` were read from remembered locations since the last call.
    Lookup {
        keys: Vec<String>,
        touched: Vec<String>,
    },
    Reserve {
        key: String,
    },
    Commit {
        key: String,
        entry: WireEntry,
        token: u64,
    },
    Abandon {
        slot: u32,
        token: u64,
    },
    Remove {
        key: String,
        slot: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Hello(Hello),
    Entries(Vec<Option<WireEntry>>),
    Reserved {
        /// Slot, token and the slot's new generation.
        reservation: Option<(u32, u64, u64)>,
        summary: Summary,
    },
    Committed {
        summary: Summary,
    },
    Done,
    Failed(String),
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn frame<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(msg).map_err(|e| invalid(e.to_string()))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    Ok(buf)
}

fn body_len(header: [u8; 4]) -> io::Result<usize> {
    let n = u32::from_le_bytes(header) as usize;
    if n > MAX_FRAME {
        return Err(invalid(format!("node cache message of {n} bytes refused")));
    }
    Ok(n)
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> io::Result<T> {
    serde_json::from_slice(body).map_err(|e| invalid(format!("node cache message: {e}")))
}

async fn read_frame<T: DeserializeOwned>(stream: &mut UnixStream) -> io::Result<T> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let mut body = vec![0u8; body_len(header)?];
    stream.read_exact(&mut body).await?;
    parse(&body)
}

async fn write_frame<T: Serialize>(stream: &mut UnixStream, msg: &T) -> io::Result<()> {
    stream.write_all(&frame(msg)?).await
}

/// What the daemon reports of its node cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerStats {
    pub disk: Summary,
    pub block_size: u64,
    /// Client connections open now (a mount process keeps a few).
    pub connections: u64,
}

/// The daemon's side: the one index of the node cache, served to mount processes.
pub struct CacheServer {
    hello: Hello,
    index: Mutex<Index>,
    generations: Generations,
    /// slot -> (token, connection) of reservations not yet committed or given back.
    pending: Mutex<HashMap<u32, (u64, u64)>>,
    next_id: AtomicU64,
    clients: AtomicU64,
    _lock: std::fs::File,
}

impl CacheServer {
    /// Opens the disk tier in `dir` (`size` bytes of `block_size` slots) for the whole node.
    pub fn open(dir: &Path, size: u64, block_size: u64) -> io::Result<Arc<CacheServer>> {
        let disk = super::Disk::open(dir, size, block_size)?;
        drop(super::io::open_data_file(&disk.data, disk.data_len)?);
        let meta = std::fs::metadata(&disk.data)?;
        let generations_path = dir.join("generations");
        let generations = Generations::open_for_server(&generations_path, disk.index.slots())?;
        tracing::info!(
            dir = %dir.display(),
            slots = disk.index.slots(),
            block_size,
            blocks = disk.index.len(),
            replayed = disk.replayed,
            "node cache ready"
        );
        Ok(Arc::new(CacheServer {
            hello: Hello {
                data: disk.data,
                data_len: disk.data_len,
                block_size,
                generations: generations_path,
                dev: meta.dev(),
                ino: meta.ino(),
            },
            index: Mutex::new(disk.index),
            generations,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            clients: AtomicU64::new(0),
            _lock: disk.lock,
        }))
    }

    pub fn block_size(&self) -> u64 {
        self.hello.block_size
    }

    /// The index's summary, stamped so that a client keeps the newest (called under the
    /// index lock, which orders the stamps).
    fn summary_of(&self, index: &Index) -> Summary {
        Summary {
            as_of: self.next_id.fetch_add(1, Ordering::Relaxed),
            ..Summary::of(index)
        }
    }

    /// The node cache as a whole (the daemon's Stats and metrics).
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            disk: Summary::of(&lock(&self.index)),
            block_size: self.hello.block_size,
            connections: self.clients.load(Ordering::Relaxed),
        }
    }

    /// Serves clients on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(self.clone().converse(stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "node cache: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn converse(self: Arc<Self>, mut stream: UnixStream) {
        let conn = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.clients.fetch_add(1, Ordering::Relaxed);
        let result = async {
            write_frame(&mut stream, &Reply::Hello(self.hello.clone())).await?;
            loop {
                let request: Request = match read_frame(&mut stream).await {
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return io::Result::Ok(()),
                    other => other?,
                };
                let reply = self.answer(conn, request);
                write_frame(&mut stream, &reply).await?;
            }
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(conn, error = %e, "node cache client dropped");
        }
        self.forget(conn);
        self.clients.fetch_sub(1, Ordering::Relaxed);
    }

    /// Gives back every slot a closed connection reserved and never committed.
    fn forget(&self, conn: u64) {
        let mut pending = lock(&self.pending);
        let orphans: Vec<u32> = pending
            .iter()
            .filter(|(_, (_, c))| *c == conn)
            .map(|(slot, _)| *slot)
            .collect();
        let mut index = lock(&self.index);
        for slot in orphans {
            pending.remove(&slot);
            index.abandon(slot);
        }
    }

    fn answer(&self, conn: u64, request: Request) -> Reply {
        match request {
            Request::Lookup { keys, touched } => {
                let mut index = lock(&self.index);
                for key in &touched {
                    index.lookup(key);
                }
                Reply::Entries(
                    keys.iter()
                        .map(|k| {
                            let mut entry = index.lookup(k)?;
                            entry.generation = self.generations.get(entry.slot)?;
                            Some(WireEntry::from(entry))
                        })
                        .collect(),
                )
            }
            Request::Reserve { key } => {
                let mut pending = lock(&self.pending);
                let mut index = lock(&self.index);
                let reservation = index.reserve(&key).map(|slot| {
                    let token = self.next_id.fetch_add(1, Ordering::Relaxed);
                    pending.insert(slot, (token, conn));
                    // Before anyone may write it: remembered locations of the slot go stale.
                    (slot, token, self.generations.bump(slot))
                });
                Reply::Reserved {
                    reservation,
                    summary: self.summary_of(&index),
                }
            }
            Request::Commit { key, entry, token } => {
                if !self.take_reservation(entry.slot, token) {
                    return Reply::Failed(format!(
                        "slot {} is not reserved by this token (the reservation was lost)",
                        entry.slot
                    ));
                }
                let mut index = lock(&self.index);
                if entry.slot as usize >= index.slots() {
                    return Reply::Failed(format!("slot {} out of range", entry.slot));
                }
                match index.commit(BlockKey::from(key), entry.into()) {
                    Ok(()) => Reply::Committed {
                        summary: self.summary_of(&index),
                    },
                    Err(e) => Reply::Failed(format!("writing the cache index: {e}")),
                }
            }
            Request::Abandon { slot, token } => {
                if self.take_reservation(slot, token) {
                    lock(&self.index).abandon(slot);
                }
                Reply::Done
            }
            Request::Remove { key, slot } => {
                if lock(&self.index).remove(&key, slot) {
                    self.generations.bump(slot);
                }
                Reply::Done
            }
        }
    }

    fn take_reservation(&self, slot: u32, token: u64) -> bool {
        let mut pending = lock(&self.pending);
        if pending.get(&slot).is_some_and(|(t, _)| *t == token) {
            pending.remove(&slot);
            return true;
        }
        false
    }
}

/// A slot reserved for a new block, with the connection that reserved it: the server gives
/// the slot back if that connection closes before the commit.
pub struct Reservation {
    pub slot: u32,
    token: u64,
    generation: u64,
    stream: UnixStream,
}

/// A mount process's side: asks the daemon's [`CacheServer`] about slots.
pub struct CacheClient {
    socket: PathBuf,
    hello: Hello,
    idle: Mutex<Vec<UnixStream>>,
    /// Set after a failure: calls fail at once until then.
    retry_at: Mutex<Option<Instant>>,
    up: AtomicBool,
    summary: Mutex<Summary>,
    /// The daemon's slot generations; without them every lookup asks the daemon.
    generations: Option<Generations>,
    /// Where blocks were, as of a generation of their slot.
    known: Mutex<HashMap<BlockKey, SlotEntry>>,
    /// Blocks read from `known` that the daemon has not heard of yet.
    touched: Mutex<Vec<String>>,
}

fn unavailable(socket: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        format!("node cache at {} is unavailable", socket.display()),
    )
}

impl CacheClient {
    /// Connects to the server at `socket` (waiting up to `wait` for it to appear) and learns
    /// which data file to use.
    pub fn connect(socket: &Path, wait: Duration) -> io::Result<CacheClient> {
        let deadline = Instant::now() + wait;
        let hello = loop {
            match Self::hello_blocking(socket) {
                Ok(hello) => break hello,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("node cache at {}: {e}", socket.display()),
                    ))
                }
            }
        };
        let summary = Summary {
            slots: hello.data_len / hello.block_size.max(1),
            ..Summary::default()
        };
        let generations = match Generations::open_for_client(
            &hello.generations,
            summary.slots as usize,
        ) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!(error = %e, "node cache generations unusable; every cache lookup asks the daemon");
                None
            }
        };
        Ok(CacheClient {
            socket: socket.to_path_buf(),
            hello,
            idle: Mutex::default(),
            retry_at: Mutex::default(),
            up: AtomicBool::new(true),
            summary: Mutex::new(summary),
            generations,
            known: Mutex::default(),
            touched: Mutex::default(),
        })
    }

    fn hello_blocking(socket: &Path) -> io::Result<Hello> {
        let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut header = [0u8; 4];
        stream.read_exact(&mut header)?;
        let mut body = vec![0u8; body_len(header)?];
        stream.read_exact(&mut body)?;
        match parse(&body)? {
            Reply::Hello(hello) => Ok(hello),
            other => Err(invalid(format!("expected a hello, got {other:?}"))),
        }
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Blocks, slots and evictions of the whole node cache, as of the last reply that said.
    pub fn summary(&self) -> Summary {
        *lock(&self.summary)
    }

    async fn open_conn(&self) -> io::Result<UnixStream> {
        let mut stream = UnixStream::connect(&self.socket).await?;
        let Reply::Hello(hello) = read_frame(&mut stream).await? else {
            return Err(invalid("node cache did not say hello"));
        };
        if hello != self.hello {
            return Err(invalid(format!(
                "node cache at {} now serves another data file or block size ({} of {} bytes, \
                 was {} of {}); restart this mount to use it",
                self.socket.display(),
                hello.data.display(),
                hello.block_size,
                self.hello.data.display(),
                self.hello.block_size
            )));
        }
        Ok(stream)
    }

    async fn exchange(stream: &mut UnixStream, request: &Request) -> io::Result<Reply> {
        write_frame(stream, request).await?;
        read_frame(stream).await
    }

    /// One request and its reply. A kept connection that fails (the daemon restarted) is
    /// retried once on a fresh one; a fresh one that fails marks the server down for a while.
    async fn call(&self, request: &Request) -> io::Result<Reply> {
        let (stream, reply) = self.call_holding(request).await?;
        self.keep(stream);
        Ok(reply)
    }

    /// [`Self::call`], handing back the connection: a reservation lives exactly as long as the
    /// connection that made it, so the caller keeps it until the commit.
    async fn call_holding(&self, request: &Request) -> io::Result<(UnixStream, Reply)> {
        if lock(&self.retry_at).is_some_and(|t| Instant::now() < t) {
            return Err(unavailable(&self.socket));
        }
        let kept = lock(&self.idle).pop();
        if let Some(mut stream) = kept {
            if let Ok(reply) = Self::exchange(&mut stream, request).await {
                return Ok((stream, reply));
            }
            lock(&self.idle).clear();
        }
        let result = match self.open_conn().await {
            Ok(mut stream) => Self::exchange(&mut stream, request)
                .await
                .map(|reply| (stream, reply)),
            Err(e) => Err(e),
        };
        match result {
            Ok(done) => {
                *lock(&self.retry_at) = None;
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(socket = %self.socket.display(), "node cache reachable again");
                }
                Ok(done)
            }
            Err(e) => {
                *lock(&self.retry_at) = Some(Instant::now() + RETRY_AFTER);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        socket = %self.socket.display(),
                        error = %e,
                        "node cache unreachable: blocks are read from the store and not cached until it is back"
                    );
                }
                Err(e)
            }
        }
    }

    fn keep(&self, stream: UnixStream) {
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(stream);
        }
    }

    /// Keeps the newest summary the server sent.
    fn note(&self, summary: Summary) {
        let mut kept = lock(&self.summary);
        if summary.as_of >= kept.as_of {
            *kept = summary;
        }
    }

    /// Whether `entry`'s slot has certainly not changed hands since the entry was made.
    fn current(&self, entry: &SlotEntry) -> bool {
        self.generations
            .as_ref()
            .is_some_and(|g| g.get(entry.slot) == Some(entry.generation))
    }

    /// After a read of `entry`'s slot: false if the slot changed hands (without generations
    /// there is no telling, and the CRCs are the only check).
    pub fn unchanged(&self, entry: &SlotEntry) -> bool {
        self.generations.is_none() || self.current(entry)
    }

    fn remember(&self, key: &BlockKey, entry: &SlotEntry) {
        let mut known = lock(&self.known);
        if known.len() >= MAX_KNOWN {
            known.clear();
        }
        known.insert(key.clone(), entry.clone());
    }

    /// Where each of `keys` is cached (`None`: not cached, or the server is unavailable).
    /// Remembered locations whose slot has not changed hands are answered without the daemon.
    pub async fn lookup(&self, keys: &[&BlockKey]) -> Vec<Option<SlotEntry>> {
        let mut out: Vec<Option<SlotEntry>> = vec![None; keys.len()];
        let mut ask = Vec::new();
        {
            let known = lock(&self.known);
            let mut touched = lock(&self.touched);
            for (i, key) in keys.iter().enumerate() {
                match known.get(*key) {
                    Some(entry) if self.current(entry) => {
                        touched.push(key.to_string());
                        out[i] = Some(entry.clone());
                    }
                    _ => ask.push(i),
                }
            }
            if ask.is_empty() && touched.len() < TOUCH_BATCH {
                return out;
            }
        }
        let touched = std::mem::take(&mut *lock(&self.touched));
        let request = Request::Lookup {
            keys: ask.iter().map(|&i| keys[i].to_string()).collect(),
            touched,
        };
        if let Ok(Reply::Entries(entries)) = self.call(&request).await {
            if entries.len() == ask.len() {
                for (i, entry) in ask.into_iter().zip(entries) {
                    let entry = entry.map(SlotEntry::from);
                    if let Some(e) = &entry {
                        self.remember(keys[i], e);
                    }
                    out[i] = entry;
                }
            }
        }
        out
    }

    /// A slot for a new block of `key`; `None` if it is cached already, nothing is free, or
    /// the server is unavailable.
    pub async fn reserve(&self, key: &BlockKey) -> Option<Reservation> {
        let request = Request::Reserve {
            key: key.to_string(),
        };
        let (stream, reply) = self.call_holding(&request).await.ok()?;
        match reply {
            Reply::Reserved {
                reservation: Some((slot, token, generation)),
                summary,
            } => {
                self.note(summary);
                Some(Reservation {
                    slot,
                    token,
                    generation,
                    stream,
                })
            }
            Reply::Reserved { summary, .. } => {
                self.note(summary);
                self.keep(stream);
                None
            }
            _ => None,
        }
    }

    /// Records `entry` (written to the reservation's slot) as `key`'s block.
    pub async fn commit(
        &self,
        key: &BlockKey,
        entry: SlotEntry,
        reservation: Reservation,
    ) -> io::Result<()> {
        let Reservation {
            token,
            generation,
            mut stream,
            ..
        } = reservation;
        let entry = SlotEntry {
            generation,
            ..entry
        };
        let request = Request::Commit {
            key: key.to_string(),
            entry: entry.clone().into(),
            token,
        };
        let reply = Self::exchange(&mut stream, &request).await?;
        self.keep(stream);
        match reply {
            Reply::Committed { summary } => {
                self.note(summary);
                self.remember(key, &entry);
                Ok(())
            }
            Reply::Failed(why) => Err(io::Error::other(why)),
            other => Err(invalid(format!("unexpected reply {other:?}"))),
        }
    }

    /// Gives a reserved slot back (its write failed).
    pub async fn abandon(&self, reservation: Reservation) {
        let Reservation {
            slot,
            token,
            mut stream,
            ..
        } = reservation;
        if Self::exchange(&mut stream, &Request::Abandon { slot, token })
            .await
            .is_ok()
        {
            self.keep(stream);
        }
    }

    pub async fn remove(&self, key: &BlockKey, slot: u32) {
        lock(&self.known).remove(key);
        let request = Request::Remove {
            key: key.to_string(),
            slot,
        };
        let _ = self.call(&request).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{BlockCache, CacheConfig, DiskTier, EnginePreference, ObjectId};
    use crate::store::StoreResult;
    use bytes::Bytes;
    use futures::future::{BoxFuture, FutureExt};
    use std::ops::Range;
    use std::sync::atomic::AtomicUsize;

    const BS: u64 = 4096;

    /// A node cache of `slots` blocks served on `socket` from its own runtime: dropping the
    /// runtime is the daemon going away (every connection closes, the dir lock is released).
    fn start_server(dir: &Path, socket: &Path, slots: u64) -> tokio::runtime::Runtime {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = CacheServer::open(dir, slots * BS, BS).unwrap();
        let _ = std::fs::remove_file(socket);
        let listener = {
            let _guard = rt.enter();
            UnixListener::bind(socket).unwrap()
        };
        rt.spawn(server.serve(listener));
        rt
    }

    fn client_cache(socket: &Path, block_size: u64) -> std::io::Result<Arc<BlockCache>> {
        BlockCache::open(&CacheConfig {
            disk: DiskTier::Node {
                socket: socket.to_path_buf(),
            },
            block_size,
            memory: 0,
            engine: EnginePreference::ThreadPool,
            wait_for_disk: true,
        })
    }

    fn object(key: &str) -> ObjectId {
        ObjectId {
            store: Arc::from("test"),
            key: Arc::from(key),
            etag: Arc::from("\"e\""),
        }
    }

    /// Byte `i` of every object is `i % 251`; counts the fetches.
    fn source(
        calls: &Arc<AtomicUsize>,
    ) -> impl Fn(Range<u64>) -> BoxFuture<'static, StoreResult<Bytes>> {
        let calls = calls.clone();
        move |range: Range<u64>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let bytes: Vec<u8> = range.map(|i| (i % 251) as u8).collect();
            async move { Ok(Bytes::from(bytes)) }.boxed()
        }
    }

    async fn read_all(
        cache: &Arc<BlockCache>,
        key: &str,
        blocks: u64,
        calls: &Arc<AtomicUsize>,
    ) -> Vec<u8> {
        let size = blocks * BS;
        let got = cache
            .read_blocks(&object(key), 0, blocks, size, source(calls))
            .await
            .unwrap();
        cache.drain_writes().await;
        got.concat()
    }

    fn want(blocks: u64) -> Vec<u8> {
        (0..blocks * BS).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn processes_share_blocks_and_one_quota() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cache.sock");
        let server = start_server(&dir.path().join("cache"), &socket, 8);
        let (a, b) = (
            client_cache(&socket, BS).unwrap(),
            client_cache(&socket, BS).unwrap(),
        );
        let (calls_a, calls_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));

        assert_eq!(read_all(&a, "x", 4, &calls_a).await, want(4));
        assert_eq!(calls_a.load(Ordering::SeqCst), 1);
        // Another process reads what the first one cached, from the disk, with no fetch.
        assert_eq!(read_all(&b, "x", 4, &calls_b).await, want(4));
        assert_eq!(
            calls_b.load(Ordering::SeqCst),
            0,
            "b fetched blocks a had cached"
        );
        assert_eq!(b.stats().disk_hits, 4);

        // Both fill the one quota: 8 slots hold at most 8 blocks, whoever wrote them.
        read_all(&a, "y", 6, &calls_a).await;
        read_all(&b, "z", 6, &calls_b).await;
        let node = b.stats();
        assert_eq!(node.disk_slots, 8);
        assert!(node.disk_blocks <= 8, "{node:?}");
        assert!(node.evictions >= 8, "{node:?}");
        server.shutdown_background();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_connection_gives_back_its_slots() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cache.sock");
        let server = start_server(&dir.path().join("cache"), &socket, 1);
        let first = CacheClient::connect(&socket, Duration::ZERO).unwrap();
        let key: BlockKey = Arc::from("k");
        let reservation = first.reserve(&key).await.expect("a free slot");
        let slot = reservation.slot;
        let second = CacheClient::connect(&socket, Duration::ZERO).unwrap();
        let other: BlockKey = Arc::from("other");
        assert!(
            second.reserve(&other).await.is_none(),
            "the only slot is reserved"
        );
        // The reserving process dies before its commit: its connection closes.
        drop(reservation);
        drop(first);
        let mut again = None;
        for _ in 0..100 {
            again = second.reserve(&other).await;
            if again.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let again = again.expect("the lost reservation's slot came back");
        assert_eq!(again.slot, slot);
        second
            .commit(&other, SlotEntry::new(slot, &[2; 100]), again)
            .await
            .unwrap();
        assert_eq!(second.lookup(&[&key]).await, vec![None]);
        assert!(second.lookup(&[&other]).await[0].is_some());
        server.shutdown_background();
    }

    #[test]
    fn a_commit_without_its_reservation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let server = CacheServer::open(&dir.path().join("cache"), 4 * BS, BS).unwrap();
        let Reply::Reserved {
            reservation: Some((slot, token, _)),
            ..
        } = server.answer(1, Request::Reserve { key: "k".into() })
        else {
            panic!("no reservation");
        };
        let commit = |token| Request::Commit {
            key: "k".into(),
            entry: SlotEntry::new(slot, &[1; 10]).into(),
            token,
        };
        assert!(matches!(
            server.answer(1, commit(token + 1)),
            Reply::Failed(_)
        ));
        server.forget(1);
        assert!(
            matches!(server.answer(2, commit(token)), Reply::Failed(_)),
            "its connection closed"
        );
        assert_eq!(server.stats().disk.blocks, 0);
    }

    /// Regression: reservations were tied to connections that the client's pool closed when
    /// it had enough idle ones, so commits under load failed and slots were written twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_writes_at_once_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cache.sock");
        let server = start_server(&dir.path().join("cache"), &socket, 256);
        let cache = client_cache(&socket, BS).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let reads = (0..64).map(|i| {
            let (cache, calls) = (cache.clone(), calls.clone());
            async move {
                let key = format!("obj{i}");
                cache
                    .read_blocks(&object(&key), 0, 2, 2 * BS, source(&calls))
                    .await
                    .unwrap()
            }
        });
        futures::future::join_all(reads).await;
        cache.drain_writes().await;
        let stats = cache.stats();
        assert_eq!(stats.write_errors, 0, "{stats:?}");
        assert_eq!(stats.disk_blocks, 128, "{stats:?}");
        let again = Arc::new(AtomicUsize::new(0));
        for i in 0..64 {
            let got = cache
                .read_blocks(&object(&format!("obj{i}")), 0, 2, 2 * BS, source(&again))
                .await
                .unwrap();
            assert_eq!(got.concat(), want(2));
        }
        assert_eq!(again.load(Ordering::SeqCst), 0);
        assert_eq!(cache.stats().checksum_failures, 0);
        server.shutdown_background();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_go_on_while_the_daemon_is_away_and_the_cache_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let socket = dir.path().join("cache.sock");
        let server = start_server(&cache_dir, &socket, 16);
        let cache = client_cache(&socket, BS).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        read_all(&cache, "x", 2, &calls).await;
        server.shutdown_background();
        std::fs::remove_file(&socket).unwrap();

        // No daemon: a block never looked up is read from the store, and nothing fails.
        assert_eq!(read_all(&cache, "z", 2, &calls).await, want(2));
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // A new daemon on the same dir bumps every generation (what the client remembers
        // goes stale), but its index has the blocks recorded before: found again.
        let server = start_server(&cache_dir, &socket, 16);
        tokio::time::sleep(RETRY_AFTER + Duration::from_millis(100)).await;
        let before = cache.stats().disk_hits;
        assert_eq!(read_all(&cache, "x", 2, &calls).await, want(2));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "served from the node cache again"
        );
        assert_eq!(cache.stats().disk_hits, before + 2);
        assert_eq!(cache.stats().checksum_failures, 0);
        server.shutdown_background();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remembered_blocks_need_no_daemon_until_their_slot_changes_hands() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cache.sock");
        let server = start_server(&dir.path().join("cache"), &socket, 2);
        let (a, b) = (
            client_cache(&socket, BS).unwrap(),
            client_cache(&socket, BS).unwrap(),
        );
        let calls = Arc::new(AtomicUsize::new(0));
        read_all(&a, "x", 2, &calls).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // b fills both slots with other blocks: x's slots change hands.
        read_all(&b, "y", 2, &calls).await;
        assert_eq!(read_all(&a, "x", 2, &calls).await, want(2));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "x was fetched again, not read from y's slots"
        );
        assert_eq!(
            a.stats().checksum_failures,
            0,
            "a stale location is a miss, not a bad disk"
        );

        // What a wrote last it reads again with the daemon gone: no round trip needed.
        server.shutdown_background();
        let hits = a.stats().disk_hits;
        assert_eq!(read_all(&a, "x", 2, &calls).await, want(2));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(a.stats().disk_hits, hits + 2);
    }

    #[test]
    fn a_mount_with_another_block_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cache.sock");
        let server = start_server(&dir.path().join("cache"), &socket, 4);
        let err = client_cache(&socket, 2 * BS).err().expect("refused");
        assert!(err.to_string().contains("block size 4096"), "{err}");
        let err = CacheClient::connect(&dir.path().join("nothing.sock"), Duration::ZERO)
            .err()
            .expect("no server");
        assert!(err.to_string().contains("nothing.sock"), "{err}");
        drop(server);
    }
}
