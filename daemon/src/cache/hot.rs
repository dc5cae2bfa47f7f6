//! The memory tier: recently used blocks, bounded in bytes, evicted with CLOCK.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use super::index::BlockKey;

pub struct HotTier {
    limit: u64,
    bytes: u64,
    map: HashMap<BlockKey, (Bytes, bool)>,
    ring: VecDeque<BlockKey>,
}

impl HotTier {
    pub fn new(limit: u64) -> HotTier {
        HotTier {
            limit,
            bytes: 0,
            map: HashMap::new(),
            ring: VecDeque::new(),
        }
    }

    pub fn get(&mut self, key: &str) -> Option<Bytes> {
        let (bytes, referenced) = self.map.get_mut(key)?;
        *referenced = true;
        Some(bytes.clone())
    }

    pub fn insert(&mut self, key: BlockKey, bytes: Bytes) {
        let len = bytes.len() as u64;
        if len > self.limit || self.map.contains_key(&key) {
            return;
        }
        while self.bytes + len > self.limit {
            let Some(victim) = self.ring.pop_front() else {
                break;
            };
            match self.map.get_mut(&victim) {
                Some((_, referenced)) if *referenced => {
                    *referenced = false;
                    self.ring.push_back(victim);
                }
                Some(_) => {
                    if let Some((old, _)) = self.map.remove(&victim) {
                        self.bytes -= old.len() as u64;
                    }
                }
                None => {}
            }
        }
        self.bytes += len;
        self.map.insert(key.clone(), (bytes, false));
        self.ring.push_back(key);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stays_within_its_limit_and_keeps_hot_blocks() {
        let mut t = HotTier::new(300);
        for i in 0..3 {
            t.insert(Arc::from(format!("k{i}")), Bytes::from(vec![0u8; 100]));
        }
        assert!(t.get("k0").is_some());
        t.insert(Arc::from("k3"), Bytes::from(vec![0u8; 100]));
        assert!(t.bytes() <= 300);
        assert!(t.get("k0").is_some(), "referenced block kept");
        assert!(t.get("k1").is_none(), "unreferenced block evicted first");
    }
}
