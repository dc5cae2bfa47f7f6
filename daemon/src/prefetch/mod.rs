//! Reads of one open object: block-aligned ranged GETs, an adaptive readahead window, and a
//! global memory budget.
//!
//! Objects are read in fixed blocks (1 MiB by default, the unit the block cache keeps). A
//! read waits only for the blocks it covers; blocks ahead of a sequential reader are fetched
//! concurrently in the background, as many as the window says and the memory budget allows.
//! Blocks a reader has passed are dropped at once, and a handle's in-flight GETs are cancelled
//! when it is closed.

mod window;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::cache::{nth_block, BlockCache, ObjectId};
use crate::memory::{MemoryLimiter, Reservation};
use crate::store::{ObjectStore, StoreError, StoreResult};
pub use window::{Access, Window};

#[derive(Clone, Debug)]
pub struct PrefetchConfig {
    pub block_size: u64,
    /// Largest readahead window per handle.
    pub max_window: u64,
    /// GETs in flight across the whole engine.
    pub max_concurrent_gets: usize,
    /// Consecutive blocks wanted at once are fetched with one GET of up to this size.
    pub max_get_size: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            block_size: 1 << 20,
            max_window: 64 << 20,
            max_concurrent_gets: 32,
            max_get_size: 8 << 20,
        }
    }
}

/// What every reader shares: the store, the memory budget and the GET concurrency limit.
pub struct Fetcher {
    store: Arc<dyn ObjectStore>,
    memory: Arc<MemoryLimiter>,
    gets: Arc<Semaphore>,
    config: PrefetchConfig,
    cache: Option<NodeCache>,
}

/// The node cache and the name this store has in it.
#[derive(Clone)]
pub struct NodeCache {
    pub cache: Arc<BlockCache>,
    /// Identifies the store (endpoint and bucket, or local root) in cache keys.
    pub store_id: Arc<str>,
}

impl Fetcher {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        memory: Arc<MemoryLimiter>,
        config: PrefetchConfig,
        cache: Option<NodeCache>,
    ) -> Arc<Fetcher> {
        Arc::new(Fetcher {
            store,
            memory,
            gets: Arc::new(Semaphore::new(config.max_concurrent_gets.max(1))),
            config,
            cache,
        })
    }

    /// One ranged GET under the engine-wide concurrency limit.
    async fn get(&self, key: &str, range: Range<u64>, etag: Option<&str>) -> StoreResult<Bytes> {
        let _permit = self
            .gets
            .acquire()
            .await
            .map_err(|_| StoreError::Rejected("engine shutting down".into()))?;
        self.store.get_range(key, range, etag).await
    }

    /// Blocks `first..first + count` of an object: through the node cache when there is one
    /// (and the object has an ETag to key it by), else with one GET split into blocks.
    async fn blocks(
        self: Arc<Self>,
        key: Arc<str>,
        etag: Option<Arc<str>>,
        size: u64,
        first: u64,
        count: u64,
    ) -> StoreResult<Arc<Vec<Bytes>>> {
        let bs = self.config.block_size;
        if let (Some(node), Some(etag)) = (self.cache.clone(), etag.clone()) {
            let obj = ObjectId {
                store: node.store_id.clone(),
                key: key.clone(),
                etag: etag.clone(),
            };
            let fetch = |range: Range<u64>| {
                let (me, key, etag) = (self.clone(), key.clone(), etag.clone());
                async move { me.get(&key, range, Some(&etag)).await }.boxed()
            };
            let blocks = node
                .cache
                .read_blocks(&obj, first, count, size, fetch)
                .await?;
            return Ok(Arc::new(blocks));
        }
        let range = first * bs..((first + count) * bs).min(size);
        let whole = self.get(&key, range, etag.as_deref()).await?;
        let blocks = (0..count as usize)
            .map(|n| nth_block(&whole, n, bs))
            .collect();
        Ok(Arc::new(blocks))
    }
}

type BlockFuture = Shared<BoxFuture<'static, StoreResult<Bytes>>>;

/// One block fetched or being fetched; dropping it frees its share of the memory budget.
struct Block {
    data: BlockFuture,
    _memory: Reservation,
}

/// Cancels a GET once no future that could want its bytes is left. Every block future of a
/// GET holds one until it completes, so a read still waiting keeps the GET alive even if its
/// block was evicted from the map meanwhile.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a read waits for.
enum Plan {
    /// These blocks, being fetched or fetched.
    Blocks(Vec<(u64, BlockFuture)>),
    /// Try the node cache for just the requested bytes of one block first.
    CachedRange(ObjectId),
    /// A random read with no node cache to fill: GET just the requested bytes. Fetching
    /// whole blocks would read (and copy) up to 256x what a 4 KiB reader asked for.
    ExactRange,
}

struct ReadState {
    window: Window,
    blocks: BTreeMap<u64, Block>,
}

/// An open object being read.
pub struct ObjectReader {
    fetcher: Arc<Fetcher>,
    key: Arc<str>,
    etag: Option<Arc<str>>,
    size: u64,
    state: Mutex<ReadState>,
    /// The object itself, when the store is a local directory and no node cache sits in
    /// between: reads then go straight from the file to the caller (see [`Self::local_file`]).
    local: Option<std::fs::File>,
}

impl ObjectReader {
    pub fn new(fetcher: Arc<Fetcher>, key: &str, etag: Option<&str>, size: u64) -> ObjectReader {
        let window = Window::new(fetcher.config.block_size, fetcher.config.max_window);
        let local = if fetcher.cache.is_some() {
            None // the node cache wants to see (and keep) the blocks
        } else {
            match fetcher.store.open_local(key, etag) {
                Some(Ok(file)) => Some(file),
                Some(Err(e)) => {
                    // The block path reports the problem on the first read.
                    tracing::debug!(key, error = %e, "no direct file access; reading by blocks");
                    None
                }
                None => None,
            }
        };
        ObjectReader {
            fetcher,
            key: Arc::from(key),
            etag: etag.map(Arc::from),
            size,
            state: Mutex::new(ReadState {
                window,
                blocks: BTreeMap::new(),
            }),
            local,
        }
    }

    /// The open object file when the store is a local directory and there is no node cache.
    /// A caller that can read a file straight into its destination (virtio-fs: guest memory,
    /// FUSE: the reply buffer) should use it instead of [`Self::read`]: one copy, no block
    /// fetches, no readahead of our own (the kernel's page cache does that for local files).
    /// The file stays the version that was opened, as with any open local file.
    pub fn local_file(&self) -> Option<&std::fs::File> {
        self.local.as_ref()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Reads up to `len` bytes at `offset`; short only at the end of the object.
    pub async fn read(&self, offset: u64, len: u64) -> StoreResult<Vec<Bytes>> {
        if offset >= self.size || len == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + len).min(self.size);
        let bs = self.fetcher.config.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let wanted = match self.plan(offset, end, first, last) {
            Plan::Blocks(wanted) => wanted,
            Plan::CachedRange(id) => {
                // A small random read of a cached block: read just its bytes.
                let block_start = first * bs;
                let range = (offset - block_start) as usize..(end - block_start) as usize;
                if let Some(node) = &self.fetcher.cache {
                    let served = node
                        .cache
                        .read_cached_range(&id, first, range, async { Ok(()) })
                        .await?;
                    if let Some(bytes) = served {
                        if bytes.len() as u64 == end - offset {
                            return Ok(vec![bytes]);
                        }
                    }
                }
                self.demand_blocks(first, last)
            }
            Plan::ExactRange => {
                let bytes = self
                    .fetcher
                    .get(&self.key, offset..end, self.etag.as_deref())
                    .await?;
                if bytes.len() as u64 != end - offset {
                    return Err(StoreError::Changed);
                }
                return Ok(vec![bytes]);
            }
        };

        let mut out = Vec::with_capacity(wanted.len());
        for (index, fut) in wanted {
            let data = match fut.await {
                Ok(data) => data,
                Err(e) => {
                    // Forget the failed block so the next read asks the store again.
                    self.lock().blocks.remove(&index);
                    return Err(e);
                }
            };
            let block_start = index * bs;
            let from = offset.max(block_start) - block_start;
            let to = end.min(block_start + data.len() as u64) - block_start;
            if from >= to {
                return Err(StoreError::Changed);
            }
            out.push(data.slice(from as usize..to as usize));
        }
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts what blocks `first..=last` need (no readahead) and returns their futures.
    fn demand_blocks(&self, first: u64, last: u64) -> Vec<(u64, BlockFuture)> {
        let mut state = self.lock();
        let demand: Vec<(u64, Reservation)> = (first..=last)
            .filter(|i| !state.blocks.contains_key(i))
            .map(|i| (i, self.fetcher.memory.reserve(self.block_len(i))))
            .collect();
        self.start_runs(&mut state, demand);
        (first..=last)
            .filter_map(|i| state.blocks.get(&i).map(|b| (i, b.data.clone())))
            .collect()
    }

    /// The cache identity of this object, if the node cache can hold it.
    fn cache_id(&self) -> Option<ObjectId> {
        let node = self.fetcher.cache.as_ref()?;
        Some(ObjectId {
            store: node.store_id.clone(),
            key: self.key.clone(),
            etag: self.etag.clone()?,
        })
    }

    /// Updates the window, drops passed blocks, starts the GETs this read needs and the ones
    /// the window wants, and returns the futures of the blocks covering the request, or, for
    /// a random read within one block that the node cache may hold, says to try that first.
    fn plan(&self, offset: u64, end: u64, first: u64, last: u64) -> Plan {
        let bs = self.fetcher.config.block_size;
        let mut state = self.lock();
        let previous_ahead = state.window.ahead();
        let prefetched = (first..=last).all(|i| state.blocks.contains_key(&i));
        let access = state.window.on_read(offset, end - offset, prefetched);
        let ahead = match access {
            Access::Sequential { ahead } => {
                let keep_from = first.saturating_sub(1);
                state.blocks.retain(|&i, _| i >= keep_from);
                ahead
            }
            Access::Random => {
                // Keep what a sibling read of the old window may still want; drop the rest.
                let margin = previous_ahead + 1;
                let keep = first.saturating_sub(margin)..=last + margin;
                state.blocks.retain(|i, _| keep.contains(i));
                let held = (first..=last).all(|i| state.blocks.contains_key(&i));
                if !held {
                    match self.cache_id() {
                        Some(id) if first == last => return Plan::CachedRange(id),
                        // The node cache keeps whole blocks: fetch them so they get cached.
                        Some(_) => {}
                        // Nothing could keep a whole block beyond this read.
                        None => return Plan::ExactRange,
                    }
                }
                0
            }
        };
        let demand: Vec<(u64, Reservation)> = (first..=last)
            .filter(|i| !state.blocks.contains_key(i))
            .map(|i| (i, self.fetcher.memory.reserve(self.block_len(i))))
            .collect();
        self.start_runs(&mut state, demand);
        let last_block = (self.size - 1) / bs;
        let mut prefetch = Vec::new();
        for index in (last + 1..=last + ahead).take_while(|&i| i <= last_block) {
            if state.blocks.contains_key(&index) {
                continue;
            }
            let Some(memory) = self.fetcher.memory.try_reserve(self.block_len(index)) else {
                break; // out of budget: prefetch less rather than more memory
            };
            prefetch.push((index, memory));
        }
        // Top the window up in runs, not block by block: a reader advancing one block per
        // read would otherwise turn into one small GET per read.
        let max_run = (self.fetcher.config.max_get_size / bs).max(1);
        let worth_it = prefetch.len() as u64 >= max_run.min(ahead.div_ceil(2)).max(1);
        if worth_it {
            self.start_runs(&mut state, prefetch);
        }
        Plan::Blocks(
            (first..=last)
                .filter_map(|i| state.blocks.get(&i).map(|b| (i, b.data.clone())))
                .collect(),
        )
    }

    /// Starts GETs for `blocks` (ascending), one GET per run of consecutive blocks up to the
    /// coalescing limit: fewer, larger requests stream faster from object stores.
    fn start_runs(&self, state: &mut ReadState, blocks: Vec<(u64, Reservation)>) {
        let max_run = (self.fetcher.config.max_get_size / self.fetcher.config.block_size).max(1);
        let mut run: Vec<(u64, Reservation)> = Vec::new();
        for (index, memory) in blocks {
            let contiguous = run.last().is_some_and(|(prev, _)| *prev + 1 == index);
            if !run.is_empty() && (!contiguous || run.len() as u64 == max_run) {
                self.start_run(state, std::mem::take(&mut run));
            }
            run.push((index, memory));
        }
        if !run.is_empty() {
            self.start_run(state, run);
        }
    }

    fn start_run(&self, state: &mut ReadState, run: Vec<(u64, Reservation)>) {
        let first = run[0].0;
        let task = tokio::spawn(self.fetcher.clone().blocks(
            self.key.clone(),
            self.etag.clone(),
            self.size,
            first,
            run.len() as u64,
        ));
        let guard = Arc::new(AbortOnDrop(task.abort_handle()));
        let whole = task
            .map(|joined| {
                joined.unwrap_or_else(|e| Err(StoreError::Rejected(format!("fetch task: {e}"))))
            })
            .boxed()
            .shared();
        for (index, memory) in run {
            let whole = whole.clone();
            let guard = guard.clone();
            let n = (index - first) as usize;
            let data = async move {
                let _guard = guard;
                let blocks = whole.await?;
                match blocks.get(n) {
                    Some(block) if !block.is_empty() => Ok(block.clone()),
                    _ => Err(StoreError::Changed),
                }
            }
            .boxed()
            .shared();
            state.blocks.insert(
                index,
                Block {
                    data,
                    _memory: memory,
                },
            );
        }
    }

    fn block_len(&self, index: u64) -> u64 {
        let bs = self.fetcher.config.block_size;
        (self.size - index * bs).min(bs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    async fn reader_over(
        bytes: &[u8],
        limit: u64,
    ) -> (ObjectReader, Arc<MemoryLimiter>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("obj"), bytes).unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let info = store.head("obj").await.unwrap();
        let memory = MemoryLimiter::new(limit);
        let config = PrefetchConfig {
            block_size: 4096,
            max_window: 64 * 4096,
            max_concurrent_gets: 4,
            max_get_size: 4 * 4096,
        };
        let fetcher = Fetcher::new(store, memory.clone(), config, None);
        let reader = ObjectReader::new(fetcher, "obj", info.etag.as_deref(), info.size);
        (reader, memory, dir)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn concat(parts: Vec<Bytes>) -> Vec<u8> {
        parts.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[tokio::test]
    async fn sequential_and_random_reads_return_exact_bytes() {
        let data = pattern(1_000_000);
        let (reader, _m, _d) = reader_over(&data, 1 << 30).await;
        let mut off = 0;
        while off < data.len() {
            let got = concat(reader.read(off as u64, 10_000).await.unwrap());
            let end = (off + 10_000).min(data.len());
            assert_eq!(got, &data[off..end]);
            off = end;
        }
        for (o, l) in [
            (999_990u64, 100u64),
            (5, 1),
            (4095, 2),
            (123_456, 70_000),
            (2_000_000, 5),
        ] {
            let got = concat(reader.read(o, l).await.unwrap());
            let s = (o as usize).min(data.len());
            let e = ((o + l) as usize).min(data.len());
            assert_eq!(got, &data[s..e], "offset {o} len {l}");
        }
    }

    #[tokio::test]
    async fn prefetch_never_takes_more_than_the_budget() {
        let data = pattern(2_000_000);
        // Budget of 8 blocks; the window wants up to 64.
        let (reader, memory, _d) = reader_over(&data, 8 * 4096).await;
        for i in 0..200u64 {
            reader.read(i * 4096, 4096).await.unwrap();
            // Demand blocks (at most 2 here) may go over; prefetch may not.
            assert!(
                memory.used() <= 8 * 4096 + 2 * 4096,
                "used {}",
                memory.used()
            );
        }
        drop(reader);
        assert_eq!(memory.used(), 0, "closing the handle frees everything");
    }

    /// A remote-like store over a local directory: no `open_local`, and it counts the bytes
    /// its GETs return.
    struct Counting {
        inner: Arc<dyn ObjectStore>,
        bytes: std::sync::atomic::AtomicU64,
    }

    #[async_trait::async_trait]
    impl ObjectStore for Counting {
        fn describe(&self) -> String {
            "counting".into()
        }
        async fn check(&self, prefix: &str) -> StoreResult<()> {
            self.inner.check(prefix).await
        }
        async fn head(&self, key: &str) -> StoreResult<crate::store::ObjectInfo> {
            self.inner.head(key).await
        }
        async fn get_range(
            &self,
            key: &str,
            range: Range<u64>,
            etag: Option<&str>,
        ) -> StoreResult<Bytes> {
            let got = self.inner.get_range(key, range, etag).await?;
            self.bytes
                .fetch_add(got.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(got)
        }
        async fn list(
            &self,
            prefix: &str,
            token: Option<&str>,
            max_keys: usize,
        ) -> StoreResult<crate::store::ListPage> {
            self.inner.list(prefix, token, max_keys).await
        }
        async fn put(&self, key: &str, body: Bytes) -> StoreResult<Option<String>> {
            self.inner.put(key, body).await
        }
        async fn create_upload(&self, key: &str) -> StoreResult<String> {
            self.inner.create_upload(key).await
        }
        async fn upload_part(
            &self,
            key: &str,
            upload_id: &str,
            number: i32,
            body: Bytes,
        ) -> StoreResult<crate::store::UploadedPart> {
            self.inner.upload_part(key, upload_id, number, body).await
        }
        async fn complete_upload(
            &self,
            key: &str,
            upload_id: &str,
            parts: &[crate::store::UploadedPart],
        ) -> StoreResult<Option<String>> {
            self.inner.complete_upload(key, upload_id, parts).await
        }
        async fn abort_upload(&self, key: &str, upload_id: &str) -> StoreResult<()> {
            self.inner.abort_upload(key, upload_id).await
        }
        async fn delete(&self, key: &str) -> StoreResult<()> {
            self.inner.delete(key).await
        }
        async fn copy(&self, from: &str, to: &str) -> StoreResult<()> {
            self.inner.copy(from, to).await
        }
    }

    #[tokio::test]
    async fn random_reads_without_a_node_cache_fetch_only_what_they_ask_for() {
        let data = pattern(1_000_000);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("obj"), &data).unwrap();
        let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let store = Arc::new(Counting {
            inner: local,
            bytes: Default::default(),
        });
        let info = store.head("obj").await.unwrap();
        let config = PrefetchConfig {
            block_size: 64 << 10,
            ..PrefetchConfig::default()
        };
        let fetcher = Fetcher::new(store.clone(), MemoryLimiter::new(1 << 30), config, None);
        let reader = ObjectReader::new(fetcher, "obj", info.etag.as_deref(), info.size);
        assert!(
            reader.local_file().is_none(),
            "a remote store has no local file"
        );
        // Far apart, so that none of them looks sequential; one crosses a block boundary.
        let reads = [
            (700_000u64, 4096u64),
            (100_000, 4096),
            (900_000, 5000),
            (300_000, 4096),
            ((10 << 16) - 100, 4096),
            (999_000, 4096), // short: the end of the object
        ];
        let mut asked = 0;
        for (offset, len) in reads {
            let got = concat(reader.read(offset, len).await.unwrap());
            let end = ((offset + len) as usize).min(data.len());
            assert_eq!(
                got,
                &data[offset as usize..end],
                "offset {offset} len {len}"
            );
            asked += (end - offset as usize) as u64;
        }
        let fetched = store.bytes.load(std::sync::atomic::Ordering::Relaxed);
        // The first read of a handle at a nonzero offset is random too: exact bytes only.
        assert_eq!(fetched, asked, "random reads fetched whole blocks");
    }

    #[tokio::test]
    async fn a_local_store_hands_readers_the_file_itself() {
        let data = pattern(100_000);
        let (reader, _m, _d) = reader_over(&data, 1 << 30).await;
        let file = reader
            .local_file()
            .expect("a local store without a node cache");
        let mut got = vec![0u8; 1000];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut got, 5000).unwrap();
        assert_eq!(got, &data[5000..6000]);
    }

    #[tokio::test]
    async fn a_changed_object_is_an_error_not_stale_bytes() {
        let data = pattern(100_000);
        let (reader, _m, dir) = reader_over(&data, 1 << 30).await;
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(dir.path().join("obj"), pattern(100_001)).unwrap();
        let err = reader.read(50_000, 10).await.unwrap_err();
        assert!(matches!(err, StoreError::Changed), "{err:?}");
    }
}
