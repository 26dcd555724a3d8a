//! Client-id takeover against the shipped Mosquitto configuration: a
//! second connection that reuses a device's or the aggregator's client id
//! with its own certificate inherits nothing of the other's session (its
//! subscriptions and queued messages). What holds this is Mosquitto's rule
//! that a persistent session resumes only for the same username, which
//! `use_identity_as_username` makes the certificate's CN; a subscription
//! the intruder makes itself is the ACL's business (`mosquitto_acl.rs`).
//! The embedded broker's gate refuses such a connection outright
//! (`cloud-sync/aggregator/tests/trust.rs`). Gated like the other
//! Mosquitto tests (DAI_MOSQUITTO_PORT, which CI sets after installing
//! Mosquitto).

use dai_testkit::{MqttProbe, SecureMosquitto, aggregator_tls, bundle_tls, make_fleet};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use std::time::Duration;

const FLEET: &str = "lab";

/// A persistent-session client (clean session off) that is connected, and
/// subscribed to `topics`, when it returns.
async fn persistent(
    port: u16,
    id: &str,
    tls: std::sync::Arc<dai_trust::tls::ClientConfig>,
    topics: &[&str],
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttProbe::options(port, id, Some(tls));
    opts.set_clean_session(false);
    let (client, mut events) = AsyncClient::new(opts, 16);
    for t in topics {
        client
            .subscribe(*t, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    let mut subacks = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while subacks < topics.len() || topics.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id}: no CONNACK/SUBACK"
        );
        // Up to the deadline, never a short timeout: a poll cancelled
        // mid-connect starts the connect again.
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subacks += 1,
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) if topics.is_empty() => break,
            Ok(Err(e)) => panic!("{id}: {e}"),
            _ => {}
        }
    }
    (client, events)
}

/// Payloads of the messages `events` receives within `within`.
async fn received(events: &mut EventLoop, within: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(ev) = tokio::time::timeout_at(deadline, events.poll()).await {
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => got.push(p.payload.to_vec()),
            Ok(_) => {}
            // Taken over or refused: nothing more comes on this one.
            Err(_) => break,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reusing_another_clients_id_inherits_none_of_its_messages() {
    if std::env::var("DAI_MOSQUITTO_PORT").is_err() {
        eprintln!(
            "SKIPPED reusing_another_clients_id_inherits_none_of_its_messages: needs the mosquitto binary; set DAI_MOSQUITTO_PORT (.ci/run installs it)"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let fleet_dir = make_fleet(tmp.path(), FLEET, &["dev-a", "dev-b"]);
    let broker = SecureMosquitto::start(&fleet_dir, FLEET).expect("mosquitto");
    let port = broker.port;
    let (a_tls, b_tls, agg_tls) = (
        bundle_tls(&tmp.path().join("dev-a")),
        bundle_tls(&tmp.path().join("dev-b")),
        aggregator_tls(&fleet_dir),
    );
    let a_ack = format!("dai/v1/{FLEET}/dev/dev-a/ack");
    let updates = format!("dai/v1/{FLEET}/dev/+/update");

    // dev-a's session holds a subscription to its acks; it goes away and
    // an ack for it is queued in that session.
    let (a, mut a_events) = persistent(port, "dev-a", a_tls.clone(), &[&a_ack]).await;
    a.disconnect().await.expect("disconnect");
    let _ = received(&mut a_events, Duration::from_millis(300)).await;
    let op = MqttProbe::connect_tls(port, "dai-cloud-op", &[], agg_tls.clone()).await;
    op.publish(&a_ack, b"queued for dev-a".to_vec()).await;
    let mut op = op;
    let _ = op.next_publish(Duration::from_millis(300)).await;

    // dev-b takes dev-a's client id with its own certificate: nothing of
    // dev-a's session reaches it.
    let (_b, mut b_events) = persistent(port, "dev-a", b_tls.clone(), &[]).await;
    op.publish(&a_ack, b"sent while dev-b holds the id".to_vec())
        .await;
    let _ = op.next_publish(Duration::from_millis(200)).await;
    let stolen = received(&mut b_events, Duration::from_secs(2)).await;
    assert!(
        stolen.is_empty(),
        "dev-b received dev-a's messages: {stolen:?}"
    );

    // The aggregator's id, taken by dev-b, gets none of the updates.
    let (_agg, mut agg_events) =
        persistent(port, "dai-cloud-1", agg_tls.clone(), &[&updates]).await;
    let (_b2, mut b2_events) = persistent(port, "dai-cloud-1", b_tls, &[]).await;
    // (Mosquitto knows dev-a by its certificate; this second dev-a
    // connection gets its own id so it does not replace the one below.)
    let dev_a = MqttProbe::connect_tls(port, "dev-a-publisher", &[], a_tls.clone()).await;
    dev_a
        .publish(&format!("dai/v1/{FLEET}/dev/dev-a/update"), b"u".to_vec())
        .await;
    let mut dev_a = dev_a;
    let _ = dev_a.next_publish(Duration::from_millis(300)).await;
    let stolen = received(&mut b2_events, Duration::from_secs(2)).await;
    assert!(
        stolen.is_empty(),
        "dev-b received updates as the aggregator: {stolen:?}"
    );
    let _ = received(&mut agg_events, Duration::from_millis(100)).await;

    // Positive control: dev-a, as itself again, gets an ack sent to it,
    // and the aggregator's identity, reconnected, gets a device's update.
    let mut a_again = MqttProbe::connect_tls(port, "dev-a", &[&a_ack], a_tls).await;
    op.publish(&a_ack, b"for dev-a".to_vec()).await;
    let _ = op.next_publish(Duration::from_millis(200)).await;
    let got = a_again
        .wait_for(&a_ack, Duration::from_secs(5))
        .await
        .expect("dev-a gets its own ack");
    assert!(!got.payload.is_empty());
    let mut agg = MqttProbe::connect_tls(port, "dai-cloud-2", &[&updates], agg_tls).await;
    dev_a
        .publish(&format!("dai/v1/{FLEET}/dev/dev-a/update"), b"u2".to_vec())
        .await;
    let _ = dev_a.next_publish(Duration::from_millis(200)).await;
    assert!(
        agg.wait_for(&updates, Duration::from_secs(5))
            .await
            .is_some(),
        "the aggregator's identity reads updates"
    );
    drop(broker);
}
