//! The portable engine: positioned `pread`/`pwrite` on tokio's blocking thread pool.
//!
//! It is the fallback when io_uring is unavailable and the oracle the io_uring engine is tested
//! against. A semaphore caps how many blocking threads it occupies at once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use super::align::{check_io, AlignedBuf};
use super::{dio_alignment_of, BlockIo, EngineKind};

/// Default cap on blocking threads busy with this engine's I/O at once.
pub const DEFAULT_MAX_CONCURRENCY: usize = 32;

pub struct ThreadPoolIo {
    file: Arc<File>,
    alignment: usize,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for ThreadPoolIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPoolIo")
            .field("alignment", &self.alignment)
            .finish()
    }
}

impl ThreadPoolIo {
    /// An engine for `file`, with the alignment its filesystem asks for O_DIRECT.
    pub fn new(file: File) -> ThreadPoolIo {
        let alignment = dio_alignment_of(&file);
        ThreadPoolIo::with_config(file, alignment, DEFAULT_MAX_CONCURRENCY)
    }

    /// An engine with an explicit alignment (a power of two, at least 512) and cap on
    /// concurrent blocking calls (at least 1).
    pub fn with_config(file: File, alignment: usize, max_concurrency: usize) -> ThreadPoolIo {
        ThreadPoolIo {
            file: Arc::new(file),
            alignment: super::sane_alignment(alignment),
            permits: Arc::new(Semaphore::new(max_concurrency.max(1))),
        }
    }

    async fn run<F>(&self, buf: AlignedBuf, offset: u64, op: F) -> io::Result<AlignedBuf>
    where
        F: FnOnce(&File, &mut AlignedBuf, u64) -> io::Result<()> + Send + 'static,
    {
        check_io(&buf, offset, self.alignment)?;
        if buf.is_empty() {
            return Ok(buf);
        }
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("cache I/O needs a tokio runtime: {e}")))?;
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("cache thread pool is closed"))?;
        let file = self.file.clone();
        let task = handle.spawn_blocking(move || {
            let _permit = permit;
            let mut buf = buf;
            op(&file, &mut buf, offset).map(|()| buf)
        });
        task.await
            .map_err(|e| io::Error::other(format!("cache I/O thread failed: {e}")))?
    }
}

#[async_trait]
impl BlockIo for ThreadPoolIo {
    fn kind(&self) -> EngineKind {
        EngineKind::ThreadPool
    }

    fn alignment(&self) -> usize {
        self.alignment
    }

    async fn read_at(&self, buf: AlignedBuf, offset: u64) -> io::Result<AlignedBuf> {
        self.run(buf, offset, |file, buf, offset| {
            file.read_exact_at(buf.as_mut_slice(), offset)
                .map_err(|e| super::with_context(e, "read", buf.len(), offset))
        })
        .await
    }

    async fn write_at(&self, buf: AlignedBuf, offset: u64) -> io::Result<AlignedBuf> {
        self.run(buf, offset, |file, buf, offset| {
            file.write_all_at(buf.as_slice(), offset)
                .map_err(|e| super::with_context(e, "write", buf.len(), offset))
        })
        .await
    }
}
