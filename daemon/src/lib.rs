//! berth: object storage as a filesystem on every Kubernetes node.
//!
//! Data flows store -> namespace -> fs -> door:
//! - [`store`]: object stores behind one trait (S3, local directory) with retries;
//! - [`namespace`]: keys seen as directories and files, inode table, listings;
//! - [`cache`]: the node-wide block cache (memory + disk, io_uring);
//! - [`prefetch`] and [`upload`]: reads and writes of object data, under one [`memory`] budget;
//! - [`fs`]: the FileSystem both doors serve;
//! - [`fuse`]: the /dev/fuse door (mount, queues, workers, unmount);
//! - [`heal`]: the holder that keeps connections alive, and engine replacement;
//! - [`engine`]: the replaceable process that serves requests;
//! - [`share`]: the virtio-fs door (`berth share`, over the `berth-vhost` crate);
//! - [`mount`], [`warm`] and [`cli`]: the `berth` command; [`client`]: the same commands through
//!   a running `berth daemon` (`berth --socket PATH ...`); [`unmount`]: `berth unmount`.

pub mod api;
pub mod cache;
pub mod cli;
pub mod client;
pub mod engine;
pub mod fs;
pub mod fuse;
pub mod heal;
pub mod memory;
pub mod mount;
pub mod namespace;
pub mod prefetch;
pub mod share;
pub mod status;
pub mod store;
pub mod units;
pub mod unmount;
pub mod upload;
pub mod warm;
