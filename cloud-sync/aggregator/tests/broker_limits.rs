//! A hostile enrolled device against the real `dai-cloud run` (embedded
//! broker behind its mutual-TLS gate, a real fleet directory): it publishes
//! 16 MiB retained messages on each of its own topics, on another device's
//! and on topics of its own invention, round after round. The gate must
//! refuse every one (from the packet's fixed header, before buffering it),
//! the aggregator's memory must not grow with them, and an honest device
//! must keep getting its updates acked throughout. The aggregator runs as
//! its own process so its RSS is its own.

use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::signed::{self, Kind};
use dai_testkit::{
    MqttProbe, aggregator_public, bundle_key, bundle_tls, free_port, head, head_bytes, make_fleet,
    update, wait_for_port,
};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FLEET: &str = "lab";
/// Rounds of the attack (each: every target once).
const ROUNDS: usize = 6;
/// Just under the old 16 MiB broker bound, so the old gate took them.
const BIG: usize = (16 << 20) - 4096;

struct Cloud(Child);

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn topic(device: &str, leaf: &str) -> String {
    format!("dai/v1/{FLEET}/dev/{device}/{leaf}")
}

/// dev-b's update `n`, sent as an edge sends it (again every 5 s until
/// acked); its ack's status, or None after 60 s.
async fn submit(
    probe: &mut MqttProbe,
    key: &ed25519_dalek::SigningKey,
    agg: &ed25519_dalek::VerifyingKey,
    n: usize,
) -> Option<AckStatus> {
    let id = format!("dev-b:m:{n}");
    let on = topic("dev-b", "update");
    let body = update(&id)
        .device("dev-b")
        .model("m")
        .samples(10)
        .sizes(&[3, 2])
        .value(0.01)
        .encode();
    let wire = signed::seal(Kind::Update, key, FLEET, &on, &body);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        probe.publish(&on, wire.clone()).await;
        let resend = Instant::now() + Duration::from_secs(5);
        while Instant::now() < resend {
            match probe.next_publish(Duration::from_millis(200)).await {
                Ok(Some(p)) if p.topic.ends_with("/ack") => {
                    let body = signed::open(Kind::Ack, agg, FLEET, &p.topic, &p.payload)
                        .expect("acks are signed by the aggregator");
                    let ack = Ack::from_bytes(body).expect("ack");
                    if ack.update_id == id {
                        return Some(ack.status);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    None
}

/// One attacker connection: publish `size` bytes retained on `on` and
/// wait for the broker's PUBACK (true) or the connection's end (false).
async fn attack(port: u16, bundle: &Path, on: &str, size: usize) -> bool {
    let mut opts = MqttProbe::options(port, "dev-a", Some(bundle_tls(bundle)));
    // The attacker's own client must not stop it first.
    opts.set_max_packet_size(32 << 20, 32 << 20);
    let (client, mut events): (AsyncClient, _) = AsyncClient::new(opts, 4);
    client
        .publish(on, QoS::AtLeastOnce, true, vec![0x5a; size])
        .await
        .expect("queue");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => return true,
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_flooding_16_mib_retained_messages_is_refused_and_acks_go_on() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fleet_dir = make_fleet(tmp.path(), FLEET, &["dev-a", "dev-b"]);
    let base = tmp.path().join("m.safetensors");
    std::fs::write(&base, head_bytes(&head(&[3, 2], 1))).expect("base head");
    let port = free_port();
    let log = std::fs::File::create(tmp.path().join("cloud.log")).expect("log");
    let cloud = Cloud(
        Command::new(env!("CARGO_BIN_EXE_dai-cloud"))
            .args([
                "run",
                "--fleet",
                FLEET,
                "--min-updates",
                "1",
                "--max-staleness",
                "1000",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--http", &format!("127.0.0.1:{}", free_port())])
            .arg("--fleet-dir")
            .arg(&fleet_dir)
            .arg("--state")
            .arg(tmp.path().join("cloud.sqlite"))
            .arg("--model")
            .arg(format!("m={}", base.display()))
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start dai-cloud"),
    );
    let pid = cloud.0.id();
    wait_for_port(port, Duration::from_secs(30), "the gate");
    let agg = aggregator_public(&fleet_dir);
    let (a_dir, b_dir) = (tmp.path().join("dev-a"), tmp.path().join("dev-b"));
    let b_key = bundle_key(&b_dir);
    let mut honest =
        MqttProbe::connect_tls(port, "dev-b", &[&topic("dev-b", "ack")], bundle_tls(&b_dir)).await;
    assert_eq!(
        submit(&mut honest, &b_key, &agg, 0).await,
        Some(AckStatus::Accepted),
        "the honest device's first update was not acked"
    );
    // The positive control: dev-a may retain a status of its bound.
    assert!(
        attack(port, &a_dir, &topic("dev-a", "status"), 200).await,
        "a small retained status was refused: the refusals below would prove nothing"
    );
    let before = rss_kib(pid);

    let mut taken = Vec::new();
    let mut peak = before;
    for round in 0..ROUNDS {
        let targets = [
            topic("dev-a", "update"),
            topic("dev-a", "status"),
            topic("dev-a", "event"),
            topic("dev-a", "want"),
            topic("dev-b", "update"),
            format!("dai/v1/{FLEET}/model/m/global"),
            topic("dev-a", &format!("junk{round}")),
            format!("dai/v1/{FLEET}/mine/{round}"),
        ];
        for on in &targets {
            if attack(port, &a_dir, on, BIG).await {
                taken.push(on.clone());
            }
            peak = peak.max(rss_kib(pid));
        }
        assert_eq!(
            submit(&mut honest, &b_key, &agg, round + 1).await,
            Some(AckStatus::Accepted),
            "round {round}: the aggregator stopped acking the honest device"
        );
    }
    let after = rss_kib(pid);
    let attempts = ROUNDS * 8;
    println!(
        "broker limits: {attempts} retained {BIG}-byte messages ({} MiB), {} taken; aggregator RSS {} MiB before, {} MiB peak, {} MiB after",
        (attempts * BIG) >> 20,
        taken.len(),
        before >> 10,
        peak >> 10,
        after >> 10
    );
    assert!(
        taken.is_empty(),
        "the gate took 16 MiB messages on {taken:?}"
    );
    // Everything refused, so the broker holds none of it: what grows is
    // TLS sessions and allocator slack, far below one such message.
    assert!(
        peak < before + (64 << 10),
        "the aggregator grew from {before} KiB to {peak} KiB under the attack"
    );
    drop(cloud);
}
