//! What the runtime needs to be told, owned here rather than read from the
//! daemon's whole `Config`: the daemon's config crate maps its YAML onto
//! [`RuntimeOptions`] (the way a library owns its builder and a binary maps
//! flags onto it), so this crate links no config parser or sensor driver.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Request dispatch across inference workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancingStrategy {
    RoundRobin,
    LeastConnections,
    IpHash,
}

impl LoadBalancingStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::LeastConnections => "least_connections",
            Self::IpHash => "ip_hash",
        }
    }
}

/// Which cache entry is evicted first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvictionPolicy {
    #[serde(rename = "LRU", alias = "lru")]
    Lru,
    #[serde(rename = "LFU", alias = "lfu")]
    Lfu,
    #[serde(rename = "FIFO", alias = "fifo")]
    Fifo,
}

impl EvictionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lru => "LRU",
            Self::Lfu => "LFU",
            Self::Fifo => "FIFO",
        }
    }
}

/// Everything [`crate::Runtime::new`] takes.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeOptions {
    /// Inference worker threads.
    pub workers: usize,
    /// Jobs each worker's queue holds before requests get "overloaded".
    pub queue_capacity: usize,
    pub load_balancing: LoadBalancingStrategy,
    /// Most rows one request or one merged batch may carry.
    pub max_batch: usize,
    /// How long a worker waits for more jobs to merge while others are in flight.
    pub max_batch_wait: Duration,
    /// `None`: no result cache.
    pub cache: Option<CacheOptions>,
    /// Bytes of model memory the runtime may hold (estimated per model).
    pub memory_limit_bytes: u64,
    /// Bundle variant to load when a bundle lists it (e.g. "int8").
    pub prefer_variant: Option<String>,
}

/// The result cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheOptions {
    pub policy: EvictionPolicy,
    pub capacity_bytes: u64,
}

impl Default for RuntimeOptions {
    /// One worker, no cache: what a tool that loads one model wants.
    fn default() -> Self {
        RuntimeOptions {
            workers: 1,
            queue_capacity: 64,
            load_balancing: LoadBalancingStrategy::RoundRobin,
            max_batch: 8,
            max_batch_wait: Duration::from_millis(2),
            cache: None,
            memory_limit_bytes: 1 << 30,
            prefer_variant: None,
        }
    }
}
