//! Operating `dai-cloud` as a process: SIGKILL mid-round and restart (the
//! pending buffer and seen ids survive, nothing counts twice), promote and
//! rollback against a running aggregator, its status page and /metrics.

use dai_head::Head;
use dai_protocol::messages::{Ack, AckStatus};
use dai_testkit::{MqttProbe, free_port, head_bytes, wait_for_port, zero_head};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dai-cloud"))
}

/// A 3 -> 2 head, all zeros, written to `dir/m.safetensors`.
fn base_head(dir: &Path) -> (PathBuf, Head) {
    let head = zero_head(&[3, 2]);
    let path = dir.join("m.safetensors");
    std::fs::write(&path, head_bytes(&head)).expect("write");
    (path, head)
}

/// Update `uN` comes from device `edge-N`: a device has one live
/// contribution per base, and a round closes on distinct devices.
fn device_of(id: &str) -> String {
    format!("edge-{}", id.strip_prefix('u').unwrap_or(id))
}

fn topic_of(id: &str) -> String {
    format!("dai/v1/ops/dev/{}/update", device_of(id))
}

fn update(id: &str, samples: u64, v: f32) -> Vec<u8> {
    dai_testkit::update(id)
        .device(&device_of(id))
        .samples(samples)
        .value(v)
        .loss(0.2)
        .encode()
}

struct Aggregator {
    child: Child,
    http: u16,
}

impl Aggregator {
    fn start(dir: &Path, head: &Path, broker: u16, min_updates: usize) -> Aggregator {
        if !dir.join("aggregator.key").exists() {
            assert!(
                bin()
                    .args(["keygen", "--dir"])
                    .arg(dir)
                    .output()
                    .expect("keygen")
                    .status
                    .success()
            );
        }
        let http = free_port();
        let child = bin()
            .args([
                "run",
                "--fleet",
                "ops",
                "--listen",
                &format!("127.0.0.1:{broker}"),
                "--http",
                &format!("127.0.0.1:{http}"),
                "--min-updates",
                &min_updates.to_string(),
                "--model",
                &format!("m={}", head.display()),
                "--insecure-plaintext",
                // Plain FedAvg: the tests check its exact arithmetic.
                "--robust",
                "mean",
                "--clip-norm",
                "off",
                "--max-sample-weight",
                "off",
            ])
            .arg("--key")
            .arg(dir.join("aggregator.key"))
            .arg("--state")
            .arg(dir.join("state.sqlite"))
            .env("DAI_LOG", "warn")
            .spawn()
            .expect("dai-cloud run");
        wait_for_port(http, Duration::from_secs(20), "dai-cloud");
        wait_for_port(broker, Duration::from_secs(20), "dai-cloud");
        Aggregator { child, http }
    }

    fn kill9(mut self) {
        let ok = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        let _ = self.child.wait();
    }

    async fn get(&self, path: &str) -> String {
        reqwest::get(format!("http://127.0.0.1:{}{path}", self.http))
            .await
            .expect("GET")
            .text()
            .await
            .expect("body")
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device-side MQTT client subscribed to its acks and the model's global.
async fn device(broker: u16, name: &str) -> MqttProbe {
    let probe = MqttProbe::connect(
        broker,
        name,
        // Every device's acks: a plain broker (--insecure-plaintext).
        &["dai/v1/ops/dev/+/ack", "dai/v1/ops/model/m/global"],
    )
    .await;
    // Give the aggregator time to (re)subscribe on its side.
    tokio::time::sleep(Duration::from_millis(700)).await;
    probe
}

/// Poll until `acks` acks and (if `global_version`) that global arrived.
async fn collect(
    device: &mut MqttProbe,
    acks: usize,
    global_version: Option<u64>,
    public: &ed25519_dalek::VerifyingKey,
) -> (Vec<Ack>, Option<Head>) {
    let mut got = Vec::new();
    let mut global = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < acks || (global_version.is_some() && global.is_none()) {
        assert!(
            Instant::now() < deadline,
            "timed out: acks {got:?}, waiting for global {global_version:?}"
        );
        match device.next_publish(Duration::from_millis(200)).await {
            Ok(Some(p)) if p.topic.ends_with("/ack") => {
                let body = dai_protocol::signed::open(
                    dai_protocol::signed::Kind::Ack,
                    public,
                    "ops",
                    &p.topic,
                    &p.payload,
                )
                .expect("an ack signed by the aggregator");
                got.push(Ack::from_bytes(body).expect("ack"))
            }
            Ok(Some(p)) if p.topic.ends_with("/global") => {
                let g =
                    dai_protocol::global::verify(&p.payload, public, "ops", "m").expect("signed");
                if Some(g.version) == global_version {
                    global = Some(Head::from_bytes(&g.head_file).expect("head").0);
                }
            }
            _ => {}
        }
    }
    (got, global)
}

fn public_key(dir: &Path) -> ed25519_dalek::VerifyingKey {
    dai_protocol::global::verifying_key_from_hex(
        &std::fs::read_to_string(dir.join("aggregator.pub")).expect("pub"),
    )
    .expect("key")
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_round_keeps_the_buffer_and_seen_ids() {
    let dir = tempfile::tempdir().expect("tmp");
    let (head_path, _) = base_head(dir.path());
    let broker = free_port();
    let agg = Aggregator::start(dir.path(), &head_path, broker, 3);
    let public = public_key(dir.path());
    let mut edge = device(broker, "edge-1").await;
    for (id, samples, v) in [("u1", 1, 1.0), ("u2", 1, 2.0)] {
        edge.publish(&topic_of(id), update(id, samples, v)).await;
    }
    let (acks, _) = collect(&mut edge, 2, None, &public).await;
    assert!(
        acks.iter()
            .all(|a| a.status == AckStatus::Accepted && a.reason.is_none())
    );
    let m = agg.get("/metrics").await;
    assert_eq!(metric(&m, "dai_cloud_pending_updates{model=\"m\"}"), 2.0);
    assert_eq!(
        metric(&m, "dai_cloud_updates_total{outcome=\"accepted\"}"),
        2.0
    );

    // Mid-round (2 of 3 updates): SIGKILL, no chance to clean up.
    agg.kill9();
    drop(edge);
    let agg = Aggregator::start(dir.path(), &head_path, broker, 3);
    let m = agg.get("/metrics").await;
    assert_eq!(
        metric(&m, "dai_cloud_pending_updates{model=\"m\"}"),
        2.0,
        "the pending buffer survived"
    );
    let mut edge = device(broker, "edge-1b").await;
    // The edge never saw u2's ack before the crash, so it sends u2 again,
    // then its next update.
    edge.publish(&topic_of("u2"), update("u2", 1, 2.0)).await;
    edge.publish(&topic_of("u3"), update("u3", 2, 4.0)).await;
    let (acks, global) = collect(&mut edge, 2, Some(1), &public).await;
    assert_eq!(acks[0].update_id, "u2");
    assert_eq!(acks[0].status, AckStatus::Accepted);
    assert_eq!(
        acks[0].reason.as_deref(),
        Some("duplicate delivery; counted once")
    );
    assert_eq!(
        (acks[1].update_id.as_str(), acks[1].status),
        ("u3", AckStatus::Accepted)
    );
    // FedAvg by sample count over u1 (1 x 1.0), u2 (1 x 2.0), u3 (2 x 4.0):
    // (1 + 2 + 8) / 4 = 2.75; u2 counted twice would give 2.6.
    let global = global.expect("global 1");
    for w in &global.params.weights[0] {
        assert!((w - 2.75).abs() < 1e-5, "{w}");
    }
    let m = agg.get("/metrics").await;
    assert_eq!(
        metric(&m, "dai_cloud_updates_total{outcome=\"duplicate\"}"),
        1.0
    );
    assert_eq!(metric(&m, "dai_cloud_global_version{model=\"m\"}"), 1.0);
    drop(agg);
    let out = bin()
        .args(["models", "list", "--json", "--state"])
        .arg(dir.path().join("state.sqlite"))
        .output()
        .expect("models");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[1]["contributors"], serde_json::json!(["u1", "u2", "u3"]));
    assert_eq!(v[1]["metrics"]["samples"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_and_rollback_reach_a_running_aggregator() {
    let dir = tempfile::tempdir().expect("tmp");
    let (head_path, base) = base_head(dir.path());
    let broker = free_port();
    let agg = Aggregator::start(dir.path(), &head_path, broker, 1);
    let public = public_key(dir.path());
    let state = dir.path().join("state.sqlite");
    let mut edge = device(broker, "edge-1").await;
    edge.publish("dai/v1/ops/dev/edge-1/update", update("u1", 5, 0.5))
        .await;
    let (_, v1) = collect(&mut edge, 1, Some(1), &public).await;
    let v1 = v1.expect("v1");
    assert!((v1.params.weights[0][0] - 0.5).abs() < 1e-6);

    // Promote the base (version 0) from another process: a new version 2
    // with the base's weights reaches the devices.
    let out = bin()
        .args([
            "models",
            "promote",
            "m",
            "0",
            "--reason",
            "v1 misbehaves",
            "--state",
        ])
        .arg(&state)
        .output()
        .expect("promote");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, v2) = collect(&mut edge, 0, Some(2), &public).await;
    assert_eq!(v2.expect("v2").params, base.params);

    // Roll back version 2: its parent (1) is served again, as version 3.
    let out = bin()
        .args(["models", "rollback", "m", "--state"])
        .arg(&state)
        .output()
        .expect("rollback");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, v3) = collect(&mut edge, 0, Some(3), &public).await;
    assert_eq!(v3.expect("v3").params, v1.params);

    // Refusals name the problem.
    let out = bin()
        .args(["models", "promote", "m", "9", "--state"])
        .arg(&state)
        .output()
        .expect("promote");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no version 9 (the newest is 3)"), "{err}");
    let out = bin()
        .args(["models", "--state", "/nonexistent/s.sqlite"])
        .output()
        .expect("models");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such state file"));

    let list = bin()
        .args(["models", "--state"])
        .arg(&state)
        .output()
        .expect("list");
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("weights of v0: v1 misbehaves"), "{text}");
    assert!(
        text.contains("weights of v1: rollback of version 2"),
        "{text}"
    );

    // Status page, its data and metrics.
    let page = agg.get("/").await;
    assert!(page.contains("<title>dai-cloud</title>"));
    let status: serde_json::Value =
        serde_json::from_str(&agg.get("/api/status").await).expect("status json");
    assert_eq!(status["models"]["m"]["current"], 3);
    assert_eq!(status["seen"]["accepted"], 1);
    assert_eq!(status["recent"][0]["update_id"], "u1");
    let m = agg.get("/metrics").await;
    assert_eq!(metric(&m, "dai_cloud_global_version{model=\"m\"}"), 3.0);
    assert_eq!(metric(&m, "dai_cloud_broker_connected"), 1.0);
    assert!(metric(&m, "dai_cloud_update_bytes_total") > 0.0);
    assert!(m.ends_with("# EOF\n"));
}
