//! The holder: the long-lived process of `berth mount` (and of a standalone `berth share`).
//! It mounts, keeps every /dev/fuse fd of every connection (clones included) and every VMM's
//! vhost-user connection (`super::vmm`), starts an engine and hands it the fds, and replaces
//! the engine when it dies, hangs or is upgraded. It never reads a request and never talks to
//! the store, so there is little in it that can crash. Nothing unmounts and no VMM is
//! disconnected when an engine exits.
//!
//! Everything the holder reacts to arrives on one channel as an [`Event`]: engine messages and
//! the engine's socket closing (its death), signals, `berth upgrade` requests, detector
//! reports (eBPF, when it loads), VMMs connecting, and a 100 ms tick for the fallback checks
//! (held fd error state, fusectl `waiting` and each VMM's queues against the engine's
//! progress counters).

mod engines;
mod mounts;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::control::{self, ControlReply, ControlRequest};
use super::detect::{monotonic_ns, Detector, HangWatch};
use super::events::{DetectorEvent, Event};
use super::handoff::{self, ShareSocket, ToEngine, ToHolder};
use super::remount;
use super::signals;
use super::vmm::{self, HeldShare};
use crate::fuse::connection_state::ConnectionState;
use crate::fuse::{self, FuseMount};
use crate::state;
use crate::status::HolderFacts;
use crate::sys::files::private_dir;
use crate::sys::sockets::{self, Peers};
use crate::volume::Target;

const TICK: Duration = Duration::from_millis(100);
/// A first engine connects to the store and opens the cache before it is ready.
const FIRST_START_TIMEOUT: Duration = Duration::from_secs(120);
const SUCCESSOR_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an upgrade waits for the old engine to drain its open writes and stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(5);
/// After the last unmount the engine commits files still open; it may take this long.
const FINAL_COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

/// What `berth mount` does: which sources to mount where, and how to keep them served.
#[derive(Clone, Debug)]
pub struct HolderConfig {
    /// FUSE mounts; mountpoints are distinct. At least one, or a standalone share.
    pub targets: Vec<Target>,
    /// Volumes served to VMMs only (`berth share SOURCE --socket PATH`): the target's
    /// mountpoint is the socket's path, which names its state directory.
    pub standalone: Vec<(Target, ShareSocket)>,
    pub read_only: bool,
    /// FUSE queues (and engine worker threads) per connection.
    pub threads: usize,
    pub state_dir: PathBuf,
    /// Do not load the eBPF probes.
    pub no_ebpf: bool,
    /// Requests waiting and none finished for this long: the engine is hung.
    pub hang_timeout: Duration,
    /// No heartbeat from the engine for this long: it is frozen (None: not checked).
    pub freeze_timeout: Option<Duration>,
    /// The arguments every engine is started with (`berth engine --handoff-fd N` + these):
    /// the mount's own command line, which the engine parses into the same configs.
    pub engine_argv: Vec<OsString>,
}

/// One volume the holder keeps served: a FUSE connection, or a standalone share.
struct HeldMount {
    source: String,
    fsname: String,
    /// The mountpoint; for a standalone share its socket's path.
    mountpoint: PathBuf,
    /// None for a standalone share: its VMMs are its only users.
    fuse: Option<FuseMount>,
    queues: Vec<File>,
    shared: ConnectionState,
    conn: Option<u32>,
    init_capable: Option<u64>,
    hang: HangWatch,
    /// Unmounted from outside: no longer served.
    gone: bool,
    /// virtio-fs shares of this mount's volume (served by the same engine).
    shares: Vec<HeldShare>,
    /// Its state directory (inode journal, status), held for the holder's life.
    state: Option<state::MountDir>,
}

struct Engine {
    generation: u64,
    child: Child,
    sock: UnixStream,
    started: Instant,
    /// The holder's index of each mount the engine serves, in the engine's order.
    mounts: Vec<usize>,
}

impl HeldMount {
    /// Its FUSE connection is in error (aborted, or unmounted).
    fn lost(&self) -> bool {
        self.fuse.is_some() && self.queues.first().is_some_and(fuse::connection_lost)
    }

    /// Unmounted from outside (a standalone share never is).
    fn unmounted(&self) -> bool {
        self.fuse
            .as_ref()
            .is_some_and(|f| f.connection_id().is_none())
    }
}

pub struct Holder {
    config: HolderConfig,
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
    /// When the last fallback tick ran: a holder that was itself stopped (a frozen cgroup, a
    /// suspended node) does not blame its engine for the silence it slept through.
    last_tick: Option<Instant>,
    /// Whether the stall check reads fusectl `waiting` (off with `BERTH_NO_FUSECTL=1`, how the
    /// path of nodes without fusectl is tested); without it, the engine's own counters.
    fusectl: bool,
}

/// Set to `1`, the holder never reads fusectl: the stall check counts the requests the engine
/// read and did not finish instead of the kernel's `waiting`, as where fusectl is missing.
pub const NO_FUSECTL_ENV: &str = "BERTH_NO_FUSECTL";

/// `berth mount`: hold the mounts and keep an engine serving them until unmounted.
pub fn run(config: HolderConfig) -> anyhow::Result<()> {
    let (sender, events) = mpsc::channel();
    signals::forward(sender.clone(), Event::Signal).context("installing signal handling")?;
    let binary = std::env::current_exe().context("finding the berth binary")?;
    if !config.targets.is_empty() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("berth mount needs root (CAP_SYS_ADMIN) to mount FUSE filesystems");
        }
    }
    let fusectl = std::env::var_os(NO_FUSECTL_ENV).is_none_or(|v| v != "1");
    if !fusectl {
        tracing::info!("fusectl not used ({NO_FUSECTL_ENV}=1): the stall check counts the requests the engine read and did not finish");
    } else if !config.targets.is_empty() {
        fuse::ensure_fusectl();
    }
    private_dir(&config.state_dir)
        .with_context(|| format!("creating the state dir {}", config.state_dir.display()))?;
    let hang_timeout = config.hang_timeout;
    let detector = Detector::start(config.no_ebpf, hang_timeout, sender.clone());
    let wanted = config.targets.clone();
    let standalone = config.standalone.clone();
    let mut holder = Holder {
        facts: HolderFacts {
            holder_pid: std::process::id(),
            detector: detector.name().to_string(),
            ..HolderFacts::default()
        },
        config,
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
        last_tick: None,
        fusectl,
    };
    let mut healed = Vec::new();
    for target in wanted {
        let (mountpoint, targets) = mounts::prepare(&target.mountpoint)?;
        if let Err(e) = holder.mount(target.text, &target.source, &mountpoint) {
            holder.abandon();
            return Err(e);
        }
        healed.push(targets);
    }
    for (target, socket) in standalone {
        if let Err(e) = holder.hold_share(target, socket) {
            holder.abandon();
            return Err(e);
        }
    }
    if let Err(e) = holder.start_first_engine() {
        holder.abandon();
        return Err(e);
    }
    for (i, targets) in healed.iter().enumerate() {
        if !targets.is_empty() {
            let mountpoint = holder.mounts[i].mountpoint.clone();
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
        let done = if m.fuse.is_some() {
            "mounted"
        } else {
            "sharing"
        };
        let at = if m.fuse.is_some() { "at" } else { "on" };
        println!("berth: {done} {} {at} {}", m.source, m.mountpoint.display());
    }
    holder.accept_vmms()?;
    let _ = std::io::stdout().flush();
    let result = holder.serve();
    holder.cleanup_state();
    result
}

impl Holder {
    fn on_engine_message(&mut self, message: ToHolder) {
        match message {
            ToHolder::Init { mount, capable } => {
                if let Some(m) = self.mounts.iter_mut().filter(|m| !m.gone).nth(mount) {
                    m.init_capable = Some(capable);
                    tracing::debug!(mountpoint = %m.mountpoint.display(), capable, "FUSE INIT negotiated; kept for successors");
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
                Some(Event::VmmConnected {
                    mount,
                    socket,
                    connection,
                }) => self.on_vmm_connected(mount, &socket, connection),
            }
            if self.mounts.iter().all(|m| m.gone) {
                // The engine commits files still open and exits by itself after the last
                // unmount; an engine of standalone shares is told to stop.
                if let Some(engine) = &self.engine {
                    let generation = engine.generation;
                    let timeout = if self.mounts.iter().any(|m| m.fuse.is_none()) {
                        let _ = handoff::send(&engine.sock, &ToEngine::StopAfterWrites, &[]);
                        STOP_TIMEOUT
                    } else {
                        FINAL_COMMIT_TIMEOUT
                    };
                    self.wait_gone(generation, timeout);
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
        let now = Instant::now();
        let awake = self
            .last_tick
            .replace(now)
            .is_some_and(|t| now.duration_since(t) < TICK * 5);
        if let Some((generation, mount, silent)) = self.frozen_engine().filter(|_| awake) {
            self.facts.last_detected_by = Some("heartbeat".into());
            self.on_hung(generation, mount, silent, "no heartbeat");
            return;
        }
        for i in 0..self.mounts.len() {
            if self.mounts[i].gone {
                continue;
            }
            if self.mounts[i].lost() {
                self.on_connection_lost(i);
                return;
            }
            if let Some((generation, waited)) = self.hung_vmm(i) {
                self.facts.last_detected_by = Some("virtqueue".into());
                self.on_hung(generation, i, waited, "requests waiting, none finished");
                return;
            }
            if self.mounts[i].fuse.is_none() {
                continue;
            }
            // With eBPF the probes report stalls first; this check stays as a safety net
            // (a stall the probes reported while a successor was starting is not re-reported).
            let timeout = if self.detector.name() == "ebpf" {
                self.hang_timeout * 2
            } else {
                self.hang_timeout
            };
            let m = &mut self.mounts[i];
            let progress = m.shared.progress();
            let kernel = m
                .conn
                .filter(|_| self.fusectl)
                .and_then(fuse::waiting_requests);
            // Where fusectl cannot be read: what the engine read and has not finished (blind
            // to requests no worker has read yet, which the heartbeat covers).
            let (waiting, by) = match kernel {
                Some(w) => (w, "fusectl"),
                None => (m.hang.in_flight(progress), "counters"),
            };
            if let Some(waited) = m.hang.check(Some(waiting), progress.1, timeout) {
                self.facts.last_detected_by = Some(by.into());
                let generation = self.generation;
                self.on_hung(generation, i, waited, "requests waiting, none finished");
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
                    self.on_hung(generation, i, waited, "requests waiting, none finished");
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

    fn on_hung(&mut self, generation: u64, mount: usize, waited: Duration, why: &str) {
        if !self.is_current(generation) {
            return;
        }
        tracing::error!(
            mountpoint = %self.mounts[mount].mountpoint.display(),
            waited_ms = waited.as_millis() as u64,
            generation,
            "engine is hung ({why}); killing and replacing it"
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
        if let Some(i) = self.mounts.iter().position(|m| !m.gone && m.lost()) {
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
            if !m.gone && m.unmounted() {
                tracing::info!(mountpoint = %m.mountpoint.display(), "unmounted");
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
        if self.mounts[i].unmounted() {
            self.refresh_gone();
            return;
        }
        let detected = Instant::now();
        let mountpoint = self.mounts[i].mountpoint.clone();
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

    /// SIGINT/SIGTERM: unmount (retried every second while busy; a second signal forces
    /// it). `sig` 0 is the retry tick.
    fn on_signal(&mut self, sig: i32) {
        if sig != 0 {
            self.signals += 1;
        }
        let force = self.signals > 1;
        tracing::info!(force, "signal received; unmounting");
        let mut busy = 0;
        for m in self.mounts.iter_mut().filter(|m| !m.gone) {
            let Some(fuse) = &m.fuse else {
                // A standalone share ends: no new VMM; the engine is stopped once all are gone.
                tracing::info!(socket = %m.mountpoint.display(), "share stopped");
                m.shares.iter().for_each(HeldShare::unlink);
                m.gone = true;
                continue;
            };
            match fuse.unmount(force) {
                Ok(()) if force => {
                    tracing::warn!(mountpoint = %m.mountpoint.display(), "forced unmount: open files on the mount now fail");
                    fuse.abort_connection();
                }
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => busy += 1,
                Err(e) => {
                    tracing::error!(mountpoint = %m.mountpoint.display(), error = %e, "unmount failed")
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
        match request {
            ControlRequest::AddShare {
                socket,
                request_queues,
                queue_size,
                group,
            } => {
                let spec = ShareSocket {
                    socket,
                    request_queues,
                    queue_size,
                    group,
                };
                ControlReply::from_result(self.add_share(mount, spec), self.generation)
            }
            ControlRequest::RemoveShare { socket } => {
                ControlReply::from_result(self.remove_share(mount, &socket), self.generation)
            }
            ControlRequest::Upgrade { binary } => {
                let upgraded = self.upgrade(binary);
                let stall_ms = upgraded.as_ref().map_or(0, |s| s.as_millis() as u64);
                let message =
                    upgraded.map(|_| format!("engine generation {} serving", self.generation));
                ControlReply {
                    stall_ms,
                    ..ControlReply::from_result(message, self.generation)
                }
            }
        }
    }

    /// Binds a share's socket and accepts VMMs on it; each is attached to the engine.
    fn add_share(&mut self, mount: usize, spec: ShareSocket) -> anyhow::Result<String> {
        let m = self.mounts.get_mut(mount).context("no such mount")?;
        if m.gone {
            bail!("the mount is gone");
        }
        if vmm::find(&m.shares, &spec.socket).is_some() {
            return Ok(format!("{} is already shared", spec.socket.display()));
        }
        let share = HeldShare::bind(spec)?;
        share.accept(mount, self.sender.clone())?;
        let socket = share.spec.socket.clone();
        tracing::info!(socket = %socket.display(), mountpoint = %m.mountpoint.display(), "virtio-fs share added");
        m.shares.push(share);
        Ok(format!("sharing on {}", socket.display()))
    }

    /// Stops a share: no new VMM, the socket file goes away; VMMs still attached are served
    /// until they leave.
    fn remove_share(&mut self, mount: usize, socket: &Path) -> anyhow::Result<String> {
        let m = self.mounts.get_mut(mount).context("no such mount")?;
        let Some(index) = vmm::find(&m.shares, socket) else {
            return Ok(format!("{} is not shared", socket.display()));
        };
        m.shares[index].unlink();
        tracing::info!(socket = %socket.display(), "virtio-fs share removed");
        Ok(format!("stopped sharing on {}", socket.display()))
    }

    /// Starts accepting VMMs on every share held at start-up (standalone shares).
    fn accept_vmms(&self) -> anyhow::Result<()> {
        for (i, m) in self.mounts.iter().enumerate() {
            for share in &m.shares {
                share.accept(i, self.sender.clone())?;
            }
        }
        Ok(())
    }

    /// A VMM connected: the engine serves its queues (a successor gets it when it is ready).
    fn on_vmm_connected(&mut self, mount: usize, socket: &Path, connection: u64) {
        let Some(conn) = self.mounts.get(mount).and_then(|m| {
            m.shares
                .iter()
                .filter(|s| s.spec.socket == socket)
                .flat_map(HeldShare::connections)
                .find(|c| c.id == connection)
        }) else {
            return; // it left already
        };
        self.attach_vmm(mount, socket, &conn);
    }

    /// Attaches the current engine to every VMM (after it is ready).
    fn attach_vmms(&mut self) {
        for i in 0..self.mounts.len() {
            // Removed shares whose last VMM left are forgotten.
            self.mounts[i]
                .shares
                .retain(|s| !s.removed() || !s.connections().is_empty());
            let held: Vec<_> = self.mounts[i]
                .shares
                .iter()
                .flat_map(|s| {
                    s.connections()
                        .into_iter()
                        .map(|c| (s.spec.socket.clone(), c))
                })
                .collect();
            for (socket, conn) in held {
                self.attach_vmm(i, &socket, &conn);
            }
        }
    }

    fn attach_vmm(&mut self, mount: usize, socket: &Path, conn: &vmm::VmmConnection) {
        let Some(engine) = &self.engine else {
            return; // the successor gets it
        };
        let Some(index) = engine.mounts.iter().position(|&m| m == mount) else {
            return;
        };
        match vmm::attach(&engine.sock, engine.generation, index, socket, conn) {
            Ok(()) => {
                tracing::info!(socket = %socket.display(), connection = conn.id, generation = engine.generation, "engine attached to the VMM")
            }
            // A dying engine: its successor is attached when it is ready.
            Err(e) => {
                tracing::warn!(socket = %socket.display(), connection = conn.id, error = %format!("{e:#}"), "could not attach the engine to the VMM")
            }
        }
    }

    /// The engine, if its heartbeat stopped for the freeze timeout: (its generation, a mount
    /// it serves, how long it has been silent). An engine that has not beaten yet (starting,
    /// or a binary from before the heartbeat) gets no verdict here.
    fn frozen_engine(&self) -> Option<(u64, usize, Duration)> {
        let timeout = self.config.freeze_timeout?;
        let engine = self.engine.as_ref()?;
        let latest = engine
            .mounts
            .iter()
            .map(|&i| self.mounts[i].shared.last_beat())
            .filter(|&(generation, _)| generation == engine.generation)
            .map(|(_, ns)| ns)
            .max()?;
        let silent = Duration::from_nanos(monotonic_ns().saturating_sub(latest));
        (silent >= timeout).then(|| (engine.generation, engine.mounts[0], silent))
    }

    /// A VMM of mount `i` whose queues have requests waiting and none answered for the hang
    /// timeout: (the engine generation, how long).
    fn hung_vmm(&self, i: usize) -> Option<(u64, Duration)> {
        let engine = self.engine.as_ref()?;
        for share in &self.mounts[i].shares {
            for conn in share.connections() {
                if *conn.attached.lock().unwrap_or_else(|e| e.into_inner()) != engine.generation {
                    continue;
                }
                // Busy: a VMM message is being applied; look again next tick.
                let Ok(front) = conn.front.try_lock() else {
                    continue;
                };
                let (waiting, finished) = front.progress();
                drop(front);
                let mut hang = conn.hang.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(waited) =
                    hang.check(Some(u64::from(waiting)), finished, self.hang_timeout)
                {
                    return Some((engine.generation, waited));
                }
            }
        }
        None
    }

    /// Replaces the engine with `binary`: the old one stops at a request boundary (its open
    /// writes are carried by their spools), the new one takes the connections and asks for a
    /// RESEND.
    fn upgrade(&mut self, binary: Option<PathBuf>) -> anyhow::Result<Duration> {
        let binary = binary.unwrap_or_else(|| self.binary.clone());
        check_engine_binary(&binary)?;
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

    /// A control socket per mount (see [`state::control_socket`]).
    fn listen_for_control(&self) -> anyhow::Result<()> {
        for (mount, m) in self.mounts.iter().enumerate() {
            let path = state::control_socket(&self.config.state_dir, &m.mountpoint);
            if let Some(dir) = path.parent() {
                private_dir(dir)
                    .with_context(|| format!("creating state dir {}", dir.display()))?;
            }
            // It replaces the engine: root only.
            let listener = sockets::listen(&path, Peers::ROOT).with_context(|| {
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
                        if !Peers::ROOT.allow(conn.as_raw_fd(), "holder control") {
                            continue;
                        }
                        if let Err(e) = serve_control(mount, conn, &events) {
                            tracing::warn!(error = %e, "control request failed");
                        }
                    }
                })?;
        }
        Ok(())
    }
}

/// The engine binary an upgrade runs: it runs as root with the volume's credentials and the
/// FUSE connections, so it must be root's own: a regular executable file owned by root that
/// neither its group nor others may write.
fn check_engine_binary(binary: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(binary)
        .with_context(|| format!("new engine binary {}", binary.display()))?;
    let mode = meta.permissions().mode();
    if !meta.is_file() || mode & 0o111 == 0 {
        bail!("{} is not an executable file", binary.display());
    }
    if meta.uid() != 0 || mode & 0o022 != 0 {
        bail!(
            "{} must be owned by root and writable by nobody else (it is uid {}, mode {:o}); \
             refusing to run it as the engine",
            binary.display(),
            meta.uid(),
            mode & 0o7777
        );
    }
    Ok(())
}

/// Answers one control connection: its request goes to the holder's loop as an event, the
/// loop's reply goes back.
fn serve_control(mount: usize, conn: UnixStream, events: &Sender<Event>) -> anyhow::Result<()> {
    let request = control::read_request(&conn)?;
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
    control::write_reply(&conn, &reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_roots_own_executables_become_engines() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("berth");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
        let set = |mode| std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(mode));
        set(0o755).unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(check_engine_binary(&bin).is_ok(), root);
        set(0o775).unwrap();
        assert!(check_engine_binary(&bin).is_err(), "group-writable");
        set(0o757).unwrap();
        assert!(check_engine_binary(&bin).is_err(), "world-writable");
        set(0o644).unwrap();
        assert!(check_engine_binary(&bin).is_err(), "not executable");
        if root {
            set(0o755).unwrap();
            // SAFETY: chown of a file the test made.
            let c = std::ffi::CString::new(bin.to_str().unwrap()).unwrap();
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
            assert!(check_engine_binary(&bin).is_err(), "owned by nobody");
        }
        assert!(check_engine_binary(dir.path()).is_err(), "a directory");
    }
}
