//! The VMMs attached to a held mount's virtio-fs shares. The holder binds each share's
//! vhost-user socket and accepts the VMMs itself: each connection gets a front
//! (`berth_vhost::front`) that answers every vhost-user message and records the device, and
//! the engine serving the mount is attached to it through a link socket of its own
//! ([`EngineLink`]). When the engine dies, hangs or is upgraded, only the link goes: the VMM's
//! socket stays open, its messages are still answered, and the next engine is attached to the
//! same front and takes over the queues where the dead one left them (the queues' state is
//! in a region the front owns). The holder never reads a guest request.

use std::os::fd::AsRawFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use berth_vhost::device::{DeviceFds, DeviceState};
use berth_vhost::front::{Front, FrontConfig, RingLink};

use super::detect::HangWatch;
use super::events::Event;
use super::handoff::{self, FromRings, ShareSocket, ToEngine, ToRings};
use crate::fuse::connection_state::ConnectionState;
use crate::sys::sockets::{self, Peers};

/// How long a front waits for the engine to apply a change before taking it for gone.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

/// One VMM attached to a share.
pub struct VmmConnection {
    pub id: u64,
    pub front: Arc<Mutex<Front>>,
    /// Replies to requests that change the store, so a resubmitted one is not applied twice.
    pub journal: ConnectionState,
    /// The engine generation serving its queues (0: none yet).
    pub attached: Mutex<u64>,
    /// Requests waiting and none answered: the engine is hung (see the holder's tick).
    pub hang: Mutex<HangWatch>,
}

/// A share's socket and the VMMs attached to it.
pub struct HeldShare {
    pub spec: ShareSocket,
    listener: UnixListener,
    pub connections: Arc<Mutex<Vec<Arc<VmmConnection>>>>,
    stopped: Arc<AtomicBool>,
}

impl HeldShare {
    /// Binds `spec.socket`, open to root and `spec.group` only: its directory is created, a
    /// stale socket replaced; a live socket, or anything that is not a socket, is refused.
    pub fn bind(spec: ShareSocket) -> anyhow::Result<HeldShare> {
        check(&spec)?;
        let socket = &spec.socket;
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
        }
        let listener = sockets::listen(socket, Peers { group: spec.group })
            .with_context(|| format!("listening on {}", socket.display()))?;
        Ok(HeldShare {
            spec,
            listener,
            connections: Arc::default(),
            stopped: Arc::default(),
        })
    }

    /// Accepts VMMs on a thread of its own: each becomes a connection, reported to the
    /// holder's loop as [`Event::VmmConnected`] (so that the engine is attached to it).
    pub fn accept(&self, mount: usize, events: Sender<Event>) -> anyhow::Result<()> {
        let listener = self.listener.try_clone()?;
        let (spec, connections, stopped) = (
            self.spec.clone(),
            self.connections.clone(),
            self.stopped.clone(),
        );
        std::thread::Builder::new()
            .name("vmm-accept".into())
            .spawn(move || {
                static NEXT: AtomicU64 = AtomicU64::new(1);
                let peers = Peers { group: spec.group };
                for stream in listener.incoming() {
                    if stopped.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    if !peers.allow(stream.as_raw_fd(), "virtio-fs share") {
                        continue;
                    }
                    let id = NEXT.fetch_add(1, Ordering::Relaxed);
                    match connect(&spec, id, stream, mount, &connections, &events) {
                        Ok(()) => tracing::info!(socket = %spec.socket.display(), connection = id, "VMM connected"),
                        Err(e) => tracing::error!(socket = %spec.socket.display(), error = %format!("{e:#}"), "VMM connection not served"),
                    }
                }
            })?;
        Ok(())
    }

    /// Whether [`Self::unlink`] was called.
    pub fn removed(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// VMMs still attached.
    pub fn connections(&self) -> Vec<Arc<VmmConnection>> {
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops accepting VMMs (one attached is served until it leaves) and removes the socket.
    pub fn unlink(&self) {
        self.stopped.store(true, Ordering::Release);
        // SAFETY: shutdown of a listener we own wakes its accept, which then sees `stopped`.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = std::fs::remove_file(&self.spec.socket);
    }
}

/// Sets up a front for a new VMM and serves its messages on a thread until it leaves.
fn connect(
    spec: &ShareSocket,
    id: u64,
    stream: UnixStream,
    mount: usize,
    connections: &Arc<Mutex<Vec<Arc<VmmConnection>>>>,
    events: &Sender<Event>,
) -> anyhow::Result<()> {
    let front = Front::new(FrontConfig {
        request_queues: spec.request_queues,
        queue_size: spec.queue_size,
    })
    .context("setting up the device")?;
    let conn = Arc::new(VmmConnection {
        id,
        front: Arc::new(Mutex::new(front)),
        journal: ConnectionState::create(0).context("creating the reply journal")?,
        attached: Mutex::new(0),
        hang: Mutex::new(HangWatch::new()),
    });
    connections
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(conn.clone());
    let _ = events.send(Event::VmmConnected {
        mount,
        socket: spec.socket.clone(),
        connection: id,
    });
    let connections = connections.clone();
    std::thread::Builder::new()
        .name(format!("vmm-{id}"))
        .spawn(move || {
            let reason = berth_vhost::front::serve(stream, conn.front.clone());
            tracing::info!(connection = id, %reason, "VMM left");
            connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|c| c.id != id);
            // The engine sees its link close and drops what the VMM had open.
            conn.front
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .detach();
        })?;
    Ok(())
}

/// Attaches engine `generation` (on `engine`; mount `mount` there) to connection `conn`,
/// unless it serves it already: a new link socket, handed to the engine with the queues'
/// state region and the journal, and given to the front.
pub fn attach(
    engine: &UnixStream,
    generation: u64,
    mount: usize,
    socket: &Path,
    conn: &VmmConnection,
) -> anyhow::Result<()> {
    let mut attached = conn.attached.lock().unwrap_or_else(|e| e.into_inner());
    if *attached == generation {
        return Ok(());
    }
    let (ours, theirs) = UnixStream::pair().context("creating a link socket")?;
    let mut front = conn.front.lock().unwrap_or_else(|e| e.into_inner());
    // An older link (a dead engine's) goes first.
    front.detach();
    let message = ToEngine::AttachVmm {
        mount,
        socket: socket.to_path_buf(),
        connection: conn.id,
    };
    let fds = [
        theirs.as_raw_fd(),
        front.inflight().file().as_raw_fd(),
        conn.journal.file().as_raw_fd(),
    ];
    handoff::send(engine, &message, &fds).context("handing the VMM to the engine")?;
    drop(theirs);
    ours.set_read_timeout(Some(LINK_TIMEOUT))?;
    front
        .attach(Box::new(EngineLink { sock: ours }))
        .context("the engine did not take the VMM")?;
    *attached = generation;
    conn.hang.lock().unwrap_or_else(|e| e.into_inner()).reset();
    Ok(())
}

/// A front's link to the engine serving its queues.
struct EngineLink {
    sock: UnixStream,
}

impl EngineLink {
    fn ask(&mut self, message: &ToRings, fds: &[std::fs::File]) -> std::io::Result<()> {
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        handoff::send(&self.sock, message, &raw)?;
        match handoff::recv::<FromRings>(&self.sock)? {
            (FromRings::Done, _) => Ok(()),
            (FromRings::Failed(why), _) => Err(std::io::Error::other(why)),
        }
    }
}

impl RingLink for EngineLink {
    fn update(&mut self, state: &DeviceState, fds: &DeviceFds) -> std::io::Result<()> {
        let files = fds.to_list(state)?;
        self.ask(&ToRings::Update(state.clone()), &files)
    }

    fn stop(&mut self, index: usize) -> std::io::Result<()> {
        self.ask(&ToRings::Stop { queue: index }, &[])
    }
}

fn check(spec: &ShareSocket) -> anyhow::Result<()> {
    if !spec.socket.is_absolute() || spec.socket.file_name().is_none() {
        bail!(
            "the share socket {} must be an absolute path to a file",
            spec.socket.display()
        );
    }
    spec.check_settings()
}

/// Index of the share on `socket`, if any (removed ones do not count).
pub fn find(shares: &[HeldShare], socket: &Path) -> Option<usize> {
    shares
        .iter()
        .position(|s| !s.removed() && s.spec.socket == socket)
}

/// The sockets of `shares` (for status and logs).
pub fn sockets(shares: &[HeldShare]) -> Vec<PathBuf> {
    shares.iter().map(|s| s.spec.socket.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(socket: PathBuf) -> ShareSocket {
        ShareSocket {
            socket,
            request_queues: 1,
            queue_size: 1024,
            group: None,
        }
    }

    #[test]
    fn binding_replaces_stale_sockets_and_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a/fs.sock");
        let first = HeldShare::bind(spec(sock.clone())).unwrap();
        drop(first);
        // The file of a dead listener is still there: it is replaced.
        let second = HeldShare::bind(spec(sock.clone())).unwrap();
        second.unlink();
        assert!(!sock.exists());
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"keep me").unwrap();
        let err = HeldShare::bind(spec(plain.clone())).err().unwrap();
        assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
        assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
    }

    #[test]
    fn bad_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path().join("fs.sock"));
        s.request_queues = 0;
        assert!(HeldShare::bind(s.clone()).is_err());
        s.request_queues = 64;
        assert!(HeldShare::bind(s.clone()).is_err());
        s.request_queues = 2;
        s.queue_size = 1000;
        assert!(HeldShare::bind(s.clone()).is_err());
        assert!(HeldShare::bind(spec(PathBuf::from("relative.sock"))).is_err());
    }
}
