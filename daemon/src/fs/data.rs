//! The data of open files: reads (through an object's prefetching reader, or from a local
//! file straight into the reply buffers), writes into an upload, and commits.

use std::io;
use std::sync::atomic::Ordering;

use fuse_backend_rs::api::filesystem::{ZeroCopyReader, ZeroCopyWriter};

use super::handles::Handle;
use super::{errno, unsupported, BerthFs, MAX_IO};
use crate::namespace::{store_error, Node, ObjectStat};
use crate::prefetch::ObjectReader;
use crate::upload::Upload;

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
        if upload.written().load(Ordering::Acquire) == 0
            && self.rt.block_on(upload.reopen_if_empty())
        {
            self.ns.resume_write(*ino, upload.written());
        }
        // The bytes go from the request's buffers straight into the part buffer.
        self.rt
            .block_on(upload.write_with(offset, size, |buf| r.read_exact(buf)))
    }

    /// Commits an upload and tells the namespace how it ended.
    pub(super) fn commit(&self, ino: u64, upload: &Upload) -> io::Result<()> {
        let result = self.rt.block_on(upload.commit());
        match &result {
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

    pub(super) fn open_upload(
        &self,
        parent: u64,
        name: &str,
        key: String,
    ) -> io::Result<(Node, u64)> {
        let upload = Upload::new(
            self.ns.store().clone(),
            self.memory.clone(),
            key,
            self.config.part_size,
        );
        self.add_upload(parent, name, upload)
    }

    /// Opens the object at `key` for appending: its state now (asked from the store, not the
    /// cache) is what the append builds on and what commit checks is still there.
    pub(super) fn open_append(&self, parent: u64, name: &str, key: String) -> io::Result<u64> {
        let info = self
            .rt
            .block_on(self.ns.store().head(&key))
            .map_err(|e| store_error("open for append", &key, e))?;
        tracing::debug!(key = %key, size = info.size, "opened for appending");
        let upload = Upload::appending(
            self.ns.store().clone(),
            self.memory.clone(),
            key,
            self.config.part_size,
            ObjectStat::from(info),
        );
        Ok(self.add_upload(parent, name, upload)?.1)
    }

    fn add_upload(&self, parent: u64, name: &str, upload: Upload) -> io::Result<(Node, u64)> {
        let node = self.ns.begin_write(parent, name, upload.written())?;
        let fh = self
            .add_handle(Handle::Write {
                ino: node.ino,
                upload,
            })
            .inspect_err(|_| self.ns.end_write(node.ino, None))?;
        Ok((node, fh))
    }
}
