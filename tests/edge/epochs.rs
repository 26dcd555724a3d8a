//! Losing the aggregator's state must not deadlock the fleet. Three
//! enrolled edges and the aggregator, all on a Mosquitto with mutual TLS
//! (it keeps the old epoch's retained global across the aggregator's
//! restart, as a real broker does), make global 1; the aggregator stops, two edges train while it is away (their
//! updates wait in the outbox, against global 1), its state file is
//! deleted and it starts again: a new epoch at version 0. Every edge must
//! adopt the new epoch's global although its version is lower, drop the
//! two waiting updates with a count (never as accepted), and the next
//! round must make global 1 of the new epoch from all three devices.

use crate::support::*;
use dai_cloud::service::{ServiceError, ServiceStats};
use dai_cloud::state::Settings;
use dai_testkit::{SecureMosquitto, fedavg, make_fleet, service_config};

const FLEET: &str = "lab";
use serde_json::Value;
use std::time::{Duration, Instant};

fn counter(metrics: &str, name: &str, label: Option<&str>) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && label.is_none_or(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn training(d: &TestDaemon) -> Value {
    d.get_json("/v1/status").await["training"]["models"][0].clone()
}

/// Wait until every edge serves global `version` of an epoch `pred` likes
/// with an empty outbox; returns that epoch.
async fn wait_all(edges: &[TestDaemon], version: i64, pred: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut views = Vec::new();
        for d in edges {
            views.push(training(d).await);
        }
        let epochs: Vec<u64> = views
            .iter()
            .filter(|t| t["global_version"] == version && t["outbox_pending"] == 0)
            .filter_map(|t| t["global_epoch"].as_u64())
            .filter(|&e| pred(e))
            .collect();
        if epochs.len() == edges.len() && epochs.iter().all(|&e| e == epochs[0]) {
            return epochs[0];
        }
        assert!(
            Instant::now() < deadline,
            "not every edge serves global {version} of the expected epoch: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

type Running = (
    tokio::task::JoinHandle<Result<ServiceStats, ServiceError>>,
    tokio::sync::oneshot::Sender<()>,
);

/// The aggregator on the Mosquitto at `port`, state in `dir`.
fn aggregator(
    port: u16,
    dir: &std::path::Path,
    fleet_dir: &std::path::Path,
    base: &[u8],
) -> Running {
    let secure = dai_cloud::secure::SecureFleet::open(fleet_dir).expect("fleet");
    let mut cfg = service_config(port, dir, [("digits", base.to_vec())]);
    cfg.tls = Some(std::sync::Arc::new(secure.client_tls().expect("tls")));
    secure.apply(&mut cfg);
    cfg.settings = Settings {
        reject_norm: 1e3,
        ..fedavg(3)
    };
    cfg.round_timeout = Duration::from_secs(300);
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(dai_cloud::service::run(cfg, async move {
        let _ = rx.await;
    }));
    (task, stop)
}

async fn train(d: &TestDaemon, rows: &[([f32; 64], u32)]) {
    post_digit_samples(d, rows, |l| l).await;
    let r = d
        .client
        .post(d.url("/v1/models/digits/train"))
        .send()
        .await
        .expect("train");
    let run: Value = r.json().await.expect("json");
    assert_eq!(run["run"]["outcome"], "accepted", "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_aggregator_state_starts_a_new_epoch_that_every_edge_adopts() {
    ensure_zoo();
    let ids = tempfile::tempdir().expect("tmp");
    let names = ["edge-0", "edge-1", "edge-2"];
    let fleet_dir = make_fleet(ids.path(), FLEET, &names);
    let agg_dir = tempfile::tempdir().expect("tmp");
    let base = std::fs::read(zoo().join("digits/head.safetensors")).expect("base head");
    let mosquitto = SecureMosquitto::start(&fleet_dir, FLEET).expect("mosquitto (CI installs it)");
    let port = mosquitto.port;
    let (task, stop) = aggregator(port, agg_dir.path(), &fleet_dir, &base);
    let rows = dai_models::digits::load(&repo().join("models/data/digits.csv.gz")).expect("digits");
    let mut edges = Vec::new();
    for name in names {
        let bundle = ids.path().join(name);
        let name = name.to_string();
        edges.push(
            TestDaemon::start(move |c| {
                c.daemon.models = vec!["digits".into()];
                c.training.enabled = false;
                c.num_epochs = 5;
                c.batch_size = 16;
                c.caching_enabled = false;
                c.cloud.enabled = true;
                c.cloud.broker = format!("127.0.0.1:{port}");
                c.cloud.fleet = FLEET.into();
                c.cloud.device_id = name;
                c.cloud.bundle_dir = bundle.display().to_string();
                c.cloud.heartbeat_sec = 1;
                c.retry_delay_sec = 1;
                c.connection_timeout_sec = 2;
            })
            .await,
        );
    }
    for (i, d) in edges.iter().enumerate() {
        train(d, &rows[i * 60..i * 60 + 60]).await;
    }
    let old_epoch = wait_all(&edges, 1, |_| true).await;
    let _ = stop.send(());
    let first = task.await.expect("join").expect("aggregator");
    assert_eq!(
        (first.accepted, first.globals_published),
        (3, 1),
        "{first:?}"
    );

    // Away: two edges train against global 1 of the old epoch.
    for (i, d) in edges.iter().take(2).enumerate() {
        train(d, &rows[200 + i * 60..260 + i * 60]).await;
        assert_eq!(training(d).await["outbox_pending"], 1);
    }
    // The state is lost; the aggregator starts again from nothing.
    for entry in std::fs::read_dir(agg_dir.path()).expect("dir") {
        std::fs::remove_file(entry.expect("entry").path()).expect("delete state");
    }
    let (task, stop) = aggregator(port, agg_dir.path(), &fleet_dir, &base);

    // Every edge adopts version 0 of the new epoch (lower than the 1 it
    // serves) and the two waiting updates are dropped, counted.
    let new_epoch = wait_all(&edges, 0, |e| e > old_epoch).await;
    let mut rebased = 0.0;
    let mut accepted = 0.0;
    for d in &edges {
        let m = d.get_text("/metrics").await;
        rebased += counter(&m, "dai_edge_outbox_rebased_total", None);
        accepted += counter(&m, "dai_edge_sync_acks_total", Some("outcome=\"accepted\""));
    }
    assert_eq!(rebased, 2.0, "each waiting update dropped once, counted");
    assert_eq!(accepted, 3.0, "no dropped update was taken for accepted");

    // The next round makes global 1 of the new epoch from all three.
    for (i, d) in edges.iter().enumerate() {
        train(d, &rows[400 + i * 60..460 + i * 60]).await;
    }
    let epoch = wait_all(&edges, 1, |e| e == new_epoch).await;
    assert_eq!(epoch, new_epoch);
    for d in edges {
        d.stop().await;
    }
    let _ = stop.send(());
    let second = task.await.expect("join").expect("aggregator");
    assert_eq!(
        (second.accepted, second.globals_published),
        (3, 1),
        "{second:?}"
    );
    drop(mosquitto);
}
