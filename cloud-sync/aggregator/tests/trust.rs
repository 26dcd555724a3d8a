//! The attacks of the trust issue against a secure aggregator, from
//! outside clients, through the embedded broker's real mutual-TLS gate:
//! real certificates (a fleet directory as `dai-cloud fleet init` and
//! `devices add` make it), real TCP on loopback, the real service.

use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::signed::{self, Kind};
use dai_testkit::{
    MqttProbe, aggregator_public, aggregator_tls, bundle_key, bundle_tls, free_port, head,
    head_bytes, make_fleet, start_secure, update,
};
use std::time::Duration;

const FLEET: &str = "lab";

fn topic(device: &str, leaf: &str) -> String {
    format!("dai/v1/{FLEET}/dev/{device}/{leaf}")
}

/// `device`'s update `id` claiming `claims` as its device and `samples`
/// samples, signed with `key` for `on` (a topic).
fn signed_update(
    key: &ed25519_dalek::SigningKey,
    on: &str,
    id: &str,
    claims: &str,
    samples: u64,
) -> Vec<u8> {
    let body = update(id)
        .device(claims)
        .model("m")
        .samples(samples)
        .sizes(&[3, 2])
        .value(0.1)
        .encode();
    signed::seal(Kind::Update, key, FLEET, on, &body)
}

/// Acks `probe` receives within `within`, each verified.
async fn acks(
    probe: &mut MqttProbe,
    agg: &ed25519_dalek::VerifyingKey,
    n: usize,
    within: Duration,
) -> Vec<Ack> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while out.len() < n && tokio::time::Instant::now() < deadline {
        if let Ok(Some(p)) = probe.next_publish(Duration::from_millis(200)).await
            && p.topic.ends_with("/ack")
        {
            let body = signed::open(Kind::Ack, agg, FLEET, &p.topic, &p.payload)
                .expect("acks are signed by the aggregator");
            out.push(Ack::from_bytes(body).expect("ack"));
        }
    }
    out
}

/// A fleet `lab` with dev-a and dev-b enrolled and a secure aggregator
/// (FedAvg over `min_devices`) behind the gate on a free port.
async fn secure_lab(
    min_devices: usize,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    u16,
    tokio::task::JoinHandle<
        Result<dai_cloud::service::ServiceStats, dai_cloud::service::ServiceError>,
    >,
    tokio::sync::oneshot::Sender<()>,
) {
    let tmp = tempfile::tempdir().expect("tmp");
    let fleet_dir = make_fleet(tmp.path(), FLEET, &["dev-a", "dev-b"]);
    let port = free_port();
    let (service, stop) = start_secure(
        port,
        tmp.path(),
        &fleet_dir,
        [("m", head_bytes(&head(&[3, 2], 1)))],
        |c| c.settings = dai_testkit::fedavg(min_devices),
    )
    .await;
    (tmp, fleet_dir, port, service, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_at_connect_and_devices_act_only_as_themselves() {
    let (tmp, fleet_dir, port, service, stop) = secure_lab(10).await;
    let other = tempfile::tempdir().expect("tmp");
    let foreign = make_fleet(other.path(), FLEET, &["dev-a"]);
    let (a_dir, b_dir) = (tmp.path().join("dev-a"), tmp.path().join("dev-b"));
    let agg = aggregator_public(&fleet_dir);

    // The attack from the issue: an anonymous client on plain TCP, and
    // TLS without a client certificate, and a certificate of another CA
    // with a known device's name.
    let plain = MqttProbe::connect_with(port, "mallory", &["dai/#"], None).await;
    assert!(plain.is_err(), "an anonymous plain-TCP client connected");
    let no_cert = std::sync::Arc::new(
        dai_trust::tls::ClientConfig::builder_with_provider(dai_trust::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                let ca = std::fs::read(fleet_dir.join("ca.pem")).expect("ca");
                for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
                    roots.add(c.expect("pem")).expect("root");
                }
                roots
            })
            .with_no_client_auth(),
    );
    let anon = MqttProbe::connect_with(port, "mallory", &[], Some(no_cert)).await;
    assert!(anon.is_err(), "TLS without a client certificate connected");
    let forged = MqttProbe::connect_with(
        port,
        "dev-a",
        &[],
        Some(bundle_tls(&other.path().join("dev-a"))),
    )
    .await;
    assert!(forged.is_err(), "another CA's certificate connected");
    drop(foreign);

    // Device A's certificate with B's client id, or the aggregator's id.
    for id in ["dev-b", "dai-cloud-test", "dai-cloud"] {
        let r = MqttProbe::connect_with(port, id, &[], Some(bundle_tls(&a_dir))).await;
        assert!(r.is_err(), "dev-a connected as {id}");
    }
    // A may not read B's updates, nor everyone's, nor B's acks.
    for filter in [
        topic("dev-b", "update"),
        format!("dai/v1/{FLEET}/dev/+/update"),
        "dai/#".to_string(),
        topic("dev-b", "ack"),
    ] {
        let r = MqttProbe::connect_with(port, "dev-a", &[&filter], Some(bundle_tls(&a_dir))).await;
        assert!(r.is_err(), "dev-a subscribed to {filter}");
    }

    // The positive control: A and B connect as themselves, submit, and
    // each gets its own signed ack.
    let mut a =
        MqttProbe::connect_tls(port, "dev-a", &[&topic("dev-a", "ack")], bundle_tls(&a_dir)).await;
    let mut b =
        MqttProbe::connect_tls(port, "dev-b", &[&topic("dev-b", "ack")], bundle_tls(&b_dir)).await;
    let (ka, kb) = (bundle_key(&a_dir), bundle_key(&b_dir));
    let a1 = signed_update(&ka, &topic("dev-a", "update"), "a-1", "dev-a", 10);
    a.publish(&topic("dev-a", "update"), a1.clone()).await;
    b.publish(
        &topic("dev-b", "update"),
        signed_update(&kb, &topic("dev-b", "update"), "b-1", "dev-b", 5),
    )
    .await;
    let got = acks(&mut a, &agg, 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "dev-a got no ack");
    assert_eq!(
        (got[0].update_id.as_str(), got[0].status),
        ("a-1", AckStatus::Accepted)
    );
    let got = acks(&mut b, &agg, 1, Duration::from_secs(20)).await;
    assert_eq!(
        (got[0].update_id.as_str(), got[0].status),
        ("b-1", AckStatus::Accepted)
    );

    // With A's stolen certificate and key an attacker is A and only A: a
    // capture re-published is a duplicate; a copy with a new id, or more
    // samples, no longer matches its signature and gets no ack; A's key
    // signing for B's name inside is rejected.
    a.publish(&topic("dev-a", "update"), a1.clone()).await;
    let mut renamed = a1[..69].to_vec();
    renamed.extend_from_slice(
        &update("a-new")
            .device("dev-a")
            .model("m")
            .samples(1 << 50)
            .sizes(&[3, 2])
            .value(0.1)
            .encode(),
    );
    a.publish(&topic("dev-a", "update"), renamed).await;
    a.publish(
        &topic("dev-a", "update"),
        signed_update(&ka, &topic("dev-a", "update"), "a-2", "dev-b", 1 << 50),
    )
    .await;
    let got = acks(&mut a, &agg, 2, Duration::from_secs(20)).await;
    let ids: Vec<(&str, AckStatus)> = got
        .iter()
        .map(|x| (x.update_id.as_str(), x.status))
        .collect();
    assert_eq!(
        ids,
        vec![("a-1", AckStatus::Accepted), ("a-2", AckStatus::Rejected)],
        "{got:?}"
    );
    assert!(
        got[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("counted once")
    );
    // And A publishing on B's topic is cut off by the gate.
    a.publish(
        &topic("dev-b", "update"),
        signed_update(&ka, &topic("dev-b", "update"), "b-x", "dev-b", 1),
    )
    .await;
    let mut closed = false;
    for _ in 0..50 {
        if a.next_publish(Duration::from_millis(100)).await.is_err() {
            closed = true;
            break;
        }
    }
    assert!(closed, "the gate kept a device that published as another");

    let _ = stop.send(());
    let stats = service.await.expect("join").expect("service");
    assert_eq!(stats.accepted, 2, "{stats:?}");
    assert_eq!(stats.duplicates, 1, "{stats:?}");
    assert_eq!(stats.rejected, 1, "{stats:?}");
    assert_eq!(stats.refused.get("signature"), Some(&1), "{stats:?}");
    // B's accounting: B's five samples only.
    let state = dai_cloud::state::State::open(&tmp.path().join("agg.sqlite")).expect("state");
    assert_eq!(
        state.pending_devices("m").expect("pending"),
        vec![("dev-a".to_string(), 10), ("dev-b".to_string(), 5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_cut_off_and_the_rest_carry_on() {
    let (tmp, fleet_dir, port, service, stop) = secure_lab(10).await;
    let (a_dir, b_dir) = (tmp.path().join("dev-a"), tmp.path().join("dev-b"));
    let agg = aggregator_public(&fleet_dir);
    let mut a =
        MqttProbe::connect_tls(port, "dev-a", &[&topic("dev-a", "ack")], bundle_tls(&a_dir)).await;
    let fd = dai_trust::fs::FleetDir::new(&fleet_dir);
    let mut registry = fd.load_registry().expect("registry");
    assert!(registry.revoke("dev-a", 1).expect("revoke"));
    fd.save_registry(&registry).expect("save");
    // Within the registry poll (1 s) A's updates on its open connection are
    // refused and it cannot connect again; B carries on.
    tokio::time::sleep(dai_cloud::service::FLEET_POLL * 3).await;
    let ka = bundle_key(&a_dir);
    a.publish(
        &topic("dev-a", "update"),
        signed_update(&ka, &topic("dev-a", "update"), "a-1", "dev-a", 1),
    )
    .await;
    assert!(
        acks(&mut a, &agg, 1, Duration::from_secs(3))
            .await
            .is_empty()
    );
    let again = MqttProbe::connect_with(port, "dev-a", &[], Some(bundle_tls(&a_dir))).await;
    assert!(again.is_err(), "a revoked device connected");
    let mut b =
        MqttProbe::connect_tls(port, "dev-b", &[&topic("dev-b", "ack")], bundle_tls(&b_dir)).await;
    let kb = bundle_key(&b_dir);
    b.publish(
        &topic("dev-b", "update"),
        signed_update(&kb, &topic("dev-b", "update"), "b-1", "dev-b", 1),
    )
    .await;
    assert_eq!(
        acks(&mut b, &agg, 1, Duration::from_secs(20)).await.len(),
        1
    );
    let _ = stop.send(());
    let stats = service.await.expect("join").expect("service");
    assert_eq!(stats.refused.get("revoked"), Some(&1), "{stats:?}");
    assert_eq!(stats.accepted, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_retained_global_heals_for_a_device_that_connects_later() {
    let (tmp, fleet_dir, port, service, stop) = secure_lab(1).await;
    let a_dir = tmp.path().join("dev-a");
    let global = format!("dai/v1/{FLEET}/model/m/global");
    let mut a = MqttProbe::connect_tls(port, "dev-a", &[&global], bundle_tls(&a_dir)).await;
    let ka = bundle_key(&a_dir);
    a.publish(
        &topic("dev-a", "update"),
        signed_update(&ka, &topic("dev-a", "update"), "a-1", "dev-a", 1),
    )
    .await;
    let first = a
        .wait_for(&global, Duration::from_secs(20))
        .await
        .expect("version 1");
    // An operator (the aggregator's identity) clears the retained message,
    // as `mosquitto_pub -r -n` would.
    let op = MqttProbe::connect_tls(port, "dai-cloud-op", &[], aggregator_tls(&fleet_dir)).await;
    op.client
        .publish(&global, rumqttc::QoS::AtLeastOnce, true, Vec::<u8>::new())
        .await
        .expect("clear");
    let mut op = op;
    let _ = op.next_publish(Duration::from_millis(500)).await;
    // A device connecting afterwards still gets the signed global.
    let mut late = MqttProbe::connect_tls(
        port,
        "dev-b",
        &[&global],
        bundle_tls(&tmp.path().join("dev-b")),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut healed = None;
    while healed.is_none() && tokio::time::Instant::now() < deadline {
        if let Ok(Some(p)) = late.next_publish(Duration::from_millis(200)).await
            && !p.payload.is_empty()
        {
            healed = Some(p.payload);
        }
    }
    let healed = healed.expect("the retained global healed");
    let g = dai_protocol::global::verify(&healed, &aggregator_public(&fleet_dir), FLEET, "m")
        .expect("signed global");
    assert_eq!(g.version, 1);
    assert_eq!(healed, first.payload);
    let _ = stop.send(());
    service.await.expect("join").expect("service");
}
