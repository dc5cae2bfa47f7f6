//! The virtio-fs door inside an engine: FUSE requests arrive in virtqueues from a guest's
//! virtio-fs driver instead of /dev/fuse, and are served by a door of the same
//! [`BerthFs`](crate::fs::BerthFs) as the FUSE mount (same inode numbers, same caches).
//!
//! The engine never talks to the VMM. The holder keeps each VMM's vhost-user connection and
//! a front that records the device (`crate::heal::vmm`); it attaches the engine to it with a
//! link socket, and a [`GuestDoor`] serves the queues from what the link says
//! (`berth_vhost::rings`). When this engine dies, the next one is attached to the same front
//! and takes the queues over: the queues' state and the reply journal are in memory the
//! holder owns, and the guest's handle numbers name their door and kind, so the successor's
//! door (same tag) takes its open files over.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use berth_vhost::device::DeviceFds;
use berth_vhost::inflight::Inflight;
use berth_vhost::rings::{Hooks, Rings};
use fuse_backend_rs::abi::fuse_abi::InHeader;
use fuse_backend_rs::api::server::Server;

use crate::fs::BerthFs;
use crate::fuse::connection_state::ConnectionState;
use crate::fuse::protocol;
use crate::heal::handoff::{self, FromRings, ToRings};

#[cfg(test)]
mod hostile_tests;

/// The door tag of virtio-fs connection `connection` (1..=255, cycling). A connection keeps
/// its number for its life, so every engine gives it the same tag.
pub fn door_tag(connection: u64) -> u8 {
    ((connection.saturating_sub(1) % 255) + 1) as u8
}

/// What the rings need from the engine for requests that change the store: the reply journal
/// of the connection (in memory the holder owns), and whether the engine is draining.
struct Journal {
    state: ConnectionState,
    draining: Arc<AtomicBool>,
}

impl Hooks for Journal {
    fn journaled(&self, opcode: u32) -> bool {
        protocol::is_non_idempotent(opcode)
    }

    fn journal(&self, unique: u64, reply: &[u8]) {
        self.state.journal_reply(unique, reply);
    }

    fn replay(&self, unique: u64) -> Option<Vec<u8>> {
        self.state.journaled_reply(unique)
    }

    fn defer(&self, _header: &InHeader, prefix: &[u8]) -> bool {
        self.draining.load(Ordering::Acquire)
            && protocol::InHeader::parse(prefix)
                .is_some_and(|h| protocol::opens_for_write(&h, prefix))
    }
}

/// One VMM connection served by this engine.
pub struct GuestDoor {
    pub connection: u64,
    fs: Arc<BerthFs>,
    rings: Arc<Mutex<Rings<Arc<BerthFs>>>>,
    ended: Arc<AtomicBool>,
    /// This engine is stopping: the front's updates are acknowledged but not served (the
    /// successor is handed the same device).
    stopped: Arc<AtomicBool>,
}

impl GuestDoor {
    /// Serves connection `connection` of a share of `fs`'s volume: `link` carries the front's
    /// device updates, `inflight` is the queues' state region, `journal` the reply journal.
    /// Requests that open a file for writing are left to the successor once `draining` is set.
    pub fn attach(
        fs: &BerthFs,
        connection: u64,
        link: UnixStream,
        inflight: File,
        journal: File,
        draining: Arc<AtomicBool>,
    ) -> anyhow::Result<GuestDoor> {
        let inflight =
            Arc::new(Inflight::open(inflight).context("mapping the virtqueue state region")?);
        let journal = Journal {
            state: ConnectionState::open(journal).context("mapping the reply journal")?,
            draining,
        };
        let door = Arc::new(fs.door(door_tag(connection)));
        // A successor takes over what the guest was writing through this connection.
        door.adopt_writes();
        let rings = Arc::new(Mutex::new(Rings::new(
            Arc::new(Server::new(door.clone())),
            inflight,
            Arc::new(journal),
        )));
        let ended = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(AtomicBool::new(false));
        let (r, e, st) = (rings.clone(), ended.clone(), stopped.clone());
        std::thread::Builder::new()
            .name(format!("vmm-link-{connection}"))
            .spawn(move || serve_link(connection, link, &r, &e, &st))
            .context("starting the VMM link thread")?;
        tracing::info!(connection, "serving a VMM's virtqueues");
        Ok(GuestDoor {
            connection,
            fs: door,
            rings,
            ended,
            stopped,
        })
    }

    /// Files the guest has open for writing (an upgrade waits for them to close).
    pub fn open_writes(&self) -> usize {
        self.fs.open_writes()
    }

    /// The front detached this engine (the VMM left, or a newer link replaced this one).
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Stops every queue after the request it serves (this engine is stopping).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.rings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop_all();
    }
}

/// Applies the front's messages until the link closes, then stops the queues. The door (and
/// what the guest opened through it) goes with the last reference.
fn serve_link(
    connection: u64,
    link: UnixStream,
    rings: &Mutex<Rings<Arc<BerthFs>>>,
    ended: &AtomicBool,
    stopped: &AtomicBool,
) {
    loop {
        let (message, files) = match handoff::recv::<ToRings>(&link) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(connection, reason = %e, "VMM link closed; its queues stop here");
                break;
            }
        };
        let mut rings = rings.lock().unwrap_or_else(|e| e.into_inner());
        let result = match message {
            _ if stopped.load(Ordering::Acquire) => Ok(()),
            ToRings::Update(state) => {
                DeviceFds::from_list(&state, files).and_then(|fds| rings.update(&state, &fds))
            }
            ToRings::Stop { queue } => {
                rings.stop(queue);
                Ok(())
            }
        };
        drop(rings);
        let answer = match result {
            Ok(()) => FromRings::Done,
            Err(e) => {
                tracing::warn!(connection, error = %e, "could not serve the device as the VMM set it up");
                FromRings::Failed(e.to_string())
            }
        };
        if handoff::send(&link, &answer, &[]).is_err() {
            break;
        }
    }
    rings.lock().unwrap_or_else(|e| e.into_inner()).stop_all();
    ended.store(true, Ordering::Release);
}
