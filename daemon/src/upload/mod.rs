//! Writes of one new object: a sequential stream turned into a multipart upload.
//!
//! Bytes collect in a part-sized buffer; each full part is uploaded in the background (a few
//! at a time per handle) while the application keeps writing. The object appears in the store
//! only when the upload is committed (close or fsync), all at once; until then readers of the
//! store see the old object, or none. A failed upload is aborted and reported as EIO, never
//! committed half-way.
//!
//! An upload can also **append** to an object that exists ([`Upload::appending`]): the new
//! object is the old one's bytes, read from the store (with If-Match on its ETag) into the
//! same part pipeline when the first appended byte comes, then the appended bytes. At commit
//! the store is asked again: if the object no longer carries the ETag it had at open (another
//! client replaced it), nothing is committed and the writer gets EIO, with a log line; the
//! other client's object stays. A flush or close with nothing appended changes nothing.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::task::JoinHandle;

use crate::memory::{MemoryLimiter, Reservation};
use crate::namespace::ObjectStat;
use crate::store::{ObjectStore, StoreResult, UploadedPart};

/// S3 allows at most this many parts in one upload.
const MAX_PARTS: i32 = 10_000;
/// Parts uploading at once for one handle.
const PARTS_IN_FLIGHT: usize = 4;
/// How long a writer waits for memory before going over the budget.
const MEMORY_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Status {
    Open,
    Committed(ObjectStat),
    Failed(i32),
}

struct State {
    buf: BytesMut,
    buf_memory: Option<Reservation>,
    upload_id: Option<String>,
    in_flight: VecDeque<(JoinHandle<StoreResult<UploadedPart>>, Reservation)>,
    parts: Vec<UploadedPart>,
    next_part: i32,
    status: Status,
    /// The base object's bytes are in the pipeline (appends only).
    seeded: bool,
}

pub struct Upload {
    store: Arc<dyn ObjectStore>,
    memory: Arc<MemoryLimiter>,
    key: String,
    part_size: usize,
    written: Arc<AtomicU64>,
    /// The object this upload appends to, as it was when opened.
    base: Option<ObjectStat>,
    state: tokio::sync::Mutex<State>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl Upload {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        memory: Arc<MemoryLimiter>,
        key: String,
        part_size: usize,
    ) -> Upload {
        Upload {
            store,
            memory,
            key,
            part_size,
            written: Arc::new(AtomicU64::new(0)),
            base: None,
            state: tokio::sync::Mutex::new(State {
                buf: BytesMut::new(),
                buf_memory: None,
                upload_id: None,
                in_flight: VecDeque::new(),
                parts: Vec::new(),
                next_part: 1,
                status: Status::Open,
                seeded: false,
            }),
        }
    }

    /// An upload that appends to `key`, which holds `base` now: writes go on at its end.
    pub fn appending(
        store: Arc<dyn ObjectStore>,
        memory: Arc<MemoryLimiter>,
        key: String,
        part_size: usize,
        base: ObjectStat,
    ) -> Upload {
        let mut up = Upload::new(store, memory, key, part_size);
        up.written.store(base.size, Ordering::Release);
        up.base = Some(base);
        up
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
        let mut rest = data;
        self.write_with(offset, data.len(), |buf| {
            let (now, later) = rest.split_at(buf.len());
            buf.copy_from_slice(now);
            rest = later;
            Ok(())
        })
        .await
    }

    /// Appends `len` bytes at `offset`, which `fill` copies straight into the part buffer, a
    /// piece at a time (one copy from the request's buffers, no staging allocation). If
    /// `fill` fails before any byte went in, nothing changed; after, the upload fails (its
    /// parts cannot be taken back) and is aborted.
    pub async fn write_with(
        &self,
        offset: u64,
        len: usize,
        mut fill: impl FnMut(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<usize> {
        let mut st = self.state.lock().await;
        match st.status {
            Status::Open => {}
            Status::Committed(_) => {
                tracing::warn!(key = %self.key, "write after the object was committed (close/fsync): not supported");
                return Err(errno(libc::EOPNOTSUPP));
            }
            Status::Failed(e) => return Err(errno(e)),
        }
        let written = self.written.load(Ordering::Acquire);
        if offset != written {
            tracing::warn!(key = %self.key, offset, expected = written, "non-sequential write refused: objects are written front to back");
            return Err(errno(libc::EINVAL));
        }
        if len == 0 {
            return Ok(0);
        }
        if let Err(e) = self.seed(&mut st).await {
            st.status = Status::Failed(e.raw_os_error().unwrap_or(libc::EIO));
            self.abort(&mut st).await;
            return Err(e);
        }
        self.fill_buffer(&mut st, len, &mut fill).await?;
        self.written.fetch_add(len as u64, Ordering::AcqRel);
        Ok(len)
    }

    /// Puts the base object's bytes first in the pipeline, once (appends only). They are read
    /// with If-Match on the ETag the object had when opened: a change since fails here.
    async fn seed(&self, st: &mut State) -> io::Result<()> {
        let Some(base) = &self.base else {
            return Ok(());
        };
        if st.seeded {
            return Ok(());
        }
        let mut at = 0;
        while at < base.size {
            let end = (at + self.part_size as u64).min(base.size);
            let bytes = self
                .store
                .get_range(&self.key, at..end, base.etag.as_deref())
                .await
                .map_err(|e| {
                    tracing::error!(key = %self.key, error = %e, "could not read the object being appended to; nothing is committed");
                    errno(e.errno())
                })?;
            if bytes.len() as u64 != end - at {
                tracing::error!(key = %self.key, "the object being appended to is shorter than when it was opened; nothing is committed");
                return Err(errno(libc::EIO));
            }
            let mut rest = &bytes[..];
            self.fill_buffer(st, bytes.len(), &mut |buf: &mut [u8]| {
                let (now, later) = rest.split_at(buf.len());
                buf.copy_from_slice(now);
                rest = later;
                Ok(())
            })
            .await?;
            at = end;
        }
        st.seeded = true;
        Ok(())
    }

    /// Copies `len` bytes from `fill` into the part buffer, uploading each full part. A fill
    /// that fails before any byte went in changes nothing; after, the upload fails.
    async fn fill_buffer(
        &self,
        st: &mut State,
        len: usize,
        fill: &mut impl FnMut(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            if st.buf_memory.is_none() {
                let r = self
                    .memory
                    .reserve_wait(self.part_size as u64, MEMORY_WAIT)
                    .await;
                st.buf_memory = Some(r);
                st.buf.reserve(self.part_size);
            }
            let room = self.part_size - st.buf.len();
            let take = room.min(left);
            let start = st.buf.len();
            st.buf.resize(start + take, 0);
            if let Err(e) = fill(&mut st.buf[start..]) {
                st.buf.truncate(start);
                if left < len {
                    tracing::error!(key = %self.key, error = %e, "a write failed half-way; the file is NOT saved");
                    st.status = Status::Failed(libc::EIO);
                    self.abort(st).await;
                }
                return Err(e);
            }
            left -= take;
            if st.buf.len() == self.part_size {
                if let Err(e) = self.send_part(st).await {
                    st.status = Status::Failed(e.raw_os_error().unwrap_or(libc::EIO));
                    self.abort(st).await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Uploads the buffer as the next part, waiting first if too many parts are in flight.
    async fn send_part(&self, st: &mut State) -> io::Result<()> {
        if st.next_part > MAX_PARTS {
            tracing::error!(key = %self.key, part_size = self.part_size, "object too large for {MAX_PARTS} parts; raise --part-size");
            return Err(errno(libc::EFBIG));
        }
        if st.upload_id.is_none() {
            let id = self.store.create_upload(&self.key).await.map_err(|e| {
                tracing::error!(key = %self.key, error = %e, "could not start multipart upload");
                errno(e.errno())
            })?;
            st.upload_id = Some(id);
        }
        while st.in_flight.len() >= PARTS_IN_FLIGHT {
            self.reap_one(st).await?;
        }
        let body = st.buf.split().freeze();
        let memory = st
            .buf_memory
            .take()
            .unwrap_or_else(|| self.memory.reserve(0));
        let number = st.next_part;
        st.next_part += 1;
        let store = self.store.clone();
        let key = self.key.clone();
        let id = st.upload_id.clone().unwrap_or_default();
        let task = tokio::spawn(async move { store.upload_part(&key, &id, number, body).await });
        st.in_flight.push_back((task, memory));
        Ok(())
    }

    async fn reap_one(&self, st: &mut State) -> io::Result<()> {
        let Some((task, _memory)) = st.in_flight.pop_front() else {
            return Ok(());
        };
        match task.await {
            Ok(Ok(part)) => {
                st.parts.push(part);
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::error!(key = %self.key, error = %e, "part upload failed");
                Err(errno(libc::EIO))
            }
            Err(e) => {
                tracing::error!(key = %self.key, error = %e, "part upload task failed");
                Err(errno(libc::EIO))
            }
        }
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
        if let Some(base) = self.base.as_ref().filter(|_| !st.seeded) {
            return Ok(base.clone());
        }
        match self.finish(&mut st).await {
            Ok(stat) => {
                tracing::debug!(key = %self.key, size = stat.size, "object committed");
                st.status = Status::Committed(stat.clone());
                Ok(stat)
            }
            Err(e) => {
                st.status = Status::Failed(e.raw_os_error().unwrap_or(libc::EIO));
                self.abort(&mut st).await;
                Err(e)
            }
        }
    }

    async fn finish(&self, st: &mut State) -> io::Result<ObjectStat> {
        let size = self.written.load(Ordering::Acquire);
        self.check_base_unchanged().await?;
        let etag = if st.upload_id.is_none() {
            let body = st.buf.split().freeze();
            st.buf_memory = None;
            self.store.put(&self.key, body).await.map_err(|e| {
                tracing::error!(key = %self.key, error = %e, "upload failed");
                errno(e.errno())
            })?
        } else {
            if !st.buf.is_empty() {
                self.send_part(st).await?;
            }
            while !st.in_flight.is_empty() {
                self.reap_one(st).await?;
            }
            st.parts.sort_by_key(|p| p.number);
            let id = st.upload_id.clone().unwrap_or_default();
            self.store
                .complete_upload(&self.key, &id, &st.parts)
                .await
                .map_err(|e| {
                    tracing::error!(key = %self.key, error = %e, "completing the upload failed");
                    errno(e.errno())
                })?
        };
        Ok(ObjectStat {
            size,
            mtime: SystemTime::now(),
            etag,
        })
    }

    /// Appends only: the object still carries the ETag it had when opened (asked right before
    /// completing; a change in between is not seen, see the module's notes).
    async fn check_base_unchanged(&self) -> io::Result<()> {
        let Some(base) = &self.base else {
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

    async fn abort(&self, st: &mut State) {
        for (task, _) in st.in_flight.drain(..) {
            task.abort();
        }
        st.buf.clear();
        st.buf_memory = None;
        if let Some(id) = st.upload_id.take() {
            if let Err(e) = self.store.abort_upload(&self.key, &id).await {
                tracing::warn!(key = %self.key, error = %e, "could not abort the multipart upload; the store may keep its parts until a lifecycle rule removes them");
            }
        }
    }

    /// Re-opens an upload that committed an empty object before any data came, so that the
    /// writes that follow replace it. Shells do this: `echo x > f` opens `f`, moves the fd with
    /// dup2 and closes the original (a flush with nothing written), then writes. Returns
    /// whether it re-opened.
    pub async fn reopen_if_empty(&self) -> bool {
        let mut st = self.state.lock().await;
        match &st.status {
            Status::Committed(stat) if stat.size == 0 => {
                st.status = Status::Open;
                true
            }
            _ => false,
        }
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

    /// Whether the upload committed (or failed) already.
    pub async fn is_open(&self) -> bool {
        matches!(self.state.lock().await.status, Status::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn setup(part: usize) -> (Upload, Arc<MemoryLimiter>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let memory = MemoryLimiter::new(1 << 30);
        let up = Upload::new(store, memory.clone(), "out/file".into(), part);
        (up, memory, dir)
    }

    #[tokio::test]
    async fn streams_parts_and_commits_exact_bytes() {
        let (up, memory, dir) = setup(1000);
        let data: Vec<u8> = (0..10_500u32).map(|i| (i % 251) as u8).collect();
        let mut off = 0;
        for chunk in data.chunks(777) {
            up.write(off, chunk).await.unwrap();
            off += chunk.len() as u64;
        }
        assert!(
            !dir.path().join("out/file").exists(),
            "nothing visible before commit"
        );
        let stat = up.commit().await.unwrap();
        assert_eq!(stat.size, data.len() as u64);
        assert_eq!(std::fs::read(dir.path().join("out/file")).unwrap(), data);
        assert_eq!(
            up.commit().await.unwrap().size,
            stat.size,
            "commit is idempotent"
        );
        assert_eq!(memory.used(), 0);
    }

    #[tokio::test]
    async fn refuses_out_of_order_writes_and_writes_after_commit() {
        let (up, _m, _d) = setup(1000);
        up.write(0, b"abc").await.unwrap();
        let e = up.write(10, b"x").await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        up.commit().await.unwrap();
        let e = up.write(3, b"d").await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
    }

    #[tokio::test]
    async fn writes_after_an_empty_commit_replace_the_empty_object() {
        let (up, _m, dir) = setup(4);
        up.commit().await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("out/file")).unwrap(), b"");
        assert!(up.reopen_if_empty().await);
        up.write(0, b"hello world").await.unwrap();
        assert_eq!(up.commit().await.unwrap().size, 11);
        assert_eq!(
            std::fs::read(dir.path().join("out/file")).unwrap(),
            b"hello world"
        );
        assert!(
            !up.reopen_if_empty().await,
            "a non-empty object stays committed"
        );
    }

    #[tokio::test]
    async fn an_empty_file_commits_as_an_empty_object() {
        let (up, _m, dir) = setup(1000);
        up.commit().await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("out/file")).unwrap(), b"");
    }

    #[tokio::test]
    async fn writes_fill_the_part_buffer_directly_and_a_failed_fill_changes_nothing() {
        let (up, _m, dir) = setup(4);
        let e = up
            .write_with(0, 3, |_| Err(io::Error::from_raw_os_error(libc::EFAULT)))
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
        assert_eq!(up.written().load(Ordering::Acquire), 0, "nothing went in");
        let mut calls = 0;
        up.write_with(0, 10, |buf| {
            calls += 1;
            buf.fill(b'a' + calls);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(calls, 3, "one fill per part-buffer piece (4 + 4 + 2)");
        up.commit().await.unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("out/file")).unwrap(),
            b"bbbbccccdd"
        );
    }

    #[tokio::test]
    async fn a_fill_failing_half_way_fails_the_upload_and_commits_nothing() {
        let (up, _m, dir) = setup(4);
        let mut calls = 0;
        let e = up
            .write_with(0, 10, |buf| {
                calls += 1;
                if calls == 2 {
                    return Err(io::Error::from_raw_os_error(libc::EFAULT));
                }
                buf.fill(b'x');
                Ok(())
            })
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
        assert!(
            up.commit().await.is_err(),
            "a half-written file is never committed"
        );
        assert!(!dir.path().join("out/file").exists());
    }

    #[tokio::test]
    async fn an_open_upload_is_aborted_and_a_committed_one_is_left() {
        let (up, _m, dir) = setup(1000);
        up.write(0, b"half").await.unwrap();
        assert!(up.abort_if_open().await);
        assert!(up.commit().await.is_err());
        assert!(
            !dir.path().join("out/file").exists(),
            "nothing half-written was committed"
        );
        let (done, _m2, dir2) = setup(1000);
        done.write(0, b"whole").await.unwrap();
        done.commit().await.unwrap();
        assert!(!done.abort_if_open().await);
        assert_eq!(
            std::fs::read(dir2.path().join("out/file")).unwrap(),
            b"whole"
        );
    }
    fn appending(dir: &tempfile::TempDir, part: usize) -> Upload {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let info = block_on(store.head("out/file")).unwrap();
        Upload::appending(
            store,
            MemoryLimiter::new(1 << 30),
            "out/file".into(),
            part,
            info.into(),
        )
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn an_append_keeps_the_old_bytes_and_adds_the_new_ones() {
        for (old_len, part) in [(11usize, 1000usize), (10_500, 1000), (0, 4)] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("out")).unwrap();
            let old: Vec<u8> = (0..old_len).map(|i| (i % 251) as u8).collect();
            std::fs::write(dir.path().join("out/file"), &old).unwrap();
            let up = appending(&dir, part);
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
            assert_eq!(std::fs::read(dir.path().join("out/file")).unwrap(), want);
        }
    }

    #[test]
    fn an_append_to_an_object_replaced_meanwhile_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("out/file"), b"first version").unwrap();
        let up = appending(&dir, 1000);
        let rt = tokio::runtime::Runtime::new().unwrap();
        // Replaced after the bytes were read: found at commit.
        rt.block_on(up.write(13, b" + more")).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.path().join("out/file"), b"another client's").unwrap();
        let e = rt.block_on(up.commit()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(
            std::fs::read(dir.path().join("out/file")).unwrap(),
            b"another client's"
        );
        // Replaced before the bytes were read: found when reading them.
        let up = appending(&dir, 1000);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.path().join("out/file"), b"a third, longer version").unwrap();
        let e = rt.block_on(up.write(16, b"x")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(rt.block_on(up.commit()).is_err());
        assert_eq!(
            std::fs::read(dir.path().join("out/file")).unwrap(),
            b"a third, longer version"
        );
    }
}
