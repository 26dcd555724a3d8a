//! `/metrics` parses as Prometheus text with a real parser and counts right.

use crate::support::*;
use prometheus_parse::{Scrape, Value as PV};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_requests() {
    let d = TestDaemon::start(|c| c.profiling_enabled = true).await;
    for i in 0..4 {
        let (s, _) = d.infer("silero-vad", &silero_request(i)).await;
        assert_eq!(s, 200);
    }
    let (s, _) = d.infer("silero-vad", &silero_request(0)).await;
    assert_eq!(s, 200);
    let (s, _) = d.infer("nope", &serde_json::json!({"inputs": {}})).await;
    assert_eq!(s, 404);

    let text = d
        .client
        .get(d.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = Scrape::parse(lines).expect("valid Prometheus text");
    let sample = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| s.value.clone())
    };
    let counter = |name: &str, labels: &[(&str, &str)]| match sample(name, labels) {
        Some(PV::Counter(v)) | Some(PV::Untyped(v)) | Some(PV::Gauge(v)) => v,
        other => panic!("{name} {labels:?}: {other:?}\n{text}"),
    };
    assert_eq!(
        counter(
            "dai_edge_requests_total",
            &[("model", "silero-vad"), ("outcome", "ok")]
        ),
        4.0
    );
    assert_eq!(
        counter(
            "dai_edge_requests_total",
            &[("model", "silero-vad"), ("outcome", "cached")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            "dai_edge_requests_total",
            &[("model", "_unknown"), ("outcome", "unknown_model")]
        ),
        1.0
    );
    assert_eq!(counter("dai_edge_cache_hits_total", &[]), 1.0);
    assert_eq!(counter("dai_edge_cache_misses_total", &[]), 4.0);
    match sample(
        "dai_edge_request_duration_seconds",
        &[("model", "silero-vad")],
    ) {
        Some(PV::Histogram(buckets)) => {
            let last = buckets.last().expect("buckets");
            assert_eq!(last.count, 5.0, "+Inf bucket counts all five");
        }
        other => panic!("histogram expected, got {other:?}"),
    }
    assert!(matches!(
        sample(
            "dai_edge_stage_duration_seconds",
            &[("model", "silero-vad"), ("stage", "infer")]
        ),
        Some(PV::Histogram(_))
    ));
    for gauge in [
        "dai_edge_queue_depth",
        "dai_edge_active_workers",
        "dai_edge_cache_entries",
        "dai_edge_process_resident_memory_bytes",
    ] {
        assert!(sample(gauge, &[]).is_some(), "{gauge} missing");
    }
    assert_eq!(
        counter(
            "dai_edge_model_info",
            &[
                ("model", "pp-ocr-cls"),
                ("state", "ready"),
                ("version", "1.4.4")
            ]
        ),
        1.0
    );
    d.stop().await;
}
