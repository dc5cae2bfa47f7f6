//! The sandbox of the processes that parse guest input: `berth engine` (FUSE requests and
//! virtio-fs descriptor chains of its volumes' shares, a standalone `berth share`'s too), as
//! virtiofsd sandboxes itself. A memory-safety bug in the request parsers (fuse-backend-rs,
//! vm-memory, virtio-queue) then runs in a process that cannot mount, load modules or BPF,
//! trace or change namespaces, and holds only the capabilities it needs for its files.
//!
//! Two steps, because capabilities belong to threads and seccomp filters can be synced to all:
//! 1. [`drop_privileges`], while the process still has one thread (before the I/O runtime
//!    starts): `no_new_privs`, and every capability but those of [`ENGINE_CAPS`] dropped
//!    from the bounding, permitted, effective, inheritable and ambient sets. Every thread started afterwards inherits that.
//! 2. [`enter`], after setup (volumes built, fds received, caches and rings opened) and
//!    before the first request is read: the seccomp allowlist of [`seccomp::rules`] on every
//!    thread (`SECCOMP_FILTER_FLAG_TSYNC`); a syscall outside it kills the process with
//!    SIGSYS, and a holder replaces its engine as after any crash.
//!
//! The holder (`berth mount`, `berth share`) is not sandboxed: it mounts, remounts, binds
//! sockets and starts engines, and it never reads a request. See docs/virtiofs.md, "Sandbox".

mod caps;
pub mod seccomp;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub use seccomp::Uses;

use caps::{CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER};

/// What an engine keeps: it reads and writes files of any owner as root (a local-directory
/// store, the state dir, the node cache's data file): DAC_OVERRIDE and DAC_READ_SEARCH for
/// access, FOWNER for what only an owner may do (utimes, sticky directories).
pub const ENGINE_CAPS: &[u32] = &[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER];

/// `--sandbox`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxMode {
    /// No sandbox: the process keeps root's capabilities and may make any syscall.
    Off,
    /// Capabilities dropped, no_new_privs, seccomp: a syscall outside the list kills.
    On,
    /// As `On`, but a syscall outside the list is allowed and logged by the kernel (audit
    /// type 1326 in the kernel log): to find what an environment needs before turning it on.
    Log,
}

/// How a process is sandboxed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxPolicy {
    pub mode: SandboxMode,
    /// Asked for explicitly (`--sandbox on|log` or `BERTH_SANDBOX`): a step the kernel
    /// refuses is then an error and the process does not serve. Otherwise (the default) it
    /// is a warning and the process serves without that step.
    pub required: bool,
}

impl Default for SandboxPolicy {
    fn default() -> Self {
        SandboxPolicy {
            mode: SandboxMode::On,
            required: false,
        }
    }
}

impl SandboxPolicy {
    pub const OFF: SandboxPolicy = SandboxPolicy {
        mode: SandboxMode::Off,
        required: false,
    };
}

/// Why a step of the sandbox could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("dropping capabilities: {0}")]
    Capabilities(#[source] std::io::Error),
    #[error(
        "{0} threads are running: capabilities belong to each thread and must be dropped \
         before the second one starts"
    )]
    Threads(usize),
    #[error("installing the seccomp filter: {0}")]
    Seccomp(#[source] std::io::Error),
    #[error("no seccomp filter is written for this architecture")]
    Architecture,
}

/// Whether this process is confined (step 2 done), for the fault injection below.
static CONFINED: AtomicBool = AtomicBool::new(false);

/// Step 1 (see the module text): `no_new_privs` and capabilities. Call it while the process
/// has one thread. An error only when the policy requires the sandbox; otherwise a refusal
/// is logged and the process goes on with what could be done.
pub fn drop_privileges(policy: &SandboxPolicy, keep: &[u32]) -> Result<(), SandboxError> {
    if policy.mode == SandboxMode::Off {
        tracing::info!("sandbox off (--sandbox off): this process keeps root's capabilities and makes any syscall");
        return Ok(());
    }
    let threads = thread_count();
    let result = if threads > 1 {
        Err(SandboxError::Threads(threads))
    } else {
        caps::set_no_new_privs()
            .map_err(SandboxError::NoNewPrivs)
            .and_then(|()| caps::drop_all_but(keep).map_err(SandboxError::Capabilities))
    };
    settle(policy, result, "capabilities")?;
    let kept: Vec<&str> = keep.iter().map(|&c| caps::name(c)).collect();
    tracing::debug!(?kept, "sandbox: capabilities dropped, no_new_privs set");
    Ok(())
}

/// Step 2 (see the module text): the seccomp allowlist, on every thread. After it the
/// process cannot widen it again (seccomp itself is not on the list).
pub fn enter(policy: &SandboxPolicy, uses: Uses) -> Result<(), SandboxError> {
    let default = match policy.mode {
        SandboxMode::Off => return Ok(()),
        SandboxMode::On => libc::SECCOMP_RET_KILL_PROCESS,
        SandboxMode::Log => libc::SECCOMP_RET_LOG,
    };
    let result = if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        // no_new_privs again: harmless if step 1 set it, needed if step 1 was refused.
        caps::set_no_new_privs()
            .map_err(SandboxError::NoNewPrivs)
            .and_then(|()| {
                let rules = seccomp::rules(std::process::id(), uses);
                seccomp::install(&seccomp::program(&rules, default)).map_err(SandboxError::Seccomp)
            })
    } else {
        Err(SandboxError::Architecture)
    };
    let confined = result.is_ok();
    settle(policy, result, "seccomp")?;
    if confined {
        CONFINED.store(true, Ordering::Release);
        tracing::info!(
            mode = ?policy.mode,
            io_uring = uses.io_uring,
            "sandbox entered: capabilities dropped, no_new_privs, seccomp allowlist on every thread"
        );
    }
    Ok(())
}

/// A refused step: the error when required, else a warning.
fn settle(
    policy: &SandboxPolicy,
    result: Result<(), SandboxError>,
    step: &str,
) -> Result<(), SandboxError> {
    match result {
        Err(e) if policy.required => Err(e),
        Err(e) => {
            tracing::warn!(step, error = %e, "sandbox step refused; serving without it (--sandbox on makes this an error, --sandbox off silences it)");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count())
}

/// Fault injection for the sandbox test: with `BERTH_FAULT_FORBIDDEN_SYSCALL=<FUSE opcode>`,
/// an engine armed with [`arm_fault_injection`] (the first generation only) calls mount(2),
/// which the sandbox forbids, when its queue worker reads the first request of that opcode.
/// Sandboxed, the kernel kills the engine (SIGSYS) and the holder replaces it; with the
/// sandbox off, mount(2) just fails and the request is served.
pub fn forbidden_syscall_if_injected(opcode: u32) {
    static WANTED: OnceLock<Option<u32>> = OnceLock::new();
    if !ARMED.load(Ordering::Acquire) {
        return;
    }
    let wanted = WANTED.get_or_init(|| {
        std::env::var("BERTH_FAULT_FORBIDDEN_SYSCALL")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if *wanted != Some(opcode) || !ARMED.swap(false, Ordering::AcqRel) {
        return;
    }
    let confined = CONFINED.load(Ordering::Acquire);
    tracing::warn!(
        opcode,
        confined,
        "fault injection: calling mount(2), which the sandbox forbids"
    );
    // SAFETY: mount(2) with null pointers: outside the sandbox it fails (EFAULT or EPERM)
    // without touching memory; inside, the kernel kills the process before it runs.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
            std::ptr::null::<libc::c_void>(),
        )
    };
    tracing::warn!(
        result = r,
        error = %std::io::Error::last_os_error(),
        "fault injection: mount(2) returned; this process is not sandboxed"
    );
}

static ARMED: AtomicBool = AtomicBool::new(false);

/// Lets [`forbidden_syscall_if_injected`] fire in this process (the engine arms its first
/// generation only, so that the successor serves).
pub fn arm_fault_injection() {
    if std::env::var_os("BERTH_FAULT_FORBIDDEN_SYSCALL").is_some() {
        ARMED.store(true, Ordering::Release);
    }
}
