//! The aggregator through a real MQTT broker (embedded rumqttd on loopback):
//! updates in, acks and a signed retained global model out.

use dai_cloud::service::{BrokerAddr, ServiceConfig, run, start_embedded_broker};
use dai_cloud::state::{Settings, Strategy};
use dai_cloud::{Aggregation, Robust};
use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::update::{Encoding, Tensor, Update, UpdateMeta};
use dai_head::{Activation, Head, HeadSpec, Loss};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn update(id: &str, samples: u64, v: f32) -> Vec<u8> {
    Update {
        meta: UpdateMeta {
            device: "edge-1".into(),
            model: "m".into(),
            base_version: "1.0.0".into(),
            update_id: id.into(),
            sample_count: samples,
            loss: 0.1,
            encoding: Encoding::Int8,
        },
        tensors: vec![
            Tensor {
                name: "layers.0.weight".into(),
                shape: vec![2, 3],
                values: vec![v; 6],
            },
            Tensor {
                name: "layers.0.bias".into(),
                shape: vec![2],
                values: vec![v; 2],
            },
        ],
    }
    .encode()
    .expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_are_acked_and_a_signed_global_is_published() {
    let port = free_port();
    start_embedded_broker(format!("127.0.0.1:{port}").parse().expect("addr")).expect("broker");
    let dir = tempfile::tempdir().expect("tmp");
    let base = Head::init(
        HeadSpec::new(&[3, 2], &[Activation::None], Loss::SoftmaxCrossEntropy).expect("spec"),
        3,
    );
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let cfg = ServiceConfig {
        fleet: "lab".into(),
        broker: BrokerAddr {
            host: "127.0.0.1".into(),
            port,
        },
        client_id: "dai-cloud-test".into(),
        state_path: dir.path().join("agg.sqlite"),
        models: vec![(
            "m".into(),
            base.to_bytes(&Default::default()).expect("bytes"),
        )],
        settings: Settings {
            strategy: Strategy::FedAvg { min_updates: 2 },
            aggregation: Aggregation {
                clip_norm: None,
                robust: Robust::Mean,
            },
            max_staleness: 3,
            reject_norm: 1e6,
        },
        round_timeout: Duration::from_secs(60),
        signing_key: key.clone(),
        server_optimizer: None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(run(cfg, async move {
        let _ = stop_rx.await;
    }));

    // An edge-like client.
    let mut opts = MqttOptions::new("edge-1", "127.0.0.1", port);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut events) = AsyncClient::new(opts, 64);
    client
        .subscribe("dai/v1/lab/dev/edge-1/ack", QoS::AtLeastOnce)
        .await
        .expect("sub");
    client
        .subscribe("dai/v1/lab/model/m/global", QoS::AtLeastOnce)
        .await
        .expect("sub");
    // Let the aggregator connect and subscribe before publishing.
    let mut ready = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ready && tokio::time::Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::SubAck(_)))) =
            tokio::time::timeout(Duration::from_millis(200), events.poll()).await
        {
            ready = true;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let topic = "dai/v1/lab/dev/edge-1/update";
    client
        .publish(topic, QoS::AtLeastOnce, false, update("u1", 1, 0.5))
        .await
        .expect("pub");
    client
        .publish(topic, QoS::AtLeastOnce, false, update("u1", 1, 0.5))
        .await
        .expect("pub dup");
    client
        .publish(topic, QoS::AtLeastOnce, false, b"not an update".to_vec())
        .await
        .expect("pub junk");
    client
        .publish(topic, QoS::AtLeastOnce, false, update("u2", 3, 1.0))
        .await
        .expect("pub");

    let mut acks = Vec::new();
    let mut global = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while (acks.len() < 4 || global.is_none()) && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic.ends_with("/ack") => {
                acks.push(Ack::from_bytes(&p.payload).expect("ack"))
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic.ends_with("/global") => {
                global = Some(p.payload.to_vec())
            }
            Ok(Err(e)) => panic!("client connection: {e}"),
            _ => {}
        }
    }
    assert_eq!(acks.len(), 4, "{acks:?}");
    assert_eq!(
        (acks[0].update_id.as_str(), acks[0].status),
        ("u1", AckStatus::Accepted)
    );
    assert!(
        acks[1]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("counted once"),
        "{:?}",
        acks[1]
    );
    assert_eq!(acks[2].status, AckStatus::Rejected);
    assert!(
        acks[2]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("undecodable"),
        "{:?}",
        acks[2]
    );
    assert_eq!(
        (acks[3].update_id.as_str(), acks[3].status),
        ("u2", AckStatus::Accepted)
    );

    let g =
        dai_protocol::global::verify(&global.expect("a global model"), &key.verifying_key(), "m")
            .expect("signed global");
    assert_eq!(g.version, 1);
    let (head, _) = Head::from_bytes(&g.head_file).expect("head");
    // FedAvg of int8-coded deltas 0.5 (1 sample) and 1.0 (3 samples) = 0.875.
    for (a, b) in head.params.weights[0].iter().zip(&base.params.weights[0]) {
        assert!((a - b - 0.875).abs() < 0.01, "{a} - {b}");
    }
    let other = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]);
    let again = dai_protocol::global::sign(&g.head_file, &other);
    assert!(
        dai_protocol::global::verify(&again, &key.verifying_key(), "m").is_err(),
        "another key's signature is refused"
    );
    let _ = stop_tx.send(());
    let stats = service.await.expect("join").expect("service");
    assert_eq!((stats.accepted, stats.globals_published), (2, 1));
    assert!(stats.rejected >= 1);
}
