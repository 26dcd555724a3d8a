//! The uplink against the real aggregator through a real (embedded) broker:
//! outbox rows leave only on the aggregator's ack, a signed global arrives
//! and is applied, and a broker that is not up yet is waited for.

use dai_cloud::service::ServiceConfig;
use dai_head::Head;
use dai_protocol::base::GlobalId;
use dai_protocol::global::GlobalModel;
use dai_protocol::messages::{Ack, AckStatus, Status};
use dai_protocol::update::Encoding;
use dai_sync::{Edge, UplinkConfig, run};
use dai_testkit::{
    free_port, head, head_bytes, service_config, signing_key, start_embedded_broker_on,
};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct FakeEdge {
    outbox: Mutex<Vec<(String, Vec<u8>)>>,
    acks: Mutex<Vec<Ack>>,
    globals: Mutex<Vec<GlobalModel>>,
}

impl Edge for FakeEdge {
    fn outbox(&self, limit: usize) -> Vec<(String, Vec<u8>)> {
        self.outbox.lock().iter().take(limit).cloned().collect()
    }
    fn acked(&self, ack: &Ack) {
        self.outbox.lock().retain(|(id, _)| id != &ack.update_id);
        self.acks.lock().push(ack.clone());
    }
    fn models(&self) -> Vec<String> {
        vec!["m".into()]
    }
    fn served_global(&self, _: &str) -> GlobalId {
        self.globals
            .lock()
            .last()
            .map_or(GlobalId::default(), |g| GlobalId {
                epoch: g.epoch,
                version: g.version,
            })
    }
    fn apply_global(&self, g: GlobalModel) -> Result<(), String> {
        self.globals.lock().push(g);
        Ok(())
    }
    fn status(&self) -> Status {
        Status {
            device: "edge-a".into(),
            state: "online".into(),
            ts: 0.0,
            models: Default::default(),
            outbox_pending: self.outbox.lock().len() as u64,
        }
    }
}

fn update(id: &str, v: f32) -> (String, Vec<u8>) {
    let u = dai_testkit::update(id)
        .device("edge-a")
        .samples(10)
        .loss(0.2)
        .encoding(Encoding::F16)
        .value(v);
    (id.to_string(), u.encode())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_drains_on_acks_and_the_global_arrives_even_if_the_broker_comes_late() {
    let port = free_port();
    let key = signing_key(5);
    let edge = Arc::new(FakeEdge::default());
    edge.outbox
        .lock()
        .extend([update("a-1", 0.25), update("a-2", 0.75)]);
    let cfg = UplinkConfig {
        fleet: "lab".into(),
        device: "edge-a".into(),
        host: "127.0.0.1".into(),
        port,
        aggregator_key: key.verifying_key(),
        device_key: None,
        tls: None,
        retry_delay: Duration::from_millis(100),
        connection_timeout: Duration::from_secs(1),
        heartbeat: Duration::from_secs(1),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let uplink = tokio::spawn(run(cfg, edge.clone(), async move {
        let _ = stop_rx.await;
    }));
    // The broker is not there yet: the uplink retries with backoff.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(edge.outbox.lock().len(), 2, "nothing leaves without an ack");

    start_embedded_broker_on(port);
    let dir = tempfile::tempdir().expect("tmp");
    let base = head(&[3, 2], 3);
    let (agg_stop, agg_rx) = tokio::sync::oneshot::channel::<()>();
    let aggregator = tokio::spawn(dai_cloud::service::run(
        ServiceConfig {
            signing_key: key.clone(),
            ..service_config(port, dir.path(), [("m", head_bytes(&base))])
        },
        async move {
            let _ = agg_rx.await;
        },
    ));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !edge.outbox.lock().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(edge.outbox.lock().is_empty(), "acked rows leave the outbox");
    // a-2 (cumulative, same base) superseded a-1: edge-a is one device
    // with one contribution, and the round of two closes when a second
    // device's update arrives.
    assert!(
        edge.globals.lock().is_empty(),
        "one device closed a round of two"
    );
    let other = dai_testkit::MqttProbe::connect(port, "edge-b", &[]).await;
    let b = dai_testkit::update("b-1")
        .device("edge-b")
        .samples(10)
        .loss(0.2)
        .encoding(Encoding::F16)
        .value(0.25)
        .encode();
    other.publish("dai/v1/lab/dev/edge-b/update", b).await;
    let mut other = other;
    while edge.globals.lock().is_empty() && tokio::time::Instant::now() < deadline {
        let _ = other.next_publish(Duration::from_millis(100)).await;
    }
    let acks = edge.acks.lock().clone();
    assert!(
        acks.iter()
            .any(|a| a.update_id == "a-1" && a.status == AckStatus::Accepted),
        "{acks:?}"
    );
    assert!(
        acks.iter()
            .any(|a| a.update_id == "a-2" && a.status == AckStatus::Accepted),
        "{acks:?}"
    );
    let globals = edge.globals.lock().clone();
    assert_eq!(globals.len(), 1, "one verified global applied");
    assert_eq!(globals[0].version, 1);
    let (head, _) = Head::from_bytes(&globals[0].head_file).expect("head");
    for (a, b) in head.params.weights[0].iter().zip(&base.params.weights[0]) {
        assert!(
            (a - b - 0.5).abs() < 1e-3,
            "FedAvg of edge-a's newest (0.75) and edge-b's 0.25: {a} - {b}"
        );
    }
    let _ = stop_tx.send(());
    let stats = uplink.await.expect("uplink");
    assert!(
        stats.published >= 2 && stats.globals_applied == 1,
        "{stats:?}"
    );
    let _ = agg_stop.send(());
    let _ = aggregator.await;
}

/// A hostile broker (here: anyone on a plain broker) answers an update with
/// forged acks: unsigned, signed by another key, and a genuine signature
/// made for another device's ack topic. None deletes the row; the real
/// aggregator's signed ack does, and the update is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_acks_delete_nothing_and_the_update_is_counted_once() {
    let port = free_port();
    start_embedded_broker_on(port);
    let key = signing_key(5);
    let device_key = signing_key(11);
    let edge = Arc::new(FakeEdge::default());
    edge.outbox.lock().push(update("a-1", 0.25));
    let cfg = UplinkConfig {
        fleet: "lab".into(),
        device: "edge-a".into(),
        host: "127.0.0.1".into(),
        port,
        aggregator_key: key.verifying_key(),
        device_key: Some(device_key.clone()),
        tls: None,
        retry_delay: Duration::from_millis(100),
        connection_timeout: Duration::from_secs(1),
        heartbeat: Duration::from_secs(1),
    };
    let mut attacker =
        dai_testkit::MqttProbe::connect(port, "attacker", &["dai/v1/lab/dev/edge-a/update"]).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let uplink = tokio::spawn(run(cfg, edge.clone(), async move {
        let _ = stop_rx.await;
    }));
    // The update goes out signed by the device for its topic.
    let seen = attacker
        .wait_for("dai/v1/lab/dev/edge-a/update", Duration::from_secs(20))
        .await
        .expect("the update is published");
    let body = dai_protocol::signed::open(
        dai_protocol::signed::Kind::Update,
        &device_key.verifying_key(),
        "lab",
        &seen.topic,
        &seen.payload,
    )
    .expect("signed by the device");
    assert_eq!(
        dai_protocol::update::Update::decode(body)
            .expect("update")
            .meta
            .update_id,
        "a-1"
    );
    let ack = Ack {
        update_id: "a-1".into(),
        status: AckStatus::Accepted,
        reason: None,
        round: Some(1),
    }
    .to_bytes();
    let ours = "dai/v1/lab/dev/edge-a/ack";
    let seal = |k: &ed25519_dalek::SigningKey, topic: &str| {
        dai_protocol::signed::seal(dai_protocol::signed::Kind::Ack, k, "lab", topic, &ack)
    };
    for forged in [
        ack.clone(),
        seal(&signing_key(66), ours),
        seal(&key, "dai/v1/lab/dev/edge-b/ack"),
    ] {
        attacker.publish(ours, forged).await;
    }
    // Drive the attacker's event loop so the forgeries leave, then look.
    let _ = attacker.next_publish(Duration::from_secs(2)).await;
    assert_eq!(
        edge.outbox.lock().len(),
        1,
        "a forged ack deleted the update"
    );
    assert!(edge.acks.lock().is_empty());

    // The real aggregator comes up: the uplink publishes again (no ack
    // came within the timeout), the signed ack deletes the row.
    let dir = tempfile::tempdir().expect("tmp");
    let (agg_stop, agg_rx) = tokio::sync::oneshot::channel::<()>();
    let aggregator = tokio::spawn(dai_cloud::service::run(
        ServiceConfig {
            signing_key: key.clone(),
            settings: dai_testkit::fedavg(5),
            ..service_config(port, dir.path(), [("m", head_bytes(&head(&[3, 2], 3)))])
        },
        async move {
            let _ = agg_rx.await;
        },
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !edge.outbox.lock().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        edge.outbox.lock().is_empty(),
        "the genuine ack deletes the row"
    );
    let _ = stop_tx.send(());
    let stats = uplink.await.expect("uplink");
    assert_eq!(stats.acks_refused, 3, "{stats:?}");
    let _ = agg_stop.send(());
    let agg = aggregator.await.expect("join").expect("aggregator");
    assert_eq!(agg.accepted, 1, "counted once: {agg:?}");
}
