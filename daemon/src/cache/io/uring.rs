//! The io_uring engine: one ring per data file, owned by a dedicated thread.
//!
//! Callers push requests onto a shared queue and wake the thread through an eventfd that the
//! ring polls, so a single `io_uring_enter` both submits new work and waits for completions.
//! Every request's buffer is owned by the thread's in-flight table from the moment its SQE is
//! queued until its CQE has been reaped, so the kernel never touches freed memory, even when the
//! caller's future is dropped. Short transfers and EAGAIN/EINTR are resubmitted for the rest.
//!
//! Dropping the engine stops intake (queued requests fail), waits for everything the kernel
//! holds to complete, and joins the thread. If the thread ever has to give up with requests
//! still in the kernel, it leaks their buffers rather than free memory the kernel may write.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use io_uring::{cqueue, opcode, register, squeue, types, IoUring};
use tokio::sync::oneshot;

use super::align::{check_io, AlignedBuf};
use super::{dio_alignment_of, is_direct, with_context, BlockIo, EngineKind};

/// Default number of submission queue entries.
pub const DEFAULT_RING_ENTRIES: u32 = 128;

/// `user_data` of the poll on the wake eventfd.
const WAKE_TOKEN: u64 = u64::MAX;
/// `user_data` of the no-op used to check the ring works at start.
const PROBE_TOKEN: u64 = u64::MAX - 1;
/// How often one request may get EAGAIN/EINTR before it fails.
const MAX_RETRIES: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

type Reply = oneshot::Sender<io::Result<AlignedBuf>>;

struct Request {
    op: Op,
    buf: AlignedBuf,
    offset: u64,
    reply: Reply,
}

#[derive(Default)]
struct Queue {
    requests: VecDeque<Request>,
    /// Set by `Drop`: take no more requests, finish what the kernel holds, exit.
    shutdown: bool,
    /// Set by the thread as it exits: pushing is refused from then on.
    closed: bool,
}

/// State shared by the engine handle and its ring thread.
struct Shared {
    queue: Mutex<Queue>,
    /// Non-blocking eventfd the ring polls; written to wake the thread.
    wake_fd: OwnedFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue holds plain data that is never left half-updated, so a poisoned lock (a
        // panic elsewhere while holding it) is still consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an eventfd we own.
        let rc = unsafe {
            libc::write(
                self.wake_fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            // EAGAIN: the counter is saturated, so the thread is due to wake anyway.
            if err.raw_os_error() != Some(libc::EAGAIN) {
                tracing::error!(error = %err, "could not wake the cache io_uring thread");
            }
        }
    }

    /// Resets the eventfd counter after its poll fired.
    fn drain_wake(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from an eventfd we own (non-blocking).
        let _ = unsafe {
            libc::read(
                self.wake_fd.as_raw_fd(),
                (&mut value as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// io_uring engine for one cache data file.
pub struct UringIo {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    alignment: usize,
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo")
            .field("alignment", &self.alignment)
            .finish()
    }
}

impl UringIo {
    /// An engine for `file` with the filesystem's O_DIRECT alignment and a ring of
    /// [`DEFAULT_RING_ENTRIES`]. Fails (without panicking) when io_uring is unavailable:
    /// disabled by sysctl, refused by seccomp or the kernel, or missing an opcode it needs.
    pub fn new(file: File) -> io::Result<UringIo> {
        let alignment = dio_alignment_of(&file);
        UringIo::with_config(file, alignment, DEFAULT_RING_ENTRIES)
    }

    /// An engine with an explicit alignment (a power of two, at least 512) and ring size.
    pub fn with_config(file: File, alignment: usize, entries: u32) -> io::Result<UringIo> {
        let alignment = super::sane_alignment(alignment);
        let entries = entries.clamp(4, 4096).next_power_of_two();
        check_sysctl()?;

        // SAFETY: eventfd(2) has no memory effects; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("eventfd: {e}")));
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake_fd,
        });

        // The ring is created on its own thread, which reports whether setup worked.
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("berth-cache-uring".to_string())
            .spawn(move || {
                let ring = match RingThread::setup(file, alignment, entries, thread_shared) {
                    Ok(ring) => ring,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(())).is_err() {
                    return;
                }
                ring.run();
            })
            .map_err(|e| io::Error::new(e.kind(), format!("spawn cache io_uring thread: {e}")))?;

        let started = ready_rx.recv().unwrap_or_else(|_| {
            Err(io::Error::other(
                "cache io_uring thread exited during setup",
            ))
        });
        if let Err(e) = started {
            if thread.join().is_err() {
                tracing::error!("cache io_uring thread panicked during setup");
            }
            return Err(e);
        }
        tracing::debug!(alignment, entries, "cache io_uring engine started");
        Ok(UringIo {
            shared,
            thread: Some(thread),
            alignment,
        })
    }

    async fn submit(&self, op: Op, buf: AlignedBuf, offset: u64) -> io::Result<AlignedBuf> {
        check_io(&buf, offset, self.alignment)?;
        if buf.is_empty() {
            return Ok(buf);
        }
        let (reply, done) = oneshot::channel();
        let wake = {
            let mut queue = self.shared.lock();
            if queue.closed || queue.shutdown {
                return Err(stopped());
            }
            let was_empty = queue.requests.is_empty();
            queue.requests.push_back(Request {
                op,
                buf,
                offset,
                reply,
            });
            // The thread takes requests until the queue is empty, and re-reads the queue after
            // every completion, so only the push onto an empty queue needs a wake-up.
            was_empty
        };
        if wake {
            self.shared.wake();
        }
        done.await.map_err(|_| stopped())?
    }
}

fn stopped() -> io::Error {
    io::Error::other("the cache io_uring engine has stopped")
}

/// Fails when /proc/sys/kernel/io_uring_disabled forbids io_uring to everyone (2).
fn check_sysctl() -> io::Result<()> {
    if let Ok(value) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if value.trim() == "2" {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring is disabled (kernel.io_uring_disabled = 2)",
            ));
        }
    }
    Ok(())
}

impl Drop for UringIo {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("cache io_uring thread panicked");
            }
        }
    }
}

#[async_trait]
impl BlockIo for UringIo {
    fn kind(&self) -> EngineKind {
        EngineKind::IoUring
    }

    fn alignment(&self) -> usize {
        self.alignment
    }

    async fn read_at(&self, buf: AlignedBuf, offset: u64) -> io::Result<AlignedBuf> {
        self.submit(Op::Read, buf, offset).await
    }

    async fn write_at(&self, buf: AlignedBuf, offset: u64) -> io::Result<AlignedBuf> {
        self.submit(Op::Write, buf, offset).await
    }
}

/// How SQEs name the data file.
#[derive(Clone, Copy)]
enum Target {
    /// Index in the ring's registered file table.
    Fixed(u32),
    Fd(RawFd),
}

/// A request the thread has accepted.
struct InFlight {
    op: Op,
    buf: AlignedBuf,
    offset: u64,
    reply: Reply,
    /// Bytes transferred so far.
    done: usize,
    retries: u32,
    /// An SQE pointing into `buf` is queued or in the kernel: `buf` must not be freed.
    in_kernel: bool,
}

/// The in-flight table: slots indexed by SQE `user_data`.
struct Slots {
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
}

impl Slots {
    fn with_capacity(n: usize) -> Slots {
        Slots {
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
        }
    }

    fn free_count(&self) -> usize {
        self.free.len()
    }

    fn insert(&mut self, entry: InFlight) -> Option<usize> {
        let idx = self.free.pop()?;
        self.slots[idx] = Some(entry);
        Some(idx)
    }

    fn get_mut(&mut self, idx: usize) -> Option<&mut InFlight> {
        self.slots.get_mut(idx).and_then(Option::as_mut)
    }

    fn remove(&mut self, idx: usize) -> Option<InFlight> {
        let entry = self.slots.get_mut(idx)?.take()?;
        self.free.push(idx);
        Some(entry)
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        for entry in self.slots.iter_mut().filter_map(Option::take) {
            if entry.in_kernel {
                // The kernel may still read or write this memory: never give it back.
                tracing::error!(
                    len = entry.buf.len(),
                    "cache io_uring stopped with I/O in flight; leaking its buffer"
                );
                let _ = entry.reply.send(Err(stopped()));
                std::mem::forget(entry.buf);
            } else {
                let _ = entry.reply.send(Err(stopped()));
            }
        }
    }
}

struct RingThread {
    // Field order matters on drop: `slots` (which leaks buffers the kernel may still hold) goes
    // first, then the ring.
    slots: Slots,
    ring: IoUring,
    shared: Arc<Shared>,
    /// Kept open for the ring thread's lifetime: SQEs name it.
    file: File,
    target: Target,
    direct: bool,
    alignment: usize,
    /// Slots whose next SQE still has to be queued.
    ready: VecDeque<usize>,
    /// SQEs for requests queued or in the kernel (not counting the wake poll).
    in_kernel: usize,
    wake_armed: bool,
    shutdown: bool,
    completions: Vec<(u64, i32)>,
}

impl RingThread {
    fn setup(
        file: File,
        alignment: usize,
        entries: u32,
        shared: Arc<Shared>,
    ) -> io::Result<RingThread> {
        let mut ring = IoUring::new(entries)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring_setup: {e}")))?;

        let mut probe = register::Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring probe: {e}")))?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::PollAdd::CODE, "POLL_ADD"),
            (opcode::Nop::CODE, "NOP"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks IORING_OP_{name}"),
                ));
            }
        }

        let fd = file.as_raw_fd();
        let target = match ring.submitter().register_files(&[fd]) {
            Ok(()) => Target::Fixed(0),
            Err(e) => {
                tracing::debug!(error = %e, "io_uring register_files failed; using plain fds");
                Target::Fd(fd)
            }
        };

        // One round trip through the ring, so a ring that sets up but cannot run fails here.
        let nop = opcode::Nop::new().build().user_data(PROBE_TOKEN);
        // SAFETY: a NOP references no memory.
        unsafe { ring.submission().push(&nop) }
            .map_err(|_| io::Error::other("io_uring submission queue full at start"))?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(io::Error::new(e.kind(), format!("io_uring_enter: {e}"))),
            }
        }
        let result = ring
            .completion()
            .next()
            .map(|cqe| cqe.result())
            .ok_or_else(|| io::Error::other("io_uring returned no completion for a NOP"))?;
        if result < 0 {
            let e = io::Error::from_raw_os_error(-result);
            return Err(io::Error::new(e.kind(), format!("io_uring NOP: {e}")));
        }

        let sq = ring.params().sq_entries() as usize;
        let cq = ring.params().cq_entries() as usize;
        // One SQE and one CQE per slot at most, plus the wake poll: neither queue can overflow.
        let max_slots = sq.min(cq).saturating_sub(1).max(1);
        let direct = is_direct(&file);
        Ok(RingThread {
            slots: Slots::with_capacity(max_slots),
            ring,
            shared,
            file,
            target,
            direct,
            alignment,
            ready: VecDeque::with_capacity(max_slots),
            in_kernel: 0,
            wake_armed: false,
            shutdown: false,
            completions: Vec::with_capacity(cq),
        })
    }

    fn run(mut self) {
        if let Err(e) = self.event_loop() {
            tracing::error!(error = %e, "cache io_uring thread failed; cache I/O will fail");
        }
        // Refuse new requests and fail those still queued.
        let queued = {
            let mut queue = self.shared.lock();
            queue.closed = true;
            std::mem::take(&mut queue.requests)
        };
        for request in queued {
            let _ = request.reply.send(Err(stopped()));
        }
        // Slots still holding requests (only after an error) are failed, and leaked if the
        // kernel may hold them, when `self.slots` drops.
        tracing::debug!(file = self.file.as_raw_fd(), "cache io_uring thread exits");
    }

    fn event_loop(&mut self) -> io::Result<()> {
        loop {
            self.intake();
            self.queue_ready();
            if !self.wake_armed && !self.shutdown {
                let poll = opcode::PollAdd::new(
                    types::Fd(self.shared.wake_fd.as_raw_fd()),
                    libc::POLLIN as u32,
                )
                .build()
                .user_data(WAKE_TOKEN);
                // SAFETY: a poll references no memory; the eventfd outlives the ring (both are
                // owned by this thread, via `shared`).
                if unsafe { self.ring.submission().push(&poll) }.is_ok() {
                    self.wake_armed = true;
                }
            }
            if self.shutdown && self.in_kernel == 0 && !self.wake_armed && self.ready.is_empty() {
                return Ok(());
            }
            // If some SQE could not be queued (never expected), submit without waiting and retry.
            let want = usize::from(self.ready.is_empty());
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN) | Some(libc::EBUSY) => {
                        if self.ring.completion().is_empty() {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    _ => return Err(io::Error::new(e.kind(), format!("io_uring_enter: {e}"))),
                },
            }
            self.reap();
        }
    }

    /// Moves requests from the shared queue into free slots; on shutdown fails them instead.
    fn intake(&mut self) {
        let mut queue = self.shared.lock();
        if queue.shutdown {
            self.shutdown = true;
            let queued = std::mem::take(&mut queue.requests);
            drop(queue);
            for request in queued {
                let _ = request.reply.send(Err(stopped()));
            }
            return;
        }
        let n = self.slots.free_count().min(queue.requests.len());
        let taken: Vec<Request> = queue.requests.drain(..n).collect();
        drop(queue);
        for request in taken {
            let entry = InFlight {
                op: request.op,
                buf: request.buf,
                offset: request.offset,
                reply: request.reply,
                done: 0,
                retries: 0,
                in_kernel: false,
            };
            match self.slots.insert(entry) {
                Some(idx) => self.ready.push_back(idx),
                // Cannot happen (n <= free slots); fail rather than lose the request.
                None => tracing::error!("cache io_uring in-flight table full"),
            }
        }
    }

    /// Queues an SQE for every ready slot while the submission queue has room.
    fn queue_ready(&mut self) {
        while let Some(&idx) = self.ready.front() {
            let target = self.target;
            let Some(entry) = self.slots.get_mut(idx) else {
                self.ready.pop_front();
                continue;
            };
            let remaining = entry.buf.len() - entry.done;
            // Larger requests are refused up front; were one to get here, it would go in parts.
            let len = u32::try_from(remaining).unwrap_or(u32::MAX);
            let offset = entry.offset + entry.done as u64;
            // SAFETY: `done < buf.len()` (a slot is ready only with bytes left), so the pointer
            // stays inside the allocation.
            let ptr = unsafe { entry.buf.as_mut_ptr().add(entry.done) };
            let sqe = build_sqe(entry.op, target, ptr, len, offset).user_data(idx as u64);
            entry.in_kernel = true;
            // SAFETY: the SQE points at `len` bytes inside `entry.buf`, a heap allocation owned
            // by the in-flight table (moving the `AlignedBuf` does not move its bytes). They are
            // neither freed nor accessed until the CQE for this SQE is reaped: `in_kernel` is
            // set before the push, only `complete` clears it, and `Slots::drop` leaks any
            // buffer whose SQE may still be outstanding.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_err() {
                entry.in_kernel = false;
                break;
            }
            self.in_kernel += 1;
            self.ready.pop_front();
        }
    }

    fn reap(&mut self) {
        self.completions.clear();
        self.completions.extend(
            self.ring
                .completion()
                .map(|cqe: cqueue::Entry| (cqe.user_data(), cqe.result())),
        );
        let completions = std::mem::take(&mut self.completions);
        for &(user_data, result) in &completions {
            match user_data {
                WAKE_TOKEN => {
                    self.wake_armed = false;
                    self.shared.drain_wake();
                    if result < 0 && result != -libc::ECANCELED {
                        tracing::debug!(result, "cache io_uring wake poll failed; re-arming");
                    }
                }
                PROBE_TOKEN => {}
                idx => self.complete(idx as usize, result),
            }
        }
        self.completions = completions;
    }

    /// Handles the CQE of slot `idx`: finishes the request, or marks it ready to resubmit.
    fn complete(&mut self, idx: usize, result: i32) {
        let direct = self.direct;
        let alignment = self.alignment;
        let Some(entry) = self.slots.get_mut(idx) else {
            tracing::error!(idx, "cache io_uring completion for an unknown request");
            return;
        };
        if !entry.in_kernel {
            tracing::error!(
                idx,
                "cache io_uring completion for a request not in the kernel"
            );
            return;
        }
        entry.in_kernel = false;
        self.in_kernel -= 1;

        let outcome: Option<io::Result<()>> = if result < 0 {
            let errno = -result;
            if (errno == libc::EAGAIN || errno == libc::EINTR) && entry.retries < MAX_RETRIES {
                entry.retries += 1;
                None
            } else {
                Some(Err(io::Error::from_raw_os_error(errno)))
            }
        } else if result == 0 {
            Some(Err(match entry.op {
                Op::Read => io::Error::new(io::ErrorKind::UnexpectedEof, "end of file"),
                Op::Write => io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes"),
            }))
        } else {
            let n = result as usize;
            entry.done += n;
            if entry.done >= entry.buf.len() {
                Some(Ok(()))
            } else if entry.op == Op::Read && direct && n % alignment != 0 {
                // A direct read only stops mid-block at the end of the file.
                Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "end of file",
                )))
            } else {
                None
            }
        };

        match outcome {
            None => self.ready.push_back(idx),
            Some(result) => {
                let Some(entry) = self.slots.remove(idx) else {
                    return;
                };
                let reply = match result {
                    Ok(()) => Ok(entry.buf),
                    Err(e) => Err(with_context(
                        e,
                        entry.op.name(),
                        entry.buf.len(),
                        entry.offset,
                    )),
                };
                // The caller may have stopped waiting; the buffer is then simply dropped.
                let _ = entry.reply.send(reply);
            }
        }
    }
}

fn build_sqe(op: Op, target: Target, ptr: *mut u8, len: u32, offset: u64) -> squeue::Entry {
    match (op, target) {
        (Op::Read, Target::Fixed(i)) => opcode::Read::new(types::Fixed(i), ptr, len)
            .offset(offset)
            .build(),
        (Op::Read, Target::Fd(fd)) => opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(offset)
            .build(),
        (Op::Write, Target::Fixed(i)) => opcode::Write::new(types::Fixed(i), ptr, len)
            .offset(offset)
            .build(),
        (Op::Write, Target::Fd(fd)) => opcode::Write::new(types::Fd(fd), ptr, len)
            .offset(offset)
            .build(),
    }
}
