//! SIGINT/SIGTERM for the holder as events on a channel (a signalfd read by one thread), so
//! the holder's loop stays a plain loop over one channel. The signals are blocked in every
//! thread; engines unblock them again before exec (see [`unblock_in_child`]).

use std::io;
use std::sync::mpsc::Sender;

fn holder_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT/SIGTERM in this thread (call before spawning any thread) and delivers them
/// through `events` as `wrap(signal number)`.
pub fn forward<E: Send + 'static>(events: Sender<E>, wrap: fn(i32) -> E) -> io::Result<()> {
    let set = holder_signals();
    // SAFETY: blocks signals for the calling thread; threads spawned later inherit the mask.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: creates a signalfd for the blocked set.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    std::thread::Builder::new()
        .name("holder-signals".into())
        .spawn(move || loop {
            // SAFETY: signalfd_siginfo is plain data; read fills it from our fd.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let n =
                unsafe { libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
            if n as usize != size {
                continue;
            }
            if events.send(wrap(info.ssi_signo as i32)).is_err() {
                return;
            }
        })?;
    Ok(())
}

/// For `pre_exec`: a child must not inherit the holder's blocked signals.
pub fn unblock_in_child() -> io::Result<()> {
    let set = holder_signals();
    // SAFETY: async-signal-safe call on a local set.
    if unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
