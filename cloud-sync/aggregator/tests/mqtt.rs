//! The aggregator through a real MQTT broker (embedded rumqttd on loopback):
//! updates in, acks and a signed retained global model out.

use dai_cloud::service::{ServiceConfig, run};
use dai_head::Head;
use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::update::Encoding;
use dai_testkit::{
    MqttProbe, head, head_bytes, service_config, signing_key, start_embedded_broker,
};
use std::time::Duration;

fn update(device: &str, id: &str, samples: u64, v: f32) -> Vec<u8> {
    dai_testkit::update(id)
        .device(device)
        .samples(samples)
        .value(v)
        .encoding(Encoding::Int8)
        .encode()
}

/// The ack in `p`, which must carry the aggregator's signature.
fn signed_ack(key: &ed25519_dalek::SigningKey, p: &rumqttc::Publish) -> Ack {
    let body = dai_protocol::signed::open(
        dai_protocol::signed::Kind::Ack,
        &key.verifying_key(),
        "lab",
        &p.topic,
        &p.payload,
    )
    .expect("an ack signed by the aggregator");
    Ack::from_bytes(body).expect("ack")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_are_acked_and_a_signed_global_is_published() {
    let port = start_embedded_broker();
    let dir = tempfile::tempdir().expect("tmp");
    let base = head(&[3, 2], 3);
    let key = signing_key(9);
    let cfg = ServiceConfig {
        client_id: "dai-cloud-test".into(),
        signing_key: key.clone(),
        ..service_config(port, dir.path(), [("m", head_bytes(&base))])
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(run(cfg, async move {
        let _ = stop_rx.await;
    }));

    // An edge-like client.
    let mut edge = MqttProbe::connect(
        port,
        "edge-1",
        // Two devices' acks (a plain broker: no ACL in this test).
        &["dai/v1/lab/dev/+/ack", "dai/v1/lab/model/m/global"],
    )
    .await;
    // Let the aggregator connect and subscribe before publishing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let topic = "dai/v1/lab/dev/edge-1/update";
    edge.publish(topic, update("edge-1", "u1", 1, 0.5)).await;
    edge.publish(topic, update("edge-1", "u1", 1, 0.5)).await;
    edge.publish(topic, b"not an update".to_vec()).await;
    // A round closes on two devices: u2 is edge-2's.
    edge.publish(
        "dai/v1/lab/dev/edge-2/update",
        update("edge-2", "u2", 3, 1.0),
    )
    .await;

    let mut acks = Vec::new();
    let mut global = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while (acks.len() < 4 || global.is_none()) && tokio::time::Instant::now() < deadline {
        match edge.next_publish(Duration::from_millis(500)).await {
            Ok(Some(p)) if p.topic.ends_with("/ack") => acks.push(signed_ack(&key, &p)),
            Ok(Some(p)) if p.topic.ends_with("/global") => global = Some(p.payload.to_vec()),
            Err(e) => panic!("client connection: {e}"),
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

    let g = dai_protocol::global::verify(
        &global.expect("a global model"),
        &key.verifying_key(),
        "lab",
        "m",
    )
    .expect("signed global");
    assert_eq!(g.version, 1);
    let (head, _) = Head::from_bytes(&g.head_file).expect("head");
    // FedAvg of int8-coded deltas 0.5 (1 sample) and 1.0 (3 samples) = 0.875.
    for (a, b) in head.params.weights[0].iter().zip(&base.params.weights[0]) {
        assert!((a - b - 0.875).abs() < 0.01, "{a} - {b}");
    }
    let other = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]);
    let again = dai_protocol::global::sign(&g.head_file, &other, "lab", g.epoch).expect("sign");
    assert!(
        dai_protocol::global::verify(&again, &key.verifying_key(), "lab", "m").is_err(),
        "another key's signature is refused"
    );
    let _ = stop_tx.send(());
    let stats = service.await.expect("join").expect("service");
    assert_eq!((stats.accepted, stats.globals_published), (2, 1));
    assert!(stats.rejected >= 1);
}

/// A broker that takes 1.5 s to answer a new connection (a loaded host, a
/// reconnect storm's queue of handshakes): a TCP relay on loopback that
/// waits before it opens the upstream side.
async fn slow_relay(upstream: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let port = listener.local_addr().expect("relay addr").port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    port
}

/// The connect (TCP, then CONNACK) must survive the service loop's timers:
/// rumqttc's `poll` is not cancel-safe while it connects, and the loop once
/// polled it next to a 250 ms tick, so a broker slower than a tick was
/// never reached and nothing was ever acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_slow_to_answer_the_connect_is_still_reached() {
    let port = start_embedded_broker();
    let relay = slow_relay(port, Duration::from_millis(1500)).await;
    let dir = tempfile::tempdir().expect("tmp");
    let key = signing_key(9);
    let cfg = ServiceConfig {
        client_id: "dai-cloud-slow".into(),
        signing_key: key.clone(),
        ..service_config(relay, dir.path(), [("m", head_bytes(&head(&[3, 2], 3)))])
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(run(cfg, async move {
        let _ = stop_rx.await;
    }));
    let mut edge = MqttProbe::connect(port, "edge-1", &["dai/v1/lab/dev/edge-1/ack"]).await;
    let topic = "dai/v1/lab/dev/edge-1/update";
    // As an edge does: the update again every 2 s until its ack comes (the
    // aggregator subscribes only once it is connected).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut ack = None;
    while ack.is_none() && tokio::time::Instant::now() < deadline {
        edge.publish(topic, update("edge-1", "u1", 1, 0.5)).await;
        if let Ok(Some(p)) = edge.next_publish(Duration::from_secs(2)).await {
            ack = Some(signed_ack(&key, &p));
        }
    }
    let ack = ack.expect("no ack within 30 s: the aggregator never finished connecting");
    assert_eq!(
        (ack.update_id.as_str(), ack.status),
        ("u1", AckStatus::Accepted)
    );
    let _ = stop_tx.send(());
    let stats = service.await.expect("join").expect("service");
    assert_eq!(stats.accepted, 1, "{stats:?}");
}
