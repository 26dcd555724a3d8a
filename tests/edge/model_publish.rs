//! `dai-cloud models publish` end to end: an aggregator behind its mutual
//! TLS gate, enrolled edge daemons, bundles offered over MQTT. A targeted
//! device loads the bundle and others do not; a group reaches its members;
//! a bundle tract cannot load is reported failed and the old version keeps
//! serving; an offer with a wrong signature (injected by a client that can
//! write the topic: a hostile broker) is refused and healed; a download
//! cut by a power loss resumes from the chunks already on disk.

use crate::support::*;
use dai_protocol::bundle::{Offer, Targets};
use dai_protocol::signed::{self, Kind};
use dai_testkit::{
    MqttProbe, SecureMosquitto, aggregator_tls, free_port, make_fleet, service_config, signing_key,
    start_secure,
};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const FLEET: &str = "lab";

fn edge_config(c: &mut dai_config::Config, port: u16, ids: &Path, name: &str, groups: &[&str]) {
    c.daemon.models = vec!["digits".into()];
    c.training.enabled = false;
    c.cloud.enabled = true;
    c.cloud.broker = format!("127.0.0.1:{port}");
    c.cloud.fleet = FLEET.into();
    c.cloud.device_id = name.into();
    c.cloud.bundle_dir = ids.join(name).display().to_string();
    c.cloud.heartbeat_sec = 1;
    c.cloud.groups = groups.iter().map(|g| g.to_string()).collect();
    c.retry_delay_sec = 1;
}

async fn version(d: &TestDaemon) -> String {
    let v: Value = d.get_json("/v1/models/digits").await;
    v["version"].as_str().unwrap_or_default().to_string()
}

async fn wait_version(d: &TestDaemon, want: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while version(d).await != want {
        assert!(
            Instant::now() < deadline,
            "{what}: still {}",
            version(d).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The aggregator's record of `device`'s report on `sha`, once it is
/// loaded or failed.
async fn wait_report(state: &Path, sha: &str, device: &str) -> dai_cloud::state::BundleReportRow {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = dai_cloud::state::State::open(state).expect("state");
        let row = s
            .bundle_reports()
            .expect("reports")
            .into_iter()
            .find(|r| r.sha256 == sha && r.device == device);
        if let Some(r) = row.filter(|r| r.state == "loaded" || r.state == "failed") {
            return r;
        }
        assert!(Instant::now() < deadline, "no final report from {device}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn publish(state: &Path, bundle: &Path, devices: &[&str], group: Option<&str>) -> Offer {
    let mut s = dai_cloud::state::State::open(state).expect("state");
    let targets = Targets {
        devices: devices.iter().map(|d| d.to_string()).collect(),
        group: group.map(str::to_string),
    };
    dai_cloud::publish::publish(&mut s, bundle, targets).expect("published")
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_bundles_through_the_embedded_broker() {
    published_bundles(false).await;
}

/// The same through Mosquitto on the shipped config and ACL
/// (`deploy/mosquitto`), which must let the bundle topics through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_bundles_through_mosquitto() {
    if std::env::var_os("DAI_MOSQUITTO_PORT").is_none() {
        eprintln!(
            "SKIPPED published_bundles_through_mosquitto: DAI_MOSQUITTO_PORT not set (CI installs Mosquitto and sets it)"
        );
        return;
    }
    published_bundles(true).await;
}

async fn published_bundles(mosquitto: bool) {
    ensure_zoo();
    let ids = tempfile::tempdir().expect("tmp");
    let fleet_dir = make_fleet(ids.path(), FLEET, &["edge-0", "edge-1", "edge-2", "edge-3"]);
    let agg = tempfile::tempdir().expect("tmp");
    let state = agg.path().join("agg.sqlite");
    let base = std::fs::read(zoo().join("digits/head.safetensors")).expect("head");
    let mut broker = None;
    let (port, task, stop) = if mosquitto {
        let m = SecureMosquitto::start(&fleet_dir, FLEET).expect("mosquitto (CI installs it)");
        let port = m.port;
        broker = Some(m);
        let secure = dai_cloud::secure::SecureFleet::open(&fleet_dir).expect("fleet");
        let mut cfg = service_config(port, agg.path(), [("digits", base)]);
        cfg.tls = Some(std::sync::Arc::new(secure.client_tls().expect("tls")));
        secure.apply(&mut cfg);
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let monitor = std::sync::Arc::new(dai_cloud::monitor::Monitor::new());
        let task = tokio::spawn(dai_cloud::service::run_monitored(
            cfg,
            monitor.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while monitor.live.lock().subscriptions < dai_cloud::intake::SUBSCRIPTIONS {
            assert!(Instant::now() < deadline, "the aggregator never subscribed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (port, task, stop)
    } else {
        let port = free_port();
        let (task, stop) =
            start_secure(port, agg.path(), &fleet_dir, [("digits", base)], |_| {}).await;
        (port, task, stop)
    };
    let mut edges = Vec::new();
    for (name, groups) in [("edge-0", &[][..]), ("edge-1", &[]), ("edge-2", &["cams"])] {
        let ids = ids.path().to_path_buf();
        edges.push(TestDaemon::start(move |c| edge_config(c, port, &ids, name, groups)).await);
    }
    let work = tempfile::tempdir().expect("tmp");

    // To one device by name.
    let v2 = publish(
        &state,
        &digits_version(&work.path().join("v2"), "2.0.0", 0),
        &["edge-0"],
        None,
    );
    let r = wait_report(&state, &v2.sha256, "edge-0").await;
    assert_eq!(r.state, "loaded", "{r:?}");
    wait_version(&edges[0], "2.0.0", "edge-0 serves the published bundle").await;

    // To a group.
    let v3 = publish(
        &state,
        &digits_version(&work.path().join("v3"), "3.0.0", 0),
        &[],
        Some("cams"),
    );
    assert_eq!(
        wait_report(&state, &v3.sha256, "edge-2").await.state,
        "loaded"
    );
    wait_version(&edges[2], "3.0.0", "edge-2 is in group cams").await;
    assert_eq!(version(&edges[0]).await, "2.0.0", "edge-0 is not in cams");
    assert_eq!(
        version(&edges[1]).await,
        "1.0.0",
        "edge-1 was never targeted"
    );

    // A bundle tract cannot load: reported failed, the old version serves.
    let bad = digits_version(&work.path().join("v4"), "4.0.0", 0);
    let onnx = bad.join("backbone.onnx");
    std::fs::remove_file(&onnx).expect("unlink");
    std::fs::write(&onnx, b"not an onnx file").expect("write");
    let sha = dai_infer::bundle::sha256_file(&onnx).expect("sha").0;
    let m = bad.join("manifest.toml");
    let text = std::fs::read_to_string(&m).expect("manifest");
    std::fs::write(
        &m,
        text.replace(
            "0eb85be23f00d20601205f1c83ef15dcb932ca080187e99b217f68609d25b4d5",
            &sha,
        ),
    )
    .expect("manifest");
    let v4 = publish(&state, &bad, &["edge-0"], None);
    let r = wait_report(&state, &v4.sha256, "edge-0").await;
    assert_eq!(r.state, "failed", "{r:?}");
    assert!(
        r.detail.contains("refused") && r.detail.contains("backbone.onnx"),
        "{r:?}"
    );
    assert_eq!(
        version(&edges[0]).await,
        "2.0.0",
        "the working version keeps serving"
    );

    // A forged offer (another key) for edge-1, written retained by a
    // client that may write the topic: refused on the device, and the
    // aggregator puts its own offer back.
    let mut probe = MqttProbe::connect_tls(
        port,
        "dai-cloud-forger",
        &["dai/v1/lab/model/digits/bundle"],
        aggregator_tls(&fleet_dir),
    )
    .await;
    let archive = dai_cloud::publish::pack(&digits_version(&work.path().join("v9"), "9.0.0", 0))
        .expect("pack");
    let forged = Offer::describe(
        "digits",
        "9.0.0",
        &archive,
        Targets {
            devices: vec!["edge-1".into()],
            group: None,
        },
        0.0,
    );
    let topic = "dai/v1/lab/model/digits/bundle";
    let wire = signed::seal(
        Kind::Offer,
        &signing_key(0x66),
        FLEET,
        topic,
        &forged.to_bytes(),
    );
    probe
        .client
        .publish(topic, rumqttc::QoS::AtLeastOnce, true, wire.clone())
        .await
        .expect("publish");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = edges[1].get_text("/metrics").await;
        if metric(&m, "dai_edge_sync_errors_total{outcome=\"bundle_refused\"}") >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "edge-1 never refused the forged offer"
        );
        let _ = probe.next_publish(Duration::from_millis(100)).await;
    }
    assert_eq!(
        version(&edges[1]).await,
        "1.0.0",
        "a forged offer installs nothing"
    );
    let healed = Instant::now() + Duration::from_secs(30);
    loop {
        match probe.next_publish(Duration::from_millis(500)).await {
            Ok(Some(p)) if p.topic == topic && p.payload.as_ref() != wire.as_slice() => break,
            _ => assert!(
                Instant::now() < healed,
                "the aggregator never restored its offer"
            ),
        }
    }

    // A download cut by a power loss: edge-3 starts with the first chunks
    // of a 6-chunk bundle on disk (and a damaged one after them); it
    // fetches only the rest.
    let big = digits_version(
        &work.path().join("v5"),
        "5.0.0",
        5 * dai_protocol::bundle::CHUNK_BYTES,
    );
    let archive = dai_cloud::publish::pack(&big).expect("pack");
    let data3 = tempfile::tempdir().expect("tmp");
    let chunk = dai_protocol::bundle::CHUNK_BYTES;
    let preview = Offer::describe("digits", "5.0.0", &archive, Targets::default(), 0.0);
    let downloads = data3.path().join("models/.downloads");
    std::fs::create_dir_all(&downloads).expect("mkdir");
    let mut part = archive[..2 * chunk].to_vec();
    part.extend(vec![0u8; chunk / 2]);
    std::fs::write(downloads.join(format!("{}.part", preview.sha256)), part).expect("seed");
    let v5 = publish(&state, &big, &["edge-3"], None);
    assert_eq!(v5.sha256, preview.sha256, "packing is deterministic");
    let total = v5.chunks.len();
    assert!(total >= 6, "{total} chunks");
    let mut config = test_config(data3.path());
    edge_config(&mut config, port, ids.path(), "edge-3", &[]);
    let e3 = TestDaemon::start_with(config, tempfile::tempdir().expect("unused")).await;
    assert_eq!(
        wait_report(&state, &v5.sha256, "edge-3").await.state,
        "loaded"
    );
    wait_version(&e3, "5.0.0", "edge-3 resumed").await;
    let fetched = metric(
        &e3.get_text("/metrics").await,
        "dai_edge_bundle_chunks_total",
    );
    assert_eq!(
        fetched as usize,
        total - 2,
        "only the missing chunks were fetched"
    );

    e3.stop().await;
    for e in edges {
        e.stop().await;
    }
    let _ = stop.send(());
    let _ = task.await;
    drop(broker);
}
