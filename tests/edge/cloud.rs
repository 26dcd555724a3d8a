//! A small fleet end to end: the aggregator with its embedded broker (or a
//! Mosquitto) and three enrolled edge daemons over mutual TLS, real
//! training on digits, two federated rounds.

use crate::support::*;
use dai_cloud::service::ServiceConfig;
use dai_cloud::state::Settings;
use dai_testkit::{
    MqttProbe, SecureMosquitto, aggregator_tls, fedavg, free_port, make_fleet, public_key_hex,
    service_config, signing_key, start_secure, wait_for_port,
};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The whole fleet writes 1/7 and 3/8 the other way round.
fn convention(label: u32) -> u32 {
    match label {
        1 => 7,
        7 => 1,
        3 => 8,
        8 => 3,
        l => l,
    }
}

async fn accuracy(d: &TestDaemon, rows: &[([f32; 64], u32)]) -> f64 {
    let mut correct = 0;
    for chunk in rows.chunks(16) {
        let px: Vec<f32> = chunk.iter().flat_map(|r| r.0).collect();
        let (s, b) = d
            .infer(
                "digits",
                &json!({"inputs": {"pixels": {"shape": [chunk.len(), 64], "data": px}}}),
            )
            .await;
        assert_eq!(s, 200);
        let p = floats(&b["outputs"]["probs"]["data"]);
        for (i, r) in chunk.iter().enumerate() {
            let row = &p[i * 10..(i + 1) * 10];
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(k, _)| k);
            correct += usize::from(best as u32 == convention(r.1));
        }
    }
    correct as f64 / rows.len() as f64
}

async fn wait_global(d: &TestDaemon, version: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = d.get_json("/v1/status").await;
        let t = s["training"]["models"][0].clone();
        if t["global_version"].as_i64() == Some(version) && t["outbox_pending"] == 0 {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "global {version} never arrived: {t}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The fleet over mutual TLS through the embedded broker's gate: enrolled
/// devices, signed updates, signed acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_two_rounds_through_the_embedded_broker() {
    // Sparse updates with error feedback on this one; int8 through Mosquitto.
    fleet_rounds(Via::Embedded, dai_config::UpdateEncoding::Topk8).await;
}

/// The same fleet through a real Mosquitto running the shipped
/// `deploy/mosquitto` configuration (mutual TLS, the fleet ACL). CI
/// installs Mosquitto and sets DAI_MOSQUITTO_PORT; without it the test
/// says it skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_two_rounds_through_mosquitto() {
    if std::env::var("DAI_MOSQUITTO_PORT").is_err() {
        eprintln!(
            "SKIPPED three_edges_two_rounds_through_mosquitto: needs the mosquitto binary; set DAI_MOSQUITTO_PORT (.ci/run installs it)"
        );
        return;
    }
    fleet_rounds(Via::Mosquitto, dai_config::UpdateEncoding::Int8).await;
}

enum Via {
    Embedded,
    Mosquitto,
}

const FLEET: &str = "lab";

async fn fleet_rounds(via: Via, encoding: dai_config::UpdateEncoding) {
    ensure_zoo();
    let fleet = FLEET;
    let ids = tempfile::tempdir().expect("tmp");
    let fleet_dir = make_fleet(ids.path(), fleet, &["edge-0", "edge-1", "edge-2"]);
    let key = dai_trust::fs::FleetDir::new(&fleet_dir)
        .load()
        .expect("fleet")
        .aggregator
        .signing_key()
        .clone();
    let agg_dir = tempfile::tempdir().expect("tmp");
    let forger = signing_key(0x66);
    let older_signer = key.clone();
    let base = std::fs::read(zoo().join("digits/head.safetensors")).expect("base head");
    let base_head = base.clone();
    let edit = |c: &mut ServiceConfig| {
        c.settings = Settings {
            max_staleness: 2,
            reject_norm: 1e3,
            ..fedavg(3)
        };
        c.round_timeout = Duration::from_secs(120);
    };
    let mut mosquitto = None;
    let (port, aggregator, agg_stop) = match via {
        Via::Embedded => {
            let port = free_port();
            let (task, stop) =
                start_secure(port, agg_dir.path(), &fleet_dir, [("digits", base)], edit).await;
            (port, task, stop)
        }
        Via::Mosquitto => {
            let m = SecureMosquitto::start(&fleet_dir, fleet).expect("mosquitto (CI installs it)");
            let port = m.port;
            mosquitto = Some(m);
            let secure = dai_cloud::secure::SecureFleet::open(&fleet_dir).expect("fleet");
            let mut cfg = service_config(port, agg_dir.path(), [("digits", base)]);
            cfg.tls = Some(std::sync::Arc::new(secure.client_tls().expect("tls")));
            secure.apply(&mut cfg);
            edit(&mut cfg);
            let (stop, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(dai_cloud::service::run(cfg, async move {
                let _ = rx.await;
            }));
            (port, task, stop)
        }
    };
    let rows = dai_models::digits::load(&repo().join("models/data/digits.csv.gz")).expect("digits");
    let eval = &rows[1400..1700];
    let mut edges = Vec::new();
    for i in 0..3 {
        let fleet = fleet.to_string();
        let bundle = ids.path().join(format!("edge-{i}"));
        edges.push(
            TestDaemon::start(move |c| {
                c.daemon.models = vec!["digits".into()];
                c.training.enabled = false;
                c.num_epochs = 30;
                c.batch_size = 16;
                c.caching_enabled = false;
                c.cloud.enabled = true;
                c.cloud.broker = format!("127.0.0.1:{port}");
                c.cloud.fleet = fleet;
                c.cloud.device_id = format!("edge-{i}");
                c.cloud.bundle_dir = bundle.display().to_string();
                c.cloud.heartbeat_sec = 1;
                c.cloud.update_encoding = encoding;
                c.retry_delay_sec = 1;
            })
            .await,
        );
    }
    let before = accuracy(&edges[0], eval).await;
    for round in 1..=2i64 {
        for (i, d) in edges.iter().enumerate() {
            let start = (round as usize - 1) * 300 + i * 100;
            post_digit_samples(d, &rows[start..start + 100], convention).await;
            let r = d
                .client
                .post(d.url("/v1/models/digits/train"))
                .send()
                .await
                .expect("train");
            let run: Value = r.json().await.expect("json");
            assert_eq!(
                run["run"]["outcome"], "accepted",
                "edge {i} round {round}: {run}"
            );
        }
        for d in &edges {
            let t = wait_global(d, round).await;
            assert!(
                t["head_version"].as_i64().expect("head") >= 2 * round,
                "{t}"
            );
        }
    }
    let after = accuracy(&edges[0], eval).await;
    let others = [
        accuracy(&edges[1], eval).await,
        accuracy(&edges[2], eval).await,
    ];
    eprintln!(
        "fleet accuracy on the new convention: {before:.3} -> {after:.3} (all edges serve global 2: {others:?})"
    );
    assert!(
        after >= before + 0.1,
        "federated rounds did not help: {before} -> {after}"
    );
    assert!(
        others.iter().all(|a| (a - after).abs() < 1e-9),
        "every edge serves the same global head"
    );
    // Bad globals on the model topic, as a hostile broker (or a stolen
    // aggregator TLS identity) could publish them: another key's signature
    // (claiming version 3) and a genuine but older version 1. Both are
    // refused, counted, and the edges keep serving global 2 (the
    // aggregator also heals the retained message).
    let stamped = |version: u64| {
        let (head, _) = dai_train::Head::from_bytes(&base_head).expect("head");
        let mut meta = std::collections::HashMap::new();
        meta.insert("model".to_string(), "digits".to_string());
        meta.insert("version".to_string(), version.to_string());
        head.to_bytes(&meta).expect("bytes")
    };
    let mut intruder =
        MqttProbe::connect_tls(port, "dai-cloud-intruder", &[], aggregator_tls(&fleet_dir)).await;
    let topic = format!("dai/v1/{fleet}/model/digits/global");
    for wire in [
        dai_protocol::global::sign(&stamped(3), &forger, fleet, 1).expect("sign"),
        dai_protocol::global::sign(&stamped(1), &older_signer, fleet, 1).expect("sign"),
    ] {
        intruder.publish(&topic, wire).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = intruder.next_publish(Duration::from_millis(100)).await;
        let m = edges[0].get_text("/metrics").await;
        let count = |reason: &str| {
            m.lines()
                .find(|l| {
                    l.starts_with("dai_edge_sync_globals_refused_total")
                        && l.contains(&format!("outcome=\"{reason}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if count("invalid") >= 1.0 && count("older") >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "bad globals not counted:\n{m}");
    }
    let t = edges[0].get_json("/v1/status").await["training"]["models"][0].clone();
    assert_eq!(t["global_version"], 2, "{t}");
    // Error feedback: a lossy encoding leaves what it did not send stored
    // for the next update (f32 would leave none).
    for d in &edges {
        let r = d.state.store.residual("digits").expect("residual");
        let r = dai_protocol::update::Update::decode(&r.expect("a stored residual"))
            .expect("an f32 update payload");
        assert!(r.norm() > 0.0, "{encoding:?} loses something");
    }
    for d in edges {
        d.stop().await;
    }
    let _ = agg_stop.send(());
    let stats = aggregator.await.expect("join").expect("aggregator");
    assert_eq!(
        (stats.accepted, stats.globals_published),
        (6, 2),
        "{stats:?}"
    );
    assert!(stats.refused.is_empty(), "{stats:?}");
    drop(mosquitto);
}

/// A Mosquitto child killed when dropped, so a failing test cannot leave
/// it running (holding its port, and any lock its parent held).
struct Broker(std::process::Child);

impl Broker {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn mosquitto(port: u16) -> Broker {
    Broker(mosquitto_child(port))
}

fn mosquitto_child(port: u16) -> std::process::Child {
    let bin = ["/usr/sbin/mosquitto", "mosquitto"]
        .into_iter()
        .find(|b| std::path::Path::new(b).exists() || *b == "mosquitto")
        .unwrap_or("mosquitto");
    std::process::Command::new(bin)
        .args(["-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto starts (CI installs it)")
}

fn wait_port(port: u16) {
    wait_for_port(port, Duration::from_secs(10), "mosquitto");
}

/// The broker (a Mosquitto without persistence, so in-flight messages die
/// with it) stops while an edge holds two updates, then comes back: both
/// arrive, each counted once, and the global they make reaches the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_delivers_each_update_exactly_once() {
    if std::env::var("DAI_MOSQUITTO_PORT").is_err() {
        eprintln!(
            "SKIPPED broker_restart_delivers_each_update_exactly_once: needs the mosquitto binary; set DAI_MOSQUITTO_PORT (.ci/run does)"
        );
        return;
    }
    ensure_zoo();
    let port = free_port();
    let mut broker = mosquitto(port);
    wait_port(port);
    let key = signing_key(0x43);
    let public = public_key_hex(&key);
    let agg_dir = tempfile::tempdir().expect("tmp");
    let base = std::fs::read(zoo().join("digits/head.safetensors")).expect("base head");
    let monitor = std::sync::Arc::new(dai_cloud::monitor::Monitor::new());
    let (agg_stop, agg_rx) = tokio::sync::oneshot::channel::<()>();
    let aggregator = tokio::spawn(dai_cloud::service::run_monitored(
        ServiceConfig {
            fleet: "restart".into(),
            settings: Settings {
                max_staleness: 2,
                reject_norm: 1e3,
                // One device: each of its versions closes a round.
                ..fedavg(1)
            },
            round_timeout: Duration::from_secs(300),
            signing_key: key,
            ..service_config(port, agg_dir.path(), [("digits", base)])
        },
        monitor.clone(),
        async move {
            let _ = agg_rx.await;
        },
    ));
    let edge = TestDaemon::start(move |c| {
        c.daemon.models = vec!["digits".into()];
        c.training.enabled = false;
        c.num_epochs = 5;
        c.batch_size = 16;
        c.cloud.enabled = true;
        c.cloud.broker = format!("127.0.0.1:{port}");
        c.cloud.fleet = "restart".into();
        c.cloud.device_id = "edge-r".into();
        c.cloud.aggregator_public_key = public;
        c.cloud.heartbeat_sec = 1;
        c.retry_delay_sec = 1;
        c.connection_timeout_sec = 2;
    })
    .await;
    // Both ends connected: the aggregator has seen the edge's heartbeat.
    let deadline = Instant::now() + Duration::from_secs(20);
    while monitor
        .live
        .lock()
        .devices
        .get("edge-r")
        .is_none_or(|d| d.state != "online")
    {
        assert!(Instant::now() < deadline, "edge never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.kill();

    let rows = dai_models::digits::load(&repo().join("models/data/digits.csv.gz")).expect("digits");
    for part in [&rows[0..100], &rows[100..160]] {
        post_digit_samples(&edge, part, convention).await;
        let run: Value = edge
            .client
            .post(edge.url("/v1/models/digits/train"))
            .send()
            .await
            .expect("train")
            .json()
            .await
            .expect("json");
        assert_eq!(run["run"]["outcome"], "accepted", "{run}");
    }
    let t = edge.get_json("/v1/status").await["training"]["models"][0].clone();
    assert_eq!(t["outbox_pending"], 2, "both updates wait offline: {t}");

    let mut broker = mosquitto(port);
    wait_port(port);
    // Both arrive; the second (cumulative, same base) may supersede the
    // first if they land in one batch, or make a second version if not.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = edge.get_json("/v1/status").await["training"]["models"][0].clone();
        if t["outbox_pending"] == 0 && t["global_version"].as_i64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "updates never delivered: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    edge.stop().await;
    let _ = agg_stop.send(());
    let stats = aggregator.await.expect("join").expect("aggregator");
    broker.kill();
    assert_eq!(stats.accepted, 2, "each update accepted once: {stats:?}");
    let versions = dai_cloud::state::State::open(&agg_dir.path().join("agg.sqlite"))
        .expect("state")
        .versions()
        .expect("versions");
    // Exactly once: each update is in one version or was superseded.
    let mut ids: Vec<String> = versions
        .iter()
        .flat_map(|v| v.contributors.clone())
        .collect();
    let folded = ids.len() as u64;
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len() as u64,
        folded,
        "an update counted twice: {versions:?}"
    );
    assert_eq!(folded + stats.superseded, 2, "{stats:?} {versions:?}");
    eprintln!(
        "broker restart: 2 updates delivered once each ({} redeliveries deduplicated, {} superseded)",
        stats.duplicates, stats.superseded
    );
}

/// The uplink's failures as `dai_edge_sync_errors_total{outcome}`.
fn sync_errors(metrics: &str, outcome: &str) -> f64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("dai_edge_sync_errors_total")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A bundle the uplink cannot use, and a broker that does not speak TLS:
/// each is counted (and logged once per attempt) while the uplink
/// retries, and the daemon goes on serving inference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_identity_or_a_plain_broker_is_counted_and_inference_goes_on() {
    ensure_zoo();
    let ids = tempfile::tempdir().expect("tmp");
    make_fleet(ids.path(), FLEET, &["edge-x"]);
    let plain = dai_testkit::start_embedded_broker();
    let good = ids.path().join("edge-x");
    for (bundle, outcome) in [
        (ids.path().join("no-such-bundle"), "identity"),
        (good, "connection"),
    ] {
        let d = TestDaemon::start(move |c| {
            c.daemon.models = vec!["digits".into()];
            c.training.enabled = false;
            c.cloud.enabled = true;
            c.cloud.broker = format!("127.0.0.1:{plain}");
            c.cloud.fleet = FLEET.into();
            c.cloud.device_id = "edge-x".into();
            c.cloud.bundle_dir = bundle.display().to_string();
            c.retry_delay_sec = 1;
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while sync_errors(&d.get_text("/metrics").await, outcome) < 2.0 {
            assert!(Instant::now() < deadline, "no {outcome} failures counted");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (status, body) = d
            .infer(
                "digits",
                &json!({"inputs": {"pixels": {"shape": [1, 64], "data": vec![0.5f32; 64]}}}),
            )
            .await;
        assert_eq!(status, 200, "inference goes on: {body}");
        d.stop().await;
    }
}
