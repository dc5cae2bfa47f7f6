//! The ring server: serves the virtqueues of one virtio-fs device from a [`DeviceState`] the
//! front recorded, without ever having talked to the VMM. An engine runs one per attached
//! VMM; when it dies, the next engine builds a new one from the same state and the same
//! [`Inflight`] region and goes on where the dead one stopped:
//!
//! - the avail index it had reached and the requests it had taken but not answered are in
//!   the region ([`recover`] reconciles them with the used ring in guest memory);
//! - those requests are served again in the order they were taken (a scratch avail ring
//!   outside guest memory hands their heads to the queue machinery), and a request that
//!   changes the store and was already applied is answered from the reply journal instead
//!   ([`Hooks`]);
//! - kicks that came while nobody served stay in the eventfd; every ring is scanned at once
//!   anyway, and the guest is signalled.
//!
//! One thread per running queue, blocked in poll(2) on its kick eventfd and a stop eventfd.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::abi::fuse_abi::InHeader;
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::ByteValued as _;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::device::{DeviceFds, DeviceState};
use crate::inflight::Inflight;
use crate::request::handle_chain;

/// Guest memory plus one scratch region of ours (above the guest's) for resubmissions.
pub type Memory = GuestMemoryMmap<()>;

const SCRATCH_SIZE: usize = 1 << 20;

/// What the ring server asks of the filesystem side, for requests that change the store.
pub trait Hooks: Send + Sync {
    /// Whether a request of this opcode must not be applied twice (its reply is journaled).
    fn journaled(&self, opcode: u32) -> bool;
    /// Keeps the reply to request `unique`.
    fn journal(&self, unique: u64, reply: &[u8]);
    /// The reply kept for request `unique`, if any.
    fn replay(&self, unique: u64) -> Option<Vec<u8>>;
    /// Whether to leave this request to the next ring server (`prefix`: the request's first
    /// bytes, header included): it stays taken and unanswered, and the successor serves it.
    /// An upgrading engine defers what opens files for writing, so its open writes only drain.
    fn defer(&self, _header: &InHeader, _prefix: &[u8]) -> bool {
        false
    }
}

/// How many bytes of a request [`Hooks::defer`] sees: the header and an OPEN's flags.
pub const DEFER_PREFIX: usize = 64;

/// Hooks that journal nothing (a request taken twice is applied twice).
pub struct NoJournal;

impl Hooks for NoJournal {
    fn journaled(&self, _opcode: u32) -> bool {
        false
    }
    fn journal(&self, _unique: u64, _reply: &[u8]) {}
    fn replay(&self, _unique: u64) -> Option<Vec<u8>> {
        None
    }
}

/// The mapped memory of a device state: its regions, and a scratch region after them.
pub fn map_memory(state: &DeviceState, fds: &DeviceFds) -> io::Result<(Arc<Memory>, GuestAddress)> {
    let mut regions = Vec::new();
    let mut end = 0u64;
    for (r, file) in state.regions.iter().zip(&fds.regions) {
        // Past the end of the file every access would be a SIGBUS (the front checked this
        // when the VMM offered the region; the file may have shrunk since).
        let size = file.metadata()?.len();
        if !r.inside(size) {
            return Err(invalid("a guest memory region ends past its file"));
        }
        let mapping = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone()?, r.mmap_offset),
            usize::try_from(r.memory_size).map_err(|_| invalid("region too large"))?,
        )
        .map_err(|e| io::Error::other(format!("mapping guest memory: {e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_phys_addr))
            .ok_or_else(|| invalid("a guest memory region wraps around"))?;
        end = end.max(region.start_addr().0.saturating_add(region.len()));
        regions.push(region);
    }
    // Far above the guest's memory, page aligned.
    let scratch_at = GuestAddress(
        end.checked_add(1 << 30)
            .ok_or_else(|| invalid("memory map too high"))?
            & !0xfff,
    );
    let scratch = GuestRegionMmap::new(
        MmapRegion::new(SCRATCH_SIZE).map_err(|e| io::Error::other(e.to_string()))?,
        scratch_at,
    )
    .ok_or_else(|| invalid("scratch region"))?;
    regions.push(scratch);
    let mem = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| io::Error::other(format!("guest memory table: {e}")))?;
    Ok((Arc::new(mem), scratch_at))
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The running queues of one device.
pub struct Rings<F: FileSystem + Send + Sync + 'static> {
    server: Arc<Server<F>>,
    inflight: Arc<Inflight>,
    hooks: Arc<dyn Hooks>,
    threads: Vec<Option<RingThread>>,
}

struct RingThread {
    stop: Arc<OwnedFd>,
    handle: JoinHandle<()>,
}

impl<F: FileSystem + Send + Sync + 'static> Rings<F> {
    pub fn new(server: Arc<Server<F>>, inflight: Arc<Inflight>, hooks: Arc<dyn Hooks>) -> Self {
        Rings {
            server,
            inflight,
            hooks,
            threads: Vec::new(),
        }
    }

    /// Serves the device as `state` says: every queue stops at a request boundary, and every
    /// running one starts again from the region on the new memory and addresses.
    pub fn update(&mut self, state: &DeviceState, fds: &DeviceFds) -> io::Result<()> {
        self.stop_all();
        if state.regions.is_empty() {
            return Ok(());
        }
        let (mem, scratch) = map_memory(state, fds)?;
        self.threads = (0..state.vrings.len()).map(|_| None).collect();
        for (q, v) in state.vrings.iter().enumerate() {
            if !v.running() || q >= self.inflight.queues() {
                continue;
            }
            let (Some(Some(kick)), Some(Some(call))) = (fds.kicks.get(q), fds.calls.get(q)) else {
                continue;
            };
            let (Some(desc), Some(avail), Some(used)) = (
                state.to_gpa(v.desc),
                state.to_gpa(v.avail),
                state.to_gpa(v.used),
            ) else {
                tracing::warn!(
                    queue = q,
                    "vring addresses outside guest memory; queue not served"
                );
                continue;
            };
            let mut queue = Queue::new(v.num.min(self.inflight.queue_size() as u16))
                .map_err(|e| io::Error::other(format!("queue {q}: {e}")))?;
            queue.set_size(v.num);
            queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
            queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
            queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
            queue.set_event_idx(state.event_idx());
            queue.set_ready(true);
            if !queue.is_valid(&*mem) {
                tracing::warn!(
                    queue = q,
                    "the guest's vring is not valid; queue not served"
                );
                continue;
            }
            let ring = Ring {
                q,
                queue,
                mem: mem.clone(),
                scratch,
                kick: kick.try_clone()?,
                call: call.try_clone()?,
                inflight: self.inflight.clone(),
                server: self.server.clone(),
                hooks: self.hooks.clone(),
            };
            self.threads[q] = Some(ring.spawn()?);
        }
        Ok(())
    }

    /// Stops queue `q` after the request it is serving (GET_VRING_BASE).
    pub fn stop(&mut self, q: usize) {
        if let Some(t) = self.threads.get_mut(q).and_then(Option::take) {
            t.finish();
        }
    }

    pub fn stop_all(&mut self) {
        for t in self.threads.iter_mut().filter_map(Option::take) {
            t.finish();
        }
    }
}

impl<F: FileSystem + Send + Sync + 'static> Drop for Rings<F> {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl RingThread {
    fn finish(self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes to an eventfd we own.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        let _ = self.handle.join();
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; the fd is owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

struct Ring<F: FileSystem + Send + Sync + 'static> {
    q: usize,
    queue: Queue,
    mem: Arc<Memory>,
    scratch: GuestAddress,
    kick: File,
    call: File,
    inflight: Arc<Inflight>,
    server: Arc<Server<F>>,
    hooks: Arc<dyn Hooks>,
}

impl<F: FileSystem + Send + Sync + 'static> Ring<F> {
    fn spawn(mut self) -> io::Result<RingThread> {
        let stop = Arc::new(eventfd()?);
        let theirs = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vfs-queue-{}", self.q))
            .spawn(move || self.run(theirs))?;
        Ok(RingThread { stop, handle })
    }

    fn run(&mut self, stop: Arc<OwnedFd>) {
        if let Err(e) = self.recover() {
            tracing::error!(queue = self.q, error = %e, "could not take over the queue");
            return;
        }
        loop {
            if let Err(e) = self.process() {
                tracing::error!(queue = self.q, error = %e, "virtio-fs queue error; waiting for the next kick");
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.kick.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: polls two valid pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(queue = self.q, "poll failed; queue stops");
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            let mut buf = [0u8; 8];
            let _ = (&self.kick).read(&mut buf);
        }
    }

    /// Where the dead ring server left the queue, reconciled with the used ring: answers it
    /// published are no longer in flight; an entry it took and marked but did not count is
    /// counted; then what it took and did not answer is served again, oldest first.
    fn recover(&mut self) -> io::Result<()> {
        let q = self.q;
        let mem = self.mem.clone();
        let num = self.queue.size();
        let guest_used = self
            .queue
            .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
            .map_err(|e| io::Error::other(e.to_string()))?
            .0;
        if let Some(mut published) = self.inflight.used_idx(q) {
            // At most a queue's worth: a guest writing nonsense cannot make us loop.
            let mut steps = 0;
            while published != guest_used && steps < num {
                let slot = u64::from(published % num);
                let at = GuestAddress(self.queue.used_ring())
                    .checked_add(4 + slot * 8)
                    .ok_or_else(|| invalid("used ring address"))?;
                let id: u32 = mem
                    .read_obj(at)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                if let Ok(head) = u16::try_from(id) {
                    if self.inflight.is_marked(q, head) {
                        self.inflight.clear(q, head);
                    }
                }
                published = published.wrapping_add(1);
                steps += 1;
            }
        }
        self.inflight.set_used_idx(q, guest_used);
        self.queue.set_next_used(guest_used);
        let mut next = self.inflight.next_avail(q);
        // The dead server may have marked the head at `next` and died before counting it.
        let taken = self.inflight.taken(q);
        if taken.iter().any(|&(_, pos)| pos == next) {
            next = next.wrapping_add(1);
            self.inflight.set_next_avail(q, next);
        }
        self.queue.set_next_avail(next);
        if !taken.is_empty() {
            tracing::info!(
                queue = q,
                requests = taken.len(),
                "serving again the requests a dead engine took"
            );
        }
        for (head, _) in taken {
            self.resubmit(head)?;
        }
        self.signal();
        Ok(())
    }

    /// Serves request `head` again, through a one-entry avail ring in scratch memory.
    fn resubmit(&mut self, head: u16) -> io::Result<()> {
        let mem = self.mem.clone();
        let avail = self.scratch;
        let used = self.scratch.unchecked_add(4096);
        let e = |e: vm_memory::GuestMemoryError| io::Error::other(e.to_string());
        mem.write_obj(0u16, avail).map_err(e)?;
        mem.write_obj(1u16, avail.unchecked_add(2)).map_err(e)?;
        mem.write_obj(head, avail.unchecked_add(4)).map_err(e)?;
        let mut scratch =
            Queue::new(self.queue.size()).map_err(|e| io::Error::other(e.to_string()))?;
        scratch.set_size(self.queue.size());
        let desc = self.queue.desc_table();
        scratch.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        scratch.set_avail_ring_address(Some(avail.0 as u32), Some((avail.0 >> 32) as u32));
        scratch.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
        scratch.set_ready(true);
        let Some(chain) = scratch.pop_descriptor_chain(mem.clone()) else {
            self.inflight.clear(self.q, head);
            return Ok(());
        };
        match self.serve(chain, true) {
            Some(len) => self.complete(head, len),
            None => Ok(()),
        }
    }

    /// Serves every request the guest has queued.
    fn process(&mut self) -> io::Result<()> {
        let mem = self.mem.clone();
        let event_idx = self.queue.event_idx_enabled();
        loop {
            if event_idx {
                self.queue
                    .disable_notification(&*mem)
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
            loop {
                let pos = self.queue.next_avail();
                let Some(chain) = self.queue.pop_descriptor_chain(mem.clone()) else {
                    break;
                };
                let head = chain.head_index();
                // Marked before it counts as taken: a successor that finds it marked at the
                // position it would take next knows it was taken.
                self.inflight.mark(self.q, head, pos);
                self.inflight
                    .set_next_avail(self.q, self.queue.next_avail());
                if let Some(len) = self.serve(chain, false) {
                    self.complete(head, len)?;
                }
            }
            if !event_idx
                || !self
                    .queue
                    .enable_notification(&*mem)
                    .map_err(|e| io::Error::other(e.to_string()))?
            {
                return Ok(());
            }
        }
    }

    /// Publishes the answer to `head`, then forgets it was in flight (in that order: a
    /// successor reconciles a published answer whose head is still marked).
    fn complete(&mut self, head: u16, len: u32) -> io::Result<()> {
        let mem = self.mem.clone();
        if let Err(e) = self.queue.add_used(&*mem, head, len) {
            // A head index the guest made up: nothing to return.
            tracing::warn!(head, error = %e, "cannot return a descriptor chain");
            self.inflight.clear(self.q, head);
            return Ok(());
        }
        self.inflight.clear(self.q, head);
        self.inflight.set_used_idx(self.q, self.queue.next_used());
        if self
            .queue
            .needs_notification(&*mem)
            .map_err(|e| io::Error::other(e.to_string()))?
        {
            self.signal();
        }
        Ok(())
    }

    fn signal(&self) {
        let _ = (&self.call).write(&1u64.to_ne_bytes());
    }

    /// Serves one chain; a request that changes the store is answered from the journal when
    /// it was applied already (a resubmission), and journaled when it is applied now. `None`:
    /// deferred to the next ring server (left taken and unanswered).
    fn serve(&self, chain: DescriptorChain<Arc<Memory>>, resubmitted: bool) -> Option<u32> {
        let mem = &*self.mem;
        let mut prefix = [0u8; DEFER_PREFIX];
        let got = Reader::from_descriptor_chain(mem, chain.clone())
            .ok()
            .map_or(0, |mut r| read_prefix(&mut r, &mut prefix));
        let header = (got >= std::mem::size_of::<InHeader>())
            .then(|| InHeader::from_slice(&prefix[..std::mem::size_of::<InHeader>()]).copied())
            .flatten();
        if let Some(h) = &header {
            if self.hooks.defer(h, &prefix[..got]) {
                tracing::debug!(
                    queue = self.q,
                    opcode = h.opcode,
                    "request left to the next engine"
                );
                return None;
            }
        }
        let journaled = header.is_some_and(|h| self.hooks.journaled(h.opcode));
        if let (true, true, Some(h)) = (journaled, resubmitted, header) {
            if let Some(reply) = self.hooks.replay(h.unique) {
                tracing::info!(
                    opcode = h.opcode,
                    unique = h.unique,
                    "resubmitted request was already applied; replaying its journaled reply"
                );
                let written = VirtioFsWriter::new(mem, chain)
                    .ok()
                    .and_then(|mut w| w.write_all(&reply).ok().map(|()| reply.len()));
                return Some(written.map_or(0, |n| n as u32));
            }
        }
        let len = catch_unwind(AssertUnwindSafe(|| {
            handle_chain(&self.server, mem, chain.clone())
        }))
        .unwrap_or(0);
        if let (true, Some(h)) = (journaled, header) {
            let reply = read_writable(mem, chain, len as usize);
            if !reply.is_empty() {
                self.hooks.journal(h.unique, &reply);
            }
        }
        Some(len)
    }
}

/// Reads up to `buf.len()` bytes of a request; returns how many.
fn read_prefix(reader: &mut Reader<'_, ()>, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match io::Read::read(reader, &mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// The first `len` bytes the chain's writable buffers hold (the reply just written).
fn read_writable(mem: &Memory, chain: DescriptorChain<Arc<Memory>>, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len.min(4096));
    for desc in chain.writable() {
        if out.len() >= len {
            break;
        }
        let take = (desc.len() as usize).min(len - out.len());
        let mut buf = vec![0u8; take];
        if mem.read_slice(&mut buf, desc.addr()).is_err() {
            break;
        }
        out.extend_from_slice(&buf);
    }
    out
}
