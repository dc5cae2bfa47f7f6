//! Writes of one new object: a sequential stream turned into a multipart upload.
//!
//! Bytes go into the upload's spool ([`spool`]: a file in the mount's state directory, which
//! outlives the engine); each full part is read back and uploaded in the background (a few at
//! a time per handle) while the application keeps writing. The object appears in the store
//! only when the upload is committed (close or fsync), all at once; until then readers of the
//! store see the old object, or none. A failed upload is aborted and reported as EIO, never
//! committed half-way.
//!
//! **An engine crash loses nothing.** The spool holds every byte not yet acknowledged by the
//! store and a log of the upload (its id, each acknowledged part's ETag); a successor engine
//! resumes the upload from it ([`Upload::resume`]) when it takes the kernel's handle over,
//! sends again the parts that were in flight, and accepts again the write that was in flight
//! (the kernel resends it).
//!
//! An upload can also **append** to an object that exists (a base in its header): the new
//! object is the old one's bytes, then the appended bytes. When the first appended byte comes,
//! each whole part of the old bytes is copied by the store itself (UploadPartCopy) and the
//! rest is read into the pipeline, both conditional on the ETag the object had at open. At
//! commit the store is asked again (HEAD), and the PutObject or CompleteMultipartUpload
//! carries If-Match on that ETag where the store supports it (else the HEAD stands alone,
//! with a window of one round trip): if another client replaced the object, nothing is
//! committed and the writer gets EIO, with a log line; the other client's object stays. A
//! flush or close with nothing appended changes nothing.

pub mod spool;

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

use crate::memory::{MemoryLimiter, Reservation};
use crate::namespace::ObjectStat;
use crate::store::{ObjectStore, PosixMeta, StoreError, StoreResult, UploadedPart};
pub use spool::{Header, Recovered, Spool, SpoolDir};
use spool::{Record, MAX_META_RECORDS};

/// S3 allows at most this many parts in one upload.
const MAX_PARTS: i32 = 10_000;
/// Parts uploading at once for one handle.
const PARTS_IN_FLIGHT: usize = 4;
/// How long a writer waits for memory before going over the budget.
const MEMORY_WAIT: Duration = Duration::from_secs(5);
/// The largest part S3 takes.
const MAX_PART_SIZE: u64 = 5 << 30;

#[derive(Debug)]
enum Status {
    Open,
    Committed(ObjectStat),
    Failed(i32),
}

struct InFlight {
    task: JoinHandle<StoreResult<UploadedPart>>,
    _memory: Reservation,
}

struct State {
    spool: Spool,
    /// The memory budget's share for the part being filled (its bytes are in the spool, in
    /// the state directory's memory when that is tmpfs): what bounds a writer that never
    /// completes a part, as it bounded the part buffer before spools.
    filling: Option<Reservation>,
    upload_id: Option<String>,
    in_flight: VecDeque<InFlight>,
    /// Parts the store acknowledged, by number.
    parts: BTreeMap<i32, UploadedPart>,
    /// The part being filled: every byte before it was sent.
    next_part: i32,
    status: Status,
    /// The base object's bytes are in the pipeline (appends only).
    seeded: bool,
    /// The object this upload appends to, as it was when opened (or last committed).
    base: Option<ObjectStat>,
    /// Resumed from a predecessor's spool: a write over bytes not yet sent is taken again
    /// (the kernel resends the write that was in flight at the crash).
    resumed: bool,
    /// The POSIX attributes the object is to carry: given at open, changed by chmod, chown
    /// and utimes while it is open, sent with the object at commit.
    meta: PosixMeta,
    /// What the multipart upload was created with (S3 takes metadata there, not at
    /// completion): a change after it is applied once the object is complete.
    meta_sent: Option<PosixMeta>,
    /// Metadata changes recorded in the spool's log (capped, see `MAX_META_RECORDS`).
    meta_records: usize,
}

pub struct Upload {
    store: Arc<dyn ObjectStore>,
    memory: Arc<MemoryLimiter>,
    key: String,
    part_size: u64,
    written: Arc<AtomicU64>,
    /// A request has named this upload's handle since it was opened or resumed.
    claimed: AtomicBool,
    state: tokio::sync::Mutex<State>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl Upload {
    /// An upload of `header.key` into `spool` (made with the same header); `written` starts
    /// at the base's size for an append, else 0, and is what `stat` shows while it is open.
    /// The object is committed with `meta` as its POSIX attributes (unless changed later
    /// through [`Upload::set_meta`]).
    pub fn start(
        store: Arc<dyn ObjectStore>,
        memory: Arc<MemoryLimiter>,
        header: Header,
        spool: Spool,
        written: Arc<AtomicU64>,
        meta: PosixMeta,
    ) -> io::Result<Upload> {
        written.store(
            header.base.as_ref().map_or(0, |b| b.size),
            Ordering::Release,
        );
        let mut state = State::new(spool);
        if !meta.is_empty() {
            state.spool.record(&Record::Meta(meta.clone()))?;
            state.meta_records = 1;
        }
        state.meta = meta;
        let up = Upload::with_state(store, memory, header, written, state);
        up.claim();
        Ok(up)
    }

    /// The upload a predecessor engine left in `spool`, where it stopped.
    pub fn resume(
        store: Arc<dyn ObjectStore>,
        memory: Arc<MemoryLimiter>,
        spool: Spool,
        rec: Recovered,
    ) -> io::Result<Upload> {
        let header = rec.header;
        if header.part_size == 0 || header.part_size > MAX_PART_SIZE {
            tracing::error!(key = %header.key, part_size = header.part_size, "an upload log with an impossible part size; not resumed");
            return Err(errno(libc::EIO));
        }
        let written = match (&rec.committed, &header.base) {
            (Some(stat), _) => stat.size,
            (None, Some(base)) if !rec.seeded => base.size,
            _ => rec.data_len,
        };
        let parts: BTreeMap<i32, UploadedPart> =
            rec.parts.into_iter().map(|p| (p.number, p)).collect();
        // Everything after the first part not acknowledged is sent again from the spool.
        let mut next_part = 1;
        while parts.contains_key(&next_part) {
            next_part += 1;
        }
        let mut state = State::new(spool);
        state.upload_id = rec.upload_id;
        state.parts = parts;
        state.next_part = next_part;
        state.seeded = rec.seeded;
        state.resumed = true;
        state.meta = rec.meta;
        state.meta_sent = rec.meta_sent;
        state.meta_records = rec.meta_records;
        if let Some(stat) = rec.committed {
            state.status = Status::Committed(stat);
        }
        let written = Arc::new(AtomicU64::new(written));
        Ok(Upload::with_state(store, memory, header, written, state))
    }

    fn with_state(
        store: Arc<dyn ObjectStore>,
        memory: Arc<MemoryLimiter>,
        header: Header,
        written: Arc<AtomicU64>,
        mut state: State,
    ) -> Upload {
        state.base = header.base;
        Upload {
            store,
            memory,
            key: header.key,
            part_size: header.part_size,
            written,
            claimed: AtomicBool::new(false),
            state: tokio::sync::Mutex::new(state),
        }
    }

    /// A request named this upload's handle: the kernel (or guest) holds it.
    pub fn claim(&self) {
        if !self.claimed.load(Ordering::Relaxed) {
            self.claimed.store(true, Ordering::Relaxed);
        }
    }

    /// Resumed from a predecessor, never named by a request since, nothing written through
    /// it: the spool of a create or open whose reply may never have reached the kernel.
    pub fn is_unclaimed_and_untouched(&self) -> bool {
        if self.claimed.load(Ordering::Relaxed) {
            return false;
        }
        // Busy means a request is using it.
        let Ok(st) = self.state.try_lock() else {
            return false;
        };
        self.written.load(Ordering::Acquire) == st.base.as_ref().map_or(0, |b| b.size)
    }

    /// Changes the attributes the object is to carry, if it is still open (not committed):
    /// returns them, or `None` if it committed already (the caller then changes the stored
    /// object's). EBUSY once `MAX_META_RECORDS` changes were made on one open file.
    pub async fn set_meta(
        &self,
        change: impl FnOnce(&mut PosixMeta),
    ) -> io::Result<Option<PosixMeta>> {
        let mut st = self.state.lock().await;
        match st.status {
            Status::Open => {}
            Status::Committed(_) => return Ok(None),
            Status::Failed(e) => return Err(errno(e)),
        }
        let mut meta = st.meta.clone();
        change(&mut meta);
        if meta == st.meta {
            return Ok(Some(meta));
        }
        self.record_meta(&mut st, meta.clone())?;
        Ok(Some(meta))
    }

    fn record_meta(&self, st: &mut State, meta: PosixMeta) -> io::Result<()> {
        if st.meta_records >= MAX_META_RECORDS {
            tracing::warn!(key = %self.key, "refused: too many attribute changes on one open file");
            return Err(errno(libc::EBUSY));
        }
        st.spool.record(&Record::Meta(meta.clone()))?;
        st.meta_records += 1;
        st.meta = meta;
        Ok(())
    }

    /// Bytes accepted so far (the size `stat` shows while the file is open).
    pub fn written(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Appends `data` at `offset`, which must be where the previous write ended.
    pub async fn write(&self, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.write_with(offset, data.len(), true, |file, at, _| {
            use std::os::unix::fs::FileExt as _;
            file.write_all_at(data, at)
        })
        .await
    }

    /// Writes `len` bytes at `offset`, which must be where the previous write ended: `fill`
    /// puts them into the spool file at the offset it is given (straight from the request's
    /// buffers: one copy, by the kernel). If `fill` fails, nothing changed. A write at the
    /// end of what a flush committed re-opens the upload (see [`Upload::reopen_after_commit`])
    /// if `may_reopen` (no other handle writes the file now).
    pub async fn write_with(
        &self,
        offset: u64,
        len: usize,
        may_reopen: bool,
        fill: impl FnOnce(&mut File, u64, usize) -> io::Result<()>,
    ) -> io::Result<usize> {
        let mut st = self.state.lock().await;
        if let Status::Failed(e) = st.status {
            return Err(errno(e));
        }
        if matches!(st.status, Status::Committed(_))
            && !(may_reopen && self.reopen(&mut st, offset))
        {
            tracing::warn!(key = %self.key, offset, "write after the object was committed (close/fsync), not at its end or while another handle writes it: not supported");
            return Err(errno(libc::EOPNOTSUPP));
        }
        let written = self.written.load(Ordering::Acquire);
        let unsent = self.part_start(st.next_part);
        let resent = st.resumed && offset < written && offset >= unsent;
        if offset != written && !resent {
            tracing::warn!(key = %self.key, offset, expected = written, "non-sequential write refused: objects are written front to back");
            return Err(errno(libc::EINVAL));
        }
        if len == 0 {
            return Ok(0);
        }
        // A write makes the file modified now: a time set before it no longer holds.
        if st.meta.mtime.is_some() {
            let mut meta = st.meta.clone();
            meta.mtime = None;
            self.record_meta(&mut st, meta)?;
        }
        if let Err(e) = self.seed(&mut st).await {
            self.fail(&mut st, &e).await;
            return Err(e);
        }
        self.reserve_filling(&mut st).await;
        let file = st.spool.data_file()?;
        if let Err(e) = fill(file, offset, len) {
            // Nothing of it counts: cut off what went in.
            if let Err(t) = st.spool.truncate(written) {
                tracing::error!(key = %self.key, error = %t, "could not cut a failed write out of the spool; the file is NOT saved");
                self.fail(&mut st, &t).await;
            }
            return Err(e);
        }
        let end = offset + len as u64;
        if end > written {
            self.written.store(end, Ordering::Release);
        }
        if let Err(e) = self.send_full_parts(&mut st, end.max(written)).await {
            self.fail(&mut st, &e).await;
            return Err(e);
        }
        if self.part_start(st.next_part) < end.max(written) {
            self.reserve_filling(&mut st).await;
        }
        Ok(len)
    }

    /// The part being filled holds its share of the memory budget.
    async fn reserve_filling(&self, st: &mut State) {
        if st.filling.is_none() {
            st.filling = Some(self.memory.reserve_wait(self.part_size, MEMORY_WAIT).await);
        }
    }

    /// The memory for `len` bytes being sent: the filled part's share, or a new one.
    async fn take_filling(&self, st: &mut State, len: u64) -> Reservation {
        match st.filling.take() {
            Some(r) => r,
            None => self.memory.reserve_wait(len, MEMORY_WAIT).await,
        }
    }

    fn part_start(&self, number: i32) -> u64 {
        (number as u64 - 1) * self.part_size
    }

    async fn fail(&self, st: &mut State, e: &io::Error) {
        st.status = Status::Failed(e.raw_os_error().unwrap_or(libc::EIO));
        self.abort(st).await;
    }

    /// Puts the base object's bytes first in the pipeline, once (appends only). Each whole
    /// part of them is copied by the store itself where it can (UploadPartCopy, conditional on
    /// the ETag the object had when opened), so an append to a large object does not read it;
    /// the rest (the tail shorter than a part, or everything on stores that cannot copy) is
    /// read with If-Match on that ETag. A change since fails here. A successor goes on from
    /// the first part not acknowledged.
    async fn seed(&self, st: &mut State) -> io::Result<()> {
        let Some(base) = st.base.clone() else {
            return Ok(());
        };
        if st.seeded {
            return Ok(());
        }
        let key = &self.key;
        let failed = |e: StoreError| {
            tracing::error!(key = %key, error = %e, "could not read the object being appended to; nothing is committed");
            errno(e.errno())
        };
        let mut at = self.part_start(st.next_part).min(base.size);
        let (mut can_copy, mut copied) = (true, 0u64);
        while at < base.size {
            let end = (at + self.part_size).min(base.size);
            if can_copy && end - at == self.part_size {
                self.ensure_upload(st).await?;
                let id = st.upload_id.clone().unwrap_or_default();
                let copy = self
                    .store
                    .copy_part(key, &id, st.next_part, at..end, base.etag.as_deref())
                    .await
                    .map_err(failed)?;
                if let Some(part) = copy {
                    st.spool.record(&Record::Part(part.clone()))?;
                    st.parts.insert(part.number, part);
                    st.next_part += 1;
                    copied += end - at;
                    at = end;
                    continue;
                }
                can_copy = false;
            }
            let bytes = self
                .store
                .get_range(key, at..end, base.etag.as_deref())
                .await
                .map_err(failed)?;
            if bytes.len() as u64 != end - at {
                tracing::error!(key = %key, "the object being appended to is shorter than when it was opened; nothing is committed");
                return Err(errno(libc::EIO));
            }
            st.spool.write_at(at, &bytes)?;
            at = end;
            self.send_full_parts(st, at).await?;
        }
        // The spool is as long as the object (copied parts are a hole in it): a successor
        // takes its length for the bytes written so far.
        st.spool.extend_to(base.size)?;
        if copied > 0 {
            tracing::debug!(key = %key, copied, read = base.size - copied, "the object being appended to was copied by the store, not read");
        }
        st.spool.record(&Record::Seeded)?;
        st.seeded = true;
        Ok(())
    }

    /// Sends every part that lies wholly before `end`.
    async fn send_full_parts(&self, st: &mut State, end: u64) -> io::Result<()> {
        while self.part_start(st.next_part + 1) <= end {
            let part_end = self.part_start(st.next_part + 1);
            self.send_part(st, part_end).await?;
        }
        Ok(())
    }

    /// Uploads the spool's bytes from the current part's start to `end` as the next part,
    /// waiting first if too many parts are in flight.
    async fn send_part(&self, st: &mut State, end: u64) -> io::Result<()> {
        if st.next_part > MAX_PARTS {
            tracing::error!(key = %self.key, part_size = self.part_size, "object too large for {MAX_PARTS} parts; raise --part-size");
            return Err(errno(libc::EFBIG));
        }
        self.ensure_upload(st).await?;
        while st.in_flight.len() >= PARTS_IN_FLIGHT {
            self.reap_one(st).await?;
        }
        let start = self.part_start(st.next_part);
        let memory = self.take_filling(st, end - start).await;
        let body = st.spool.read(start..end)?.freeze();
        let number = st.next_part;
        st.next_part += 1;
        let store = self.store.clone();
        let key = self.key.clone();
        let id = st.upload_id.clone().unwrap_or_default();
        let task = tokio::spawn(async move { store.upload_part(&key, &id, number, body).await });
        st.in_flight.push_back(InFlight {
            task,
            _memory: memory,
        });
        Ok(())
    }

    /// Starts the multipart upload, once.
    async fn ensure_upload(&self, st: &mut State) -> io::Result<()> {
        if st.upload_id.is_some() {
            return Ok(());
        }
        let id = self
            .store
            .create_upload(&self.key, &st.meta)
            .await
            .map_err(|e| {
                tracing::error!(key = %self.key, error = %e, "could not start multipart upload");
                errno(e.errno())
            })?;
        st.spool.record(&Record::UploadId(id.clone()))?;
        st.upload_id = Some(id);
        st.meta_sent = Some(st.meta.clone());
        Ok(())
    }

    async fn reap_one(&self, st: &mut State) -> io::Result<()> {
        let Some(flight) = st.in_flight.pop_front() else {
            return Ok(());
        };
        let part = match flight.task.await {
            Ok(Ok(part)) => part,
            Ok(Err(e)) => {
                tracing::error!(key = %self.key, error = %e, "part upload failed");
                return Err(errno(libc::EIO));
            }
            Err(e) => {
                tracing::error!(key = %self.key, error = %e, "part upload task failed");
                return Err(errno(libc::EIO));
            }
        };
        // Not recorded, the part is only sent again by a successor: never lost.
        if let Err(e) = st.spool.record(&Record::Part(part.clone())) {
            tracing::warn!(key = %self.key, error = %e, "could not record an uploaded part");
        }
        st.parts.insert(part.number, part);
        let mut safe = 0;
        while st.parts.contains_key(&(safe + 1)) {
            safe += 1;
        }
        let upto = self.part_start(safe + 1);
        st.spool.release_before(upto);
        Ok(())
    }

    /// Makes the object visible in the store. Idempotent: later calls return the first result.
    /// An append with nothing appended yet commits nothing and stays open (a shell's `>>`
    /// flushes a dup'ed fd before it writes).
    pub async fn commit(&self) -> io::Result<ObjectStat> {
        let mut st = self.state.lock().await;
        match &st.status {
            Status::Committed(stat) => return Ok(stat.clone()),
            Status::Failed(e) => return Err(errno(*e)),
            Status::Open => {}
        }
        if let Some(base) = st.base.clone().filter(|_| !st.seeded) {
            return self.commit_meta_only(&mut st, base).await;
        }
        match self.finish(&mut st).await {
            Ok(stat) => {
                tracing::debug!(key = %self.key, size = stat.size, "object committed");
                if let Err(e) = st.spool.committed(&stat) {
                    tracing::warn!(key = %self.key, error = %e, "could not record a commit in the upload's spool");
                }
                st.status = Status::Committed(stat.clone());
                Ok(stat)
            }
            Err(e) => {
                self.fail(&mut st, &e).await;
                Err(e)
            }
        }
    }

    /// An append with nothing appended: only attributes set through the handle (`touch`
    /// opens for writing and sets the times) change, on the stored object as it was opened.
    async fn commit_meta_only(
        &self,
        st: &mut State,
        mut base: ObjectStat,
    ) -> io::Result<ObjectStat> {
        if base.meta.as_ref() == Some(&st.meta) {
            return Ok(base);
        }
        let etag = self
            .store
            .set_meta(&self.key, base.etag.as_deref(), base.size, &st.meta)
            .await
            .map_err(|e| {
                tracing::error!(key = %self.key, error = %e, "could not set the attributes of the object");
                errno(e.errno())
            })?;
        if etag.is_some() {
            base.etag = etag;
        }
        base.meta = Some(st.meta.clone());
        st.base = Some(base.clone());
        Ok(base)
    }

    async fn finish(&self, st: &mut State) -> io::Result<ObjectStat> {
        let size = self.written.load(Ordering::Acquire);
        self.check_base_unchanged(st.base.as_ref()).await?;
        self.send_full_parts(st, size).await?;
        let mut meta = st.meta.clone();
        // An append commits only onto the object it appended to (If-Match where the store can
        // condition a write; elsewhere the HEAD check above stands alone).
        let base_etag = st.base.as_ref().and_then(|b| b.etag.clone());
        let etag = if st.upload_id.is_none() {
            let _memory = self.take_filling(st, size).await;
            let body = st.spool.read(0..size)?.freeze();
            if_match_or_not(
                base_etag.as_deref(),
                |etag| {
                    self.store
                        .put_if_match(&self.key, body.clone(), &meta, etag)
                },
                || self.store.put(&self.key, body.clone(), &meta),
            )
            .await
            .map_err(|e| self.commit_failed("upload failed", e))?
        } else {
            if self.part_start(st.next_part) < size {
                self.send_part(st, size).await?;
            }
            while !st.in_flight.is_empty() {
                self.reap_one(st).await?;
            }
            let parts: Vec<UploadedPart> = st.parts.values().cloned().collect();
            let id = st.upload_id.clone().unwrap_or_default();
            let etag = if_match_or_not(
                base_etag.as_deref(),
                |etag| {
                    self.store
                        .complete_upload_if_match(&self.key, &id, &parts, etag)
                },
                || self.store.complete_upload(&self.key, &id, &parts),
            )
            .await
            .map_err(|e| self.commit_failed("completing the upload failed", e))?;
            let sent = st.meta_sent.clone().unwrap_or_default();
            if sent == meta {
                etag
            } else {
                // Changed after the upload began: set on the complete object (conditional on
                // its ETag, so nothing written since by another client is touched).
                match self
                    .store
                    .set_meta(&self.key, etag.as_deref(), size, &meta)
                    .await
                {
                    Ok(etag) => etag,
                    Err(e) => {
                        tracing::error!(key = %self.key, error = %e, "the object is saved, but the attributes set while it was written (chmod, chown, utimes) could not be applied");
                        meta = sent;
                        etag
                    }
                }
            }
        };
        Ok(ObjectStat {
            size,
            mtime: SystemTime::now(),
            etag,
            meta: Some(meta),
        })
    }

    /// Logs why a commit failed (an append's object replaced meanwhile, or the store's error).
    fn commit_failed(&self, what: &str, e: StoreError) -> io::Error {
        if matches!(e, StoreError::Changed) {
            tracing::error!(key = %self.key, "the object was replaced by another client while this append was open (If-Match refused); the append is NOT committed");
        } else {
            tracing::error!(key = %self.key, error = %e, "{what}");
        }
        errno(e.errno())
    }

    /// Appends only: the object still carries the ETag it had when opened (asked right before
    /// completing; a change in between is caught by If-Match where the store supports it).
    async fn check_base_unchanged(&self, base: Option<&ObjectStat>) -> io::Result<()> {
        let Some(base) = base else {
            return Ok(());
        };
        let now = self.store.head(&self.key).await.map_err(|e| {
            tracing::error!(key = %self.key, error = %e, "could not check the object being appended to; nothing is committed");
            errno(e.errno())
        })?;
        if now.etag != base.etag || now.size != base.size {
            tracing::error!(key = %self.key, opened = ?base.etag, now = ?now.etag, "the object was replaced by another client while this append was open; the append is NOT committed");
            return Err(errno(libc::EIO));
        }
        Ok(())
    }

    /// Stops the upload for good: parts in flight, the store's multipart upload, the spool.
    async fn abort(&self, st: &mut State) {
        for flight in st.in_flight.drain(..) {
            flight.task.abort();
        }
        st.filling = None;
        st.spool.remove();
        if let Some(id) = st.upload_id.take() {
            if let Err(e) = self.store.abort_upload(&self.key, &id).await {
                tracing::warn!(key = %self.key, error = %e, "could not abort the multipart upload; the store may keep its parts until a lifecycle rule removes them");
            }
        }
    }

    /// Re-opens an upload that committed already, for a write at the end of what it
    /// committed; returns whether it re-opened. Two cases:
    /// - an empty object committed before any data came: the writes replace it. Shells do this
    ///   (`echo x > f` opens `f`, moves the fd with dup2 and closes the original: a flush with
    ///   nothing written, then the writes);
    /// - a flush from another process's copy of the descriptor (a child forked while the file
    ///   was open closes it at exec or exit) committed the file half-way: the writer goes on,
    ///   as an append to what was committed (read back from the store, If-Match on its ETag),
    ///   and the object is committed again, whole, at the writer's own close.
    pub async fn reopen_after_commit(&self, offset: u64) -> bool {
        let mut st = self.state.lock().await;
        self.reopen(&mut st, offset)
    }

    fn reopen(&self, st: &mut State, offset: u64) -> bool {
        let Status::Committed(stat) = &st.status else {
            return false;
        };
        if offset != stat.size {
            return false;
        }
        let base = (stat.size > 0).then(|| stat.clone());
        if let Err(e) = st.spool.rebase(base.clone()) {
            tracing::error!(key = %self.key, error = %e, "could not re-open the spool of a committed file");
            return false;
        }
        if base.is_some() {
            tracing::info!(key = %self.key, size = offset, "written again after a flush committed it (another process closed a copy of the descriptor, e.g. a forked child); the new bytes are appended and the object committed again on close");
        }
        st.base = base;
        st.upload_id = None;
        st.parts.clear();
        st.next_part = 1;
        st.seeded = false;
        st.meta_sent = None;
        st.status = Status::Open;
        true
    }

    /// Aborts the upload if it is still open (data written since its last commit); the
    /// object in the store is left as it was. Returns whether it aborted.
    pub async fn abort_if_open(&self) -> bool {
        let mut st = self.state.lock().await;
        if !matches!(st.status, Status::Open) {
            return false;
        }
        st.status = Status::Failed(libc::EIO);
        self.abort(&mut st).await;
        true
    }

    /// The handle is gone: the spool is no longer needed (what was committed is in the
    /// store; what was not is aborted by the caller first).
    pub async fn release(&self) {
        self.state.lock().await.spool.remove();
    }

    /// Whether the upload committed (or failed) already.
    pub async fn is_open(&self) -> bool {
        matches!(self.state.lock().await.status, Status::Open)
    }
}

/// Spools nobody will resume (a mount started afresh after its holder died): their multipart
/// uploads are aborted and their files removed. Returns how many there were.
pub async fn discard_spools(store: &Arc<dyn ObjectStore>, spools: &SpoolDir) -> usize {
    let handles = spools.handles();
    for fh in &handles {
        match spools.open(*fh) {
            Ok(Some((mut spool, rec))) => {
                if let Some(id) = &rec.upload_id {
                    if let Err(e) = store.abort_upload(&rec.header.key, id).await {
                        tracing::warn!(key = %rec.header.key, error = %e, "could not abort a left-over multipart upload");
                    }
                }
                tracing::info!(key = %rec.header.key, committed = rec.committed.is_some(), "discarded the spool of a file an earlier mount was writing");
                spool.remove();
            }
            Ok(None) => spools.remove(*fh),
            Err(e) => {
                tracing::warn!(fh, error = %e, "could not read a left-over upload spool; removed");
                spools.remove(*fh);
            }
        }
    }
    handles.len()
}

impl State {
    fn new(spool: Spool) -> State {
        State {
            spool,
            filling: None,
            upload_id: None,
            in_flight: VecDeque::new(),
            parts: BTreeMap::new(),
            next_part: 1,
            status: Status::Open,
            seeded: false,
            base: None,
            resumed: false,
            meta: PosixMeta::default(),
            meta_sent: None,
            meta_records: 0,
        }
    }
}

/// The conditional write (If-Match on `etag`) when there is an ETag to hold the object to and
/// the store can condition a write; the plain one otherwise (the caller's HEAD check stands).
async fn if_match_or_not<'a, T, C, P>(
    etag: Option<&'a str>,
    conditional: impl FnOnce(&'a str) -> C,
    plain: impl FnOnce() -> P,
) -> StoreResult<T>
where
    C: std::future::Future<Output = StoreResult<T>>,
    P: std::future::Future<Output = StoreResult<T>>,
{
    if let Some(etag) = etag {
        match conditional(etag).await {
            Err(StoreError::Unsupported(_)) => {}
            done => return done,
        }
    }
    plain().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    /// A store in one directory, spools in another (the mount's state directory).
    struct Fixture {
        dir: tempfile::TempDir,
        _spool_dir: tempfile::TempDir,
        spools: SpoolDir,
        store: Arc<dyn ObjectStore>,
        memory: Arc<MemoryLimiter>,
    }

    const FH: u64 = 0x77;

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("out")).unwrap();
            let spool_dir = tempfile::tempdir().unwrap();
            Fixture {
                store: Arc::new(LocalStore::open(dir.path()).unwrap()),
                spools: SpoolDir::new(spool_dir.path().join("writes")),
                _spool_dir: spool_dir,
                dir,
                memory: MemoryLimiter::new(1 << 30),
            }
        }

        fn upload(&self, part: usize, base: Option<ObjectStat>) -> Upload {
            let header = Header {
                ino: 5,
                key: "out/file".into(),
                part_size: part as u64,
                base,
            };
            let spool = self.spools.create(FH, header.clone()).unwrap();
            Upload::start(
                self.store.clone(),
                self.memory.clone(),
                header,
                spool,
                Arc::new(AtomicU64::new(0)),
                PosixMeta::default(),
            )
            .unwrap()
        }

        fn appending(&self, part: usize) -> Upload {
            let info = block_on(self.store.head("out/file")).unwrap();
            self.upload(part, Some(info.into()))
        }

        /// What a successor engine finds of handle FH.
        fn resume(&self) -> Upload {
            let (spool, rec) = self.spools.open(FH).unwrap().expect("a spool");
            Upload::resume(self.store.clone(), self.memory.clone(), spool, rec).unwrap()
        }

        fn object(&self) -> Option<Vec<u8>> {
            std::fs::read(self.dir.path().join("out/file")).ok()
        }
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| ((i * 7 + seed) % 251) as u8)
            .collect()
    }

    #[tokio::test]
    async fn streams_parts_and_commits_exact_bytes() {
        let fx = Fixture::new();
        let up = fx.upload(1000, None);
        let data = pattern(10_500, 0);
        let mut off = 0;
        for chunk in data.chunks(777) {
            up.write(off, chunk).await.unwrap();
            off += chunk.len() as u64;
        }
        assert!(fx.object().is_none(), "nothing visible before commit");
        let stat = up.commit().await.unwrap();
        assert_eq!(stat.size, data.len() as u64);
        assert_eq!(fx.object().unwrap(), data);
        assert_eq!(
            up.commit().await.unwrap().size,
            stat.size,
            "commit is idempotent"
        );
        assert_eq!(fx.memory.used(), 0);
        up.release().await;
        assert!(
            fx.spools.handles().is_empty(),
            "a released upload leaves no spool"
        );
    }

    #[tokio::test]
    async fn refuses_out_of_order_writes_and_writes_after_commit() {
        let fx = Fixture::new();
        let up = fx.upload(1000, None);
        up.write(0, b"abc").await.unwrap();
        let e = up.write(10, b"x").await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let e = up.write(1, b"x").await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "no rewrites either");
        up.commit().await.unwrap();
        let e = up.write(1, b"d").await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "not at the end");
        let e = up
            .write_with(3, 1, false, |_, _, _| Ok(()))
            .await
            .unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP),
            "another handle writes it"
        );
        up.write(3, b"d").await.unwrap();
        up.commit().await.unwrap();
        assert_eq!(fx.object().unwrap(), b"abcd");
    }

    #[tokio::test]
    async fn writes_after_an_empty_commit_replace_the_empty_object() {
        let fx = Fixture::new();
        let up = fx.upload(4, None);
        up.commit().await.unwrap();
        assert_eq!(fx.object().unwrap(), b"");
        assert!(!up.reopen_after_commit(3).await, "only at the end");
        assert!(up.reopen_after_commit(0).await);
        up.write(0, b"hello world").await.unwrap();
        assert_eq!(up.commit().await.unwrap().size, 11);
        assert_eq!(fx.object().unwrap(), b"hello world");
    }

    /// A forked child's close flushed (committed) the file half-way; the writer goes on and
    /// its own close commits the whole file, also from a successor engine.
    #[test]
    fn writes_after_a_commit_go_on_and_commit_the_whole_file() {
        let fx = Fixture::new();
        let data = pattern(4500, 2);
        {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let up = fx.upload(1000, None);
            rt.block_on(async {
                up.write(0, &data[..2500]).await.unwrap();
                up.commit().await.unwrap();
                assert_eq!(fx.object().unwrap(), &data[..2500]);
                assert!(
                    !up.reopen_after_commit(100).await,
                    "a rewrite is not an append"
                );
                assert!(up.reopen_after_commit(2500).await);
                up.write(2500, &data[2500..3000]).await.unwrap();
                assert_eq!(
                    fx.object().unwrap(),
                    &data[..2500],
                    "readers see the first commit"
                );
            });
        }
        // The engine dies here; its successor goes on with the same handle.
        let up = fx.resume();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            up.write(3000, &data[3000..]).await.unwrap();
            assert_eq!(up.commit().await.unwrap().size, 4500);
        });
        assert_eq!(fx.object().unwrap(), data);
    }

    /// The bytes of a part not yet sent live in the spool (tmpfs memory): they count against
    /// the memory budget, so a guest that opens many files and never fills a part is bounded.
    #[tokio::test]
    async fn a_part_being_filled_counts_against_the_budget() {
        let fx = Fixture::new();
        let up = fx.upload(1000, None);
        up.write(0, b"a few bytes").await.unwrap();
        assert_eq!(fx.memory.used(), 1000);
        up.commit().await.unwrap();
        assert_eq!(fx.memory.used(), 0);
        let other = fx.upload(1000, None);
        other.write(0, b"more").await.unwrap();
        assert!(other.abort_if_open().await);
        assert_eq!(fx.memory.used(), 0, "an abort gives it back");
    }

    /// Every attribute change is journaled: one open file takes `MAX_META_RECORDS` of them,
    /// then EBUSY (a client looping on chmod cannot grow the spool), and the object carries
    /// the last accepted change.
    #[tokio::test]
    async fn attribute_changes_on_one_open_file_are_capped() {
        let fx = Fixture::new();
        let up = fx.upload(1000, None);
        up.write(0, b"data").await.unwrap();
        for i in 0..MAX_META_RECORDS as u32 {
            let set = up.set_meta(|m| m.uid = Some(1000 + i)).await.unwrap();
            assert_eq!(set.and_then(|m| m.uid), Some(1000 + i));
        }
        let last = Some(1000 + MAX_META_RECORDS as u32 - 1);
        let same = up.set_meta(|m| m.uid = last).await.unwrap();
        assert_eq!(same.and_then(|m| m.uid), last, "no change, no record");
        let e = up.set_meta(|m| m.uid = Some(1)).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
        up.commit().await.unwrap();
        let stored = fx.store.head("out/file").await.unwrap();
        assert_eq!(stored.meta.and_then(|m| m.uid), last);
        assert_eq!(fx.object().unwrap(), b"data");
    }

    #[tokio::test]
    async fn an_empty_file_commits_as_an_empty_object() {
        let fx = Fixture::new();
        fx.upload(1000, None).commit().await.unwrap();
        assert_eq!(fx.object().unwrap(), b"");
    }

    #[tokio::test]
    async fn a_failed_write_changes_nothing() {
        let fx = Fixture::new();
        let up = fx.upload(4, None);
        up.write(0, b"good").await.unwrap();
        // The request's buffers fail half-way (a guest's short descriptors).
        let e = up
            .write_with(4, 10, true, |file, at, _| {
                use std::os::unix::fs::FileExt as _;
                file.write_all_at(b"bad", at)?;
                Err(io::Error::from_raw_os_error(libc::EFAULT))
            })
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
        assert_eq!(up.written().load(Ordering::Acquire), 4, "nothing went in");
        up.write(4, b" bytes").await.unwrap();
        up.commit().await.unwrap();
        assert_eq!(fx.object().unwrap(), b"good bytes");
    }

    #[tokio::test]
    async fn an_open_upload_is_aborted_and_a_committed_one_is_left() {
        let fx = Fixture::new();
        let up = fx.upload(1000, None);
        up.write(0, b"half").await.unwrap();
        assert!(up.abort_if_open().await);
        assert!(up.commit().await.is_err());
        assert!(fx.object().is_none(), "nothing half-written was committed");
        assert!(
            fx.spools.handles().is_empty(),
            "an aborted upload leaves no spool"
        );
        let fx = Fixture::new();
        let done = fx.upload(1000, None);
        done.write(0, b"whole").await.unwrap();
        done.commit().await.unwrap();
        assert!(!done.abort_if_open().await);
        assert_eq!(fx.object().unwrap(), b"whole");
    }

    /// The engine dies (the Upload is dropped, its tasks with the runtime) at every point of a
    /// multipart upload; a successor resumes from the spool and commits the exact bytes.
    #[test]
    fn a_successor_resumes_an_upload_where_its_engine_died() {
        let data = pattern(10_500, 3);
        for crash_at in [0usize, 500, 1000, 3300, 7000, 10_000, 10_500] {
            let fx = Fixture::new();
            {
                let rt = tokio::runtime::Runtime::new().unwrap();
                let up = fx.upload(1000, None);
                rt.block_on(async {
                    for (i, chunk) in data[..crash_at].chunks(700).enumerate() {
                        up.write((i * 700) as u64, chunk).await.unwrap();
                    }
                });
                // Killed: no commit, no abort, in-flight parts cut off.
            }
            let up = fx.resume();
            assert_eq!(up.written().load(Ordering::Acquire), crash_at as u64);
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                // The write that was in flight at the crash comes again (RESEND).
                if crash_at >= 700 {
                    let last = (crash_at - 1) / 700 * 700;
                    up.write(last as u64, &data[last..crash_at]).await.unwrap();
                }
                let mut off = crash_at;
                for chunk in data[crash_at..].chunks(900) {
                    up.write(off as u64, chunk).await.unwrap();
                    off += chunk.len();
                }
                assert_eq!(up.commit().await.unwrap().size, data.len() as u64);
                up.release().await;
            });
            assert_eq!(fx.object().unwrap(), data, "crash after {crash_at} bytes");
            assert!(fx.spools.handles().is_empty());
        }
    }

    #[test]
    fn a_resumed_upload_takes_no_rewrite_of_what_was_sent() {
        let fx = Fixture::new();
        let data = pattern(5000, 1);
        {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let up = fx.upload(1000, None);
            rt.block_on(async {
                up.write(0, &data[..2500]).await.unwrap();
                up.write(2500, &data[2500..]).await.unwrap();
                // Parts 1-4 are sent: acknowledged ones are reaped on the next sends.
                up.write(5000, &data[..1]).await.unwrap();
            });
        }
        let up = fx.resume();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let e = up.write(0, b"x").await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
            up.write(5001, b"end").await.unwrap();
            up.commit().await.unwrap();
        });
        let mut want = data.clone();
        want.extend_from_slice(&data[..1]);
        want.extend_from_slice(b"end");
        assert_eq!(fx.object().unwrap(), want);
    }

    #[test]
    fn a_committed_upload_stays_committed_in_a_successor() {
        let fx = Fixture::new();
        {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let up = fx.upload(1000, None);
            rt.block_on(async {
                up.write(0, b"saved").await.unwrap();
                up.commit().await.unwrap();
            });
        }
        let up = fx.resume();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            assert_eq!(up.commit().await.unwrap().size, 5);
            let e = up.write(2, b"more").await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
        });
        assert_eq!(fx.object().unwrap(), b"saved");
    }

    #[test]
    fn an_append_keeps_the_old_bytes_and_adds_the_new_ones() {
        for (old_len, part) in [(11usize, 1000usize), (10_500, 1000), (0, 4)] {
            let fx = Fixture::new();
            let old = pattern(old_len, 0);
            std::fs::write(fx.dir.path().join("out/file"), &old).unwrap();
            let up = fx.appending(part);
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                assert_eq!(up.written().load(Ordering::Acquire), old_len as u64);
                if old_len > 0 {
                    let e = up.write(0, b"x").await.unwrap_err();
                    assert_eq!(
                        e.raw_os_error(),
                        Some(libc::EINVAL),
                        "writes go on at the end"
                    );
                }
                // A flush with nothing appended commits nothing and leaves the upload open.
                assert_eq!(up.commit().await.unwrap().size, old_len as u64);
                up.write(old_len as u64, b"appended").await.unwrap();
                let stat = up.commit().await.unwrap();
                assert_eq!(stat.size, old_len as u64 + 8);
            });
            let mut want = old.clone();
            want.extend_from_slice(b"appended");
            assert_eq!(fx.object().unwrap(), want);
        }
    }

    #[test]
    fn an_append_resumes_in_a_successor() {
        for crash_after_append in [false, true] {
            let fx = Fixture::new();
            let old = pattern(2500, 9);
            std::fs::write(fx.dir.path().join("out/file"), &old).unwrap();
            {
                let rt = tokio::runtime::Runtime::new().unwrap();
                let up = fx.appending(1000);
                if crash_after_append {
                    rt.block_on(up.write(2500, b"first ")).unwrap();
                }
            }
            let up = fx.resume();
            let at = up.written().load(Ordering::Acquire);
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                up.write(at, b"second").await.unwrap();
                up.commit().await.unwrap();
            });
            let mut want = old.clone();
            if crash_after_append {
                want.extend_from_slice(b"first ");
            }
            want.extend_from_slice(b"second");
            assert_eq!(fx.object().unwrap(), want);
        }
    }

    #[test]
    fn an_append_to_an_object_replaced_meanwhile_commits_nothing() {
        let fx = Fixture::new();
        let path = fx.dir.path().join("out/file");
        std::fs::write(&path, b"first version").unwrap();
        let up = fx.appending(1000);
        let rt = tokio::runtime::Runtime::new().unwrap();
        // Replaced after the bytes were read: found at commit.
        rt.block_on(up.write(13, b" + more")).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"another client's").unwrap();
        let e = rt.block_on(up.commit()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(std::fs::read(&path).unwrap(), b"another client's");
        // Replaced before the bytes were read: found when reading them.
        let up = fx.appending(1000);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"a third, longer version").unwrap();
        let e = rt.block_on(up.write(16, b"x")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(rt.block_on(up.commit()).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"a third, longer version");
        // Several parts long: replaced before its whole parts are copied by the store.
        std::fs::write(&path, pattern(2500, 1)).unwrap();
        let up = fx.appending(1000);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, pattern(2600, 2)).unwrap();
        let e = rt.block_on(up.write(2500, b"x")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(rt.block_on(up.commit()).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), pattern(2600, 2));
    }
}
