//! A mount process's side of the node cache: it asks the daemon where blocks are, reserves
//! slots for new blocks and commits them, remembers locations (guarded by slot generations),
//! and keeps going without the cache while the daemon is away.

use std::collections::HashMap;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use super::wire::{body_len, invalid, parse, read_frame, write_frame, Greeting, Reply, Request};
use crate::cache::generations::Generations;
use crate::cache::index::{BlockKey, SlotEntry};
use crate::cache::lock;
use crate::cache::stats::Summary;

/// After a failed connection, calls fail at once for this long (no connect storm per read).
pub(super) const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Idle connections a client keeps for later calls.
const MAX_IDLE: usize = 16;
/// Block locations a client remembers (then it forgets them all and asks again).
const MAX_KNOWN: usize = 1 << 16;
/// Blocks read from remembered locations before the client tells the daemon they were used.
const TOUCH_BATCH: usize = 256;

/// A slot reserved for a new block, with the connection that reserved it: the server gives
/// the slot back if that connection closes before the commit.
pub struct Reservation {
    pub slot: u32,
    token: u64,
    generation: u64,
    stream: UnixStream,
}

/// A mount process's side: asks the daemon's [`CacheServer`] about slots.
pub struct CacheClient {
    socket: PathBuf,
    greeting: Greeting,
    idle: Mutex<Vec<UnixStream>>,
    /// Set after a failure: calls fail at once until then.
    retry_at: Mutex<Option<Instant>>,
    up: AtomicBool,
    summary: Mutex<Summary>,
    /// The daemon's slot generations; without them every lookup asks the daemon.
    generations: Option<Generations>,
    /// Where blocks were, as of a generation of their slot.
    known: Mutex<HashMap<BlockKey, SlotEntry>>,
    /// Blocks read from `known` that the daemon has not heard of yet.
    touched: Mutex<Vec<String>>,
}

fn unavailable(socket: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        format!("node cache at {} is unavailable", socket.display()),
    )
}

impl CacheClient {
    /// Connects to the server at `socket` (waiting up to `wait` for it to appear) and learns
    /// which data file to use.
    pub fn connect(socket: &Path, wait: Duration) -> io::Result<CacheClient> {
        let deadline = Instant::now() + wait;
        let greeting = loop {
            match Self::greeting_blocking(socket) {
                Ok(greeting) => break greeting,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("node cache at {}: {e}", socket.display()),
                    ))
                }
            }
        };
        let summary = Summary {
            slots: greeting.data_len / greeting.block_size.max(1),
            ..Summary::default()
        };
        let generations = match Generations::open_for_client(
            &greeting.generations,
            summary.slots as usize,
        ) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!(error = %e, "node cache generations unusable; every cache lookup asks the daemon");
                None
            }
        };
        Ok(CacheClient {
            socket: socket.to_path_buf(),
            greeting,
            idle: Mutex::default(),
            retry_at: Mutex::default(),
            up: AtomicBool::new(true),
            summary: Mutex::new(summary),
            generations,
            known: Mutex::default(),
            touched: Mutex::default(),
        })
    }

    fn greeting_blocking(socket: &Path) -> io::Result<Greeting> {
        let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut header = [0u8; 4];
        stream.read_exact(&mut header)?;
        let mut body = vec![0u8; body_len(header)?];
        stream.read_exact(&mut body)?;
        match parse(&body)? {
            Reply::Greeting(greeting) => Ok(greeting),
            other => Err(invalid(format!("expected a greeting, got {other:?}"))),
        }
    }

    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Blocks, slots and evictions of the whole node cache, as of the last reply that said.
    pub fn summary(&self) -> Summary {
        *lock(&self.summary)
    }

    async fn open_conn(&self) -> io::Result<UnixStream> {
        let mut stream = UnixStream::connect(&self.socket).await?;
        let Reply::Greeting(greeting) = read_frame(&mut stream).await? else {
            return Err(invalid("node cache did not greet"));
        };
        if greeting != self.greeting {
            return Err(invalid(format!(
                "node cache at {} now serves another data file or block size ({} of {} bytes, \
                 was {} of {}); restart this mount to use it",
                self.socket.display(),
                greeting.data.display(),
                greeting.block_size,
                self.greeting.data.display(),
                self.greeting.block_size
            )));
        }
        Ok(stream)
    }

    async fn exchange(stream: &mut UnixStream, request: &Request) -> io::Result<Reply> {
        write_frame(stream, request).await?;
        read_frame(stream).await
    }

    /// One request and its reply. A kept connection that fails (the daemon restarted) is
    /// retried once on a fresh one; a fresh one that fails marks the server down for a while.
    async fn call(&self, request: &Request) -> io::Result<Reply> {
        let (stream, reply) = self.call_holding(request).await?;
        self.keep(stream);
        Ok(reply)
    }

    /// [`Self::call`], handing back the connection: a reservation lives exactly as long as the
    /// connection that made it, so the caller keeps it until the commit.
    async fn call_holding(&self, request: &Request) -> io::Result<(UnixStream, Reply)> {
        if lock(&self.retry_at).is_some_and(|t| Instant::now() < t) {
            return Err(unavailable(&self.socket));
        }
        let kept = lock(&self.idle).pop();
        if let Some(mut stream) = kept {
            if let Ok(reply) = Self::exchange(&mut stream, request).await {
                return Ok((stream, reply));
            }
            lock(&self.idle).clear();
        }
        let result = match self.open_conn().await {
            Ok(mut stream) => Self::exchange(&mut stream, request)
                .await
                .map(|reply| (stream, reply)),
            Err(e) => Err(e),
        };
        match result {
            Ok(done) => {
                *lock(&self.retry_at) = None;
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(socket = %self.socket.display(), "node cache reachable again");
                }
                Ok(done)
            }
            Err(e) => {
                *lock(&self.retry_at) = Some(Instant::now() + RETRY_AFTER);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        socket = %self.socket.display(),
                        error = %e,
                        "node cache unreachable: blocks are read from the store and not cached until it is back"
                    );
                }
                Err(e)
            }
        }
    }

    fn keep(&self, stream: UnixStream) {
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(stream);
        }
    }

    /// Keeps the newest summary the server sent.
    fn note(&self, summary: Summary) {
        let mut kept = lock(&self.summary);
        if summary.as_of >= kept.as_of {
            *kept = summary;
        }
    }

    /// Whether `entry`'s slot has certainly not changed hands since the entry was made.
    fn current(&self, entry: &SlotEntry) -> bool {
        self.generations
            .as_ref()
            .is_some_and(|g| g.get(entry.slot) == Some(entry.generation))
    }

    /// After a read of `entry`'s slot: false if the slot changed hands (without generations
    /// there is no telling, and the CRCs are the only check).
    pub fn unchanged(&self, entry: &SlotEntry) -> bool {
        self.generations.is_none() || self.current(entry)
    }

    fn remember(&self, key: &BlockKey, entry: &SlotEntry) {
        let mut known = lock(&self.known);
        if known.len() >= MAX_KNOWN {
            known.clear();
        }
        known.insert(key.clone(), entry.clone());
    }

    /// Where each of `keys` is cached (`None`: not cached, or the server is unavailable).
    /// Remembered locations whose slot has not changed hands are answered without the daemon.
    pub async fn lookup(&self, keys: &[&BlockKey]) -> Vec<Option<SlotEntry>> {
        let mut out: Vec<Option<SlotEntry>> = vec![None; keys.len()];
        let mut ask = Vec::new();
        {
            let known = lock(&self.known);
            let mut touched = lock(&self.touched);
            for (i, key) in keys.iter().enumerate() {
                match known.get(*key) {
                    Some(entry) if self.current(entry) => {
                        touched.push(key.to_string());
                        out[i] = Some(entry.clone());
                    }
                    _ => ask.push(i),
                }
            }
            if ask.is_empty() && touched.len() < TOUCH_BATCH {
                return out;
            }
        }
        let touched = std::mem::take(&mut *lock(&self.touched));
        let request = Request::Lookup {
            keys: ask.iter().map(|&i| keys[i].to_string()).collect(),
            touched,
        };
        if let Ok(Reply::Entries(entries)) = self.call(&request).await {
            if entries.len() == ask.len() {
                for (i, entry) in ask.into_iter().zip(entries) {
                    let entry = entry.map(SlotEntry::from);
                    if let Some(e) = &entry {
                        self.remember(keys[i], e);
                    }
                    out[i] = entry;
                }
            }
        }
        out
    }

    /// A slot for a new block of `key`; `None` if it is cached already, nothing is free, or
    /// the server is unavailable.
    pub async fn reserve(&self, key: &BlockKey) -> Option<Reservation> {
        let request = Request::Reserve {
            key: key.to_string(),
        };
        let (stream, reply) = self.call_holding(&request).await.ok()?;
        match reply {
            Reply::Reserved {
                reservation: Some((slot, token, generation)),
                summary,
            } => {
                self.note(summary);
                Some(Reservation {
                    slot,
                    token,
                    generation,
                    stream,
                })
            }
            Reply::Reserved { summary, .. } => {
                self.note(summary);
                self.keep(stream);
                None
            }
            _ => None,
        }
    }

    /// Records `entry` (written to the reservation's slot) as `key`'s block.
    pub async fn commit(
        &self,
        key: &BlockKey,
        entry: SlotEntry,
        reservation: Reservation,
    ) -> io::Result<()> {
        let Reservation {
            token,
            generation,
            mut stream,
            ..
        } = reservation;
        let entry = SlotEntry {
            generation,
            ..entry
        };
        let request = Request::Commit {
            key: key.to_string(),
            entry: entry.clone().into(),
            token,
        };
        let reply = Self::exchange(&mut stream, &request).await?;
        self.keep(stream);
        match reply {
            Reply::Committed { summary } => {
                self.note(summary);
                self.remember(key, &entry);
                Ok(())
            }
            Reply::Failed(why) => Err(io::Error::other(why)),
            other => Err(invalid(format!("unexpected reply {other:?}"))),
        }
    }

    /// Gives a reserved slot back (its write failed).
    pub async fn abandon(&self, reservation: Reservation) {
        let Reservation {
            slot,
            token,
            mut stream,
            ..
        } = reservation;
        if Self::exchange(&mut stream, &Request::Abandon { slot, token })
            .await
            .is_ok()
        {
            self.keep(stream);
        }
    }

    pub async fn remove(&self, key: &BlockKey, slot: u32) {
        lock(&self.known).remove(key);
        let request = Request::Remove {
            key: key.to_string(),
            slot,
        };
        let _ = self.call(&request).await;
    }
}
