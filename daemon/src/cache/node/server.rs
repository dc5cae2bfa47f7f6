//! The daemon's side of the node cache: it holds the directory lock and the one index (which
//! block lives in which slot, the CLOCK hand, the quota) and answers mount processes.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

use super::wire::{read_frame, write_frame, Greeting, Reply, Request, WireEntry};
use super::ServerStats;
use crate::cache::disk::Disk;
use crate::cache::generations::Generations;
use crate::cache::index::{BlockKey, Index};
use crate::cache::lock;
use crate::cache::stats::Summary;
use crate::sys::sockets::Peers;
use std::os::fd::AsRawFd as _;

/// The daemon's side: the one index of the node cache, served to mount processes.
pub struct CacheServer {
    greeting: Greeting,
    index: Mutex<Index>,
    generations: Generations,
    /// slot -> (token, connection) of reservations not yet committed or given back.
    pending: Mutex<HashMap<u32, (u64, u64)>>,
    next_id: AtomicU64,
    clients: AtomicU64,
    _lock: std::fs::File,
}

impl CacheServer {
    /// Opens the disk tier in `dir` (`size` bytes of `block_size` slots) for the whole node.
    pub fn open(dir: &Path, size: u64, block_size: u64) -> io::Result<Arc<CacheServer>> {
        let disk = Disk::open(dir, size, block_size)?;
        drop(crate::cache::io::open_data_file(&disk.data, disk.data_len)?);
        let meta = std::fs::metadata(&disk.data)?;
        let generations_path = dir.join("generations");
        let generations = Generations::open_for_server(&generations_path, disk.index.slots())?;
        tracing::info!(
            dir = %dir.display(),
            slots = disk.index.slots(),
            block_size,
            blocks = disk.index.len(),
            replayed = disk.replayed,
            "node cache ready"
        );
        Ok(Arc::new(CacheServer {
            greeting: Greeting {
                data: disk.data,
                data_len: disk.data_len,
                block_size,
                generations: generations_path,
                dev: meta.dev(),
                ino: meta.ino(),
            },
            index: Mutex::new(disk.index),
            generations,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            clients: AtomicU64::new(0),
            _lock: disk.lock,
        }))
    }

    pub fn block_size(&self) -> u64 {
        self.greeting.block_size
    }

    /// The index's summary, stamped so that a client keeps the newest (called under the
    /// index lock, which orders the stamps).
    fn summary_of(&self, index: &Index) -> Summary {
        Summary {
            as_of: self.next_id.fetch_add(1, Ordering::Relaxed),
            ..Summary::of(index)
        }
    }

    /// The node cache as a whole (the daemon's Stats and metrics).
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            disk: Summary::of(&lock(&self.index)),
            block_size: self.greeting.block_size,
            connections: self.clients.load(Ordering::Relaxed),
        }
    }

    /// Serves clients on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if Peers::ROOT.allow(stream.as_raw_fd(), "node cache") {
                        tokio::spawn(self.clone().converse(stream));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "node cache: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn converse(self: Arc<Self>, mut stream: UnixStream) {
        let conn = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.clients.fetch_add(1, Ordering::Relaxed);
        let result = async {
            write_frame(&mut stream, &Reply::Greeting(self.greeting.clone())).await?;
            loop {
                let request: Request = match read_frame(&mut stream).await {
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return io::Result::Ok(()),
                    other => other?,
                };
                let reply = self.answer(conn, request);
                write_frame(&mut stream, &reply).await?;
            }
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(conn, error = %e, "node cache client dropped");
        }
        self.forget(conn);
        self.clients.fetch_sub(1, Ordering::Relaxed);
    }

    /// Gives back every slot a closed connection reserved and never committed.
    pub(super) fn forget(&self, conn: u64) {
        let mut pending = lock(&self.pending);
        let orphans: Vec<u32> = pending
            .iter()
            .filter(|(_, (_, c))| *c == conn)
            .map(|(slot, _)| *slot)
            .collect();
        let mut index = lock(&self.index);
        for slot in orphans {
            pending.remove(&slot);
            index.abandon(slot);
        }
    }

    pub(super) fn answer(&self, conn: u64, request: Request) -> Reply {
        match request {
            Request::Lookup { keys, touched } => {
                let mut index = lock(&self.index);
                for key in &touched {
                    index.lookup(key);
                }
                Reply::Entries(
                    keys.iter()
                        .map(|k| {
                            let mut entry = index.lookup(k)?;
                            entry.generation = self.generations.get(entry.slot)?;
                            Some(WireEntry::from(entry))
                        })
                        .collect(),
                )
            }
            Request::Reserve { key } => {
                let mut pending = lock(&self.pending);
                let mut index = lock(&self.index);
                let reservation = index.reserve(&key).map(|slot| {
                    let token = self.next_id.fetch_add(1, Ordering::Relaxed);
                    pending.insert(slot, (token, conn));
                    // Before anyone may write it: remembered locations of the slot go stale.
                    (slot, token, self.generations.bump(slot))
                });
                Reply::Reserved {
                    reservation,
                    summary: self.summary_of(&index),
                }
            }
            Request::Commit { key, entry, token } => {
                if !self.take_reservation(entry.slot, token) {
                    return Reply::Failed(format!(
                        "slot {} is not reserved by this token (the reservation was lost)",
                        entry.slot
                    ));
                }
                let mut index = lock(&self.index);
                if entry.slot as usize >= index.slots() {
                    return Reply::Failed(format!("slot {} out of range", entry.slot));
                }
                match index.commit(BlockKey::from(key), entry.into()) {
                    Ok(()) => Reply::Committed {
                        summary: self.summary_of(&index),
                    },
                    Err(e) => Reply::Failed(format!("writing the cache index: {e}")),
                }
            }
            Request::Abandon { slot, token } => {
                if self.take_reservation(slot, token) {
                    lock(&self.index).abandon(slot);
                }
                Reply::Done
            }
            Request::Remove { key, slot } => {
                if lock(&self.index).remove(&key, slot) {
                    self.generations.bump(slot);
                }
                Reply::Done
            }
        }
    }

    fn take_reservation(&self, slot: u32, token: u64) -> bool {
        let mut pending = lock(&self.pending);
        if pending.get(&slot).is_some_and(|(t, _)| *t == token) {
            pending.remove(&slot);
            return true;
        }
        false
    }
}
