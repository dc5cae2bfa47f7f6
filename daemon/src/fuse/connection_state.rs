//! Memory the holder and its engines share for one FUSE connection: progress counters (how
//! the holder tells a hung engine from a busy one without eBPF) and the reply journal of
//! non-idempotent requests (how a successor answers a resent `mkdir` without making it twice).
//!
//! It is a memfd the holder creates once per connection and hands to every engine with the
//! queue fds, so it outlives any engine. Layout (all little-endian words, version 1):
//! a header of counters, then `SLOTS` fixed-size reply slots, then (from the first page
//! boundary) one request slot per queue. The header also carries the engine's heartbeat
//! (which generation beat last, and when): how the holder tells a frozen engine (it stopped
//! running) from one waiting on a slow store (it runs and beats) within a second. Engines
//! before the heartbeat leave both words 0, which means "no verdict".
//!
//! A request slot is the buffer a queue's worker reads each request into (so journaling it
//! costs no copy), with the id of the last request that worker finished. A request in a slot
//! that was not finished is one a dead engine read and never answered: on kernels without
//! FUSE_NOTIFY_RESEND (before 6.9) the successor serves it again from there, on the same
//! queue (the kernel takes a reply only on the queue the request was read from). Holders
//! before request slots leave their count 0; their engines can only use RESEND.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"BERTHSHM");
const VERSION: u64 = 1;
/// Replies kept: far more than requests in flight across all queues at once.
const SLOTS: usize = 256;
const SLOT_SIZE: usize = 512;
/// Reply bytes a slot holds (a create reply is 160 bytes).
const SLOT_DATA: usize = SLOT_SIZE - 24;
const HEADER_SIZE: usize = 64;
const REGION_SIZE: usize = HEADER_SIZE + SLOTS * SLOT_SIZE;
const PAGE: usize = 4096;
/// Where the request slots begin: the first page after the reply slots.
const REQUESTS_AT: usize = REGION_SIZE.div_ceil(PAGE) * PAGE;
/// Largest request: 1 MiB of data (max_pages 256) plus headers.
pub const REQUEST_BUFFER: usize = (1 << 20) + (64 << 10);
/// A request slot: one page for its words, then the request buffer.
const REQUEST_SLOT_SIZE: usize = PAGE + REQUEST_BUFFER;
/// More queues than any mount clones (one per CPU at most, capped well below this).
const MAX_REQUEST_SLOTS: usize = 256;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU64,
    /// Requests an engine has read.
    started: AtomicU64,
    /// Requests an engine has finished (answered, or needing no answer).
    finished: AtomicU64,
    /// Next reply slot to fill.
    next_slot: AtomicU64,
    /// The engine generation whose heartbeat `beat_ns` is (0: none yet).
    beat_generation: AtomicU64,
    /// CLOCK_MONOTONIC ns of that generation's latest heartbeat.
    beat_ns: AtomicU64,
    /// Request slots after the reply slots (0: a holder from before them).
    request_slots: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);

#[repr(C)]
struct Slot {
    /// 0 while the slot is being written; otherwise the request id it holds.
    request: AtomicU64,
    len: AtomicU64,
    crc: AtomicU64,
    data: [u8; SLOT_DATA],
}

/// The words of a request slot (its first page).
#[repr(C)]
struct RequestWords {
    /// `unique` of the last request this slot's worker finished (answered, or needing no
    /// answer); 0 before the first.
    finished: AtomicU64,
}

/// One connection's shared region, mapped.
pub struct ConnectionState {
    file: File,
    base: NonNull<u8>,
    len: usize,
    request_slots: usize,
}

/// The request buffer of one queue in the shared region, and what its worker finished.
/// Only that queue's worker touches it (one engine at a time serves a queue).
pub struct RequestSlot<'a> {
    words: &'a RequestWords,
    buffer: NonNull<u8>,
}

/// A request a dead engine read from this slot's queue and never finished.
#[derive(Debug, PartialEq, Eq)]
pub struct Unfinished {
    pub unique: u64,
    pub len: usize,
}

// SAFETY: all access to the mapping goes through atomics or slot writes that a single writer
// claims with `next_slot`; the mapping lives as long as the value.
unsafe impl Send for ConnectionState {}
unsafe impl Sync for ConnectionState {}

impl ConnectionState {
    /// A new zeroed region (holder side), with a request slot for each of `queues` queues.
    pub fn create(queues: usize) -> io::Result<ConnectionState> {
        let queues = queues.min(MAX_REQUEST_SLOTS);
        let name = c"berth-shared";
        // SAFETY: a valid NUL-terminated name; the returned fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is not owned elsewhere.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = region_len(queues);
        file.set_len(len as u64)?;
        let state = Self::map(file, len, queues)?;
        let header = state.header();
        header.request_slots.store(queues as u64, Ordering::Relaxed);
        header.magic.store(MAGIC, Ordering::Relaxed);
        header.version.store(VERSION, Ordering::Release);
        Ok(state)
    }

    /// Maps a region received from the holder (engine side).
    pub fn open(file: File) -> io::Result<ConnectionState> {
        let size = file.metadata()?.len();
        let too_small = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "shared state region is too small",
            )
        };
        if size < REGION_SIZE as u64 {
            return Err(too_small());
        }
        let mut words = [0u8; HEADER_SIZE];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut words, 0)?;
        let slots_at = std::mem::offset_of!(Header, request_slots);
        let queues =
            u64::from_le_bytes(words[slots_at..slots_at + 8].try_into().unwrap_or_default());
        if queues > MAX_REQUEST_SLOTS as u64 || size < region_len(queues as usize) as u64 {
            return Err(too_small());
        }
        let queues = queues as usize;
        let state = Self::map(file, region_len(queues), queues)?;
        let header = state.header();
        if header.magic.load(Ordering::Acquire) != MAGIC
            || header.version.load(Ordering::Acquire) != VERSION
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared state region has an unknown format (holder and engine versions differ)",
            ));
        }
        Ok(state)
    }

    fn map(file: File, len: usize, request_slots: usize) -> io::Result<ConnectionState> {
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
        Ok(ConnectionState {
            file,
            base,
            len,
            request_slots,
        })
    }

    /// The request slot of queue `queue`, if the holder made one.
    pub fn request_slot(&self, queue: usize) -> Option<RequestSlot<'_>> {
        if queue >= self.request_slots {
            return None;
        }
        // SAFETY: queue < request_slots keeps the slot inside the mapping; the words sit at
        // the start of a page, the buffer right after.
        unsafe {
            let at = self
                .base
                .as_ptr()
                .add(REQUESTS_AT + queue * REQUEST_SLOT_SIZE);
            Some(RequestSlot {
                words: &*at.cast::<RequestWords>(),
                buffer: NonNull::new_unchecked(at.add(PAGE)),
            })
        }
    }

    /// The memfd, to pass to an engine.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn header(&self) -> &Header {
        // SAFETY: the region starts with a Header, is page-aligned and mapped for our lifetime.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    fn slot(&self, index: usize) -> *mut Slot {
        // SAFETY: index < SLOTS keeps the pointer inside the mapping.
        unsafe {
            self.base
                .as_ptr()
                .add(HEADER_SIZE + (index % SLOTS) * SLOT_SIZE)
                .cast::<Slot>()
        }
    }

    pub fn request_started(&self) {
        self.header().started.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request_finished(&self) {
        self.header().finished.fetch_add(1, Ordering::Release);
    }

    /// (started, finished) so far, over every engine of the connection.
    pub fn progress(&self) -> (u64, u64) {
        let h = self.header();
        (
            h.started.load(Ordering::Relaxed),
            h.finished.load(Ordering::Acquire),
        )
    }

    /// Engine `generation` is alive at `now_ns` (CLOCK_MONOTONIC).
    pub fn beat(&self, generation: u64, now_ns: u64) {
        let h = self.header();
        // The time first: a holder that sees this generation sees a fresh time with it.
        h.beat_ns.store(now_ns, Ordering::Release);
        h.beat_generation.store(generation, Ordering::Release);
    }

    /// (generation, CLOCK_MONOTONIC ns) of the latest heartbeat; (0, _) when none.
    pub fn last_beat(&self) -> (u64, u64) {
        let h = self.header();
        let generation = h.beat_generation.load(Ordering::Acquire);
        (generation, h.beat_ns.load(Ordering::Acquire))
    }

    /// Records the reply to request `request` before it is written to the kernel. Replies
    /// too big for a slot are not kept (no non-idempotent reply is).
    pub fn journal_reply(&self, request: u64, reply: &[u8]) {
        if reply.len() > SLOT_DATA || request == 0 {
            return;
        }
        let index = self.header().next_slot.fetch_add(1, Ordering::Relaxed) as usize;
        // SAFETY: the slot is ours until `next_slot` wraps SLOTS times, far more than requests
        // in flight; fields are written through raw pointers into the mapping.
        unsafe {
            let slot = self.slot(index);
            (*slot).request.store(0, Ordering::Release);
            std::ptr::copy_nonoverlapping(reply.as_ptr(), (*slot).data.as_mut_ptr(), reply.len());
            (*slot).len.store(reply.len() as u64, Ordering::Relaxed);
            (*slot)
                .crc
                .store(checksum(request, reply) as u64, Ordering::Relaxed);
            (*slot).request.store(request, Ordering::Release);
        }
    }

    /// The journaled reply to `request`, if an engine recorded one completely.
    pub fn journaled_reply(&self, request: u64) -> Option<Vec<u8>> {
        (0..SLOTS).find_map(|i| {
            // SAFETY: reads inside the mapping; a torn slot fails its checksum.
            unsafe {
                let slot = self.slot(i);
                if (*slot).request.load(Ordering::Acquire) != request {
                    return None;
                }
                let len = ((*slot).len.load(Ordering::Relaxed) as usize).min(SLOT_DATA);
                // Volatile reads, byte by byte, and no reference to the bytes: another engine
                // generation may be writing this slot (a torn copy fails the checksum).
                let bytes = std::ptr::addr_of!((*slot).data).cast::<u8>();
                let data: Vec<u8> = (0..len)
                    .map(|i| std::ptr::read_volatile(bytes.add(i)))
                    .collect();
                let crc = (*slot).crc.load(Ordering::Relaxed) as u32;
                (crc == checksum(request, &data)).then_some(data)
            }
        })
    }
}

fn checksum(request: u64, reply: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&request.to_le_bytes());
    h.update(reply);
    h.finalize()
}

impl Drop for ConnectionState {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn region_len(queues: usize) -> usize {
    if queues == 0 {
        REGION_SIZE
    } else {
        REQUESTS_AT + queues * REQUEST_SLOT_SIZE
    }
}

impl RequestSlot<'_> {
    /// The buffer requests are read into.
    pub fn buffer(&mut self) -> &mut [u8] {
        // SAFETY: REQUEST_BUFFER bytes inside the mapping, touched only by this slot's worker
        // (`&mut self`), which holds the region mapped while the slot lives.
        unsafe { std::slice::from_raw_parts_mut(self.buffer.as_ptr(), REQUEST_BUFFER) }
    }

    /// The request in the buffer has been finished (answered, or needs no answer).
    pub fn finished(&self, unique: u64) {
        self.words.finished.store(unique, Ordering::Release);
    }

    /// The request a previous engine read into this slot and did not finish, if any. A
    /// request read and answered just before its engine died (it had no time to mark it) is
    /// found too: serving it again is what RESEND would do with it, and the kernel drops a
    /// second reply to a request it no longer waits for.
    pub fn unfinished(&mut self) -> Option<Unfinished> {
        let buffer = self.buffer();
        let header = super::protocol::InHeader::parse(buffer)?;
        let len = header.len as usize;
        if header.unique == 0
            || !(super::protocol::IN_HEADER_LEN..=REQUEST_BUFFER).contains(&len)
            || header.unique == self.words.finished.load(Ordering::Acquire)
        {
            return None;
        }
        Some(Unfinished {
            unique: header.unique,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_sees_what_the_holder_made_and_replies_survive_it() {
        let holder = ConnectionState::create(0).unwrap();
        let engine = ConnectionState::open(holder.file().try_clone().unwrap()).unwrap();
        engine.request_started();
        engine.request_finished();
        assert_eq!(holder.progress(), (1, 1));

        engine.journal_reply(77, b"reply-77");
        drop(engine);
        let successor = ConnectionState::open(holder.file().try_clone().unwrap()).unwrap();
        assert_eq!(
            successor.journaled_reply(77).as_deref(),
            Some(&b"reply-77"[..])
        );
        assert_eq!(successor.journaled_reply(78), None);
    }

    #[test]
    fn the_holder_sees_the_latest_heartbeat_of_each_generation() {
        let holder = ConnectionState::create(0).unwrap();
        assert_eq!(
            holder.last_beat().0,
            0,
            "no heartbeat before an engine beats"
        );
        let engine = ConnectionState::open(holder.file().try_clone().unwrap()).unwrap();
        engine.beat(3, 1_000);
        engine.beat(3, 2_000);
        assert_eq!(holder.last_beat(), (3, 2_000));
        engine.beat(4, 2_500);
        assert_eq!(holder.last_beat(), (4, 2_500));
    }

    #[test]
    fn old_replies_are_overwritten_and_oversized_ones_skipped() {
        let s = ConnectionState::create(0).unwrap();
        for r in 1..=(SLOTS as u64 + 10) {
            s.journal_reply(r, &r.to_le_bytes());
        }
        assert_eq!(s.journaled_reply(1), None, "slot reused");
        assert!(s.journaled_reply(SLOTS as u64 + 10).is_some());
        s.journal_reply(5000, &vec![1u8; SLOT_DATA + 1]);
        assert_eq!(s.journaled_reply(5000), None);
    }

    #[test]
    fn a_torn_slot_is_ignored() {
        let s = ConnectionState::create(0).unwrap();
        s.journal_reply(9, b"abc");
        // SAFETY: test-only corruption of slot 0's data inside the mapping.
        unsafe { (*s.slot(0)).data[0] ^= 0xff };
        assert_eq!(s.journaled_reply(9), None);
    }

    /// What a worker read into its slot and did not finish is found by the next engine, on
    /// the same queue only; finished requests, empty slots and old holders' regions give none.
    #[test]
    fn an_unfinished_request_outlives_its_engine_in_its_slot() {
        let holder = ConnectionState::create(2).unwrap();
        let engine = ConnectionState::open(holder.file().try_clone().unwrap()).unwrap();
        let mut request = vec![0u8; 48];
        request[0..4].copy_from_slice(&48u32.to_ne_bytes());
        request[4..8].copy_from_slice(&9u32.to_ne_bytes());
        request[8..16].copy_from_slice(&77u64.to_ne_bytes());
        {
            let mut slot = engine.request_slot(1).unwrap();
            assert_eq!(slot.unfinished(), None, "a fresh slot holds nothing");
            slot.buffer()[..48].copy_from_slice(&request);
        }
        drop(engine);

        let successor = ConnectionState::open(holder.file().try_clone().unwrap()).unwrap();
        assert!(successor.request_slot(2).is_none(), "two queues, two slots");
        assert_eq!(successor.request_slot(0).unwrap().unfinished(), None);
        let mut slot = successor.request_slot(1).unwrap();
        assert_eq!(
            slot.unfinished(),
            Some(Unfinished {
                unique: 77,
                len: 48
            })
        );
        assert_eq!(&slot.buffer()[..48], &request[..]);
        slot.finished(77);
        assert_eq!(slot.unfinished(), None, "finished");
        // A length no request can have is not served.
        slot.buffer()[0..4].copy_from_slice(&(REQUEST_BUFFER as u32 + 1).to_ne_bytes());
        slot.buffer()[8..16].copy_from_slice(&78u64.to_ne_bytes());
        assert_eq!(slot.unfinished(), None);

        let old = ConnectionState::create(0).unwrap();
        assert!(old.request_slot(0).is_none(), "a holder without slots");
    }

    #[test]
    fn a_region_shorter_than_its_request_slots_is_refused() {
        let holder = ConnectionState::create(2).unwrap();
        let file = holder.file().try_clone().unwrap();
        file.set_len(region_len(1) as u64).unwrap();
        assert!(ConnectionState::open(file).is_err());
    }

    #[test]
    fn a_foreign_memfd_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(REGION_SIZE as u64).unwrap();
        assert!(ConnectionState::open(file).is_err());
    }
}
