//! berth: object storage as a filesystem on every Kubernetes node.
//!
//! The engine core, bottom up (each layer takes its own config and imports only below it):
//! - [`store`]: object stores behind one trait (S3, local directory) with retries;
//! - [`namespace`]: keys seen as directories and files, inode table, listings;
//! - [`cache`]: the node-wide block cache (memory + disk, io_uring), local or the daemon's;
//! - [`prefetch`] and [`upload`]: reads and writes of object data, under one [`memory`] budget;
//! - [`fs`]: the FileSystem both doors serve;
//! - [`volume`]: one source made into a namespace + filesystem, from a [`volume::VolumeConfig`].
//!
//! The doors and the processes around them:
//! - [`fuse`]: the /dev/fuse door (mount, queues, workers, the per-connection shared state);
//! - [`virtiofs`]: the virtio-fs door inside an engine (over the `berth-vhost` crate);
//! - [`engine`]: the replaceable process that serves both doors for a holder;
//! - [`heal`]: the holder (`berth mount`) that keeps connections alive and replaces engines;
//! - [`sandbox`]: capabilities, no_new_privs and seccomp for the processes that parse guest
//!   input (engines, `berth share`);
//! - [`share`]: `berth share`; [`warm`]: `berth warm`; [`status`]: `berth status` and the
//!   status files; [`unmount`]: `berth unmount`;
//! - [`api`]: `berth daemon`, the node daemon (gRPC API, volumes, metrics);
//! - [`cli`]: the command line, turned into the configs above at the edge.
//!
//! Shared ground: [`state`] (the `--state-dir` layout), [`sys`] (mount table, atomic files),
//! [`units`] (sizes, durations).

pub mod api;
pub mod cache;
pub mod cli;
pub mod engine;
pub mod fs;
pub mod fuse;
pub mod heal;
pub mod memory;
pub mod namespace;
pub mod prefetch;
pub mod sandbox;
pub mod share;
pub mod state;
pub mod status;
pub mod store;
pub mod sys;
pub mod units;
pub mod unmount;
pub mod upload;
pub mod virtiofs;
pub mod volume;
pub mod warm;
