//! The engine: the process that serves FUSE requests for a holder, and may crash at any time.
//!
//! The holder starts it as `berth engine --handoff-fd N <the mount's arguments>` and sends a
//! Hello with the queue fds of every connection. A successor (generation > 1) takes over the
//! inode journal, resumes FUSE INIT from the flags its predecessor saw, asks the kernel to
//! resend what the predecessor read but never answered, and only then starts reading.
//!
//! VMMs of the volume's virtio-fs shares are attached later, one by one
//! ([`ToEngine::AttachVmm`]): the holder keeps their connections, this engine serves their
//! queues ([`crate::virtiofs::GuestDoor`]).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use fuse_backend_rs::api::server::Server;

use crate::cache::BlockCache;
use crate::fs::BerthFs;
use crate::fuse::connection_state::ConnectionState;
use crate::fuse::worker::{QueueControl, WorkerEnd};
use crate::fuse::{protocol, worker};
use crate::heal::detect::monotonic_ns;
use crate::heal::handoff::{self, Hello, MountHandoff, ToEngine, ToHolder};
use crate::memory::MemoryLimiter;
use crate::namespace::Namespace;
use crate::sandbox::{self, SandboxPolicy};
use crate::state;
use crate::status::{HolderFacts, Publisher, Reported};
use crate::virtiofs::GuestDoor;
use crate::volume::{self, Opening, Source, Target, VolumeConfig};

/// How long an engine stopping for good (no successor) lets open writes be closed.
const FINAL_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// A predecessor that just died may still hold the cache lock for a moment.
const CACHE_LOCK_WAIT: Duration = Duration::from_secs(10);

/// What the engine's main loop waits for. A few per engine life, so the size of the holder's
/// messages (a Hello is large) is not worth a box.
#[allow(clippy::large_enum_variant)]
enum EngineEvent {
    /// A message of the holder and the fds it carried.
    FromHolder(ToEngine, Vec<File>),
    HolderGone,
    WorkerEnded {
        mount: usize,
        end: WorkerEnd,
    },
}

/// One connection being served.
struct Served {
    mountpoint: PathBuf,
    fs: Arc<BerthFs>,
    ns: Arc<Namespace>,
    control: Arc<QueueControl>,
    workers: usize,
    ended: usize,
    status: Arc<Publisher>,
    /// VMMs attached to shares of this volume, served by this engine.
    vmms: Vec<GuestDoor>,
}

/// `berth engine` (started by a holder, never by hand): serves the connections the holder
/// hands over on `handoff_fd`, with the volume settings of the mount's command line.
pub fn run(handoff_fd: RawFd, config: VolumeConfig, policy: SandboxPolicy) -> anyhow::Result<()> {
    // SAFETY: the holder passed this fd for us alone (see holder::spawn_engine).
    let sock = UnixStream::from(unsafe { handoff::adopt_fd(handoff_fd) });
    let (message, fds) = handoff::recv::<ToEngine>(&sock).context("reading the holder's hello")?;
    let ToEngine::Hello(hello) = message else {
        bail!("the holder did not start with a hello");
    };
    let started = Instant::now();
    let (events_tx, events) = mpsc::channel();
    let reply = Arc::new(Mutex::new(sock.try_clone()?));
    // Still one thread: every thread started from here on inherits the dropped capabilities.
    if let Err(e) = sandbox::drop_privileges(&policy, sandbox::ENGINE_CAPS) {
        fail(&reply, format!("sandbox: {e}"));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berth-io")
        .build()
        .context("starting the I/O runtime")?;
    let memory = MemoryLimiter::new(config.memory_limit);
    let facts = Arc::new(Mutex::new(hello.facts.clone()));
    let served = match start(
        &rt, &config, &hello, fds, &memory, &facts, &reply, &events_tx, &policy,
    ) {
        Ok(s) => s,
        Err(e) => fail(&reply, format!("{e:#}")),
    };
    for s in &served {
        s.status.spawn_refresh(rt.handle());
    }
    send(
        &reply,
        &ToHolder::Ready {
            pid: std::process::id(),
        },
    )?;
    tracing::info!(
        generation = hello.generation,
        mounts = served.len(),
        took_ms = started.elapsed().as_millis() as u64,
        "engine serving"
    );
    read_holder_messages(sock, events_tx)?;
    serve_until_end(served, events, &reply, &facts)
}

/// Set to `1`, a successor engine does not ask for FUSE_NOTIFY_RESEND and serves what its
/// predecessor left from the request slots, as on kernels before 6.9 (how that path is tested
/// on newer kernels).
pub const NO_RESEND_ENV: &str = "BERTH_TAKEOVER_NO_RESEND";

/// How the requests a dead predecessor read but never answered come back: the kernel queues
/// them again (RESEND, 6.9+), or, where it cannot, each worker serves its queue's leftover from
/// the shared request slots. Returns whether the workers must replay from the slots.
fn bring_back_unanswered(
    queue: RawFd,
    shared: &ConnectionState,
    m: &MountHandoff,
) -> anyhow::Result<bool> {
    let mountpoint = m.mountpoint.display();
    if std::env::var_os(NO_RESEND_ENV).is_some_and(|v| v == "1") {
        tracing::info!(%mountpoint, "RESEND not used ({NO_RESEND_ENV}=1): serving the previous engine's unanswered requests from the request slots");
    } else {
        match protocol::notify_resend(queue) {
            Ok(()) => return Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(%mountpoint, "this kernel has no FUSE_NOTIFY_RESEND (before 6.9): serving the previous engine's unanswered requests from the request slots");
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("asking the kernel to resend for {mountpoint}"))
            }
        }
    }
    if shared.request_slot(0).is_none() {
        tracing::warn!(%mountpoint, "no RESEND and this mount's holder keeps no request slots (it predates them): requests the previous engine read wait until their callers are interrupted; remount with this berth");
        return Ok(false);
    }
    Ok(true)
}

/// Tells the holder why this engine cannot serve, and exits (the holder reports the error;
/// it is not printed twice).
fn fail(reply: &Mutex<UnixStream>, error: String) -> ! {
    let _ = send(reply, &ToHolder::Failed { error });
    std::process::exit(1);
}

fn send(reply: &Mutex<UnixStream>, message: &ToHolder) -> anyhow::Result<()> {
    let sock = reply.lock().unwrap_or_else(|e| e.into_inner());
    handoff::send(&sock, message, &[]).context("writing to the holder")
}

/// Builds every volume, takes the connections over, and starts the queue workers.
#[allow(clippy::too_many_arguments)]
fn start(
    rt: &tokio::runtime::Runtime,
    config: &VolumeConfig,
    hello: &Hello,
    fds: Vec<File>,
    memory: &Arc<MemoryLimiter>,
    facts: &Arc<Mutex<HolderFacts>>,
    reply: &Arc<Mutex<UnixStream>>,
    events: &Sender<EngineEvent>,
    policy: &SandboxPolicy,
) -> anyhow::Result<Vec<Served>> {
    // Holders before the VMM front sent a share's listening socket after each mount's fds.
    let legacy_listeners = |m: &MountHandoff| if hello.vmm_front { 0 } else { m.shares.len() };
    let expected: usize = hello
        .mounts
        .iter()
        .map(|m| m.queues + 1 + legacy_listeners(m))
        .sum();
    if fds.len() != expected {
        bail!("the holder sent {} fds, expected {expected}", fds.len());
    }
    let cache = open_cache_waiting(config)?;
    let mut fds = fds.into_iter();
    let mut prepared = Vec::new();
    for (index, m) in hello.mounts.iter().enumerate() {
        let queues: Vec<File> = fds.by_ref().take(m.queues).collect();
        let shared_file = fds.next().context("missing shared state fd")?;
        let shared =
            Arc::new(ConnectionState::open(shared_file).context("mapping the shared state")?);
        let legacy = fds.by_ref().take(legacy_listeners(m)).count();
        if legacy > 0 {
            tracing::error!(
                mountpoint = %m.mountpoint.display(),
                shares = legacy,
                "this holder predates the VMM front and hands share sockets to the engine; \
                 this engine no longer serves them: restart the mount with this berth to serve its VMs"
            );
        }
        let volume = build(rt, config, hello.generation, m, memory, &cache)?;
        if let Some(capable) = m.init_capable {
            volume
                .fs
                .resume_init(capable)
                .context("resuming FUSE INIT")?;
        }
        prepared.push((index, m, queues, shared, volume));
    }
    // Set up: from here on this engine reads requests, and guest input, in its sandbox.
    let io_uring = cache
        .as_ref()
        .is_some_and(|c| c.stats().engine == format!("{:?}", crate::cache::EngineKind::IoUring));
    sandbox::enter(policy, sandbox::Uses { io_uring }).context("entering the sandbox")?;
    if hello.generation == 1 {
        sandbox::arm_fault_injection();
    }
    // Everything is ready: only now bring back what a predecessor left unanswered, so that
    // nothing is resent while this engine is already serving it.
    let mut replay = Vec::new();
    for (_, m, queues, shared, _) in &prepared {
        replay.push(m.resend && bring_back_unanswered(queues[0].as_raw_fd(), shared, m)?);
    }
    let mut served = Vec::new();
    let beating: Vec<Arc<ConnectionState>> = prepared.iter().map(|p| p.3.clone()).collect();
    for ((index, m, queues, shared, volume), replay) in prepared.into_iter().zip(replay) {
        let control = QueueControl::new(init_reporter(index, &volume.fs, reply))?;
        let server = Arc::new(Server::new(volume.fs.clone()));
        let workers = queues.len();
        for (q, queue) in queues.into_iter().enumerate() {
            worker::set_nonblocking(&queue)?;
            let (server, shared, control, events) = (
                server.clone(),
                shared.clone(),
                control.clone(),
                events.clone(),
            );
            std::thread::Builder::new()
                .name(format!("fuse-{index}-{q}"))
                .spawn(move || {
                    let end = worker::serve_queue(queue, q, replay, &server, &shared, &control);
                    let _ = events.send(EngineEvent::WorkerEnded { mount: index, end });
                })?;
        }
        if let Some(conn) = m.conn {
            tune_readahead(conn);
        }
        let status = Publisher::new(
            &mount_dir(config, m),
            Reported {
                source: m.source.clone(),
                mountpoint: m.mountpoint.clone(),
                read_only: volume.fs.read_only(),
                ns: volume.ns.clone(),
                memory: memory.clone(),
                cache: volume.cache.clone(),
                facts: facts.clone(),
            },
        );
        served.push(Served {
            mountpoint: m.mountpoint.clone(),
            fs: volume.fs,
            ns: volume.ns,
            control,
            workers,
            ended: 0,
            status,
            vmms: Vec::new(),
        });
    }
    start_heartbeat(rt, hello.generation, beating)?;
    Ok(served)
}

/// How often the engine beats, and how stale the runtime's tick may be for it to beat.
const BEAT: Duration = Duration::from_millis(100);
const RUNTIME_STALE: Duration = Duration::from_millis(400);

/// The engine's heartbeat into every connection's shared state (docs/self-healing.md,
/// "Frozen engines"): a task on the runtime records that the runtime runs, and a thread
/// beats while it does. A stopped process beats no more, nor does one whose runtime threads
/// are all stuck; waiting on the store is asynchronous and stops neither, so a slow store
/// never looks frozen.
fn start_heartbeat(
    rt: &tokio::runtime::Runtime,
    generation: u64,
    shared: Vec<Arc<ConnectionState>>,
) -> anyhow::Result<()> {
    let ticked = Arc::new(AtomicU64::new(monotonic_ns()));
    let tick = ticked.clone();
    rt.spawn(async move {
        loop {
            tick.store(monotonic_ns(), Ordering::Relaxed);
            tokio::time::sleep(BEAT).await;
        }
    });
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || loop {
            let now = monotonic_ns();
            let runtime_age = now.saturating_sub(ticked.load(Ordering::Relaxed));
            if runtime_age < RUNTIME_STALE.as_nanos() as u64 {
                for s in &shared {
                    s.beat(generation, now);
                }
            }
            std::thread::sleep(BEAT);
        })
        .context("starting the heartbeat thread")?;
    Ok(())
}

fn build(
    rt: &tokio::runtime::Runtime,
    config: &VolumeConfig,
    generation: u64,
    m: &MountHandoff,
    memory: &Arc<MemoryLimiter>,
    cache: &Option<Arc<BlockCache>>,
) -> anyhow::Result<volume::Volume> {
    let source = Source::parse(&m.source)?;
    let node_cache = volume::node_cache(cache, &config.store, &source);
    // A mount whose kernel saw INIT, or a share-only volume a predecessor served.
    let takeover = m.init_capable.is_some() || m.takeover;
    volume::build_volume(
        rt,
        config,
        &Target {
            text: m.source.clone(),
            source,
            mountpoint: m.mountpoint.clone(),
        },
        &mount_dir(config, m),
        Opening {
            check_store: !takeover,
            recover: takeover,
            generation,
        },
        memory,
        node_cache,
    )
}

/// The mount's state directory: as its holder says, or where an older holder keeps it.
fn mount_dir(config: &VolumeConfig, m: &MountHandoff) -> PathBuf {
    m.state_dir
        .clone()
        .unwrap_or_else(|| state::legacy_mount_dir(&config.state_dir, &m.mountpoint))
}

/// Opens the node cache, waiting a little while a predecessor that just died releases it.
fn open_cache_waiting(config: &VolumeConfig) -> anyhow::Result<Option<Arc<BlockCache>>> {
    let deadline = Instant::now() + CACHE_LOCK_WAIT;
    loop {
        match volume::open_block_cache(&config.cache) {
            Err(e) if cache_in_use(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn cache_in_use(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(crate::cache::is_in_use)
}

/// Tells the holder the INIT flags once the kernel's INIT is answered (a successor needs them).
fn init_reporter(
    index: usize,
    fs: &Arc<BerthFs>,
    reply: &Arc<Mutex<UnixStream>>,
) -> Box<dyn Fn() + Send + Sync> {
    let (fs, reply) = (Arc::downgrade(fs), reply.clone());
    Box::new(move || {
        let Some(capable) = fs.upgrade().and_then(|fs| fs.init_capable()) else {
            return;
        };
        if let Err(e) = send(
            &reply,
            &ToHolder::Init {
                mount: index,
                capable,
            },
        ) {
            tracing::error!(error = %e, "could not report FUSE INIT to the holder");
        }
    })
}

fn read_holder_messages(sock: UnixStream, events: Sender<EngineEvent>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("engine-control".into())
        .spawn(move || loop {
            match handoff::recv::<ToEngine>(&sock) {
                Ok((message, fds)) => {
                    if events.send(EngineEvent::FromHolder(message, fds)).is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = events.send(EngineEvent::HolderGone);
                    return;
                }
            }
        })?;
    Ok(())
}

fn serve_until_end(
    mut served: Vec<Served>,
    events: Receiver<EngineEvent>,
    reply: &Mutex<UnixStream>,
    facts: &Mutex<HolderFacts>,
) -> anyhow::Result<()> {
    // Set while stopping for an upgrade: guests' opens for writing are left to the successor.
    let draining = &Arc::new(AtomicBool::new(false));
    loop {
        let Ok(event) = events.recv() else {
            bail!("engine event channel closed");
        };
        match event {
            EngineEvent::FromHolder(ToEngine::Stop, _) => {
                return stop(&mut served, &events, reply, draining, false)
            }
            EngineEvent::FromHolder(ToEngine::StopAfterWrites, _) => {
                return stop(&mut served, &events, reply, draining, true)
            }
            EngineEvent::FromHolder(ToEngine::Facts(f), _) => {
                *facts.lock().unwrap_or_else(|e| e.into_inner()) = f;
                served.iter().for_each(|s| s.status.refresh());
            }
            EngineEvent::FromHolder(ToEngine::Hello(_), _) => {
                tracing::warn!("unexpected second hello from the holder; ignored")
            }
            EngineEvent::FromHolder(
                ToEngine::AttachVmm {
                    mount,
                    socket,
                    connection,
                },
                fds,
            ) => {
                if let Err(e) = attach_vmm(&mut served, mount, connection, fds, draining) {
                    tracing::error!(socket = %socket.display(), connection, error = %format!("{e:#}"), "could not serve the VMM");
                }
            }
            EngineEvent::FromHolder(
                ToEngine::AddShare { .. } | ToEngine::RemoveShare { .. },
                _,
            ) => {
                tracing::warn!("share request of a holder before the VMM front; ignored")
            }
            EngineEvent::HolderGone => {
                // Without the holder nobody could hand this connection over; end now (the
                // kernel's PDEATHSIG would do the same).
                tracing::error!("holder is gone; engine exits");
                std::process::exit(2);
            }
            EngineEvent::WorkerEnded { mount, end } => {
                let s = &mut served[mount];
                s.ended += 1;
                if end == WorkerEnd::Failed {
                    tracing::error!(mountpoint = %s.mountpoint.display(), "a FUSE worker failed");
                }
                if s.ended == s.workers {
                    finish(s);
                }
                if served.iter().all(|s| s.ended == s.workers) {
                    let _ = send(reply, &ToHolder::Unmounted);
                    return Ok(());
                }
            }
        }
    }
}

/// Serves the queues of a VMM the holder attached (fds: link socket, queue state, journal).
fn attach_vmm(
    served: &mut [Served],
    mount: usize,
    connection: u64,
    fds: Vec<File>,
    draining: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let s = served.get_mut(mount).context("no such mount")?;
    let [link, inflight, journal]: [File; 3] = fds.try_into().map_err(|f: Vec<File>| {
        anyhow::anyhow!("the holder sent {} fds with a VMM, not 3", f.len())
    })?;
    // Doors whose link ended (their VMM left, or they were replaced) go now.
    s.vmms.retain(|d| !d.ended() && d.connection != connection);
    let door = GuestDoor::attach(
        &s.fs,
        connection,
        UnixStream::from(std::os::fd::OwnedFd::from(link)),
        inflight,
        journal,
        draining.clone(),
    )?;
    s.vmms.push(door);
    Ok(())
}

/// All workers of a mount ended (unmounted): commit what is still open.
fn finish(s: &Served) {
    s.fs.shutdown();
    s.status.remove();
    tracing::info!(
        mountpoint = %s.mountpoint.display(),
        inodes = s.ns.inode_count(),
        skipped_keys = s.ns.skipped_keys(),
        "unmounted"
    );
}

/// Upgrade (or stopping for good): stop opening files for writing (a successor gets those
/// requests through RESEND) and stop at a request boundary. For an upgrade open writes are not
/// waited for: their spools carry them.
fn stop(
    served: &mut [Served],
    events: &Receiver<EngineEvent>,
    reply: &Mutex<UnixStream>,
    draining: &AtomicBool,
    wait_for_writes: bool,
) -> anyhow::Result<()> {
    for s in served.iter() {
        s.control.drain();
    }
    draining.store(true, Ordering::Release);
    let open = |served: &[Served]| -> usize {
        served
            .iter()
            .map(|s| s.fs.open_writes() + s.vmms.iter().map(GuestDoor::open_writes).sum::<usize>())
            .sum()
    };
    // For an upgrade, files open for writing are not waited for: their spools carry them to
    // the successor. Stopping for good, they get a while to be closed.
    let deadline = Instant::now() + FINAL_DRAIN_TIMEOUT;
    while wait_for_writes && open(served) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let carried = open(served);
    for s in served.iter() {
        s.control.stop();
        s.vmms.iter().for_each(GuestDoor::stop);
    }
    let mut running: usize = served.iter().map(|s| s.workers - s.ended).sum();
    while running > 0 {
        match events.recv_timeout(Duration::from_secs(30)) {
            Ok(EngineEvent::WorkerEnded { .. }) => running -= 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    tracing::info!(
        open_writes_carried = carried,
        "stopped for an upgrade; files open for writing go on in the successor"
    );
    send(
        reply,
        &ToHolder::Stopped {
            open_writes_dropped: 0,
        },
    )
}

/// The kernel reads ahead 128 KiB on FUSE by default; 1 MiB requests halve the round trips of
/// a sequential reader. Best effort: the knob is per backing device (0:conn) in sysfs.
fn tune_readahead(conn: u32) {
    let path = format!("/sys/class/bdi/0:{conn}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, "1024") {
        tracing::debug!(path, error = %e, "could not raise readahead");
    }
}
