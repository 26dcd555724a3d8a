//! Result cache behaviour and load-balancing distribution through HTTP.

use crate::support::*;
use dai_config::{EvictionPolicy, LoadBalancingStrategy};
use std::collections::BTreeMap;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_and_size_bounded_eviction() {
    let d = TestDaemon::start(|c| {
        c.cache_size_mb = 1;
        c.cache_eviction_policy = EvictionPolicy::Lru;
        c.daemon.models = vec!["silero-vad".into()];
    })
    .await;
    let (s, first) = d.infer("silero-vad", &silero_request(0)).await;
    assert_eq!(s, 200);
    assert_eq!(first["cached"], false);
    let (_, again) = d.infer("silero-vad", &silero_request(0)).await;
    assert_eq!(again["cached"], true, "same input, same version: a hit");
    assert_eq!(again["outputs"], first["outputs"]);

    // Each answer is 257 floats + bookkeeping, about 1.2 KB: 1 MiB holds
    // fewer than 900. Send 1200 distinct inputs.
    for i in 1..=1200 {
        let (s, _) = d.infer("silero-vad", &silero_request(i)).await;
        assert_eq!(s, 200);
    }
    let cache = d.get_json("/v1/status").await["cache"].clone();
    assert_eq!(cache["policy"], "LRU");
    let used = cache["used_bytes"].as_u64().expect("used");
    let cap = cache["capacity_bytes"].as_u64().expect("cap");
    assert_eq!(cap, 1024 * 1024);
    assert!(used <= cap, "used {used} > capacity {cap}");
    assert!(cache["evictions"].as_u64().expect("ev") > 0, "{cache}");
    // The oldest entry is gone, the newest is there.
    let (_, old) = d.infer("silero-vad", &silero_request(0)).await;
    assert_eq!(
        old["cached"], false,
        "LRU evicted the least recently used entry"
    );
    let (_, newest) = d.infer("silero-vad", &silero_request(1200)).await;
    assert_eq!(newest["cached"], true);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caching_disabled_never_hits() {
    let d = TestDaemon::start(|c| {
        c.caching_enabled = false;
        c.daemon.models = vec!["silero-vad".into()];
    })
    .await;
    for _ in 0..3 {
        let (_, b) = d.infer("silero-vad", &silero_request(7)).await;
        assert_eq!(b["cached"], false);
    }
    assert_eq!(d.get_json("/v1/status").await["cache"]["enabled"], false);
    d.stop().await;
}

async fn worker_counts(
    strategy: LoadBalancingStrategy,
    clients: &[&str],
    per_client: usize,
) -> BTreeMap<String, BTreeMap<u64, usize>> {
    let d = TestDaemon::start(|c| {
        c.max_parallel_agents = 2;
        c.cpu_limit = 2.0;
        c.caching_enabled = false;
        c.load_balancing_strategy = strategy;
        c.daemon.models = vec!["silero-vad".into()];
        // Both workers must stay active: the resource manager would yield
        // one while the test suite itself keeps the machine's CPU above 90 %.
        c.daemon.adaptive_workers = false;
    })
    .await;
    assert_eq!(
        d.get_json("/v1/status").await["load_balancing"]["workers"]
            .as_array()
            .expect("workers")
            .len(),
        2
    );
    let mut out: BTreeMap<String, BTreeMap<u64, usize>> = BTreeMap::new();
    for ip in clients {
        let client = reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().ok())
            .build()
            .expect("client");
        for i in 0..per_client {
            let r = client
                .post(d.url("/v1/models/silero-vad/infer"))
                .json(&silero_request(i as u32))
                .send()
                .await
                .expect("post");
            assert_eq!(r.status(), 200);
            let b: serde_json::Value = r.json().await.expect("json");
            *out.entry(ip.to_string())
                .or_default()
                .entry(b["worker"].as_u64().expect("worker"))
                .or_default() += 1;
        }
    }
    d.stop().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_workers() {
    let c = worker_counts(LoadBalancingStrategy::RoundRobin, &["127.0.0.1"], 20).await;
    assert_eq!(
        c["127.0.0.1"].values().copied().collect::<Vec<_>>(),
        vec![10, 10],
        "{c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_spreads_sequential_load() {
    // Sequential requests leave both workers idle: ties rotate.
    let c = worker_counts(LoadBalancingStrategy::LeastConnections, &["127.0.0.1"], 20).await;
    assert_eq!(c["127.0.0.1"].len(), 2, "{c:?}");
    assert!(c["127.0.0.1"].values().all(|&n| n >= 5), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_pins_each_client_address_to_one_worker() {
    let clients = [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
        "127.0.0.7",
    ];
    let c = worker_counts(LoadBalancingStrategy::IpHash, &clients, 6).await;
    for ip in clients {
        assert_eq!(c[ip].len(), 1, "{ip} was served by several workers: {c:?}");
    }
    let used: std::collections::BTreeSet<u64> =
        c.values().flat_map(|m| m.keys().copied()).collect();
    assert_eq!(
        used.len(),
        2,
        "six addresses all hashed to one worker: {c:?}"
    );
}
