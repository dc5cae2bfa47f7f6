//! Which block lives in which slot of the cache data file, persisted as an append-only log.
//!
//! The data file is an array of fixed-size slots, so the cache can never grow past its quota.
//! A block is written to its slot first and recorded in the log after; a crash between the two
//! leaves an older record pointing at newer bytes, which the per-block CRC catches on read.
//! Replay keeps the last record of each slot. Torn or corrupt records end the replay. The log
//! is compacted (rewritten with live records only) when it grows to several times the slots.
//!
//! Eviction is CLOCK (second chance): every hit sets a slot's reference bit; the hand clears
//! bits and takes the first slot it finds unreferenced. Slots are freed in batches, from the
//! high-water mark (no free slot) down to the low-water mark (`EVICT_BATCH` of the slots free).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"BERTHCIX";
const VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Fraction of slots freed at once when the cache is full.
const EVICT_BATCH: f64 = 0.05;

/// Identifies one block: store, object key, ETag and block index, joined by NUL.
pub type BlockKey = Arc<str>;

/// Bytes covered by one checksum: a small read verifies only the chunks it touches.
pub const CHUNK: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotEntry {
    pub slot: u32,
    pub len: u32,
    /// CRC-32 of each `CHUNK` of the block (the last one may be shorter).
    pub crcs: Arc<[u32]>,
    /// The slot's generation when this entry was read from the node cache (which bumps it
    /// whenever the slot changes hands); 0 and unused for a cache of the process's own.
    pub generation: u64,
}

impl SlotEntry {
    pub fn new(slot: u32, data: &[u8]) -> SlotEntry {
        SlotEntry {
            slot,
            len: data.len() as u32,
            crcs: data.chunks(CHUNK).map(crc32fast::hash).collect(),
            generation: 0,
        }
    }

    /// Whether `data`, read from byte `offset` of the block (a multiple of `CHUNK`), matches
    /// the checksums of the chunks it covers.
    pub fn verify(&self, offset: usize, data: &[u8]) -> bool {
        if offset % CHUNK != 0 {
            return false;
        }
        let first = offset / CHUNK;
        data.chunks(CHUNK)
            .enumerate()
            .all(|(i, chunk)| self.crcs.get(first + i) == Some(&crc32fast::hash(chunk)))
    }
}

pub struct Index {
    path: PathBuf,
    block_size: u64,
    map: HashMap<BlockKey, SlotEntry>,
    owners: Vec<Option<BlockKey>>,
    referenced: Vec<bool>,
    free: Vec<u32>,
    hand: usize,
    log: File,
    records: u64,
    pub evictions: u64,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl Index {
    /// Opens (or creates) the log at `path` for `slots` slots of `block_size`. A log written
    /// for another geometry is discarded: its slots would not mean the same bytes.
    pub fn open(path: &Path, block_size: u64, slots: u32) -> io::Result<(Index, usize)> {
        let mut index = Index {
            path: path.to_path_buf(),
            block_size,
            map: HashMap::new(),
            owners: vec![None; slots as usize],
            referenced: vec![false; slots as usize],
            free: Vec::new(),
            hand: 0,
            log: File::open("/dev/null")?,
            records: 0,
            evictions: 0,
        };
        let mut data = Vec::new();
        if let Ok(mut f) = File::open(path) {
            f.read_to_end(&mut data)?;
        }
        let mut replayed = 0;
        match index.check_header(&data, slots) {
            Ok(()) => {
                let mut rest = &data[HEADER_LEN..];
                while let Some((key, entry, len)) = decode(rest) {
                    index.apply(key, entry);
                    rest = &rest[len..];
                    replayed += 1;
                }
                if !rest.is_empty() {
                    tracing::warn!(bytes = rest.len(), "cache index has a torn tail; ignored");
                }
            }
            Err(e) if !data.is_empty() => {
                tracing::warn!(error = %e, path = %path.display(), "cache index unusable; starting empty");
            }
            Err(_) => {}
        }
        index.free = (0..slots)
            .rev()
            .filter(|&s| index.owners[s as usize].is_none())
            .collect();
        // Rewrite the log with live records only: bounds start-up time and disk use.
        index.compact()?;
        Ok((index, replayed))
    }

    fn check_header(&self, data: &[u8], slots: u32) -> io::Result<()> {
        if data.len() < HEADER_LEN || &data[..8] != MAGIC {
            return Err(invalid("not a berth cache index"));
        }
        let field = |r: std::ops::Range<usize>| data[r].to_vec();
        let version = u32::from_le_bytes(field(8..12).try_into().map_err(|_| invalid("header"))?);
        let bs = u64::from_le_bytes(field(12..20).try_into().map_err(|_| invalid("header"))?);
        let n = u32::from_le_bytes(field(20..24).try_into().map_err(|_| invalid("header"))?);
        if version != VERSION || bs != self.block_size || n != slots {
            return Err(invalid(&format!(
                "index is for version {version}, block size {bs}, {n} slots"
            )));
        }
        Ok(())
    }

    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&self.block_size.to_le_bytes());
        h.extend_from_slice(&(self.owners.len() as u32).to_le_bytes());
        h
    }

    /// Maps `key` to `entry.slot`; returns a slot the key held before, now empty.
    fn apply(&mut self, key: BlockKey, entry: SlotEntry) -> Option<u32> {
        let slot = entry.slot as usize;
        let chunks = (entry.len as usize).div_ceil(CHUNK);
        if slot >= self.owners.len()
            || entry.len as u64 > self.block_size
            || entry.crcs.len() != chunks
        {
            return None;
        }
        if let Some(old) = self.owners[slot].take() {
            self.map.remove(&old);
        }
        let mut orphan = None;
        let new_slot = entry.slot;
        if let Some(previous) = self.map.insert(key.clone(), entry) {
            if previous.slot != new_slot {
                self.owners[previous.slot as usize] = None;
                orphan = Some(previous.slot);
            }
        }
        self.owners[slot] = Some(key);
        orphan
    }

    /// Rewrites the log with one record per live slot.
    fn compact(&mut self) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut out = self.header();
        for (key, entry) in &self.map {
            encode(key, entry, &mut out);
        }
        // It lists every cached object name: root only.
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        self.log = OpenOptions::new().append(true).open(&self.path)?;
        self.records = self.map.len() as u64;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn slots(&self) -> usize {
        self.owners.len()
    }

    pub fn lookup(&mut self, key: &str) -> Option<SlotEntry> {
        let entry = self.map.get(key)?.clone();
        self.referenced[entry.slot as usize] = true;
        Some(entry)
    }

    /// A slot to write a new block into, evicting a batch with the CLOCK hand if none is free.
    pub fn allocate(&mut self) -> Option<u32> {
        if self.free.is_empty() {
            self.evict_batch();
        }
        self.free.pop()
    }

    fn evict_batch(&mut self) {
        let slots = self.owners.len();
        let want = ((slots as f64 * EVICT_BATCH).ceil() as usize).max(1);
        // Two full turns always find unreferenced slots (the first clears every bit).
        let mut budget = 2 * slots;
        while self.free.len() < want && budget > 0 {
            budget -= 1;
            let slot = self.hand;
            self.hand = (self.hand + 1) % slots;
            if self.referenced[slot] {
                self.referenced[slot] = false;
                continue;
            }
            if let Some(key) = self.owners[slot].take() {
                self.map.remove(&key);
                self.free.push(slot as u32);
                self.evictions += 1;
            }
        }
    }

    /// Records that `slot` now holds `key`'s bytes (written and synced to the data file).
    pub fn commit(&mut self, key: BlockKey, entry: SlotEntry) -> io::Result<()> {
        let mut record = Vec::with_capacity(key.len() + 32);
        encode(&key, &entry, &mut record);
        let slot = entry.slot as usize;
        if let Some(orphan) = self.apply(key, entry) {
            self.free.push(orphan);
        }
        self.referenced[slot] = true;
        self.log.write_all(&record)?;
        self.records += 1;
        if self.records > 4 * self.owners.len() as u64 + 1024 {
            self.compact()?;
        }
        Ok(())
    }

    /// Gives back a slot whose write failed.
    pub fn abandon(&mut self, slot: u32) {
        if self.owners[slot as usize].is_none() {
            self.free.push(slot);
        }
    }

    /// A slot for a new block of `key`; `None` if `key` is cached already or nothing is free.
    pub fn reserve(&mut self, key: &str) -> Option<u32> {
        if self.lookup(key).is_some() {
            return None;
        }
        self.allocate()
    }

    /// Drops a block whose bytes in `slot` failed their checksum. A key that has moved to
    /// another slot since (another process cached it again) is left alone.
    pub fn remove(&mut self, key: &str, slot: u32) -> bool {
        if self.map.get(key).is_some_and(|e| e.slot == slot) {
            self.map.remove(key);
            self.owners[slot as usize] = None;
            self.free.push(slot);
            return true;
        }
        false
    }
}

fn encode(key: &str, entry: &SlotEntry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&entry.slot.to_le_bytes());
    out.extend_from_slice(&entry.len.to_le_bytes());
    out.extend_from_slice(&(entry.crcs.len() as u16).to_le_bytes());
    for crc in entry.crcs.iter() {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    let key = key.as_bytes();
    let len = key.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&key[..len]);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Decodes one record: `[slot u32][len u32][n u16][n x crc u32][key len u16][key][crc u32]`.
fn decode(buf: &[u8]) -> Option<(BlockKey, SlotEntry, usize)> {
    let u16_at = |i: usize| Some(u16::from_le_bytes(buf.get(i..i + 2)?.try_into().ok()?));
    let u32_at = |i: usize| Some(u32::from_le_bytes(buf.get(i..i + 4)?.try_into().ok()?));
    let n = u16_at(8)? as usize;
    let key_at = 10 + 4 * n + 2;
    let key_len = u16_at(key_at - 2)? as usize;
    let total = key_at + key_len + 4;
    if buf.len() < total || crc32fast::hash(&buf[..total - 4]) != u32_at(total - 4)? {
        return None;
    }
    let key = std::str::from_utf8(&buf[key_at..key_at + key_len]).ok()?;
    let crcs: Option<Arc<[u32]>> = (0..n).map(|i| u32_at(10 + 4 * i)).collect();
    let entry = SlotEntry {
        slot: u32_at(0)?,
        len: u32_at(4)?,
        crcs: crcs?,
        generation: 0,
    };
    Some((Arc::from(key), entry, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> BlockKey {
        Arc::from(s)
    }

    fn entry(slot: u32) -> SlotEntry {
        SlotEntry::new(slot, &[slot as u8; 100])
    }

    #[test]
    fn chunk_checksums_verify_partial_reads() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let e = SlotEntry::new(0, &data);
        assert_eq!(e.crcs.len(), 3);
        assert!(e.verify(0, &data));
        assert!(e.verify(CHUNK, &data[CHUNK..2 * CHUNK]));
        assert!(e.verify(2 * CHUNK, &data[2 * CHUNK..]));
        let mut bad = data[CHUNK..2 * CHUNK].to_vec();
        bad[7] ^= 1;
        assert!(!e.verify(CHUNK, &bad));
        assert!(
            !e.verify(100, &data[100..200]),
            "unaligned offsets are refused"
        );
    }

    #[test]
    fn survives_reopen_and_ignores_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        let (mut ix, _) = Index::open(&path, 4096, 8).unwrap();
        for i in 0..5 {
            let slot = ix.allocate().unwrap();
            ix.commit(key(&format!("k{i}")), entry(slot)).unwrap();
        }
        drop(ix);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        drop(f);
        let (mut ix, replayed) = Index::open(&path, 4096, 8).unwrap();
        assert_eq!(replayed, 5);
        assert_eq!(ix.len(), 5);
        assert!(ix.lookup("k3").is_some());
        assert_eq!(ix.free.len(), 3);
    }

    #[test]
    fn another_geometry_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        let (mut ix, _) = Index::open(&path, 4096, 8).unwrap();
        let slot = ix.allocate().unwrap();
        ix.commit(key("a"), entry(slot)).unwrap();
        drop(ix);
        let (ix, replayed) = Index::open(&path, 8192, 8).unwrap();
        assert_eq!((replayed, ix.len()), (0, 0));
    }

    #[test]
    fn clock_evicts_unreferenced_blocks_first_and_never_exceeds_the_slots() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ix, _) = Index::open(&dir.path().join("index"), 4096, 20).unwrap();
        for i in 0..20 {
            let slot = ix.allocate().unwrap();
            ix.commit(key(&format!("k{i}")), entry(slot)).unwrap();
        }
        // Everything is referenced: the first sweep clears every bit and takes slot 0.
        let slot = ix.allocate().unwrap();
        assert_eq!(slot, 0);
        assert!(ix.lookup("k0").is_none());
        ix.commit(key("k20"), entry(slot)).unwrap();
        // k1 is used again, k2 is not: the hand passes k1 and takes k2.
        assert!(ix.lookup("k1").is_some());
        let slot = ix.allocate().unwrap();
        ix.commit(key("k21"), entry(slot)).unwrap();
        assert!(
            ix.lookup("k1").is_some(),
            "a block used since the last sweep survives"
        );
        assert!(
            ix.lookup("k2").is_none(),
            "an unused block is evicted first"
        );
        assert!(ix.len() <= 20);
        assert_eq!(ix.evictions, 2);
    }

    #[test]
    fn a_reused_slot_drops_its_old_block() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ix, _) = Index::open(&dir.path().join("index"), 4096, 1).unwrap();
        let s = ix.allocate().unwrap();
        ix.commit(key("old"), entry(s)).unwrap();
        let s2 = ix.allocate().unwrap();
        assert_eq!(s, s2);
        ix.commit(key("new"), entry(s2)).unwrap();
        assert!(ix.lookup("old").is_none());
        assert!(ix.lookup("new").is_some());
    }

    #[test]
    fn log_is_compacted_when_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        let (mut ix, _) = Index::open(&path, 4096, 2).unwrap();
        for i in 0..3000 {
            let slot = ix.allocate().unwrap();
            ix.commit(key(&format!("k{i}")), entry(slot)).unwrap();
        }
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 1100 * 40, "log was not compacted: {size} bytes");
    }
}
