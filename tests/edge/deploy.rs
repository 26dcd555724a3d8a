//! The Grafana dashboards and Prometheus alert rules in deploy/ query only
//! metrics the code really exports: every `dai_*` name in them is checked
//! against the live /metrics of a running edge daemon (with a simulated
//! sensor and a served request) and of a running aggregator.

use crate::support::*;
use dai_testkit::{fedavg, service_config, signing_key, start_embedded_broker};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Every `dai_edge_*` / `dai_cloud_*` identifier in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("dai_") {
        let start = i + pos;
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        let name = &text[start..end];
        if name.starts_with("dai_edge_") || name.starts_with("dai_cloud_") {
            out.insert(name.to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// Metric names present as samples in an OpenMetrics text.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_query_only_exported_metrics() {
    let mut used = BTreeSet::new();
    let mut files = Vec::new();
    for dir in ["deploy/grafana/dashboards", "deploy/prometheus/rules"] {
        for e in std::fs::read_dir(repo().join(dir)).expect(dir) {
            let p = e.expect("entry").path();
            let text = std::fs::read_to_string(&p).expect("read");
            if p.extension().is_some_and(|x| x == "json") {
                let v: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
                assert!(
                    v["panels"].as_array().is_some_and(|p| !p.is_empty()),
                    "{}",
                    p.display()
                );
            }
            used.extend(names_in(&text));
            files.push(p);
        }
    }
    assert!(used.len() > 20, "{used:?}");

    // A live edge daemon: a simulated sensor classified by a model, one request.
    let d = TestDaemon::start(|c| {
        c.training.enabled = false;
        c.sensors = vec![
            serde_yaml_ng::from_str(
                "name: imu0\npart: mpu6050\nsource: simulated\nscenario: impact\nrate_hz: 1000\nhop: 128\nmodel: imu-anomaly\n",
            )
            .expect("sensor"),
            serde_yaml_ng::from_str("name: bad\npart: bme280\nsource: i2c\nbus: /dev/i2c-dai-none\n")
                .expect("sensor"),
        ];
    })
    .await;
    let (s, _) = d
        .infer("silero-vad", &fixture("silero-vad").request())
        .await;
    assert_eq!(s, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    let edge = loop {
        let m = d.get_text("/metrics").await;
        if m.contains("dai_edge_sensor_windows_total")
            && m.contains("dai_edge_latency_p95_seconds{")
        {
            break m;
        }
        assert!(Instant::now() < deadline, "edge metrics incomplete:\n{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // A live aggregator (embedded broker), its /metrics over HTTP.
    let port = start_embedded_broker();
    let dir = tempfile::tempdir().expect("tmp");
    let monitor = std::sync::Arc::new(dai_cloud::monitor::Monitor::new());
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(dai_cloud::service::run_monitored(
        dai_cloud::service::ServiceConfig {
            fleet: "deploy".into(),
            state_path: dir.path().join("s.sqlite"),
            settings: dai_cloud::state::Settings {
                max_staleness: 2,
                reject_norm: 1e3,
                ..fedavg(1)
            },
            signing_key: signing_key(0x22),
            ..service_config(
                port,
                dir.path(),
                [(
                    "digits",
                    std::fs::read(zoo().join("digits/head.safetensors")).expect("head"),
                )],
            )
        },
        monitor.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = listener.local_addr().expect("addr");
    let app = dai_cloud::http::router(
        monitor.clone(),
        dir.path().join("s.sqlite"),
        "deploy".into(),
    );
    let server = tokio::spawn(async move {
        let _ = axum_serve(listener, app).await;
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let cloud = loop {
        let m = reqwest::get(format!("http://{http}/metrics"))
            .await
            .expect("GET")
            .text()
            .await
            .expect("text");
        if m.lines().any(|l| l == "dai_cloud_broker_connected 1") {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "aggregator never connected:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let live: BTreeSet<String> = exported(&edge).union(&exported(&cloud)).cloned().collect();
    let missing: Vec<&String> = used.iter().filter(|n| !live.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "queried in {files:?} but not exported: {missing:?}\nexported: {live:?}\ncloud:\n{cloud}"
    );
    eprintln!("{} metric names in deploy/ all exported live", used.len());
    let _ = stop.send(());
    let _ = service.await;
    server.abort();
    d.stop().await;
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) -> std::io::Result<()> {
    axum::serve(listener, app).await
}
