//! The aggregator ingest run the federated and trust benchmarks share:
//! M simulated devices (one MQTT connection each) publish real updates as
//! fast as QoS 1 allows, signed or not, and the rate is acked updates per
//! second from the first publish to the last ack.

use dai_cloud::monitor::Monitor;
use dai_cloud::service::{BrokerAddr, ServiceConfig, run_monitored};
use dai_cloud::state::{Settings, Strategy};
use dai_cloud::{Aggregation, Robust};
use dai_protocol::update::Update;
use dai_train::Head;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn aggregator_config(
    port: u16,
    dir: &std::path::Path,
    base: &Head,
    strategy: Strategy,
) -> ServiceConfig {
    ServiceConfig {
        fleet: "bench".into(),
        broker: BrokerAddr {
            host: "127.0.0.1".into(),
            port,
        },
        client_id: format!("dai-cloud-{port}"),
        state_path: dir.join("agg.sqlite"),
        models: vec![(
            "digits".into(),
            base.to_bytes(&Default::default()).expect("bytes"),
        )],
        settings: settings(strategy),
        round_timeout: Duration::from_secs(600),
        signing_key: ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]),
        server_optimizer: None,
        devices: dai_cloud::auth::DeviceAuth::Unchecked,
        fleet_dir: None,
        tls: None,
        tiers: Vec::new(),
        upstream: None,
        share_group: None,
    }
}

/// Device `ing{k}`'s signing key in the ingest runs.
pub fn device_key(k: usize) -> ed25519_dalek::SigningKey {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&(k as u64).to_le_bytes());
    ed25519_dalek::SigningKey::from_bytes(&seed)
}

/// The enrolled keys of devices `ing0..ing{n}` (what a fleet registry holds).
pub fn device_keys(n: usize) -> dai_cloud::auth::DeviceKeys {
    let mut r = dai_trust::Registry::new(dai_trust::FleetName::parse("bench").expect("fleet"));
    for k in 0..n {
        r.add(dai_trust::DeviceRecord {
            name: dai_trust::DeviceName::parse(&format!("ing{k}")).expect("name"),
            serial: dai_trust::Serial::from_der_bytes(&[k as u8 + 1]),
            public_key: hex::encode(device_key(k).verifying_key().to_bytes()),
            created_at: 0,
            not_after: i64::MAX,
            revoked_at: None,
        })
        .expect("add");
    }
    dai_cloud::auth::DeviceKeys::from_registry(&r).expect("keys")
}

/// A connected device client subscribed to its acks; returns once subscribed.
pub async fn device_client(port: u16, name: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut opts = MqttOptions::new(name, "127.0.0.1", port);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 1024);
    client
        .subscribe(format!("dai/v1/bench/dev/{name}/ack"), QoS::AtLeastOnce)
        .await
        .expect("sub");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("device {name} could not subscribe: {other:?}"),
        }
    }
    (client, events)
}

/// (b): updates/s from the first publish to the last ack. `signed`: each
/// device signs its updates and the aggregator verifies every signature
/// against the enrolled keys (as a secure fleet runs).
pub async fn ingest(
    port: u16,
    base: &Head,
    devices: usize,
    per_device: usize,
    payload: &Update,
    signed: bool,
) -> f64 {
    let dir = tempfile::tempdir().expect("tmp");
    let monitor = Arc::new(Monitor::new());
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut cfg = aggregator_config(port, dir.path(), base, Strategy::FedBuff { k: 10 });
    if signed {
        cfg.devices = dai_cloud::auth::DeviceAuth::Signed(device_keys(devices));
    }
    let service = tokio::spawn(run_monitored(cfg, monitor.clone(), async move {
        let _ = stop_rx.await;
    }));
    let mut clients = Vec::new();
    for k in 0..devices {
        clients.push(device_client(port, &format!("ing{k}")).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (k, (client, mut events)) in clients.into_iter().enumerate() {
        let mut u = payload.clone();
        tasks.push(tokio::spawn(async move {
            let topic = format!("dai/v1/bench/dev/ing{k}/update");
            let key = device_key(k);
            for i in 0..per_device {
                u.meta.update_id = format!("ing{k}-{i}");
                u.meta.device = format!("ing{k}");
                let body = u.encode().expect("encode");
                let wire = if signed {
                    dai_protocol::signed::seal(
                        dai_protocol::signed::Kind::Update,
                        &key,
                        "bench",
                        &topic,
                        &body,
                    )
                } else {
                    body
                };
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, wire)
                    .await
                    .expect("publish");
            }
            let mut acks = 0;
            let deadline = Instant::now() + Duration::from_secs(300);
            while acks < per_device && Instant::now() < deadline {
                if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                    tokio::time::timeout(Duration::from_secs(1), events.poll()).await
                    && p.topic.ends_with("/ack")
                {
                    acks += 1;
                }
            }
            acks
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.expect("join");
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(acked, devices * per_device, "every update acked");
    let accepted = monitor
        .updates
        .get_or_create(&dai_cloud::monitor::OutcomeLabel {
            outcome: "accepted".into(),
        })
        .get();
    assert_eq!(accepted as usize, devices * per_device);
    let _ = stop.send(());
    let _ = service.await;
    acked as f64 / elapsed
}

/// Plain FedAvg/FedBuff settings with bounds no benchmark update reaches.
pub fn settings(strategy: Strategy) -> Settings {
    Settings {
        strategy,
        aggregation: Aggregation {
            clip: dai_cloud::Clip::Off,
            robust: Robust::Mean,
        },
        max_staleness: 1_000_000,
        reject_norm: 1e6,
        sample_cap: dai_cloud::state::SampleCap::Auto,
        max_updates_per_minute: 0,
        dp: None,
        validation: None,
    }
}
