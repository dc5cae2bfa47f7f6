//! The data of open files: reads (through an object's prefetching reader, or from a local
//! file straight into the reply buffers), writes into an upload, and commits.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::{ZeroCopyReader, ZeroCopyWriter};

use super::handles::{Handle, HandleKind};
use super::{errno, unsupported, BerthFs, MAX_IO};
use crate::namespace::{store_error, Node, ObjectStat};
use crate::prefetch::ObjectReader;
use crate::store::PosixMeta;
use crate::upload::{Header, Upload};

/// Reads up to `size` bytes at `offset` of a local file straight into the reply buffers
/// (guest memory for virtio-fs), as a passthrough server does: one copy, by the kernel.
/// Short only at the end of the file.
fn read_local(
    w: &mut dyn ZeroCopyWriter,
    file: &std::fs::File,
    size: usize,
    offset: u64,
) -> io::Result<usize> {
    // `write_from` takes `&mut`; the reads are positional (preadv), so a second descriptor
    // of the same open file is as good as the shared one.
    let mut file = file.try_clone()?;
    let want = size.min(w.available_bytes());
    let mut total = 0;
    while total < want {
        match w.write_from(&mut file, want - total, offset + total as u64) {
            Ok(0) => break,
            Ok(n) => total += n,
            // What the writer says when the file ended.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

impl BerthFs {
    pub(super) fn reader_for(&self, ino: u64) -> io::Result<ObjectReader> {
        let node = self.rt.block_on(self.ns.getattr(ino))?;
        let key = self.ns.object_key(&node);
        Ok(ObjectReader::new(
            self.fetcher.clone(),
            &key,
            node.stat.etag.as_deref(),
            node.stat.size,
        ))
    }

    /// READ of an open handle into the reply buffers.
    pub(super) fn read_handle(
        &self,
        handle: &Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        let reader = match handle {
            Handle::Read { reader, .. } => reader,
            Handle::Write { upload, .. } => {
                return Err(unsupported(
                    "read",
                    upload.key(),
                    "a file cannot be read while it is being written",
                    libc::EOPNOTSUPP,
                ));
            }
            Handle::Dir { .. } => return Err(errno(libc::EISDIR)),
        };
        // Never more than the reply can hold or berth negotiated: a guest's READ of 4 GiB
        // with a 4 KiB buffer fetches 4 KiB.
        let size = (size as usize).min(w.available_bytes()).min(MAX_IO);
        if let Some(file) = reader.local_file() {
            return read_local(w, file, size, offset);
        }
        let parts = self
            .rt
            .block_on(reader.read(offset, size as u64))
            .map_err(|e| store_error("read", reader.key(), e))?;
        let mut total = 0;
        for part in parts {
            w.write_all(&part)?;
            total += part.len();
        }
        Ok(total)
    }

    /// WRITE to an open handle from the request's buffers.
    pub(super) fn write_handle(
        &self,
        handle: &Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        let Handle::Write { ino, upload } = handle else {
            return Err(unsupported(
                "write",
                "",
                "stored objects cannot be modified in place; open with O_TRUNC to replace one",
                libc::EOPNOTSUPP,
            ));
        };
        // Refused before anything is allocated: the kernel never sends more than it was told
        // at FUSE INIT. (A guest whose buffers hold less than it claims fails its own write.)
        let size = size as usize;
        if size > MAX_IO {
            tracing::warn!(size, "WRITE larger than negotiated; refused");
            return Err(errno(libc::EINVAL));
        }
        // Committed already by a flush, the upload may go on (`Upload::reopen_after_commit`)
        // unless another handle writes the file now.
        let written = upload.written();
        let may_reopen = !self.ns.pending_elsewhere(*ino, &written);
        // The bytes go from the request's buffers straight into the spool.
        let n = self.rt.block_on(upload.write_with(
            offset,
            size,
            may_reopen,
            |file, at, len| r.read_exact_to(file, len, at),
        ))?;
        // Written, so being written (again, if a flush had committed it).
        if !self.ns.is_pending(*ino) {
            self.ns.resume_write(*ino, written);
        }
        Ok(n)
    }

    /// Commits an upload and tells the namespace how it ended.
    pub(super) fn commit(&self, ino: u64, upload: &Upload) -> io::Result<()> {
        // A commit that happened already (the flush at close, then the release that comes
        // later, asynchronously) told the namespace then: telling it again could undo what
        // happened since (another open changing the file's attributes or bytes).
        let was_open = self.rt.block_on(upload.is_open());
        let result = self.rt.block_on(upload.commit());
        match &result {
            Ok(_) if !was_open => {}
            Ok(stat) => self.ns.end_write(ino, Some(stat.clone())),
            Err(e) => {
                tracing::error!(key = upload.key(), error = %e, "file was NOT saved to the store");
                self.ns.end_write(ino, None);
            }
        }
        result.map(|_| ())
    }

    /// Closes every handle of this door; called once the door is gone (the mount unmounted,
    /// `berth share` stopped, the VMM left). A file still being written, with data since its
    /// last flush (close) or fsync, was never finished by its writer: its upload is aborted
    /// and the object stays as it was. What was flushed is committed already.
    pub fn shutdown(&self) {
        for handle in self.handles.drain() {
            let Handle::Write { ino, .. } = &*handle else {
                continue;
            };
            // The file is no longer busy for the other doors, whatever the store says.
            self.ns.end_write(*ino, None);
            let abort = async move {
                if let Handle::Write { upload, .. } = &*handle {
                    if upload.abort_if_open().await {
                        tracing::warn!(
                            key = upload.key(),
                            "a file was still being written when its door closed; its upload was aborted and the object NOT changed"
                        );
                    }
                    upload.release().await;
                }
            };
            // Dropped on a runtime thread, a door cannot block: the abort goes on there.
            if tokio::runtime::Handle::try_current().is_ok() {
                self.rt.spawn(abort);
            } else {
                self.rt.block_on(abort);
            }
        }
    }

    /// A new upload replacing `parent/name` (at `key`); the object is committed with `meta`.
    pub(super) fn open_upload(
        &self,
        parent: u64,
        name: &str,
        key: String,
        meta: PosixMeta,
    ) -> io::Result<(Node, u64)> {
        self.add_upload(parent, name, key, None, meta)
    }

    /// Opens the object at `key` for appending: its state now (asked from the store, not the
    /// cache) is what the append builds on and what commit checks is still there.
    pub(super) fn open_append(&self, parent: u64, name: &str, key: String) -> io::Result<u64> {
        let info = self
            .rt
            .block_on(self.ns.store().head(&key))
            .map_err(|e| store_error("open for append", &key, e))?;
        tracing::debug!(key = %key, size = info.size, "opened for appending");
        // The object keeps its attributes.
        let meta = info.meta.clone().unwrap_or_default();
        Ok(self
            .add_upload(parent, name, key, Some(ObjectStat::from(info)), meta)?
            .1)
    }

    /// A new upload of `parent/name` (at `key`), with its spool named after its handle.
    fn add_upload(
        &self,
        parent: u64,
        name: &str,
        key: String,
        base: Option<ObjectStat>,
        meta: PosixMeta,
    ) -> io::Result<(Node, u64)> {
        if let Some(existing) = self.ns.child(parent, name) {
            self.drop_orphan_write(existing.ino);
        }
        let written = Arc::new(AtomicU64::new(base.as_ref().map_or(0, |b| b.size)));
        let node = self
            .ns
            .begin_write(parent, name, written.clone(), meta.clone())?;
        let header = Header {
            ino: node.ino,
            key,
            part_size: self.config.part_size as u64,
            base,
        };
        let fh = self
            .handles
            .add_with(HandleKind::Write, |fh| {
                let spool = self.spools.create(fh, header.clone()).inspect_err(|e| {
                    tracing::error!(key = %header.key, dir = %self.spools.path().display(), error = %e, "could not create the spool of a file opened for writing");
                })?;
                let upload = Upload::start(
                    self.ns.store().clone(),
                    self.memory.clone(),
                    header,
                    spool,
                    written,
                    meta,
                )?;
                Ok(Handle::Write {
                    ino: node.ino,
                    upload,
                })
            })
            .inspect_err(|_| self.ns.end_write(node.ino, None))?;
        Ok((node, fh))
    }

    /// Takes over a file a predecessor engine was writing through handle `fh` (for inode
    /// `ino`, when a request names it): its upload goes on from the spool, nothing written is
    /// lost. EIO if there is no spool (an engine from before spools, or the upload had
    /// failed).
    pub(super) fn adopt_write(&self, fh: u64, ino: Option<u64>) -> io::Result<Arc<Handle>> {
        let found = self.spools.open(fh).inspect_err(|e| {
            tracing::error!(fh, error = %e, "could not read the spool of a file being written");
        })?;
        let Some((spool, rec)) = found else {
            if super::serving_again() {
                // Served again from a request slot: it was answered before the crash (the
                // file committed and released since), and the kernel drops this reply.
                tracing::info!(fh, ?ino, "a request served again after a takeover names a write handle whose spool is gone: it was answered before the crash");
            } else {
                tracing::error!(
                    fh,
                    ?ino,
                    "a file was being written when its engine died and left no spool; the file was NOT saved (EIO)"
                );
            }
            return Err(errno(libc::EIO));
        };
        let node = rec.header.ino;
        if ino.is_some_and(|i| i != node) {
            tracing::warn!(
                fh,
                ?ino,
                spool_ino = node,
                "a request names a write handle with another inode; refused"
            );
            return Err(errno(libc::EBADF));
        }
        let committed = rec.committed.is_some();
        let (parts, key, meta) = (rec.parts.len(), rec.header.key.clone(), rec.meta.clone());
        let upload = Upload::resume(self.ns.store().clone(), self.memory.clone(), spool, rec)?;
        let written = upload.written();
        tracing::info!(
            key = %key,
            bytes = written.load(Ordering::Acquire),
            parts_saved = parts,
            committed,
            "took over a file being written by an earlier engine"
        );
        if !committed {
            self.ns.resume_write(node, written);
            self.ns.set_pending_meta(node, meta);
        }
        self.handles.adopt(fh, Handle::Write { ino: node, upload })
    }

    /// A create or open for writing of `ino` is being applied while a predecessor's upload of
    /// it, taken over but never named by a request and with nothing written, holds the file:
    /// that is a create or open whose reply never reached the kernel (the engine died first),
    /// and this is its resent copy. The leftover goes, so the file is not busy.
    pub(super) fn drop_orphan_write(&self, ino: u64) {
        let orphans = self.handles.take_where(|h| {
            matches!(h, Handle::Write { ino: i, upload } if *i == ino && upload.is_unclaimed_and_untouched())
        });
        for h in orphans {
            if let Handle::Write { upload, .. } = &*h {
                tracing::info!(key = upload.key(), "a file a dead engine opened for writing, with nothing written, is opened again; the earlier open is dropped");
                self.rt.block_on(async {
                    upload.abort_if_open().await;
                    upload.release().await;
                });
                self.ns.end_write(ino, None);
            }
        }
    }

    /// Takes over every file this door's predecessors were writing (a successor engine does
    /// so before it serves, so a file being written is never seen as missing from the store).
    pub fn adopt_writes(&self) {
        self.spools.remove_unborn();
        for fh in self.spools.handles() {
            if self.handles.predecessors(fh) == Some(HandleKind::Write) {
                let _ = self.adopt_write(fh, None);
            }
        }
    }
}
