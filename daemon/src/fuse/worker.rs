//! FUSE queue workers: read a request, serve it, reply; until the connection ends or the
//! engine is told to stop for an upgrade.
//!
//! Each worker waits in poll(2) on its queue fd and on a stop eventfd, and reads its queue
//! without blocking (all clones share the kernel's pending list, so a readable queue may be
//! empty by the time we read). Requests that change the store reply through a pipe first, so
//! the reply can be journaled in the shared region before the kernel sees it; a resent copy of
//! such a request (after a takeover) is answered from the journal and not applied again.
//! Each request is read into its queue's slot in the holder-owned shared region: on kernels
//! without FUSE_NOTIFY_RESEND a successor serves from there what a dead engine left.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};

use super::connection_state::{ConnectionState, REQUEST_BUFFER};
use super::protocol::{self, InHeader};
use crate::fs::BerthFs;

const SERVING: u8 = 0;
const DRAINING: u8 = 1;
const STOPPED: u8 = 2;

/// Why a worker returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerEnd {
    /// The filesystem was unmounted or the connection aborted.
    Disconnected,
    /// Told to stop (upgrade); requests it read afterwards were left for the successor.
    Stopped,
    /// Reading the queue failed in an unexpected way.
    Failed,
}

/// What every worker of an engine shares: the stop switch and the INIT hook.
pub struct QueueControl {
    phase: AtomicU8,
    wake: OwnedFd,
    on_init: Box<dyn Fn() + Send + Sync>,
}

impl QueueControl {
    pub fn new(on_init: Box<dyn Fn() + Send + Sync>) -> io::Result<Arc<QueueControl>> {
        // SAFETY: eventfd has no memory preconditions; the fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(QueueControl {
            phase: AtomicU8::new(SERVING),
            // SAFETY: fd is a fresh eventfd nobody else owns.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
            on_init: Box::new(on_init),
        }))
    }

    /// From now on, requests that open a file for writing are left unanswered (the successor
    /// gets them through RESEND), so the open uploads can only go down.
    pub fn drain(&self) {
        let _ = self
            .phase
            .compare_exchange(SERVING, DRAINING, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Workers finish the request they are serving and return.
    pub fn stop(&self) {
        self.phase.store(STOPPED, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd; it stays readable.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }
}

/// Puts a queue fd in non-blocking mode (workers poll before they read).
pub fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a valid fd.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Serves queue number `index` until the connection ends or the engine stops. With `replay`
/// (a takeover on a kernel without RESEND), first serves again the request a dead
/// predecessor read from this queue and left unanswered in the queue's request slot.
pub fn serve_queue(
    queue: File,
    index: usize,
    replay: bool,
    server: &Server<Arc<BerthFs>>,
    shared: &ConnectionState,
    control: &QueueControl,
) -> WorkerEnd {
    let fd = queue.as_raw_fd();
    // Requests are read into the queue's slot in the shared region when the holder made one
    // (so a successor finds what this engine read), else into a buffer of our own.
    let mut slot = shared.request_slot(index);
    let mut own = if slot.is_none() {
        vec![0u8; REQUEST_BUFFER]
    } else {
        Vec::new()
    };
    let mut reply = vec![0u8; REQUEST_BUFFER];
    let capture = match Capture::new() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the reply capture pipe; worker stops");
            return WorkerEnd::Failed;
        }
    };
    let serve = |bytes: &mut [u8], header: &InHeader, again: bool, reply: &mut [u8]| {
        crate::sandbox::forbidden_syscall_if_injected(header.opcode);
        shared.request_started();
        serve_one(fd, header, bytes, again, reply, server, shared, &capture);
        shared.request_finished();
        if header.opcode == protocol::FUSE_INIT {
            (control.on_init)();
        }
    };
    if replay {
        if let Some(slot) = slot.as_mut() {
            if let Some(left) = slot.unfinished() {
                let bytes = &mut slot.buffer()[..left.len];
                if let Some(header) = InHeader::parse(bytes) {
                    tracing::info!(
                        queue = index,
                        opcode = header.opcode,
                        request = header.unique,
                        "serving again a request the previous engine read and did not answer"
                    );
                    crate::fs::serve_again(|| serve(bytes, &header, true, &mut reply));
                }
                slot.finished(left.unique);
            }
        }
    }
    loop {
        if control.phase() == STOPPED {
            return WorkerEnd::Stopped;
        }
        if let Err(end) = wait_readable(fd, control.wake.as_raw_fd()) {
            return end;
        }
        if control.phase() == STOPPED {
            return WorkerEnd::Stopped;
        }
        let buffer: &mut [u8] = match slot.as_mut() {
            Some(slot) => slot.buffer(),
            None => &mut own,
        };
        // SAFETY: reads into a buffer of REQUEST_BUFFER bytes only this worker uses.
        let len = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
        if len < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Empty by now, interrupted, or a request the kernel withdrew.
                Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ENOENT) => continue,
                Some(libc::ENODEV) => return WorkerEnd::Disconnected,
                _ => {
                    tracing::error!(error = %e, "reading from /dev/fuse failed; worker stops");
                    return WorkerEnd::Failed;
                }
            }
        }
        let bytes = &mut buffer[..len as usize];
        let Some(header) = InHeader::parse(bytes) else {
            tracing::error!(len, "short FUSE request ignored");
            continue;
        };
        let phase = control.phase();
        if phase == STOPPED || (phase == DRAINING && protocol::opens_for_write(&header, bytes)) {
            // Unanswered on purpose: the successor gets it again (RESEND, or from the slot).
            if phase == STOPPED {
                return WorkerEnd::Stopped;
            }
            if slot.is_some() {
                // The slot holds it for the successor: read nothing more into it.
                return wait_stopped(control);
            }
            continue;
        }
        serve(bytes, &header, false, &mut reply);
        if let Some(slot) = &slot {
            slot.finished(header.unique);
        }
    }
}

/// A draining worker whose slot holds a request left for the successor waits for the stop.
fn wait_stopped(control: &QueueControl) -> WorkerEnd {
    let mut fds = [libc::pollfd {
        fd: control.wake.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    while control.phase() != STOPPED {
        // SAFETY: polls one valid pollfd entry.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
    }
    WorkerEnd::Stopped
}

/// Waits until the queue has something or the stop eventfd fires.
fn wait_readable(fd: RawFd, wake: RawFd) -> Result<(), WorkerEnd> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: polls two valid pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(WorkerEnd::Failed);
        }
        if fds[1].revents != 0 {
            return Err(WorkerEnd::Stopped);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0
            && fds[0].revents & libc::POLLIN == 0
        {
            return Err(WorkerEnd::Disconnected);
        }
        return Ok(());
    }
}

/// Serves one request; `again`: it may have been served before (resent, or replayed from a
/// dead engine's slot), so a non-idempotent one is answered from the journal if it is there.
#[allow(clippy::too_many_arguments)]
fn serve_one(
    fd: RawFd,
    header: &InHeader,
    bytes: &mut [u8],
    again: bool,
    reply: &mut [u8],
    server: &Server<Arc<BerthFs>>,
    shared: &ConnectionState,
    capture: &Capture,
) {
    let journaled = protocol::is_non_idempotent(header.opcode);
    if journaled && (again || header.is_resend()) {
        if let Some(mut old) = shared.journaled_reply(header.request_id()) {
            tracing::info!(
                opcode = header.opcode,
                request = header.request_id(),
                "resent request was already applied; replaying its journaled reply"
            );
            protocol::set_reply_unique(&mut old, header.unique);
            write_reply(fd, &old);
            return;
        }
    }
    // Replies of journaled requests, and of the one fault injection names, go through the
    // capture pipe: journaled (if they are) before the kernel sees them.
    let crash = crash_injected(header.opcode);
    let captured_reply = journaled || crash;
    let out_fd = if captured_reply {
        capture.write_fd()
    } else {
        fd
    };
    let reader = match Reader::from_fuse_buffer(FuseBuf::new(bytes)) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "malformed FUSE request buffer");
            return;
        }
    };
    let writer = match FuseDevWriter::<()>::new(out_fd, reply) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot build FUSE reply buffer");
            return;
        }
    };
    if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
        // ENOENT on reply: the request was interrupted and the kernel forgot it.
        tracing::debug!(error = ?e, "FUSE request not answered cleanly");
    }
    if captured_reply {
        let captured = capture.take();
        if journaled && !captured.is_empty() {
            shared.journal_reply(header.request_id(), &captured);
        }
        if crash {
            tracing::warn!(
                opcode = header.opcode,
                "fault injection: engine aborts before replying"
            );
            std::process::abort();
        }
        if !captured.is_empty() {
            write_reply(fd, &captured);
        }
    }
}

/// Fault injection for the takeover tests: `BERTH_FAULT_CRASH_BEFORE_REPLY=<opcode number>`
/// makes the engine abort after applying (and journaling, if it is journaled) such a request
/// but before replying: the window where a resent request would be applied twice, or find
/// its work done.
fn crash_injected(opcode: u32) -> bool {
    static CRASH_ON: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let crash_on = CRASH_ON.get_or_init(|| {
        std::env::var("BERTH_FAULT_CRASH_BEFORE_REPLY")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    *crash_on == Some(opcode)
}

fn write_reply(fd: RawFd, reply: &[u8]) {
    // SAFETY: writes a buffer we own to the queue fd.
    let n = unsafe { libc::write(fd, reply.as_ptr().cast(), reply.len()) };
    if n < 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "journaled reply not delivered");
    }
}

/// A pipe that catches a reply so it can be journaled before it is delivered.
struct Capture {
    read: OwnedFd,
    write: OwnedFd,
}

impl Capture {
    fn new() -> io::Result<Capture> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are fresh and owned only here.
        Ok(unsafe {
            Capture {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }

    fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    fn take(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a local buffer from our pipe.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
    }
}
