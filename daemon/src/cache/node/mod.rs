//! The node cache shared by every mount process of a node.
//!
//! `berth daemon --cache-dir DIR` opens the disk tier once: it holds the directory lock and the
//! index (which block lives in which slot, the CLOCK hand, the one quota) and serves that index
//! on a unix socket ([`CacheServer`]). Each mount process is a client ([`CacheClient`]): it asks
//! where blocks are, reserves slots for new blocks and commits them, and reads and writes the
//! data file itself with its own I/O engine, so block bytes never cross the socket and a slow
//! client never holds up another one's reads.
//!
//! Why this is safe across processes:
//! - A slot can be evicted and reused by another process between a client's lookup and its read.
//!   The per-chunk CRCs of the entry it looked up then fail, and the block is fetched again: the
//!   same check that catches a torn write or a corrupt disk.
//! - A reserved slot belongs to its reservation (a token) until committed or given back; it is
//!   neither evicted nor handed out twice. A client whose connection drops loses its
//!   reservations, and a commit with a token the server no longer knows is refused.
//! - A mount process remembers where blocks are and reads them without asking again, guarded
//!   by slot generations in a file every process maps ([`super::generations`]); the blocks it
//!   read that way are reported to the daemon in batches, so that CLOCK sees them used.
//! - When the daemon is away (restarting), lookups miss and new blocks are not cached: reads go
//!   to the store and never fail because of the cache. Clients reconnect on their own and check
//!   that the daemon still serves the same data file with the same block size.

mod client;
mod server;
#[cfg(test)]
mod tests;
mod wire;

pub use client::{CacheClient, Reservation};
pub use server::CacheServer;
pub use wire::Greeting;

use super::stats::Summary;

/// What the daemon reports of its node cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerStats {
    pub disk: Summary,
    pub block_size: u64,
    /// Client connections open now (a mount process keeps a few).
    pub connections: u64,
}
