//! Result cache: inference outputs keyed by model, version and input bytes.
//!
//! Bounded by bytes (`cache_size_mb`), not entries. One ordered index picks
//! the victim for the configured policy: LRU (oldest use), LFU (fewest uses,
//! then oldest use) or FIFO (oldest insert). All operations are O(log n).

use crate::options::EvictionPolicy;
use crate::tensor::TensorData;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Identity of a cached result.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub model: String,
    pub version: String,
    /// sha256 (first 16 bytes) of the inputs' names, dtypes, shapes and bytes.
    pub digest: [u8; 16],
}

impl CacheKey {
    pub fn new(model: &str, version: &str, inputs: &[(&str, &TensorData)]) -> CacheKey {
        let mut h = Sha256::new();
        for (name, t) in inputs {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(t.dtype().as_str().as_bytes());
            h.update((t.shape.len() as u64).to_le_bytes());
            for d in &t.shape {
                h.update((*d as u64).to_le_bytes());
            }
            t.data.for_each_le_chunk(|b| h.update(b));
        }
        let full = h.finalize();
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&full[..16]);
        CacheKey {
            model: model.to_string(),
            version: version.to_string(),
            digest,
        }
    }
}

/// Counters and occupancy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub inserts: u64,
    pub entries: usize,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

#[derive(Debug)]
struct Entry {
    value: Arc<Vec<TensorData>>,
    bytes: u64,
    order: (u64, u64),
    uses: u64,
}

/// A byte-bounded cache with a fixed eviction policy.
#[derive(Debug)]
pub struct ResultCache {
    policy: EvictionPolicy,
    capacity: u64,
    map: HashMap<CacheKey, Entry>,
    index: BTreeMap<(u64, u64), CacheKey>,
    clock: u64,
    stats: CacheStats,
}

// Per-entry bookkeeping (key strings, maps) counted against the budget.
const ENTRY_OVERHEAD: u64 = 128;

impl ResultCache {
    pub fn new(policy: EvictionPolicy, capacity_bytes: u64) -> ResultCache {
        ResultCache {
            policy,
            capacity: capacity_bytes,
            map: HashMap::new(),
            index: BTreeMap::new(),
            clock: 0,
            stats: CacheStats {
                capacity_bytes,
                ..Default::default()
            },
        }
    }

    pub fn policy(&self) -> EvictionPolicy {
        self.policy
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn order_for(&self, inserted: u64, used: u64, uses: u64) -> (u64, u64) {
        match self.policy {
            EvictionPolicy::Lru => (used, 0),
            EvictionPolicy::Fifo => (inserted, 0),
            EvictionPolicy::Lfu => (uses, used),
        }
    }

    /// Look up and record a hit or a miss.
    pub fn get(&mut self, key: &CacheKey) -> Option<Arc<Vec<TensorData>>> {
        let now = self.tick();
        let policy = self.policy;
        let Some(e) = self.map.get_mut(key) else {
            self.stats.misses += 1;
            return None;
        };
        self.stats.hits += 1;
        e.uses += 1;
        if policy != EvictionPolicy::Fifo {
            let old = e.order;
            e.order = match policy {
                EvictionPolicy::Lfu => (e.uses, now),
                _ => (now, 0),
            };
            let new = e.order;
            let value = e.value.clone();
            if let Some(k) = self.index.remove(&old) {
                self.index.insert(new, k);
            }
            return Some(value);
        }
        Some(e.value.clone())
    }

    /// Insert, evicting by policy until the entry fits. An entry larger than
    /// the whole budget is not cached.
    pub fn insert(&mut self, key: CacheKey, value: Arc<Vec<TensorData>>) {
        let bytes = value.iter().map(|t| t.byte_len() as u64).sum::<u64>() + ENTRY_OVERHEAD;
        if bytes > self.capacity {
            return;
        }
        if let Some(old) = self.map.remove(&key) {
            self.index.remove(&old.order);
            self.stats.used_bytes -= old.bytes;
        }
        while self.stats.used_bytes + bytes > self.capacity {
            let Some((_, victim)) = self.index.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&victim) {
                self.stats.used_bytes -= e.bytes;
                self.stats.evictions += 1;
            }
        }
        let now = self.tick();
        let order = self.order_for(now, now, 1);
        self.index.insert(order, key.clone());
        self.map.insert(
            key,
            Entry {
                value,
                bytes,
                order,
                uses: 1,
            },
        );
        self.stats.used_bytes += bytes;
        self.stats.inserts += 1;
    }

    /// Drop every entry of `model` (a new version was loaded).
    pub fn invalidate_model(&mut self, model: &str) {
        let victims: Vec<CacheKey> = self
            .map
            .keys()
            .filter(|k| k.model == model)
            .cloned()
            .collect();
        for k in victims {
            if let Some(e) = self.map.remove(&k) {
                self.index.remove(&e.order);
                self.stats.used_bytes -= e.bytes;
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.map.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Data;

    fn val(n: usize) -> Arc<Vec<TensorData>> {
        Arc::new(vec![
            TensorData::new(vec![n], Data::U8(vec![0; n])).expect("t"),
        ])
    }

    fn key(i: u8) -> CacheKey {
        CacheKey {
            model: "m".into(),
            version: "1".into(),
            digest: [i; 16],
        }
    }

    #[test]
    fn key_depends_on_version_and_bytes() {
        let t = TensorData::new(vec![2], Data::F32(vec![1.0, 2.0])).expect("t");
        let u = TensorData::new(vec![2], Data::F32(vec![1.0, 2.5])).expect("u");
        let k1 = CacheKey::new("m", "1", &[("x", &t)]);
        assert_eq!(k1, CacheKey::new("m", "1", &[("x", &t)]));
        assert_ne!(k1, CacheKey::new("m", "2", &[("x", &t)]));
        assert_ne!(k1, CacheKey::new("m", "1", &[("x", &u)]));
    }

    // Three entries of 100 + overhead fit in a budget of 3 * 228.
    fn cache(policy: EvictionPolicy) -> ResultCache {
        let mut c = ResultCache::new(policy, 3 * (100 + ENTRY_OVERHEAD));
        for i in 1..=3 {
            c.insert(key(i), val(100));
        }
        c
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut c = cache(EvictionPolicy::Lru);
        assert!(c.get(&key(1)).is_some());
        c.insert(key(4), val(100));
        assert!(c.get(&key(2)).is_none(), "2 was least recently used");
        assert!(c.get(&key(1)).is_some());
        assert_eq!(c.stats().evictions, 1);
    }

    #[test]
    fn fifo_ignores_use() {
        let mut c = cache(EvictionPolicy::Fifo);
        assert!(c.get(&key(1)).is_some());
        c.insert(key(4), val(100));
        assert!(c.get(&key(1)).is_none(), "1 was inserted first");
        assert!(c.get(&key(2)).is_some());
    }

    #[test]
    fn lfu_evicts_least_frequently_used() {
        let mut c = cache(EvictionPolicy::Lfu);
        for _ in 0..3 {
            assert!(c.get(&key(1)).is_some());
            assert!(c.get(&key(3)).is_some());
        }
        assert!(c.get(&key(2)).is_some());
        c.insert(key(4), val(100));
        assert!(c.get(&key(2)).is_none(), "2 had the fewest uses");
        assert!(c.get(&key(1)).is_some() && c.get(&key(3)).is_some());
    }

    #[test]
    fn size_budget_and_oversized_entries() {
        let mut c = cache(EvictionPolicy::Lru);
        c.insert(key(9), val(2 * 100 + ENTRY_OVERHEAD as usize));
        let s = c.stats();
        assert!(s.used_bytes <= s.capacity_bytes);
        assert_eq!(s.evictions, 2);
        c.insert(key(10), val(10_000));
        assert!(
            c.get(&key(10)).is_none(),
            "larger than the budget: not cached"
        );
    }
}
