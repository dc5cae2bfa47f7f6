//! The virtio-fs door: FUSE requests arrive in virtqueues from a guest's virtio-fs driver
//! (crate `berth-vhost`) instead of /dev/fuse, and are served by the same
//! [`BerthFs`](crate::fs::BerthFs) as the FUSE door.
//!
//! [`EngineShare`] is the door inside a mount's engine: the holder binds and keeps the
//! vhost-user socket, and the engine that serves the FUSE mount serves VMMs on it too, with the
//! same inode numbers and block cache. `berth share` (crate::share) serves a standalone share.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use berth_vhost::{Share, ShareConfig};

use crate::fs::BerthFs;
use crate::heal::handoff::ShareSocket;

#[cfg(test)]
mod hostile_tests;

/// A share served by an engine on a socket its holder bound and keeps.
pub struct EngineShare {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    /// A copy of the listener, to wake the serving thread's accept when stopping.
    waker: UnixListener,
}

/// The door tag of virtio-fs connection `connection` (1..=255, cycling).
pub fn door_tag(connection: u64) -> u8 {
    ((connection.saturating_sub(1) % 255) + 1) as u8
}

impl EngineShare {
    /// Serves `fs` to VMMs connecting on `listener`, on a thread of its own.
    pub fn start(
        fs: Arc<BerthFs>,
        spec: &ShareSocket,
        listener: UnixListener,
    ) -> anyhow::Result<EngineShare> {
        let waker = listener.try_clone().context("copying the share listener")?;
        let stop = Arc::new(AtomicBool::new(false));
        let share = Share::new(
            ShareConfig {
                socket: spec.socket.clone(),
                request_queues: spec.request_queues,
                queue_size: spec.queue_size,
            },
            move |connection| fs.door(door_tag(connection)),
        );
        let flag = stop.clone();
        let socket = spec.socket.clone();
        std::thread::Builder::new()
            .name("vhost-listener".into())
            .spawn(move || {
                share.serve_listener(listener, &flag, |connection| {
                    tracing::info!(connection, socket = %socket.display(), "VMM left; listening for the next one")
                })
            })
            .context("starting the vhost-user listener")?;
        tracing::info!(socket = %spec.socket.display(), request_queues = spec.request_queues, "serving a virtio-fs share");
        Ok(EngineShare {
            socket: spec.socket.clone(),
            stop,
            waker,
        })
    }

    /// Stops accepting VMMs; one still attached is served until it leaves.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = berth_vhost::wake_listener(&self.waker) {
            tracing::warn!(socket = %self.socket.display(), error = %e, "could not wake the share's listener");
        }
    }
}
