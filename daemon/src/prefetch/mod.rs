//! Reads of one open object: block-aligned ranged GETs, an adaptive readahead window, and a
//! global memory budget.
//!
//! Objects are read in fixed blocks (1 MiB by default, the unit the block cache keeps). A
//! read waits only for the blocks it covers; blocks ahead of a sequential reader are fetched
//! concurrently in the background, as many as the window says and the memory budget allows.
//! Blocks a reader has passed are dropped at once, and a handle's in-flight GETs are cancelled
//! when it is closed.
//!
//! Blocks the node cache holds may have been cached by another volume, with other credentials:
//! they are served only once this volume's own credentials read that object version (see
//! [`proofs`]).

mod proofs;
mod window;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::cache::{nth_block, BlockCache, ObjectId};
use crate::memory::{MemoryLimiter, Reservation};
use crate::store::{ObjectStore, StoreError, StoreResult};
use proofs::{ReadProofs, Version, MAX_PROOFS};
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
    /// How long a proof that this volume may read an object version lets it be served that
    /// version's blocks from the node cache: the metadata TTL (`None`: forever, as in
    /// read-only dataset mode).
    pub read_proof_ttl: Option<Duration>,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            block_size: 1 << 20,
            max_window: 64 << 20,
            max_concurrent_gets: 32,
            max_get_size: 8 << 20,
            // The default metadata TTL.
            read_proof_ttl: Some(Duration::from_secs(1)),
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
    /// The object versions this volume's credentials were seen reading.
    proofs: ReadProofs,
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
            proofs: ReadProofs::new(config.read_proof_ttl, MAX_PROOFS),
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
    /// (and the object has an ETag to key it by), else with one GET split into blocks. Blocks
    /// this call did not fetch itself come from the cache only with a read proof (see
    /// [`Self::permit`]); a GET of ours that succeeds is one.
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
                async move {
                    let bytes = me.get(&key, range, Some(&etag)).await?;
                    me.proofs.record((key, etag));
                    Ok(bytes)
                }
                .boxed()
            };
            let permit = self.clone().permit(key.clone(), etag.clone());
            let blocks = node
                .cache
                .read_blocks_gated(&obj, first, count, size, fetch, permit)
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

    /// `range` of block `index` of `id` if the node cache holds it (`Ok(None)` on a miss),
    /// served only with a read proof, like [`Self::blocks`].
    async fn cached_range(
        self: &Arc<Self>,
        id: &ObjectId,
        index: u64,
        range: Range<usize>,
    ) -> StoreResult<Option<Bytes>> {
        let Some(node) = &self.cache else {
            return Ok(None);
        };
        let permit = self.clone().permit(id.key.clone(), id.etag.clone());
        node.cache.read_cached_range(id, index, range, permit).await
    }

    /// Succeeds once this volume's credentials are known to read `key` at `etag`: at once
    /// with a fresh proof (an earlier GET of ours, or an earlier proof), else after one
    /// conditional GET of the object's first byte (If-Match `etag`), shared by every reader
    /// asking at the same time. A GET, not a HEAD: it is the very permission a cache miss
    /// would need, whatever the store thinks HEAD requires. Refused (AccessDenied: EACCES
    /// above) or changed (a new ETag: `Changed`), nothing from the cache is served.
    async fn permit(self: Arc<Self>, key: Arc<str>, etag: Arc<str>) -> StoreResult<()> {
        let version: Version = (key, etag);
        let me = self.clone();
        let (key, etag) = version.clone();
        self.proofs
            .ensure(&version, move || {
                async move {
                    let result = me.get(&key, 0..1, Some(&etag)).await.map(|_| ());
                    if let Err(StoreError::AccessDenied(detail)) = &result {
                        tracing::warn!(
                            key = %key,
                            detail = %detail,
                            "this volume's credentials may not read the object: blocks other volumes cached are not served"
                        );
                    }
                    result
                }
                .boxed()
            })
            .await
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
                if let Some(bytes) = self.fetcher.cached_range(&id, first, range).await? {
                    if bytes.len() as u64 == end - offset {
                        return Ok(vec![bytes]);
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
            ..PrefetchConfig::default()
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

    /// A remote-like store over a local directory: no `open_local`; it counts the bytes its
    /// GETs return, its block GETs and its read proofs (GETs of the first byte), and refuses
    /// every GET (AccessDenied) while `deny` is set: the credentials of a volume that may list
    /// the bucket but not read its objects.
    struct Counting {
        inner: Arc<dyn ObjectStore>,
        bytes: std::sync::atomic::AtomicU64,
        gets: std::sync::atomic::AtomicU64,
        proofs: std::sync::atomic::AtomicU64,
        deny: std::sync::atomic::AtomicBool,
    }

    impl Counting {
        fn over(inner: Arc<dyn ObjectStore>) -> Arc<Counting> {
            Arc::new(Counting {
                inner,
                bytes: Default::default(),
                gets: Default::default(),
                proofs: Default::default(),
                deny: Default::default(),
            })
        }

        fn denying(inner: Arc<dyn ObjectStore>) -> Arc<Counting> {
            let store = Counting::over(inner);
            store.deny.store(true, std::sync::atomic::Ordering::SeqCst);
            store
        }

        /// (block GETs, proofs) so far.
        fn calls(&self) -> (u64, u64) {
            use std::sync::atomic::Ordering::SeqCst;
            (self.gets.load(SeqCst), self.proofs.load(SeqCst))
        }
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
            use std::sync::atomic::Ordering::SeqCst;
            let counter = if range == (0..1) {
                &self.proofs
            } else {
                &self.gets
            };
            counter.fetch_add(1, SeqCst);
            if self.deny.load(SeqCst) {
                return Err(StoreError::AccessDenied("HTTP 403 AccessDenied".into()));
            }
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
        async fn put(
            &self,
            key: &str,
            body: Bytes,
            meta: &crate::store::PosixMeta,
        ) -> StoreResult<Option<String>> {
            self.inner.put(key, body, meta).await
        }
        async fn create_upload(
            &self,
            key: &str,
            meta: &crate::store::PosixMeta,
        ) -> StoreResult<String> {
            self.inner.create_upload(key, meta).await
        }
        async fn set_meta(
            &self,
            key: &str,
            etag: Option<&str>,
            size: u64,
            meta: &crate::store::PosixMeta,
        ) -> StoreResult<Option<String>> {
            self.inner.set_meta(key, etag, size, meta).await
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
        let store = Counting::over(local);
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

    /// One node cache (memory tier of `memory` bytes, a disk tier) over one local object
    /// "obj", and volumes made of stores over it: every volume sees the same cache keys, as
    /// volumes of one bucket do on a node.
    struct Node {
        cache: Arc<BlockCache>,
        local: Arc<dyn ObjectStore>,
        data: Vec<u8>,
        etag: String,
        dirs: (tempfile::TempDir, tempfile::TempDir),
    }

    const BS: u64 = 4096;

    impl Node {
        async fn new(memory: u64) -> Node {
            let src = tempfile::tempdir().unwrap();
            let data = pattern(10 * BS as usize + 1234);
            std::fs::write(src.path().join("obj"), &data).unwrap();
            let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(src.path()).unwrap());
            let etag = local.head("obj").await.unwrap().etag.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let cache = BlockCache::open(&crate::cache::CacheConfig {
                disk: crate::cache::DiskTier::Dir {
                    dir: dir.path().to_path_buf(),
                    size: 64 * BS,
                },
                block_size: BS,
                memory,
                engine: crate::cache::EnginePreference::ThreadPool,
                wait_for_disk: true,
            })
            .unwrap();
            Node {
                cache,
                local,
                data,
                etag,
                dirs: (src, dir),
            }
        }

        fn volume(&self, store: Arc<Counting>, ttl: Option<Duration>) -> Arc<Fetcher> {
            let config = PrefetchConfig {
                block_size: BS,
                max_window: 16 * BS,
                max_concurrent_gets: 4,
                max_get_size: 4 * BS,
                read_proof_ttl: ttl,
            };
            let node = NodeCache {
                cache: self.cache.clone(),
                store_id: Arc::from("s3|http://store|bucket"),
            };
            Fetcher::new(store, MemoryLimiter::new(1 << 30), config, Some(node))
        }

        fn open(&self, volume: &Arc<Fetcher>) -> ObjectReader {
            let size = self.data.len() as u64;
            ObjectReader::new(volume.clone(), "obj", Some(&self.etag), size)
        }

        /// Reads the whole object through a new handle of `volume`, 10 000 bytes at a time.
        async fn read_all(&self, volume: &Arc<Fetcher>) -> StoreResult<Vec<u8>> {
            let reader = self.open(volume);
            let mut out = Vec::new();
            while (out.len() as u64) < reader.size() {
                out.extend(concat(reader.read(out.len() as u64, 10_000).await?));
            }
            Ok(out)
        }

        /// Blocks and bytes the cache served from either tier so far.
        fn served(&self) -> (u64, u64) {
            let s = self.cache.stats();
            (
                s.memory_hits + s.disk_hits,
                s.bytes_from_memory + s.bytes_from_disk,
            )
        }
    }

    const TTL: Option<Duration> = Some(Duration::from_secs(60));

    #[tokio::test]
    async fn another_volume_is_served_cached_blocks_after_one_proof_of_its_own() {
        let node = Node::new(1 << 20).await;
        let a_store = Counting::over(node.local.clone());
        let a = node.volume(a_store.clone(), TTL);
        assert_eq!(node.read_all(&a).await.unwrap(), node.data);
        let (a_gets, a_proofs) = a_store.calls();
        assert!(a_gets > 0, "the first reader fetches from the store");
        // A volume that fetched the blocks itself needs no proof to be served them again.
        assert_eq!(node.read_all(&a).await.unwrap(), node.data);
        let random = node.open(&a).read(5 * BS + 17, 100).await.unwrap();
        assert_eq!(concat(random), &node.data[5 * BS as usize + 17..][..100]);
        assert_eq!(a_store.calls(), (a_gets, a_proofs));
        assert_eq!(a_proofs, 0);

        let b_store = Counting::over(node.local.clone());
        let b = node.volume(b_store.clone(), TTL);
        let (one, two) = tokio::join!(node.read_all(&b), node.read_all(&b));
        assert_eq!(one.unwrap(), node.data);
        assert_eq!(two.unwrap(), node.data);
        assert_eq!(
            b_store.calls(),
            (0, 1),
            "one proof, shared, and no block GET"
        );
        // The proof is reused within the TTL, on every path that serves cached bytes.
        assert_eq!(node.read_all(&b).await.unwrap(), node.data);
        let random = node.open(&b).read(7 * BS + 5, 300).await.unwrap();
        assert_eq!(concat(random), &node.data[7 * BS as usize + 5..][..300]);
        let across = node.open(&b).read(3 * BS - 10, 20).await.unwrap();
        assert_eq!(concat(across), &node.data[3 * BS as usize - 10..][..20]);
        assert_eq!(b_store.calls(), (0, 1));
    }

    #[tokio::test]
    async fn a_run_partly_cached_is_proved_by_its_own_get() {
        let node = Node::new(1 << 20).await;
        // Blocks 0 and 1 cached by someone else (another volume, or `berth warm`).
        let obj = ObjectId {
            store: Arc::from("s3|http://store|bucket"),
            key: Arc::from("obj"),
            etag: Arc::from(node.etag.as_str()),
        };
        let local = node.local.clone();
        let fetch = move |range: Range<u64>| {
            let local = local.clone();
            async move { local.get_range("obj", range, None).await }.boxed()
        };
        let size = node.data.len() as u64;
        node.cache
            .read_blocks(&obj, 0, 2, size, fetch)
            .await
            .unwrap();
        // One read of blocks 0..4: two cached, two fetched with one GET of b's own, which is
        // all the proof the cached two need.
        let b_store = Counting::over(node.local.clone());
        let b = node.volume(b_store.clone(), TTL);
        let got = node.open(&b).read(0, 4 * BS).await.unwrap();
        assert_eq!(concat(got), &node.data[..4 * BS as usize]);
        let (gets, proofs) = b_store.calls();
        assert!(gets >= 1, "blocks 2 and 3 come from the store");
        assert_eq!(proofs, 0, "no proof request on top of b's own GET");
        assert!(
            node.cache.stats().memory_hits >= 2,
            "blocks 0 and 1 came from the cache"
        );
    }

    #[tokio::test]
    async fn a_proof_is_asked_for_again_once_the_ttl_has_passed() {
        let node = Node::new(1 << 20).await;
        let a = node.volume(Counting::over(node.local.clone()), TTL);
        node.read_all(&a).await.unwrap();
        let b_store = Counting::over(node.local.clone());
        let b = node.volume(b_store.clone(), Some(Duration::from_millis(200)));
        node.read_all(&b).await.unwrap();
        node.read_all(&b).await.unwrap();
        assert_eq!(b_store.calls(), (0, 1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(node.read_all(&b).await.unwrap(), node.data);
        assert_eq!(
            b_store.calls(),
            (0, 2),
            "an expired proof is asked for again"
        );
        // Without a TTL (read-only dataset mode) a proof lasts.
        let c_store = Counting::over(node.local.clone());
        let c = node.volume(c_store.clone(), None);
        node.read_all(&c).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        node.read_all(&c).await.unwrap();
        assert_eq!(c_store.calls(), (0, 1));
    }

    /// A volume whose credentials may list but not read: every read fails with EACCES and no
    /// byte of what another volume cached reaches it, from the memory tier or the disk tier,
    /// whichever way the read asks the cache.
    async fn refused_volume(memory: u64) {
        let node = Node::new(memory).await;
        let a = node.volume(Counting::over(node.local.clone()), TTL);
        assert_eq!(node.read_all(&a).await.unwrap(), node.data);
        node.cache.drain_writes().await;
        let served = node.served();

        let b_store = Counting::denying(node.local.clone());
        let b = node.volume(b_store.clone(), TTL);
        let reads = [
            (0, 10_000),         // sequential from the start: whole blocks
            (6 * BS + 100, 200), // random within one block: just those bytes
            (2 * BS - 10, 20),   // random across two blocks
        ];
        for (offset, len) in reads {
            let err = node.open(&b).read(offset, len).await.unwrap_err();
            assert!(matches!(err, StoreError::AccessDenied(_)), "{err:?}");
            assert_eq!(err.errno(), libc::EACCES);
        }
        assert_eq!(node.served(), served, "no cached block was served to b");
        let (gets, proofs) = b_store.calls();
        assert!(proofs >= 1, "b asked the store for itself");
        assert_eq!(gets, 0, "all of it was cached: no block GET was needed");
        // Refusals are not remembered; the volume that may read still reads.
        let again = node.open(&b).read(0, 10).await.unwrap_err();
        assert!(matches!(again, StoreError::AccessDenied(_)), "{again:?}");
        assert!(b_store.calls().1 > proofs, "a refusal is asked again");
        assert_eq!(node.read_all(&a).await.unwrap(), node.data);
    }

    #[tokio::test]
    async fn a_refused_volume_gets_eacces_and_no_byte_from_the_memory_tier() {
        refused_volume(1 << 20).await;
    }

    #[tokio::test]
    async fn a_refused_volume_gets_eacces_and_no_byte_from_the_disk_tier() {
        refused_volume(0).await;
    }

    #[tokio::test]
    async fn a_proof_of_a_changed_object_fails_like_a_read_of_it() {
        let node = Node::new(1 << 20).await;
        let a = node.volume(Counting::over(node.local.clone()), TTL);
        node.read_all(&a).await.unwrap();
        // The object changes; b still has the old ETag (from a listing, say).
        std::thread::sleep(Duration::from_millis(10));
        let src = node.dirs.0.path().join("obj");
        std::fs::write(src, pattern(node.data.len() + 1)).unwrap();
        let b_store = Counting::over(node.local.clone());
        let b = node.volume(b_store.clone(), TTL);
        let err = node.open(&b).read(0, 100).await.unwrap_err();
        assert!(matches!(err, StoreError::Changed), "{err:?}");
        let (gets, proofs) = b_store.calls();
        assert!(gets == 0 && proofs >= 1, "{gets} GETs, {proofs} proofs");
    }
}
