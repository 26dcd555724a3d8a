//! Store, hot reload, readiness, status document.

use crate::support::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_records_models_and_snapshots_across_restarts() {
    ensure_zoo();
    // The data dir must outlive the daemon (whose own temp dir goes with it).
    let data = tempfile::tempdir().expect("tmp");
    let path = data.path().to_path_buf();
    let config = test_config(&path);
    let d = TestDaemon::start_with(config, tempfile::tempdir().expect("unused")).await;
    let (s, _) = d.infer("silero-vad", &silero_request(3)).await;
    assert_eq!(s, 200);
    d.stop().await;

    // A fresh store handle on the same file sees what the daemon wrote.
    let store = dai_store::Store::open_in(&path).expect("reopen");
    let models = store.models().expect("models");
    for name in ZOO {
        let m = models
            .iter()
            .find(|m| m.name == *name && m.active)
            .unwrap_or_else(|| panic!("{name} not recorded: {models:?}"));
        assert_eq!(m.sha256.len(), 64);
    }
    assert!(
        store.snapshot_count().expect("count") >= 1,
        "shutdown writes a final snapshot"
    );
    let (_, snap) = store.latest_snapshot().expect("q").expect("snapshot");
    let silero = snap["models"]
        .as_array()
        .expect("models")
        .iter()
        .find(|m| m["name"] == "silero-vad")
        .cloned()
        .expect("silero");
    assert_eq!(silero["requests"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_bundle_is_hot_reloaded_without_dropping_requests() {
    let models = tempfile::tempdir().expect("tmp");
    let bundle = copy_bundle("pp-ocr-cls", models.path());
    let dir = models.path().to_path_buf();
    let d = TestDaemon::start(move |c| {
        c.daemon.models_dir = dir;
        c.daemon.hot_reload_interval_sec = 1;
        c.caching_enabled = false;
    })
    .await;
    assert_eq!(
        d.get_json("/v1/models/pp-ocr-cls").await["version"],
        "1.4.4"
    );

    // Keep requests flowing while the bundle changes.
    let client = d.client.clone();
    let url = d.url("/v1/models/pp-ocr-cls/infer");
    let req = fixture("pp-ocr-cls").request();
    let load = tokio::spawn(async move {
        let mut statuses = Vec::new();
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until && statuses.len() < 2000 {
            let r = client.post(&url).json(&req).send().await.expect("post");
            statuses.push(r.status().as_u16());
        }
        statuses
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let manifest = std::fs::read_to_string(bundle.join("manifest.toml")).expect("read");
    std::fs::write(
        bundle.join("manifest.toml"),
        manifest.replace("version = \"1.4.4\"", "version = \"1.4.5\""),
    )
    .expect("write");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if d.get_json("/v1/models/pp-ocr-cls").await["version"] == "1.4.5" {
            break;
        }
        assert!(Instant::now() < deadline, "new version never loaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let statuses = load.await.expect("load");
    assert!(!statuses.is_empty());
    assert!(
        statuses.iter().all(|&s| s == 200),
        "requests failed during reload: {statuses:?}"
    );
    let (_, b) = d
        .infer("pp-ocr-cls", &fixture("pp-ocr-cls").request())
        .await;
    assert_eq!(b["version"], "1.4.5");

    // A broken change keeps the old version serving and says why.
    std::fs::write(
        bundle.join("manifest.toml"),
        "name = \"pp-ocr-cls\"\nversion = \n",
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = d.get_json("/v1/models/pp-ocr-cls").await;
        if m["error"].is_string() {
            assert_eq!(m["state"], "ready");
            assert_eq!(m["version"], "1.4.5");
            break;
        }
        assert!(Instant::now() < deadline, "broken reload not reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, _) = d
        .infer("pp-ocr-cls", &fixture("pp-ocr-cls").request())
        .await;
    assert_eq!(s, 200);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_status_document() {
    let d = TestDaemon::start(|c| c.profiling_enabled = true).await;
    let h = d
        .client
        .get(d.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(h.status(), 200);
    let r = d.client.get(d.url("/readyz")).send().await.expect("readyz");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("text").contains("5 model(s)"));
    for i in 0..5 {
        let (s, _) = d.infer("silero-vad", &silero_request(100 + i)).await;
        assert_eq!(s, 200);
    }
    // Wait for the resource manager and a profiling sample (1 s periods).
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = d.get_json("/v1/status").await;
        if s["profiling"]["models"]["silero-vad"]["infer"].is_number()
            && s["resources"]["rss_mb"].is_number()
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no profiling sample / resource figures: {s}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let silero = status["models"]
        .as_array()
        .expect("models")
        .iter()
        .find(|m| m["name"] == "silero-vad")
        .cloned()
        .expect("silero");
    assert_eq!(silero["requests"], 5);
    assert!(silero["latency_ms"]["p95"].as_f64().expect("p95") > 0.0);
    assert!(status["resources"]["rss_mb"].as_f64().expect("rss") > 10.0);
    assert_eq!(status["resources"]["max_workers"], 2);
    let page = d.client.get(d.url("/")).send().await.expect("page");
    assert!(
        page.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/html")
    );
    d.stop().await;
}
