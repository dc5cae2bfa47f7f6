//! berth's virtio-fs door: a vhost-user-fs device generic over the fuse-backend-rs
//! `FileSystem` trait, split in two so that the part that reads guest requests can die.
//!
//! A VMM (QEMU, Cloud Hypervisor, Kata) connects to a unix socket, hands over the guest's
//! memory table and virtqueues, and the guest's virtio-fs driver sends FUSE requests through
//! them. The connection is answered by a [`front::Front`] in a long-lived process (berth's
//! holder); the queues are served by [`rings::Rings`] in a replaceable one (an engine). The
//! queues' state lives in an [`inflight::Inflight`] region the front owns, so a successor
//! ring server takes over where a dead one stopped, and the VMM never notices.
//!
//! - [`request`]: one descriptor chain -> one FUSE request -> one reply (untrusted input);
//! - [`front`]: every vhost-user message, the device's record ([`device`]) and its link to the
//!   ring server;
//! - [`inflight`]: which requests each queue took and answered, in shared memory;
//! - [`rings`]: the queues' workers, recovery of a dead server's requests, resubmission;
//! - [`testing`]: a virtqueue in plain memory for tests and fuzzing without a VMM.

pub mod device;
pub mod front;
pub mod inflight;
pub mod request;
pub mod rings;
pub mod testing;
