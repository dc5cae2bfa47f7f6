//! The vhost-user backend of one connection: virtqueues in, FUSE requests to the `Server`.
//!
//! virtio-fs queue 0 is the high-priority queue (FORGET, INTERRUPT), queues 1.. carry
//! requests. Each queue gets its own worker thread, so a slow read on one queue does not
//! hold up the others.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::request::handle_chain;

/// Guest memory as the backend sees it (no dirty-page bitmap: no live migration).
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Vring = VringMutex<GuestMemory>;

/// The FUSE server shared by every connection of a share.
pub type SharedServer<F> = Arc<Server<F>>;

/// The backend for one vhost-user connection.
pub struct FsBackend<F: FileSystem + Send + Sync + 'static> {
    server: SharedServer<F>,
    request_queues: usize,
    queue_size: u16,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemory>>,
}

impl<F: FileSystem + Send + Sync + 'static> FsBackend<F> {
    pub fn new(server: SharedServer<F>, request_queues: usize, queue_size: u16) -> Self {
        FsBackend {
            server,
            request_queues: request_queues.max(1),
            queue_size,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
        }
    }

    /// Serves every request the guest has queued on `vring`.
    fn process_queue(&self, vring: &Vring) -> Result<(), String> {
        let mem = self
            .mem
            .read()
            .map_err(|_| "guest memory lock poisoned".to_string())?
            .clone()
            .ok_or("a queue was kicked before the guest memory table arrived")?
            .memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(|e| format!("disabling notifications: {e}"))?;
            }
            loop {
                // Pop in its own statement: the vring lock must be released before add_used.
                let next = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = next else { break };
                let head = chain.head_index();
                let len = handle_chain(&self.server, &*mem, chain);
                if let Err(e) = vring.add_used(head, len) {
                    // A head index the guest made up: nothing to return, go on with the rest.
                    tracing::warn!(head, error = %e, "cannot return a descriptor chain");
                    continue;
                }
                if vring
                    .needs_notification()
                    .map_err(|e| format!("checking notification: {e}"))?
                {
                    vring
                        .signal_used_queue()
                        .map_err(|e| format!("signalling the guest: {e}"))?;
                }
            }
            // With EVENT_IDX, requests queued while notifications were off are served now.
            if !event_idx
                || !vring
                    .enable_notification()
                    .map_err(|e| format!("enabling notifications: {e}"))?
            {
                return Ok(());
            }
        }
    }
}

impl<F: FileSystem + Send + Sync + 'static> VhostUserBackend for FsBackend<F> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        1 + self.request_queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size as usize
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        let mut slot = self
            .mem
            .write()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?;
        *slot = Some(mem);
        Ok(())
    }

    /// One worker thread per queue (bit i of entry i).
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    /// Without an exit event the workers never stop and the daemon hangs on shutdown.
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(thread_index, error = %e, "cannot create a worker exit event");
                None
            }
        }
    }

    /// Never returns an error: vhost-user-backend would silently end this queue's worker,
    /// and every later request on the queue would hang. Problems are logged instead.
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            tracing::warn!(?evset, thread_id, "unexpected event on a virtio-fs queue");
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            tracing::warn!(device_event, thread_id, "event for an unknown queue");
            return Ok(());
        };
        if let Err(e) = self.process_queue(vring) {
            tracing::error!(thread_id, error = %e, "virtio-fs queue error; waiting for the next kick");
        }
        Ok(())
    }
}
