//! The node-wide block cache: a memory tier and a disk tier in front of object storage.
//!
//! Blocks are fixed-size pieces of objects, keyed by (store, key, ETag, block index): a changed
//! object has a new ETag, so it can never be served stale bytes. The disk tier is one data file
//! of fixed slots in `--cache-dir` (its size is the quota, never exceeded) written and read
//! through an I/O engine (io_uring, or a pread/pwrite pool as fallback), plus an index log
//! that survives restarts and crashes. Every block carries a CRC checked on each read from
//! disk; a mismatch drops the block and fetches it again. Concurrent misses of one block wait
//! for a single fetch. If the cache disk fails or fills up, blocks are served from the store
//! and not cached: reads never fail because of the cache.
//!
//! The disk tier's index lives in this process ([`DiskTier::Dir`]), or in the node daemon,
//! which serves one index and one quota to every mount process of the node ([`node`],
//! [`DiskTier::Node`]).

mod disk;
mod generations;
mod hot;
mod index;
pub mod io;
pub mod node;
mod slots;
mod stats;

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;

use crate::store::StoreResult;
use disk::Disk;
pub use disk::{is_in_use, CacheInUse};
use hot::HotTier;
use index::{BlockKey, SlotEntry};
pub use io::{EngineKind, EnginePreference};
use slots::Slots;
use stats::Counters;
pub use stats::{CacheStats, Summary};

/// Disk writes in flight at once; past that, new blocks are not cached (the store is not slowed
/// down by a slow cache disk).
const MAX_PENDING_WRITES: usize = 64;

/// Where the disk tier is.
#[derive(Clone, Debug)]
pub enum DiskTier {
    /// A directory this process owns (locked), with a quota in bytes.
    Dir { dir: PathBuf, size: u64 },
    /// The node daemon's cache, reached over its unix socket (see [`node`]).
    Node { socket: PathBuf },
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub disk: DiskTier,
    /// Must match the node cache's block size for [`DiskTier::Node`].
    pub block_size: u64,
    /// Memory tier size in bytes.
    pub memory: u64,
    pub engine: EnginePreference,
    /// Wait for the disk instead of skipping blocks when writes fall behind (warm-up wants
    /// every block cached; a mount wants reads never slowed by the cache disk).
    pub wait_for_disk: bool,
}

/// Identifies an object version for caching.
#[derive(Clone, Debug)]
pub struct ObjectId {
    /// Which store (endpoint and bucket, or local root).
    pub store: Arc<str>,
    pub key: Arc<str>,
    pub etag: Arc<str>,
}

impl ObjectId {
    fn block_key(&self, index: u64) -> BlockKey {
        Arc::from(format!(
            "{}\0{}\0{}\0{index}",
            self.store, self.key, self.etag
        ))
    }
}

/// Block `n` of `run`, the bytes of consecutive blocks fetched with one GET (empty past the end).
pub fn nth_block(run: &Bytes, n: usize, block_size: u64) -> Bytes {
    let from = (n * block_size as usize).min(run.len());
    let to = (from + block_size as usize).min(run.len());
    run.slice(from..to)
}

/// Awaits a caller's permit the first time it is needed; later calls pass at once.
async fn consent<P: Future<Output = StoreResult<()>>>(permit: &mut Option<P>) -> StoreResult<()> {
    match permit.take() {
        Some(permit) => permit.await,
        None => Ok(()),
    }
}

type Waiter = Shared<BoxFuture<'static, Option<Bytes>>>;

/// Removes keys from the in-flight map when a fetch ends, however it ends.
struct Unregister<'a> {
    cache: &'a BlockCache,
    keys: Vec<BlockKey>,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(&self.cache.inflight);
        for key in &self.keys {
            inflight.remove(key);
        }
    }
}

pub struct BlockCache {
    block_size: u64,
    align: usize,
    io: Arc<dyn io::BlockIo>,
    slots: Slots,
    hot: Mutex<HotTier>,
    inflight: Mutex<HashMap<BlockKey, Waiter>>,
    writes: Arc<Semaphore>,
    wait_for_disk: bool,
    counters: Counters,
    /// The cache dir's lock, held while this process owns the directory.
    _lock: Option<std::fs::File>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens the node cache's data file with our own I/O engine, after checking that it is the
/// file the daemon indexes, with our block size.
fn open_node_data(
    client: &node::CacheClient,
    config: &CacheConfig,
) -> std::io::Result<Arc<dyn io::BlockIo>> {
    use std::os::unix::fs::MetadataExt;
    let hello = client.greeting();
    if hello.block_size != config.block_size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "--block-size {} differs from the node cache's block size {}",
                config.block_size, hello.block_size
            ),
        ));
    }
    let io = io::open_engine(&hello.data, hello.data_len, config.engine)?;
    let meta = std::fs::metadata(&hello.data)?;
    if (meta.dev(), meta.ino()) != (hello.dev, hello.ino) {
        return Err(std::io::Error::other(format!(
            "{} is not the node cache's data file (another filesystem or a replaced file)",
            hello.data.display()
        )));
    }
    Ok(io)
}

/// How long a mount process waits for the node daemon's cache socket at start.
const NODE_CACHE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl BlockCache {
    pub fn open(config: &CacheConfig) -> std::io::Result<Arc<BlockCache>> {
        let (io, slots, lock) = match &config.disk {
            DiskTier::Dir { dir, size } => {
                let disk = Disk::open(dir, *size, config.block_size)?;
                let io = io::open_engine(&disk.data, disk.data_len, config.engine)?;
                tracing::info!(
                    dir = %dir.display(),
                    slots = disk.index.slots(),
                    block_size = config.block_size,
                    blocks = disk.index.len(),
                    replayed = disk.replayed,
                    engine = ?io.kind(),
                    "block cache ready"
                );
                (io, Slots::Local(Mutex::new(disk.index)), Some(disk.lock))
            }
            DiskTier::Node { socket } => {
                let client = node::CacheClient::connect(socket, NODE_CACHE_WAIT)?;
                let io = open_node_data(&client, config)?;
                tracing::info!(
                    socket = %socket.display(),
                    data = %client.greeting().data.display(),
                    block_size = config.block_size,
                    engine = ?io.kind(),
                    "using the node cache"
                );
                (io, Slots::Node(client), None)
            }
        };
        Ok(Arc::new(BlockCache {
            block_size: config.block_size,
            align: io.alignment(),
            io,
            slots,
            hot: Mutex::new(HotTier::new(config.memory)),
            inflight: Mutex::new(HashMap::new()),
            writes: Arc::new(Semaphore::new(MAX_PENDING_WRITES)),
            wait_for_disk: config.wait_for_disk,
            counters: Counters::default(),
            _lock: lock,
        }))
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let disk = self.slots.summary();
        CacheStats {
            engine: format!("{:?}", self.io.kind()),
            memory_hits: get(&c.memory_hits),
            disk_hits: get(&c.disk_hits),
            misses: get(&c.misses),
            bytes_from_memory: get(&c.bytes_from_memory),
            bytes_from_disk: get(&c.bytes_from_disk),
            bytes_from_store: get(&c.bytes_from_store),
            checksum_failures: get(&c.checksum_failures),
            write_errors: get(&c.write_errors),
            writes_skipped: get(&c.writes_skipped),
            coalesced: get(&c.coalesced),
            evictions: disk.evictions,
            disk_blocks: disk.blocks,
            disk_slots: disk.slots,
            memory_bytes: lock(&self.hot).bytes(),
        }
    }

    /// Blocks `first..first + count` of `obj` (whose size is `size`), from the cache where
    /// possible. Missing blocks are fetched with `fetch(byte_range)`, one call per run of
    /// consecutive blocks, and cached.
    pub async fn read_blocks<F>(
        self: &Arc<Self>,
        obj: &ObjectId,
        first: u64,
        count: u64,
        size: u64,
        fetch: F,
    ) -> StoreResult<Vec<Bytes>>
    where
        F: Fn(Range<u64>) -> BoxFuture<'static, StoreResult<Bytes>>,
    {
        self.read_blocks_gated(obj, first, count, size, fetch, async { Ok(()) })
            .await
    }

    /// [`Self::read_blocks`] for a caller that may be given a block it did not fetch itself
    /// only with `permit`'s consent. `permit` is awaited at most once, before the first such
    /// block (a hit in either tier, or a block another reader was fetching) is read from disk,
    /// counted or returned; if it fails, the call fails with its error and returns nothing
    /// from the cache. Blocks the caller's own `fetch` brought need no permit, and a call that
    /// finds nothing cached never awaits it. What `permit` checks is the caller's business
    /// (the prefetcher: that its credentials may read the object), not the cache's.
    pub async fn read_blocks_gated<F, P>(
        self: &Arc<Self>,
        obj: &ObjectId,
        first: u64,
        count: u64,
        size: u64,
        fetch: F,
        permit: P,
    ) -> StoreResult<Vec<Bytes>>
    where
        F: Fn(Range<u64>) -> BoxFuture<'static, StoreResult<Bytes>>,
        P: Future<Output = StoreResult<()>>,
    {
        let mut permit = Some(permit);
        let keys: Vec<BlockKey> = (first..first + count).map(|i| obj.block_key(i)).collect();
        let mut out: Vec<Option<Bytes>> = vec![None; keys.len()];
        let hot = self.peek_memory(&keys);
        let on_disk = self.lookup_disk(&keys, &hot).await;
        let cached = (0..keys.len()).any(|i| hot[i].is_some() || on_disk[i].is_some());

        // Misses first: a fetch of our own that succeeds may be what the permit wants to
        // know, so a run that is partly cached costs no more than its GET.
        let uncached: Vec<usize> = (0..keys.len())
            .filter(|&i| hot[i].is_none() && on_disk[i].is_none())
            .collect();
        let (mut waiting, mine) = self.claim(&keys, &uncached);
        for (i, bytes) in self.fetch_runs(&keys, first, size, mine, &fetch).await? {
            out[i] = Some(bytes);
        }
        if cached {
            consent(&mut permit).await?;
            self.take_from_memory(hot, &mut out);
            self.fill_from_disk(&keys, on_disk, &mut out).await;
            // Blocks the disk tier could not give back after all (a slot that changed hands,
            // a failed checksum) are misses too.
            let lost: Vec<usize> = (0..keys.len())
                .filter(|&i| out[i].is_none() && !waiting.iter().any(|(w, _)| *w == i))
                .collect();
            let (more_waiting, more_mine) = self.claim(&keys, &lost);
            waiting.extend(more_waiting);
            for (i, bytes) in self
                .fetch_runs(&keys, first, size, more_mine, &fetch)
                .await?
            {
                out[i] = Some(bytes);
            }
        }
        for (i, w) in waiting {
            out[i] = match w.await {
                // Another reader's fetch: not ours, so it needs the permit too.
                Some(bytes) => {
                    consent(&mut permit).await?;
                    Some(bytes)
                }
                // The fetch we waited for failed or was cancelled: fetch it ourselves.
                None => {
                    let range = self.block_range(first + i as u64, size);
                    Some(fetch(range).await?)
                }
            };
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// For the blocks `indices` of `keys` (misses): the ones another reader is fetching, to
    /// wait for, and the ones now registered as fetched by us.
    #[allow(clippy::type_complexity)]
    fn claim(
        &self,
        keys: &[BlockKey],
        indices: &[usize],
    ) -> (
        Vec<(usize, Waiter)>,
        Vec<(usize, tokio::sync::oneshot::Sender<Bytes>)>,
    ) {
        let mut waiting = Vec::new();
        let mut mine = Vec::new();
        let mut inflight = lock(&self.inflight);
        for &i in indices {
            let key = &keys[i];
            if let Some(w) = inflight.get(key) {
                waiting.push((i, w.clone()));
            } else {
                let (tx, rx) = tokio::sync::oneshot::channel::<Bytes>();
                inflight.insert(key.clone(), rx.map(Result::ok).boxed().shared());
                mine.push((i, tx));
            }
        }
        drop(inflight);
        self.counters
            .coalesced
            .fetch_add(waiting.len() as u64, Ordering::Relaxed);
        (waiting, mine)
    }

    fn block_range(&self, index: u64, size: u64) -> Range<u64> {
        let start = index * self.block_size;
        start..(start + self.block_size).min(size)
    }

    /// The blocks of `keys` the memory tier holds, not yet counted as hits.
    fn peek_memory(&self, keys: &[BlockKey]) -> Vec<Option<Bytes>> {
        let mut hot = lock(&self.hot);
        keys.iter().map(|key| hot.get(key)).collect()
    }

    /// Counts the memory tier's blocks as hits and puts them in `out`.
    fn take_from_memory(&self, hot: Vec<Option<Bytes>>, out: &mut [Option<Bytes>]) {
        for (i, bytes) in hot.into_iter().enumerate() {
            if let Some(bytes) = bytes {
                self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_from_memory
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                out[i] = Some(bytes);
            }
        }
    }

    /// Where the disk tier has the blocks of `keys` that are not in `hot` (nothing is read).
    async fn lookup_disk(
        &self,
        keys: &[BlockKey],
        hot: &[Option<Bytes>],
    ) -> Vec<Option<SlotEntry>> {
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| hot[i].is_none()).collect();
        let mut entries = vec![None; keys.len()];
        if missing.is_empty() {
            return entries;
        }
        let asked: Vec<&BlockKey> = missing.iter().map(|&i| &keys[i]).collect();
        let found = self.slots.lookup(&asked).await;
        for (i, entry) in missing.into_iter().zip(found) {
            entries[i] = entry;
        }
        entries
    }

    /// Reads the blocks `lookup_disk` found into `out`; one that cannot be trusted stays a
    /// miss.
    async fn fill_from_disk(
        &self,
        keys: &[BlockKey],
        on_disk: Vec<Option<SlotEntry>>,
        out: &mut [Option<Bytes>],
    ) {
        let reads = on_disk
            .into_iter()
            .enumerate()
            .filter_map(|(i, entry)| entry.map(|e| (i, e)))
            .map(|(i, entry)| async move { (i, self.read_slot(&keys[i], entry).await) });
        for (i, bytes) in futures::future::join_all(reads).await {
            if let Some(bytes) = bytes {
                self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_from_disk
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                lock(&self.hot).insert(keys[i].clone(), bytes.clone());
                out[i] = Some(bytes);
            }
        }
    }

    /// Reads and verifies one slot; `None` (and the block dropped) if it cannot be trusted.
    async fn read_slot(&self, key: &BlockKey, entry: SlotEntry) -> Option<Bytes> {
        self.read_slot_range(key, &entry, 0..entry.len as usize)
            .await
    }

    /// Reads `range` of a cached block from its slot, verifying the checksums of the chunks
    /// it covers (the read is widened to chunk and I/O alignment, then trimmed).
    async fn read_slot_range(
        &self,
        key: &BlockKey,
        entry: &SlotEntry,
        range: Range<usize>,
    ) -> Option<Bytes> {
        let unit = self.align.max(index::CHUNK);
        let start = range.start / unit * unit;
        let end = range.end.next_multiple_of(unit);
        let offset = entry.slot as u64 * self.block_size + start as u64;
        let read = match io::AlignedBuf::zeroed(end - start, self.align) {
            Ok(buf) => self.io.read_at(buf, offset).await,
            Err(e) => Err(e),
        };
        if read.is_ok() && !self.slots.unchanged(entry) {
            // The slot changed hands while (or before) we read it: a miss, not a bad disk.
            return None;
        }
        match read {
            Ok(buf) => {
                let valid = (entry.len as usize).min(end) - start;
                if entry.verify(start, &buf.as_slice()[..valid]) {
                    let from = range.start - start;
                    let to = range.end.min(entry.len as usize) - start;
                    return Some(Bytes::copy_from_slice(&buf.as_slice()[from..to]));
                }
                self.counters
                    .checksum_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    slot = entry.slot,
                    "cached block failed its checksum; fetching it again"
                );
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(slot = entry.slot, error = %e, "reading the cache disk failed; fetching from the store");
            }
        }
        self.slots.remove(key, entry.slot).await;
        None
    }

    /// `range` of block `index` if the block is cached, reading only the chunks it covers from
    /// disk: small random reads must not pay for the whole block. `Ok(None)` on a miss. A hit
    /// is read and returned only once `permit` (awaited only on a hit) said yes; its error is
    /// the call's (see [`Self::read_blocks_gated`]).
    pub async fn read_cached_range<P>(
        &self,
        obj: &ObjectId,
        index: u64,
        range: Range<usize>,
        permit: P,
    ) -> StoreResult<Option<Bytes>>
    where
        P: Future<Output = StoreResult<()>>,
    {
        let key = obj.block_key(index);
        let hot = lock(&self.hot).get(&key);
        if let Some(block) = hot {
            let to = range.end.min(block.len());
            if range.start < to {
                permit.await?;
                self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_from_memory
                    .fetch_add((to - range.start) as u64, Ordering::Relaxed);
                return Ok(Some(block.slice(range.start..to)));
            }
        }
        let Some(entry) = self.slots.lookup(&[&key]).await.pop().flatten() else {
            return Ok(None);
        };
        if range.start >= entry.len as usize {
            return Ok(None);
        }
        permit.await?;
        let Some(bytes) = self.read_slot_range(&key, &entry, range).await else {
            return Ok(None);
        };
        self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_from_disk
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(Some(bytes))
    }

    /// Fetches our misses in runs of consecutive blocks, wakes the waiters, caches the blocks.
    async fn fetch_runs<F>(
        self: &Arc<Self>,
        keys: &[BlockKey],
        first: u64,
        size: u64,
        mine: Vec<(usize, tokio::sync::oneshot::Sender<Bytes>)>,
        fetch: &F,
    ) -> StoreResult<Vec<(usize, Bytes)>>
    where
        F: Fn(Range<u64>) -> BoxFuture<'static, StoreResult<Bytes>>,
    {
        // Whatever happens (an error, or this future being dropped), no key of ours may stay
        // registered as in flight: waiters see their sender dropped and fetch themselves.
        let _unregister = Unregister {
            cache: self,
            keys: mine.iter().map(|(i, _)| keys[*i].clone()).collect(),
        };
        let mut runs: Vec<Vec<(usize, tokio::sync::oneshot::Sender<Bytes>)>> = Vec::new();
        for item in mine {
            match runs.last_mut() {
                Some(run) if run.last().is_some_and(|(i, _)| *i + 1 == item.0) => run.push(item),
                _ => runs.push(vec![item]),
            }
        }
        let mut done = Vec::new();
        for run in runs {
            let start = self.block_range(first + run[0].0 as u64, size).start;
            let end = self
                .block_range(first + run[run.len() - 1].0 as u64, size)
                .end;
            self.counters
                .misses
                .fetch_add(run.len() as u64, Ordering::Relaxed);
            let whole = fetch(start..end).await?;
            self.counters
                .bytes_from_store
                .fetch_add(whole.len() as u64, Ordering::Relaxed);
            for (n, (i, tx)) in run.into_iter().enumerate() {
                let bytes = nth_block(&whole, n, self.block_size);
                let key = keys[i].clone();
                lock(&self.hot).insert(key.clone(), bytes.clone());
                lock(&self.inflight).remove(&key);
                let _ = tx.send(bytes.clone());
                self.store_later(key, bytes.clone()).await;
                done.push((i, bytes));
            }
        }
        Ok(done)
    }

    /// Writes a block to the disk tier in the background; when the disk is too far behind,
    /// waits (warm-up) or skips the block (mounts).
    async fn store_later(self: &Arc<Self>, key: BlockKey, bytes: Bytes) {
        let permit = if self.wait_for_disk {
            self.writes.clone().acquire_owned().await.ok()
        } else {
            self.writes.clone().try_acquire_owned().ok()
        };
        let Some(permit) = permit else {
            self.counters.writes_skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let cache = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            cache.write_block(key, bytes).await;
        });
    }

    /// Waits until every block handed to the disk tier so far is written (or failed).
    pub async fn drain_writes(&self) {
        let _all = self.writes.acquire_many(MAX_PENDING_WRITES as u32).await;
    }

    async fn write_block(&self, key: BlockKey, bytes: Bytes) {
        let Some(reserved) = self.slots.reserve(&key).await else {
            return;
        };
        let entry = SlotEntry::new(reserved.slot(), &bytes);
        let offset = reserved.slot() as u64 * self.block_size;
        let written = match io::AlignedBuf::from_slice_padded(&bytes, self.align) {
            Ok(buf) => self.io.write_at(buf, offset).await,
            Err(e) => Err(e),
        };
        let result = match written {
            Ok(_) => self.slots.commit(key, entry, reserved).await,
            Err(e) => {
                self.slots.abandon(reserved).await;
                Err(e)
            }
        };
        if let Err(e) = result {
            let n = self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            if n % 1000 == 0 {
                tracing::warn!(error = %e, errors = n + 1, "cache disk write failed; serving from the store without caching");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn open(dir: &Path, engine: EnginePreference) -> Arc<BlockCache> {
        BlockCache::open(&CacheConfig {
            disk: DiskTier::Dir {
                dir: dir.to_path_buf(),
                size: 64 * 4096,
            },
            block_size: 4096,
            memory: 8 * 4096,
            engine,
            wait_for_disk: false,
        })
        .unwrap()
    }

    fn object() -> ObjectId {
        ObjectId {
            store: Arc::from("test"),
            key: Arc::from("k"),
            etag: Arc::from("\"e1\""),
        }
    }

    /// A fake store read: byte `i` of the object is `i % 251`; counts calls.
    fn source(
        calls: Arc<AtomicUsize>,
    ) -> impl Fn(Range<u64>) -> BoxFuture<'static, StoreResult<Bytes>> {
        move |range: Range<u64>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(Bytes::from(
                    range.map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
                ))
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn concurrent_misses_of_a_block_make_one_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), EnginePreference::ThreadPool);
        let calls = Arc::new(AtomicUsize::new(0));
        let obj = object();
        let (a, b) = tokio::join!(
            cache.read_blocks(&obj, 0, 2, 10_000, source(calls.clone())),
            cache.read_blocks(&obj, 0, 2, 10_000, source(calls.clone())),
        );
        assert_eq!(a.unwrap(), b.unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one GET for both readers");
        assert_eq!(cache.stats().coalesced, 2);
    }

    #[tokio::test]
    async fn blocks_come_back_from_disk_after_reopening_and_bad_ones_are_refetched() {
        let dir = tempfile::tempdir().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let obj = object();
        let want: Vec<u8> = (0..10_000u64).map(|i| (i % 251) as u8).collect();
        {
            let cache = open(dir.path(), EnginePreference::Auto);
            let got = cache
                .read_blocks(&obj, 0, 3, 10_000, source(calls.clone()))
                .await
                .unwrap();
            assert_eq!(got.concat(), want);
            while cache.stats().disk_blocks < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let cache = open(dir.path(), EnginePreference::Auto);
        let got = cache
            .read_blocks(&obj, 0, 3, 10_000, source(calls.clone()))
            .await
            .unwrap();
        assert_eq!(got.concat(), want);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "served from disk after reopening"
        );
        assert_eq!(cache.stats().disk_hits, 3);
        drop(cache);

        // Corrupt every slot: the next read must refetch, never return the garbage.
        std::fs::write(dir.path().join("data"), vec![0xAB; 64 * 4096]).unwrap();
        let cache = open(dir.path(), EnginePreference::ThreadPool);
        let got = cache
            .read_blocks(&obj, 0, 3, 10_000, source(calls.clone()))
            .await
            .unwrap();
        assert_eq!(got.concat(), want);
        assert_eq!(cache.stats().checksum_failures, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_new_etag_never_sees_old_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), EnginePreference::ThreadPool);
        let calls = Arc::new(AtomicUsize::new(0));
        let old = object();
        cache
            .read_blocks(&old, 0, 1, 4096, source(calls.clone()))
            .await
            .unwrap();
        let new = ObjectId {
            etag: Arc::from("\"e2\""),
            ..object()
        };
        cache
            .read_blocks(&new, 0, 1, 4096, source(calls.clone()))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_gated_read_asks_its_permit_only_for_what_it_did_not_fetch() {
        use crate::store::StoreError;
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), EnginePreference::ThreadPool);
        let calls = Arc::new(AtomicUsize::new(0));
        let asked = Arc::new(AtomicUsize::new(0));
        let permit = |answer: StoreResult<()>| {
            let asked = asked.clone();
            async move {
                asked.fetch_add(1, Ordering::SeqCst);
                answer
            }
        };
        let denied = || Err(StoreError::AccessDenied("403".into()));
        let obj = object();
        // Nothing cached: the permit is never asked (a refusing one changes nothing).
        let got = cache
            .read_blocks_gated(&obj, 0, 2, 10_000, source(calls.clone()), permit(denied()))
            .await
            .unwrap();
        assert_eq!(got.concat().len(), 2 * 4096);
        assert_eq!(asked.load(Ordering::SeqCst), 0);
        // Cached: refused, nothing is returned and no hit is counted, in either call.
        let before = cache.stats();
        let err = cache
            .read_blocks_gated(&obj, 0, 3, 10_000, source(calls.clone()), permit(denied()))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AccessDenied(_)), "{err:?}");
        let err = cache
            .read_cached_range(&obj, 1, 10..20, permit(denied()))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AccessDenied(_)), "{err:?}");
        let after = cache.stats();
        assert_eq!(
            (after.memory_hits, after.disk_hits, after.bytes_from_memory),
            (
                before.memory_hits,
                before.disk_hits,
                before.bytes_from_memory
            )
        );
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        // Allowed: asked once per call, however many blocks are cached.
        let got = cache
            .read_blocks_gated(&obj, 0, 2, 10_000, source(calls.clone()), permit(Ok(())))
            .await
            .unwrap();
        assert_eq!(got.concat().len(), 2 * 4096);
        assert_eq!(asked.load(Ordering::SeqCst), 3);
        let range = cache
            .read_cached_range(&obj, 1, 10..20, permit(Ok(())))
            .await
            .unwrap();
        assert_eq!(range.unwrap().len(), 10);
        // A miss of the cached-range path asks nothing.
        let miss = cache
            .read_cached_range(&obj, 7, 0..10, permit(denied()))
            .await
            .unwrap();
        assert!(miss.is_none());
        assert_eq!(asked.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn a_second_process_cannot_share_the_cache_dir() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _guard = rt.enter();
        let _first = open(dir.path(), EnginePreference::ThreadPool);
        let second = BlockCache::open(&CacheConfig {
            disk: DiskTier::Dir {
                dir: dir.path().to_path_buf(),
                size: 64 * 4096,
            },
            block_size: 4096,
            memory: 0,
            engine: EnginePreference::ThreadPool,
            wait_for_disk: false,
        });
        assert!(second.err().unwrap().to_string().contains("in use"));
    }
}
