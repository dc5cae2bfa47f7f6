//! The state of every virtqueue that exists only in the backend, kept in a memfd the
//! long-lived front (the holder) owns and every ring server (each engine generation) maps: so
//! that when a ring server dies, its successor knows where the ring was and which requests it
//! had taken and not answered.
//!
//! This is the idea of the vhost-user spec's "Inflight I/O tracking" (a region per queue, a
//! state per descriptor head, resubmission in the order requests were taken), in a layout of
//! our own: the VMM never sees it, because the VMM never learns that a ring server died.
//!
//! Per queue: `next_avail` (avail entries taken), `used_idx` (the used index as the ring
//! server last published it, or [`UNKNOWN`]), `finished` (requests answered, for hang
//! detection), and per head: the counter of the request holding it (0: free) and the avail
//! position it was taken from. The ring server marks a head before it advances `next_avail`,
//! and clears it after the used ring shows the answer; a successor reconciles both ends
//! (see `rings::recover`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"BERTHVQ1");
const HEADER: usize = 64;
/// `used_idx` when nobody published one since the ring was (re)based: take the guest's.
pub const UNKNOWN: u32 = u32::MAX;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    queues: AtomicU64,
    queue_size: AtomicU64,
}

#[repr(C)]
struct QueueHeader {
    next_avail: AtomicU32,
    used_idx: AtomicU32,
    finished: AtomicU64,
    counter: AtomicU64,
    _pad: AtomicU64,
}

#[repr(C)]
struct Head {
    /// 0: free; else the counter of the request that holds it.
    counter: AtomicU64,
    /// The avail position the request was taken from.
    avail_pos: AtomicU32,
    _pad: AtomicU32,
}

/// One connection's queue states, mapped.
pub struct Inflight {
    file: File,
    base: NonNull<u8>,
    len: usize,
    queues: usize,
    queue_size: usize,
}

// SAFETY: every access to the mapping goes through atomics; it lives as long as the value.
unsafe impl Send for Inflight {}
unsafe impl Sync for Inflight {}

fn queue_bytes(queue_size: usize) -> usize {
    std::mem::size_of::<QueueHeader>() + queue_size * std::mem::size_of::<Head>()
}

impl Inflight {
    /// A new region for `queues` queues of at most `queue_size` entries (front side).
    pub fn create(queues: usize, queue_size: u16) -> io::Result<Inflight> {
        let name = c"berth-virtqueues";
        // SAFETY: a valid name; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is not owned elsewhere.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = HEADER + queues * queue_bytes(queue_size as usize);
        file.set_len(len as u64)?;
        let me = Self::map(file, len, queues, queue_size as usize)?;
        let h = me.header();
        h.queues.store(queues as u64, Ordering::Relaxed);
        h.queue_size.store(u64::from(queue_size), Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        for q in 0..queues {
            me.queue(q).used_idx.store(UNKNOWN, Ordering::Relaxed);
        }
        Ok(me)
    }

    /// Maps a region the front made (ring server side).
    pub fn open(file: File) -> io::Result<Inflight> {
        use std::os::unix::fs::FileExt;
        let len = file.metadata()?.len() as usize;
        if len < HEADER {
            return Err(invalid("virtqueue state region too small"));
        }
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0)?;
        let word =
            |i: usize| u64::from_le_bytes(header[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        if word(0) != MAGIC {
            return Err(invalid("not a berth virtqueue state region"));
        }
        let (queues, queue_size) = (word(1) as usize, word(2) as usize);
        if queue_size > 32768 || queues > 1024 || HEADER + queues * queue_bytes(queue_size) > len {
            return Err(invalid("virtqueue state region has a bad geometry"));
        }
        Self::map(file, len, queues, queue_size)
    }

    fn map(file: File, len: usize, queues: usize, queue_size: usize) -> io::Result<Inflight> {
        // SAFETY: maps `len` bytes of a file at least that long, shared, read-write.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Inflight {
            file,
            base,
            len,
            queues,
            queue_size,
        })
    }

    /// The memfd, to hand to a ring server.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn queues(&self) -> usize {
        self.queues
    }

    pub fn queue_size(&self) -> usize {
        self.queue_size
    }

    fn header(&self) -> &Header {
        // SAFETY: the region starts with a Header and is mapped for our lifetime.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    fn queue(&self, q: usize) -> &QueueHeader {
        assert!(
            q < self.queues,
            "queue {q} beyond the region's {}",
            self.queues
        );
        // SAFETY: q < queues keeps the pointer inside the mapping; the layout is repr(C).
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(HEADER + q * queue_bytes(self.queue_size))
                .cast::<QueueHeader>()
        }
    }

    fn head(&self, q: usize, head: u16) -> Option<&Head> {
        if usize::from(head) >= self.queue_size {
            return None;
        }
        let at = HEADER
            + q * queue_bytes(self.queue_size)
            + std::mem::size_of::<QueueHeader>()
            + usize::from(head) * std::mem::size_of::<Head>();
        // SAFETY: head < queue_size keeps the pointer inside queue q's part of the mapping.
        Some(unsafe { &*self.base.as_ptr().add(at).cast::<Head>() })
    }

    pub fn next_avail(&self, q: usize) -> u16 {
        self.queue(q).next_avail.load(Ordering::Acquire) as u16
    }

    pub fn set_next_avail(&self, q: usize, next: u16) {
        self.queue(q)
            .next_avail
            .store(u32::from(next), Ordering::Release);
    }

    /// The used index the last ring server published, if any since the ring was based.
    pub fn used_idx(&self, q: usize) -> Option<u16> {
        let v = self.queue(q).used_idx.load(Ordering::Acquire);
        (v != UNKNOWN).then_some(v as u16)
    }

    pub fn set_used_idx(&self, q: usize, idx: u16) {
        self.queue(q)
            .used_idx
            .store(u32::from(idx), Ordering::Release);
    }

    pub fn finished(&self, q: usize) -> u64 {
        self.queue(q).finished.load(Ordering::Acquire)
    }

    /// Records that the request in `head` was taken from avail position `pos`.
    pub fn mark(&self, q: usize, head: u16, pos: u16) {
        let Some(h) = self.head(q, head) else { return };
        let counter = self.queue(q).counter.fetch_add(1, Ordering::AcqRel) + 1;
        h.avail_pos.store(u32::from(pos), Ordering::Relaxed);
        h.counter.store(counter, Ordering::Release);
    }

    /// The request in `head` is answered (the used ring shows it).
    pub fn clear(&self, q: usize, head: u16) {
        if let Some(h) = self.head(q, head) {
            h.counter.store(0, Ordering::Release);
        }
        self.queue(q).finished.fetch_add(1, Ordering::AcqRel);
    }

    pub fn is_marked(&self, q: usize, head: u16) -> bool {
        self.head(q, head)
            .is_some_and(|h| h.counter.load(Ordering::Acquire) != 0)
    }

    /// The heads taken and not answered, oldest first: (head, avail position).
    pub fn taken(&self, q: usize) -> Vec<(u16, u16)> {
        let mut out: Vec<(u64, u16, u16)> = (0..self.queue_size.min(usize::from(u16::MAX)))
            .filter_map(|i| {
                let h = self.head(q, i as u16)?;
                let c = h.counter.load(Ordering::Acquire);
                (c != 0).then(|| (c, i as u16, h.avail_pos.load(Ordering::Relaxed) as u16))
            })
            .collect();
        out.sort_unstable();
        out.into_iter().map(|(_, h, p)| (h, p)).collect()
    }

    /// The VMM (re)based queue `q` at `base` (SET_VRING_BASE): nothing is in flight.
    pub fn rebase(&self, q: usize, base: u16) {
        for i in 0..self.queue_size.min(usize::from(u16::MAX)) {
            if let Some(h) = self.head(q, i as u16) {
                h.counter.store(0, Ordering::Relaxed);
            }
        }
        let qh = self.queue(q);
        qh.used_idx.store(UNKNOWN, Ordering::Relaxed);
        qh.next_avail.store(u32::from(base), Ordering::Release);
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_sees_what_was_taken_in_order() {
        let front = Inflight::create(2, 8).unwrap();
        let engine = Inflight::open(front.file().try_clone().unwrap()).unwrap();
        assert_eq!((engine.queues(), engine.queue_size()), (2, 8));
        assert_eq!(engine.used_idx(1), None);
        engine.mark(1, 5, 0);
        engine.mark(1, 2, 1);
        engine.mark(1, 7, 2);
        engine.set_next_avail(1, 3);
        engine.clear(1, 2);
        engine.set_used_idx(1, 1);
        drop(engine);
        let successor = Inflight::open(front.file().try_clone().unwrap()).unwrap();
        assert_eq!(successor.taken(1), vec![(5, 0), (7, 2)]);
        assert_eq!(successor.next_avail(1), 3);
        assert_eq!(successor.used_idx(1), Some(1));
        assert_eq!(successor.finished(1), 1);
        assert!(successor.taken(0).is_empty());
        // A head beyond the queue (a guest lying) is ignored.
        successor.mark(1, 200, 0);
        assert!(!successor.is_marked(1, 200));
        front.rebase(1, 40);
        assert!(successor.taken(1).is_empty());
        assert_eq!(successor.next_avail(1), 40);
        assert_eq!(successor.used_idx(1), None);
    }

    #[test]
    fn a_foreign_memfd_is_refused() {
        let file = tempfile_like();
        assert!(Inflight::open(file).is_err());
    }

    fn tempfile_like() -> File {
        // SAFETY: a valid name; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: fresh fd.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(4096).unwrap();
        f
    }
}
