//! The holder: the long-lived process of `berth mount`. It mounts, keeps every /dev/fuse fd of
//! every connection (clones included), starts an engine and hands it the fds, and replaces the
//! engine when it dies, hangs or is upgraded. It never reads a request and never talks to the
//! store, so there is little in it that can crash. Nothing unmounts when an engine exits.
//!
//! Everything the holder reacts to arrives on one channel as an [`Event`]: engine messages and
//! the engine's socket closing (its death), signals, `berth upgrade` requests, detector
//! reports (eBPF, when it loads), and a 100 ms tick for the fallback checks (held fd error
//! state, fusectl `waiting` against the engine's progress counters).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use super::detect::{Detector, DetectorEvent, HangWatch};
use super::handoff::{self, Hello, MountHandoff, ShareHandoff, ToEngine, ToHolder};
use super::remount::{self, BindTarget};
use super::shared::SharedState;
use super::shares::{self, HeldShare};
use super::signals;
use super::HolderFacts;
use crate::cli::MountArgs;
use crate::fuse::{self, FuseMount, MountOptions};
use crate::mount::{self as mounting, Source};
use crate::status;

const TICK: Duration = Duration::from_millis(100);
/// A first engine connects to the store and opens the cache before it is ready.
const FIRST_START_TIMEOUT: Duration = Duration::from_secs(120);
const SUCCESSOR_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an upgrade waits for the old engine to drain its open writes and stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(5);
/// After the last unmount the engine commits files still open; it may take this long.
const FINAL_COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

/// What the holder's loop reacts to.
pub enum Event {
    Signal(i32),
    Engine {
        generation: u64,
        message: ToHolder,
    },
    /// The engine's end of the socket closed: it exited or died.
    EngineGone {
        generation: u64,
    },
    Detector(DetectorEvent),
    /// A request on the control socket of mount `mount`.
    Control {
        mount: usize,
        request: ControlRequest,
        reply: Sender<ControlReply>,
    },
}

/// A request on a mount's control socket (`berth upgrade`, the node daemon's shares).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ControlRequest {
    Upgrade {
        binary: Option<PathBuf>,
    },
    /// Serve the mount's volume to VMMs on a vhost-user socket (idempotent).
    AddShare {
        socket: PathBuf,
        request_queues: usize,
        queue_size: u16,
    },
    /// Stop serving a share (idempotent).
    RemoveShare {
        socket: PathBuf,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlReply {
    pub ok: bool,
    pub message: String,
    pub generation: u64,
    pub stall_ms: u64,
}

/// One connection the holder keeps.
struct HeldMount {
    source: String,
    fsname: String,
    fuse: FuseMount,
    queues: Vec<File>,
    shared: SharedState,
    conn: Option<u32>,
    init_capable: Option<u64>,
    hang: HangWatch,
    /// Unmounted from outside: no longer served.
    gone: bool,
    /// virtio-fs shares of this mount's volume (served by the same engine).
    shares: Vec<HeldShare>,
}

struct Engine {
    generation: u64,
    child: Child,
    sock: UnixStream,
    started: Instant,
}

pub struct Holder {
    args: MountArgs,
    argv: Vec<OsString>,
    binary: PathBuf,
    mounts: Vec<HeldMount>,
    engine: Option<Engine>,
    generation: u64,
    facts: HolderFacts,
    events: Receiver<Event>,
    sender: Sender<Event>,
    backlog: VecDeque<Event>,
    detector: Detector,
    hang_timeout: Duration,
    signals: u32,
}

/// `berth mount`: hold the mounts and keep an engine serving them until unmounted.
pub fn run(args: MountArgs, argv: Vec<OsString>) -> anyhow::Result<()> {
    let (sender, events) = mpsc::channel();
    signals::forward(sender.clone(), Event::Signal).context("installing signal handling")?;
    let binary = std::env::current_exe().context("finding the berth binary")?;
    let wanted = mounting::targets(&args)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("berth mount needs root (CAP_SYS_ADMIN) to mount FUSE filesystems");
    }
    fuse::ensure_fusectl();
    let hang_timeout = args
        .heal
        .hang_timeout
        .unwrap_or(args.store.request_deadline + Duration::from_secs(10));
    let detector = Detector::start(&args.heal, hang_timeout, sender.clone());
    let mut holder = Holder {
        facts: HolderFacts {
            holder_pid: std::process::id(),
            detector: detector.name().to_string(),
            ..HolderFacts::default()
        },
        args,
        argv,
        binary,
        mounts: Vec::new(),
        engine: None,
        generation: 0,
        events,
        sender,
        backlog: VecDeque::new(),
        detector,
        hang_timeout,
        signals: 0,
    };
    let mut healed = Vec::new();
    for (text, source, mountpoint) in wanted {
        let (mountpoint, targets) = prepare(&mountpoint)?;
        if let Err(e) = holder.mount(text, &source, &mountpoint) {
            holder.abandon();
            return Err(e);
        }
        healed.push(targets);
    }
    if let Err(e) = holder.start_first_engine() {
        holder.abandon();
        return Err(e);
    }
    for (i, targets) in healed.iter().enumerate() {
        if !targets.is_empty() {
            let mountpoint = holder.mounts[i].fuse.mountpoint().to_path_buf();
            let done = remount::rebind(&mountpoint, targets);
            tracing::warn!(
                mountpoint = %mountpoint.display(),
                rebound = done,
                of = targets.len(),
                "healed a dead mount left by an earlier holder: remounted and re-bound; files open on the old mount were lost"
            );
            holder.facts.recoveries += 1;
            holder.facts.last_recovery_kind = Some("remount".into());
            holder.facts.lost_open_files = true;
            holder.update_engine_facts();
        }
    }
    holder.listen_for_control()?;
    for m in &holder.mounts {
        println!(
            "berth: mounted {} at {}",
            m.source,
            m.fuse.mountpoint().display()
        );
    }
    let _ = std::io::stdout().flush();
    let result = holder.serve();
    holder.cleanup_state();
    result
}

/// Creates and canonicalizes a mountpoint. A dead berth mount there (its holder was killed)
/// is detached with its binds, which are returned to re-bind after the new mount is up.
fn prepare(path: &Path) -> anyhow::Result<(PathBuf, Vec<BindTarget>)> {
    if !path.exists() {
        // A dead mount fails exists(); only create what is really missing.
        if !remount::is_dead_berth_mount(path) {
            std::fs::create_dir_all(path)
                .with_context(|| format!("creating mountpoint {}", path.display()))?;
        }
    }
    let path = canonical_parent_join(path)?;
    if remount::is_dead_berth_mount(&path) {
        tracing::warn!(mountpoint = %path.display(), "found a dead berth mount (its holder is gone); replacing it");
        let targets = remount::detach_with_binds(&path)
            .with_context(|| format!("detaching the dead mount at {}", path.display()))?;
        return Ok((path, targets));
    }
    if !path.is_dir() {
        bail!("mountpoint {} is not a directory", path.display());
    }
    if fuse::is_mountpoint(&path) {
        bail!(
            "{} is already a mountpoint; unmount it first (stacking mounts hides the one below)",
            path.display()
        );
    }
    Ok((path, Vec::new()))
}

/// Canonical path without touching the (possibly dead) last component.
fn canonical_parent_join(path: &Path) -> anyhow::Result<PathBuf> {
    let absolute =
        std::path::absolute(path).with_context(|| format!("mountpoint {}", path.display()))?;
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => Ok(parent
            .canonicalize()
            .with_context(|| format!("mountpoint {}", path.display()))?
            .join(name)),
        _ => Ok(absolute),
    }
}

impl Holder {
    fn mount(&mut self, text: String, source: &Source, mountpoint: &Path) -> anyhow::Result<()> {
        let fsname = format!("berth:{}", mounting::describe(source));
        let fuse = FuseMount::mount(
            mountpoint,
            &MountOptions {
                fsname: fsname.clone(),
                read_only: self.args.read_only,
                allow_other: true,
            },
        )
        .with_context(|| format!("mounting {}", mountpoint.display()))?;
        let held = self.hold(text, fsname, fuse)?;
        self.mounts.push(held);
        Ok(())
    }

    fn hold(
        &mut self,
        source: String,
        fsname: String,
        fuse: FuseMount,
    ) -> anyhow::Result<HeldMount> {
        let queues = fuse
            .queues(self.args.threads)
            .context("cloning FUSE queues")?;
        let shared = SharedState::create().context("creating the shared state region")?;
        let conn = fuse.connection_id();
        if let Some(conn) = conn {
            self.detector.watch_connection(conn);
        }
        Ok(HeldMount {
            source,
            fsname,
            fuse,
            queues,
            shared,
            conn,
            init_capable: None,
            hang: HangWatch::new(),
            gone: false,
            shares: Vec::new(),
        })
    }

    /// Gives up before serving: detach what was mounted, stop an engine if one started.
    fn abandon(&mut self) {
        self.kill_engine();
        for m in &self.mounts {
            let _ = m.fuse.unmount(true);
        }
        self.cleanup_state();
    }

    fn start_first_engine(&mut self) -> anyhow::Result<()> {
        let generation = self.spawn_engine(false)?;
        match self.wait_ready(generation, FIRST_START_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(e) => Err(e.context("the engine did not start")),
        }
    }

    /// Starts engine generation N+1 and hands it every held connection.
    fn spawn_engine(&mut self, resend: bool) -> anyhow::Result<u64> {
        self.generation += 1;
        let generation = self.generation;
        self.facts.generation = generation;
        let (ours, theirs) = UnixStream::pair().context("creating the handoff socket")?;
        let their_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&self.binary);
        if generation > 1 {
            // Fault injection (tests) crashes the first engine only.
            cmd.env_remove("BERTH_FAULT_CRASH_BEFORE_REPLY");
        }
        cmd.arg("engine")
            .arg("--handoff-fd")
            .arg(their_fd.to_string())
            .args(&self.argv);
        // SAFETY: the closure only makes async-signal-safe calls (fcntl, sigprocmask, prctl).
        unsafe {
            cmd.pre_exec(move || {
                clear_cloexec(their_fd)?;
                signals::unblock_in_child()?;
                // An engine without its holder would serve a connection nobody can hand over.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting engine {}", self.binary.display()))?;
        drop(theirs);
        let (hello, fds) = self.hello(generation, resend);
        handoff::send(&ours, &ToEngine::Hello(hello), &fds).context("handing fds to the engine")?;
        self.detector.watch_process(child.id());
        self.read_engine_messages(generation, &ours)?;
        tracing::info!(generation, pid = child.id(), resend, binary = %self.binary.display(), "engine started");
        self.engine = Some(Engine {
            generation,
            child,
            sock: ours,
            started: Instant::now(),
        });
        Ok(generation)
    }

    fn hello(&self, generation: u64, resend: bool) -> (Hello, Vec<RawFd>) {
        let mut fds = Vec::new();
        let mut mounts = Vec::new();
        for m in self.mounts.iter().filter(|m| !m.gone) {
            fds.extend(m.queues.iter().map(|q| q.as_raw_fd()));
            fds.push(m.shared.file().as_raw_fd());
            fds.extend(m.shares.iter().map(|s| s.listener.as_raw_fd()));
            mounts.push(MountHandoff {
                source: m.source.clone(),
                mountpoint: m.fuse.mountpoint().to_path_buf(),
                conn: m.conn,
                queues: m.queues.len(),
                init_capable: m.init_capable,
                // A fresh connection (first engine, or after a remount) has nothing to resend.
                resend: resend && m.init_capable.is_some(),
                shares: m.shares.iter().map(|s| s.spec.clone()).collect(),
            });
        }
        let hello = Hello {
            generation,
            facts: self.facts.clone(),
            mounts,
        };
        (hello, fds)
    }

    /// A thread per engine turns its messages (and its death: EOF) into events.
    fn read_engine_messages(&self, generation: u64, sock: &UnixStream) -> anyhow::Result<()> {
        let sock = sock.try_clone()?;
        let events = self.sender.clone();
        std::thread::Builder::new()
            .name(format!("engine-{generation}"))
            .spawn(move || loop {
                match handoff::recv::<ToHolder>(&sock) {
                    Ok((message, _)) => {
                        if events
                            .send(Event::Engine {
                                generation,
                                message,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = events.send(Event::EngineGone { generation });
                        return;
                    }
                }
            })?;
        Ok(())
    }

    /// Waits for engine `generation` to say it is serving; handles INIT reports meanwhile.
    fn wait_ready(&mut self, generation: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.events.recv_timeout(left) {
                Ok(e) => e,
                Err(_) => {
                    self.kill_engine();
                    bail!("engine {generation} was not ready within {timeout:?}");
                }
            };
            match event {
                Event::Engine {
                    generation: g,
                    message,
                } if g == generation => match message {
                    ToHolder::Ready { .. } => return Ok(()),
                    ToHolder::Failed { error } => {
                        self.reap_engine();
                        bail!("{error}");
                    }
                    other => self.on_engine_message(other),
                },
                Event::EngineGone { generation: g } if g == generation => {
                    let status = self.reap_engine();
                    bail!("engine {generation} exited before it was ready ({status})");
                }
                Event::Engine { .. } | Event::EngineGone { .. } => {} // an older engine
                other => self.backlog.push_back(other),
            }
        }
    }

    fn on_engine_message(&mut self, message: ToHolder) {
        match message {
            ToHolder::Init { mount, capable } => {
                if let Some(m) = self.mounts.iter_mut().filter(|m| !m.gone).nth(mount) {
                    m.init_capable = Some(capable);
                    tracing::debug!(mountpoint = %m.fuse.mountpoint().display(), capable, "FUSE INIT negotiated; kept for successors");
                }
            }
            ToHolder::Stopped {
                open_writes_dropped,
            } if open_writes_dropped > 0 => {
                tracing::warn!(open_writes_dropped, "the old engine stopped with files still open for writing; their writes will fail with EIO")
            }
            _ => {}
        }
    }

    /// The main loop, until every mount is gone.
    fn serve(&mut self) -> anyhow::Result<()> {
        loop {
            let event = match self.backlog.pop_front() {
                Some(e) => Some(e),
                None => match self.events.recv_timeout(TICK) {
                    Ok(e) => Some(e),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        bail!("holder event channel closed")
                    }
                },
            };
            match event {
                None => self.tick(),
                Some(Event::Signal(sig)) => self.on_signal(sig),
                Some(Event::Engine {
                    generation,
                    message,
                }) => {
                    if self.is_current(generation) {
                        self.on_engine_message(message);
                    }
                }
                Some(Event::EngineGone { generation }) => {
                    if self.is_current(generation) {
                        self.facts.last_detected_by = Some("socket".into());
                        self.on_engine_gone(Instant::now(), "the engine exited");
                    }
                }
                Some(Event::Detector(e)) => self.on_detector(e),
                Some(Event::Control {
                    mount,
                    request,
                    reply,
                }) => {
                    let answer = self.on_control(mount, request);
                    let _ = reply.send(answer);
                }
            }
            if self.mounts.iter().all(|m| m.gone) {
                // The engine commits files still open and exits by itself; let it.
                if let Some(generation) = self.engine.as_ref().map(|e| e.generation) {
                    self.wait_gone(generation, FINAL_COMMIT_TIMEOUT);
                }
                tracing::info!("every mount is gone; bye");
                return Ok(());
            }
        }
    }

    fn is_current(&self, generation: u64) -> bool {
        self.engine
            .as_ref()
            .is_some_and(|e| e.generation == generation)
    }

    /// Fallback checks: a held fd in error state (connection aborted or unmounted), and hung
    /// engines (requests waiting, none finished for `hang_timeout`).
    fn tick(&mut self) {
        for i in 0..self.mounts.len() {
            if self.mounts[i].gone {
                continue;
            }
            if fuse::connection_lost(&self.mounts[i].queues[0]) {
                self.on_connection_lost(i);
                return;
            }
            // With eBPF the probes report stalls first; this check stays as a safety net
            // (a stall the probes reported while a successor was starting is not re-reported).
            let timeout = if self.detector.name() == "ebpf" {
                self.hang_timeout * 2
            } else {
                self.hang_timeout
            };
            let m = &mut self.mounts[i];
            let waiting = m.conn.and_then(fuse::waiting_requests);
            if let Some(waited) = m.hang.check(waiting, m.shared.progress().1, timeout) {
                self.facts.last_detected_by = Some("fusectl".into());
                let generation = self.generation;
                self.on_hung(generation, i, waited);
                return;
            }
        }
    }

    fn on_detector(&mut self, event: DetectorEvent) {
        match event {
            DetectorEvent::EngineExited { pid } => {
                if self.engine.as_ref().is_some_and(|e| e.child.id() == pid) {
                    self.facts.last_detected_by = Some("ebpf".into());
                    self.on_engine_gone(Instant::now(), "eBPF saw the engine exit");
                }
            }
            DetectorEvent::Stalled { conn, waited } => {
                // Requests queued while a successor was starting look stalled too; only an
                // engine that has served for the whole timeout can be hung.
                if self
                    .engine
                    .as_ref()
                    .is_none_or(|e| e.started.elapsed() < self.hang_timeout)
                {
                    return;
                }
                self.facts.last_detected_by = Some("ebpf".into());
                if let Some(i) = self
                    .mounts
                    .iter()
                    .position(|m| !m.gone && m.conn == Some(conn))
                {
                    let generation = self.generation;
                    self.on_hung(generation, i, waited);
                }
            }
            DetectorEvent::Aborted { conn } => {
                if let Some(i) = self
                    .mounts
                    .iter()
                    .position(|m| !m.gone && m.conn == Some(conn))
                {
                    self.on_connection_lost(i);
                }
            }
        }
    }

    fn on_hung(&mut self, generation: u64, mount: usize, waited: Duration) {
        if !self.is_current(generation) {
            return;
        }
        tracing::error!(
            mountpoint = %self.mounts[mount].fuse.mountpoint().display(),
            waited_ms = waited.as_millis() as u64,
            generation,
            "engine is hung (requests waiting, none finished); killing and replacing it"
        );
        let detected = Instant::now();
        self.kill_engine_now();
        self.on_engine_gone(detected, "hung engine killed");
    }

    /// The engine is gone: hand the connections to a successor, unless they are gone too.
    fn on_engine_gone(&mut self, detected: Instant, why: &str) {
        if self.engine.is_none() {
            return;
        }
        self.facts.last_detection_mono_ns = Some(monotonic_ns());
        let status = self.reap_engine();
        self.refresh_gone();
        if self.mounts.iter().all(|m| m.gone) {
            return;
        }
        if let Some(i) = self
            .mounts
            .iter()
            .position(|m| !m.gone && fuse::connection_lost(&m.queues[0]))
        {
            self.on_connection_lost(i);
            return;
        }
        // Even while shutting down: a mount still busy needs an engine until it is unmounted.
        tracing::warn!(%status, why, generation = self.generation, "engine gone; starting a successor on the held connections");
        self.facts.recoveries += 1;
        self.facts.last_recovery_kind = Some("takeover".into());
        self.restart_until_ready(detected);
    }

    /// Mounts unmounted from outside are no longer served.
    fn refresh_gone(&mut self) {
        for m in &mut self.mounts {
            if !m.gone && m.fuse.connection_id().is_none() {
                tracing::info!(mountpoint = %m.fuse.mountpoint().display(), "unmounted");
                m.gone = true;
            }
        }
    }

    fn restart_until_ready(&mut self, detected: Instant) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self
                .spawn_engine(true)
                .and_then(|g| self.wait_ready(g, SUCCESSOR_START_TIMEOUT))
            {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "successor engine failed to start; applications wait");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_RESTART_BACKOFF);
                    self.refresh_gone();
                    if self.mounts.iter().all(|m| m.gone) {
                        return;
                    }
                }
            }
        }
        let took = detected.elapsed();
        self.facts.last_recovery_ms = Some(took.as_millis() as u64);
        self.update_engine_facts();
        tracing::info!(
            generation = self.generation,
            recovery_ms = took.as_millis() as u64,
            recoveries = self.facts.recoveries,
            "engine replaced; open files and mounts kept"
        );
    }

    /// The connection of mount `i` is gone. Unmounted from outside: stop serving it. Still
    /// mounted but aborted: the last resort, a new mount re-bound over the old binds.
    fn on_connection_lost(&mut self, i: usize) {
        if self.mounts[i].fuse.connection_id().is_none() {
            self.refresh_gone();
            return;
        }
        let detected = Instant::now();
        let mountpoint = self.mounts[i].fuse.mountpoint().to_path_buf();
        tracing::error!(mountpoint = %mountpoint.display(), "FUSE connection aborted; remounting (files open on it are lost)");
        self.kill_engine_now();
        let _ = self.reap_engine();
        match self.remount(i) {
            Ok(targets) => {
                self.facts.recoveries += 1;
                self.facts.last_recovery_kind = Some("remount".into());
                self.facts.lost_open_files = true;
                self.restart_until_ready(detected);
                let done = remount::rebind(&mountpoint, &targets);
                tracing::warn!(mountpoint = %mountpoint.display(), rebound = done, of = targets.len(), "remounted after the connection was lost; files open on the old mount were lost");
            }
            Err(e) => {
                tracing::error!(mountpoint = %mountpoint.display(), error = %format!("{e:#}"), "remount failed; the mount stays broken");
                self.mounts[i].gone = true;
                if self.mounts.iter().any(|m| !m.gone) {
                    self.restart_until_ready(detected);
                }
            }
        }
    }

    fn remount(&mut self, i: usize) -> anyhow::Result<Vec<BindTarget>> {
        let mountpoint = self.mounts[i].fuse.mountpoint().to_path_buf();
        if let Some(conn) = self.mounts[i].conn {
            self.detector.unwatch_connection(conn);
        }
        let targets = remount::detach_with_binds(&mountpoint)?;
        let fuse = FuseMount::mount(
            &mountpoint,
            &MountOptions {
                fsname: self.mounts[i].fsname.clone(),
                read_only: self.args.read_only,
                allow_other: true,
            },
        )?;
        let held = self.hold(
            self.mounts[i].source.clone(),
            self.mounts[i].fsname.clone(),
            fuse,
        )?;
        let mut held = held;
        held.shares = std::mem::take(&mut self.mounts[i].shares);
        self.mounts[i] = held;
        Ok(targets)
    }

    /// SIGINT/SIGTERM: unmount (retried every second while busy; a second signal forces
    /// it). `sig` 0 is the retry tick.
    fn on_signal(&mut self, sig: i32) {
        if sig != 0 {
            self.signals += 1;
        }
        let force = self.signals > 1;
        tracing::info!(force, "signal received; unmounting");
        let mut busy = 0;
        for m in self.mounts.iter().filter(|m| !m.gone) {
            match m.fuse.unmount(force) {
                Ok(()) if force => {
                    tracing::warn!(mountpoint = %m.fuse.mountpoint().display(), "forced unmount: open files on the mount now fail");
                    m.fuse.abort_connection();
                }
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => busy += 1,
                Err(e) => {
                    tracing::error!(mountpoint = %m.fuse.mountpoint().display(), error = %e, "unmount failed")
                }
            }
        }
        if busy > 0 {
            tracing::warn!(busy, "mountpoint busy (open files or working directories); retrying every second; signal again to force");
            let events = self.sender.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(1));
                let _ = events.send(Event::Signal(0));
            });
        }
        self.refresh_gone();
    }

    fn on_control(&mut self, mount: usize, request: ControlRequest) -> ControlReply {
        let answer = |result: anyhow::Result<String>, generation| match result {
            Ok(message) => ControlReply {
                ok: true,
                message,
                generation,
                stall_ms: 0,
            },
            Err(e) => ControlReply {
                ok: false,
                message: format!("{e:#}"),
                generation,
                stall_ms: 0,
            },
        };
        match request {
            ControlRequest::AddShare {
                socket,
                request_queues,
                queue_size,
            } => {
                let spec = ShareHandoff {
                    socket,
                    request_queues,
                    queue_size,
                };
                answer(self.add_share(mount, spec), self.generation)
            }
            ControlRequest::RemoveShare { socket } => {
                answer(self.remove_share(mount, &socket), self.generation)
            }
            ControlRequest::Upgrade { binary } => match self.upgrade(binary) {
                Ok(stall) => ControlReply {
                    ok: true,
                    message: format!("engine generation {} serving", self.generation),
                    generation: self.generation,
                    stall_ms: stall.as_millis() as u64,
                },
                Err(e) => ControlReply {
                    ok: false,
                    message: format!("{e:#}"),
                    generation: self.generation,
                    stall_ms: 0,
                },
            },
        }
    }

    /// Binds a share's socket and has the engine serve it; later engines get it in their hello.
    fn add_share(&mut self, mount: usize, spec: ShareHandoff) -> anyhow::Result<String> {
        let m = self.mounts.get_mut(mount).context("no such mount")?;
        if m.gone {
            bail!("the mount is gone");
        }
        if shares::find(&m.shares, &spec.socket).is_some() {
            return Ok(format!("{} is already shared", spec.socket.display()));
        }
        let share = HeldShare::bind(spec)?;
        let socket = share.spec.socket.clone();
        if let Some(engine) = &self.engine {
            let message = ToEngine::AddShare {
                mount,
                share: share.spec.clone(),
            };
            // If the engine is dying, its successor gets the share in its hello.
            if let Err(e) = handoff::send(&engine.sock, &message, &[share.listener.as_raw_fd()]) {
                tracing::warn!(error = %e, "could not hand the share to the engine; its successor will serve it");
            }
        }
        tracing::info!(socket = %socket.display(), mountpoint = %m.fuse.mountpoint().display(), "virtio-fs share added");
        m.shares.push(share);
        Ok(format!("sharing on {}", socket.display()))
    }

    /// Stops a share: the engine stops accepting on it, the socket file goes away.
    fn remove_share(&mut self, mount: usize, socket: &Path) -> anyhow::Result<String> {
        let m = self.mounts.get_mut(mount).context("no such mount")?;
        let Some(index) = shares::find(&m.shares, socket) else {
            return Ok(format!("{} is not shared", socket.display()));
        };
        let share = m.shares.remove(index);
        if let Some(engine) = &self.engine {
            let message = ToEngine::RemoveShare {
                mount,
                socket: socket.to_path_buf(),
            };
            if let Err(e) = handoff::send(&engine.sock, &message, &[]) {
                tracing::warn!(error = %e, "could not tell the engine to stop the share");
            }
        }
        share.unlink();
        tracing::info!(socket = %socket.display(), "virtio-fs share removed");
        Ok(format!("stopped sharing on {}", socket.display()))
    }

    /// Replaces the engine with `binary`: the old one stops at a request boundary (after its
    /// open writes are closed), the new one takes the connections and asks for a RESEND.
    fn upgrade(&mut self, binary: Option<PathBuf>) -> anyhow::Result<Duration> {
        let binary = binary.unwrap_or_else(|| self.binary.clone());
        let meta = std::fs::metadata(&binary)
            .with_context(|| format!("new engine binary {}", binary.display()))?;
        use std::os::unix::fs::PermissionsExt;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            bail!("{} is not an executable file", binary.display());
        }
        let Some(engine) = &self.engine else {
            bail!("no engine is running");
        };
        let started = Instant::now();
        let old = engine.generation;
        handoff::send(&engine.sock, &ToEngine::Stop, &[]).context("asking the engine to stop")?;
        self.wait_gone(old, STOP_TIMEOUT);
        let stop_ms = started.elapsed().as_millis() as u64;
        let previous = std::mem::replace(&mut self.binary, binary);
        self.facts.upgrades += 1;
        let result = self
            .spawn_engine(true)
            .and_then(|g| self.wait_ready(g, SUCCESSOR_START_TIMEOUT));
        if let Err(e) = result {
            tracing::error!(error = %format!("{e:#}"), "the new engine did not start; going back to the old binary");
            self.binary = previous;
            self.restart_until_ready(started);
            bail!("upgrade failed, old engine restored: {e:#}");
        }
        let stall = started.elapsed();
        self.facts.last_upgrade_ms = Some(stall.as_millis() as u64);
        self.update_engine_facts();
        tracing::info!(
            generation = self.generation,
            stop_ms,
            stall_ms = stall.as_millis() as u64,
            "upgraded"
        );
        Ok(stall)
    }

    /// Waits until engine `generation` is gone (killing it after `timeout`), and reaps it.
    fn wait_gone(&mut self, generation: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::EngineGone { generation: g }) if g == generation => break,
                Ok(Event::Engine {
                    generation: g,
                    message,
                }) if g == generation => self.on_engine_message(message),
                Ok(Event::Engine { .. } | Event::EngineGone { .. }) => {}
                Ok(other) => self.backlog.push_back(other),
                Err(_) => {
                    tracing::error!(generation, "engine did not stop in time; killing it");
                    self.kill_engine_now();
                    break;
                }
            }
        }
        let _ = self.reap_engine();
    }

    fn update_engine_facts(&self) {
        if let Some(engine) = &self.engine {
            let _ = handoff::send(&engine.sock, &ToEngine::Facts(self.facts.clone()), &[]);
        }
    }

    fn kill_engine_now(&mut self) {
        if let Some(engine) = &mut self.engine {
            let _ = engine.child.kill();
        }
    }

    fn kill_engine(&mut self) {
        self.kill_engine_now();
        let _ = self.reap_engine();
    }

    /// Waits for the current engine's exit and forgets it; returns how it ended.
    fn reap_engine(&mut self) -> String {
        let Some(mut engine) = self.engine.take() else {
            return "no engine".into();
        };
        self.detector.unwatch_process(engine.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match engine.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    let _ = engine.child.kill();
                    return engine
                        .child
                        .wait()
                        .map_or_else(|e| e.to_string(), |s| s.to_string());
                }
            }
        }
    }

    /// A control socket per mount (see [`control_socket`]).
    fn listen_for_control(&self) -> anyhow::Result<()> {
        for (mount, m) in self.mounts.iter().enumerate() {
            let path = control_socket(&self.args.state_dir, m.fuse.mountpoint());
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating state dir {}", dir.display()))?;
            }
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).with_context(|| {
                format!(
                    "listening on {} (a --state-dir path this long leaves no room for socket names)",
                    path.display()
                )
            })?;
            let events = self.sender.clone();
            std::thread::Builder::new()
                .name("holder-control".into())
                .spawn(move || {
                    for conn in listener.incoming().flatten() {
                        if let Err(e) = serve_control(mount, conn, &events) {
                            tracing::warn!(error = %e, "control request failed");
                        }
                    }
                })?;
        }
        Ok(())
    }

    /// Removes what this holder put in the state dir.
    fn cleanup_state(&self) {
        for m in &self.mounts {
            let dir = status::mount_state_dir(&self.args.state_dir, m.fuse.mountpoint());
            for name in ["status.json", "inodes"] {
                let _ = std::fs::remove_file(dir.join(name));
            }
            let _ = std::fs::remove_file(control_socket(&self.args.state_dir, m.fuse.mountpoint()));
            let _ = std::fs::remove_dir(dir);
            m.shares.iter().for_each(HeldShare::unlink);
        }
    }
}

/// The holder's control socket for `mountpoint`: `<state-dir>/holders/<hash>.sock`. A unix
/// socket path must fit in 108 bytes, and mountpoints (kubelet's staging paths) are long, so
/// the name is a hash of the mountpoint, not the mountpoint.
pub fn control_socket(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    // FNV-1a: stable across builds and versions (an upgrade's new binary must find it).
    let hash = mountpoint
        .as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    state_dir.join("holders").join(format!("{hash:016x}.sock"))
}

fn serve_control(mount: usize, conn: UnixStream, events: &Sender<Event>) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let request: ControlRequest =
        serde_json::from_str(line.trim()).context("bad control request")?;
    let (tx, rx) = mpsc::channel();
    events
        .send(Event::Control {
            mount,
            request,
            reply: tx,
        })
        .map_err(|_| anyhow::anyhow!("holder is shutting down"))?;
    let reply = rx
        .recv_timeout(STOP_TIMEOUT + SUCCESSOR_START_TIMEOUT + Duration::from_secs(10))
        .context("no answer from the holder")?;
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    (&conn).write_all(&out)?;
    Ok(())
}

fn clear_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd of this (child) process.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// CLOCK_MONOTONIC in ns: comparable across processes (the recovery bench kills at a
/// monotonic time and reads the holder's detection time from the status).
pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data filled by clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Takes ownership of an fd number given on the command line (the engine's handoff socket).
///
/// # Safety
/// `fd` must be an open fd this process owns and nothing else will close.
pub unsafe fn adopt_fd(fd: RawFd) -> OwnedFd {
    OwnedFd::from_raw_fd(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_sockets_are_short_and_one_per_mountpoint() {
        let long = Path::new("/var/lib/kubelet/plugins/kubernetes.io/csi/csi.berth.dev/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/globalmount");
        let a = control_socket(Path::new("/run/berth"), long);
        assert!(a.as_os_str().len() < 60, "{}", a.display());
        assert_eq!(a, control_socket(Path::new("/run/berth"), long), "stable");
        assert_ne!(
            a,
            control_socket(Path::new("/run/berth"), Path::new("/mnt/other"))
        );
        assert!(a.starts_with("/run/berth/holders"));
    }
}
