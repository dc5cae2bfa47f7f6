//! Where the disk tier's index is: in this process ([`Slots::Local`]), or the node daemon's,
//! reached through a [`node::CacheClient`] ([`Slots::Node`]). The block cache asks one and the
//! same set of questions of either.

use std::sync::Mutex;

use super::index::{BlockKey, Index, SlotEntry};
use super::stats::Summary;
use super::{lock, node};

/// A slot reserved for a new block.
pub(super) enum Reserved {
    Local(u32),
    Node(node::Reservation),
}

impl Reserved {
    pub(super) fn slot(&self) -> u32 {
        match self {
            Reserved::Local(slot) => *slot,
            Reserved::Node(r) => r.slot,
        }
    }
}

/// The disk tier's index: in this process, or the node daemon's.
pub(super) enum Slots {
    Local(Mutex<Index>),
    Node(node::CacheClient),
}

impl Slots {
    pub(super) async fn lookup(&self, keys: &[&BlockKey]) -> Vec<Option<SlotEntry>> {
        match self {
            Slots::Local(index) => {
                let mut index = lock(index);
                keys.iter().map(|k| index.lookup(k)).collect()
            }
            Slots::Node(client) => client.lookup(keys).await,
        }
    }

    /// A slot for a new block of `key`.
    pub(super) async fn reserve(&self, key: &BlockKey) -> Option<Reserved> {
        match self {
            Slots::Local(index) => lock(index).reserve(key).map(Reserved::Local),
            Slots::Node(client) => client.reserve(key).await.map(Reserved::Node),
        }
    }

    pub(super) async fn commit(
        &self,
        key: BlockKey,
        entry: SlotEntry,
        reserved: Reserved,
    ) -> std::io::Result<()> {
        match (self, reserved) {
            (Slots::Node(client), Reserved::Node(r)) => client.commit(&key, entry, r).await,
            (Slots::Local(index), _) => lock(index).commit(key, entry),
            (Slots::Node(_), Reserved::Local(_)) => Err(std::io::Error::other(
                "a local slot cannot be committed to the node cache",
            )),
        }
    }

    pub(super) async fn abandon(&self, reserved: Reserved) {
        match (self, reserved) {
            (Slots::Node(client), Reserved::Node(r)) => client.abandon(r).await,
            (Slots::Local(index), r) => lock(index).abandon(r.slot()),
            (Slots::Node(_), Reserved::Local(_)) => {}
        }
    }

    pub(super) async fn remove(&self, key: &BlockKey, slot: u32) {
        match self {
            Slots::Local(index) => {
                lock(index).remove(key, slot);
            }
            Slots::Node(client) => client.remove(key, slot).await,
        }
    }

    /// Whether `entry`'s slot still holds what it held when the entry was looked up (another
    /// process may have been given the slot since).
    pub(super) fn unchanged(&self, entry: &SlotEntry) -> bool {
        match self {
            Slots::Local(_) => true,
            Slots::Node(client) => client.unchanged(entry),
        }
    }

    pub(super) fn summary(&self) -> Summary {
        match self {
            Slots::Local(index) => Summary::of(&lock(index)),
            Slots::Node(client) => client.summary(),
        }
    }
}
