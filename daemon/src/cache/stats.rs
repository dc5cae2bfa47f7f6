//! What the block cache counts: per-tier hits and bytes, misses, failures, and the disk
//! tier's blocks, slots and evictions ([`Summary`], which the node cache sends its clients).

use std::sync::atomic::AtomicU64;

use super::index::Index;

/// Counters, all monotonic.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) memory_hits: AtomicU64,
    pub(super) disk_hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) bytes_from_memory: AtomicU64,
    pub(super) bytes_from_disk: AtomicU64,
    pub(super) bytes_from_store: AtomicU64,
    pub(super) checksum_failures: AtomicU64,
    pub(super) write_errors: AtomicU64,
    pub(super) writes_skipped: AtomicU64,
    pub(super) coalesced: AtomicU64,
}

/// A snapshot of the cache's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub engine: String,
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub bytes_from_memory: u64,
    pub bytes_from_disk: u64,
    pub bytes_from_store: u64,
    pub checksum_failures: u64,
    pub write_errors: u64,
    pub writes_skipped: u64,
    pub coalesced: u64,
    pub evictions: u64,
    pub disk_blocks: u64,
    pub disk_slots: u64,
    pub memory_bytes: u64,
}

/// Blocks, slots and evictions of a disk tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub blocks: u64,
    pub slots: u64,
    pub evictions: u64,
    /// Orders summaries of the node cache: replies to concurrent calls arrive in any order.
    #[serde(default)]
    pub as_of: u64,
}

impl Summary {
    pub(super) fn of(index: &Index) -> Summary {
        Summary {
            blocks: index.len() as u64,
            slots: index.slots() as u64,
            evictions: index.evictions,
            as_of: 0,
        }
    }
}
