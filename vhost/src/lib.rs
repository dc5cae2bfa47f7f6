//! berth's virtio-fs door: a vhost-user-fs backend generic over the fuse-backend-rs
//! [`FileSystem`] trait.
//!
//! A VMM (QEMU, Cloud Hypervisor, Kata) connects to a unix socket, hands over the guest's
//! memory table and virtqueues, and the guest's virtio-fs driver sends FUSE requests through
//! them. [`Share::serve`] listens on the socket and serves one VMM at a time; when the VMM
//! goes away (VM shut down, VMM restarted) it listens again on the same path, so the next
//! VMM can attach without restarting berth.
//!
//! - [`request`]: one descriptor chain -> one FUSE request -> one reply (untrusted input);
//! - [`backend`]: the vhost-user backend of one connection (queues, workers, events);
//! - [`testing`]: a virtqueue in plain memory for tests and fuzzing without a VMM.

pub mod backend;
pub mod request;
pub mod testing;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use backend::FsBackend;

/// Pause after a failed connection, so that a persistent failure does not spin.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("setting up the vhost-user device: {0}")]
    Device(vhost_user_backend::Error),
}

/// How a share is offered to the VMM.
#[derive(Debug, Clone)]
pub struct ShareConfig {
    /// The vhost-user socket the VMM connects to.
    pub socket: PathBuf,
    /// Request queues offered (the guest uses up to this many; QEMU's `num-request-queues`).
    pub request_queues: usize,
    /// Largest queue size accepted (QEMU's `queue-size`).
    pub queue_size: u16,
}

/// Makes the filesystem one connection is served by (its argument: the connection's number,
/// from 1). Each VMM gets a filesystem of its own, so what one guest opened is its own and
/// goes away with it.
pub type FsFactory<F> = Box<dyn Fn(u64) -> F + Send + Sync>;

/// One filesystem served over one vhost-user socket.
pub struct Share<F: FileSystem + Send + Sync + 'static> {
    new_fs: FsFactory<F>,
    config: ShareConfig,
}

impl<F: FileSystem + Send + Sync + 'static> Share<F> {
    /// A share whose connections are served by `new_fs(connection)`; the filesystem is
    /// dropped when its VMM leaves.
    pub fn new(config: ShareConfig, new_fs: impl Fn(u64) -> F + Send + Sync + 'static) -> Self {
        Share {
            new_fs: Box::new(new_fs),
            config,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    /// Serves VMMs on a socket someone else bound (a process that outlives this one keeps
    /// the socket, so that a replacement can go on accepting on it), until `stop` is set.
    /// The owner wakes a waiting accept by shutting the listener down (see [`wake_listener`]);
    /// a VMM still attached when `stop` is set is served until it leaves.
    pub fn serve_listener(
        &self,
        listener: UnixListener,
        stop: &AtomicBool,
        on_connection_end: impl FnMut(u64),
    ) {
        self.serve_on(Listener::from(listener), stop, on_connection_end)
    }

    fn serve_on(
        &self,
        mut listener: Listener,
        stop: &AtomicBool,
        mut on_connection_end: impl FnMut(u64),
    ) {
        for connection in 1u64.. {
            // A connection that fails to set up (a client that is not a VMM, an accept error)
            // must not end the share: log it and wait for the next one.
            let result = self.serve_one(&mut listener, connection);
            if stop.load(Ordering::Acquire) {
                tracing::info!(socket = %self.config.socket.display(), "share stopped");
                return;
            }
            if let Err(e) = result {
                tracing::error!(connection, error = %e, "vhost-user connection failed");
                std::thread::sleep(RETRY_PAUSE);
            }
            on_connection_end(connection);
        }
    }

    /// Accepts one VMM and serves it until it disconnects. Every connection gets a fresh
    /// backend (guest memory, queue state, worker threads) and a filesystem of its own from
    /// the factory, dropped when the VMM leaves.
    fn serve_one(&self, listener: &mut Listener, connection: u64) -> Result<(), Error> {
        let backend = Arc::new(FsBackend::new(
            Arc::new(Server::new((self.new_fs)(connection))),
            self.config.request_queues,
            self.config.queue_size,
        ));
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(format!("berth-vhost-{connection}"), backend, memory)
            .map_err(Error::Device)?;
        daemon.start(listener).map_err(Error::Device)?;
        tracing::info!(connection, "VMM connected");
        match daemon.wait() {
            Ok(()) => tracing::info!(connection, "VMM disconnected"),
            // Disconnects show up as several error kinds; none of them stops the share.
            Err(e) => tracing::info!(connection, error = %e, "VMM connection ended"),
        }
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        // Dropping the daemon joins the queue workers (they saw the exit event).
        drop(daemon);
        Ok(())
    }
}

/// Wakes a thread blocked accepting on `listener` (the accept fails with EINVAL): used to end
/// [`Share::serve_listener`] after its `stop` flag is set. The listener accepts nothing after.
pub fn wake_listener(listener: &impl AsRawFd) -> std::io::Result<()> {
    // SAFETY: shutdown on a descriptor the caller owns; no memory is involved.
    if unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A filesystem that answers nothing (every operation is the trait's ENOSYS default).
    struct Empty;
    impl FileSystem for Empty {
        type Inode = u64;
        type Handle = u64;
    }

    #[test]
    fn a_stopped_share_leaves_its_accept_and_survives_bad_clients_before() {
        let dir = std::env::temp_dir().join(format!("berth-vhost-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fs.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixListener::bind(&path).unwrap();
        let ours = socket.try_clone().unwrap();
        let share = Share::new(
            ShareConfig {
                socket: path.clone(),
                request_queues: 1,
                queue_size: 64,
            },
            |_| Empty,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (ended_tx, ended_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let flag = stop.clone();
        std::thread::spawn(move || {
            share.serve_listener(socket, &flag, |c| {
                let _ = ended_tx.send(c);
            });
            let _ = done_tx.send(());
        });
        // A client that is not a VMM: it connects and leaves; the share goes on listening.
        drop(UnixStream::connect(&path).unwrap());
        assert_eq!(ended_rx.recv_timeout(Duration::from_secs(10)), Ok(1));
        assert!(
            done_rx.try_recv().is_err(),
            "the share ended on a bad client"
        );
        stop.store(true, Ordering::Release);
        wake_listener(&ours).unwrap();
        assert!(
            done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the share did not stop"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
