//! The intake with identities: only the enrolled device a topic names may
//! submit on it, and a damaged retained global heals.

use super::*;
use crate::state::Strategy;
use crate::state::fixtures::{base_file, settings, upd};
use dai_trust::{DeviceName, DeviceRecord, FleetName, Registry, Serial};

fn agg_key() -> SigningKey {
    SigningKey::from_bytes(&[9u8; 32])
}

fn dev_key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn topic(device: &str) -> String {
    format!("dai/v1/lab/dev/{device}/update")
}

/// Devices `a` (key 1) and `b` (key 2); `revoked` are marked revoked.
fn keys(revoked: &[&str]) -> DeviceKeys {
    let mut r = Registry::new(FleetName::parse("lab").expect("fleet"));
    for (name, n) in [("a", 1u8), ("b", 2u8)] {
        r.add(DeviceRecord {
            name: DeviceName::parse(name).expect("name"),
            serial: Serial::from_der_bytes(&[n]),
            public_key: hex::encode(dev_key(n).verifying_key().to_bytes()),
            created_at: 0,
            not_after: i64::MAX,
            revoked_at: revoked.contains(&name).then_some(1),
        })
        .expect("add");
    }
    DeviceKeys::from_registry(&r).expect("keys")
}

fn intake(dir: &std::path::Path, min_updates: usize) -> Intake {
    let state = State::open(&dir.join("agg.sqlite")).expect("open");
    Intake::new(
        state,
        IntakeConfig {
            fleet: "lab".into(),
            models: vec![("m".into(), base_file())],
            settings: Settings {
                strategy: Strategy::FedAvg { min_updates },
                ..settings()
            },
            round_timeout: Duration::from_secs(60),
            signing_key: agg_key(),
            server_optimizer: None,
            devices: DeviceAuth::Signed(keys(&[])),
        },
    )
    .expect("intake")
}

/// An update claiming `device`, `samples` samples.
fn body(id: &str, device: &str, samples: u64) -> Vec<u8> {
    let mut u = upd(id, "1.0.0", samples, 0.5);
    u.meta.device = device.into();
    u.encode().expect("encode")
}

fn signed_by(key: &SigningKey, on: &str, body: &[u8]) -> Vec<u8> {
    signed::seal(Kind::Update, key, "lab", on, body)
}

/// (ack topic, ack) of every ack, each checked to be signed.
fn acks(out: &[Output]) -> Vec<(String, Ack)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Ack {
                topic,
                ack,
                payload,
            } => {
                signed::open(Kind::Ack, &agg_key().verifying_key(), "lab", topic, payload)
                    .expect("signed ack");
                Some((topic.clone(), ack.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn only_the_enrolled_device_a_topic_names_can_submit_on_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 10);
    i.take_outputs();
    let (a, b) = (dev_key(1), dev_key(2));
    let genuine = body("a-1", "a", 10);
    let sealed = signed_by(&a, &topic("a"), &genuine);
    i.publish(&topic("a"), &sealed);
    // The same capture again: a duplicate, acked and counted once.
    i.publish(&topic("a"), &sealed);
    // A's envelope moved to B's topic; A signing for B's topic; unsigned;
    // a stranger; another fleet's key for a known name.
    i.publish(&topic("b"), &sealed);
    i.publish(
        &topic("b"),
        &signed_by(&a, &topic("b"), &body("b-1", "b", 10)),
    );
    i.publish(&topic("a"), &body("a-2", "a", 10));
    i.publish(
        &topic("mallory"),
        &signed_by(&a, &topic("mallory"), &body("m-1", "mallory", 1 << 50)),
    );
    // A captured update re-published under a new id (and huge sample
    // count): its body changed, so the signature no longer holds.
    let mut replayed = sealed.clone();
    let forged = body("a-new-id", "a", 1 << 50);
    replayed.truncate(5 + 64);
    replayed.extend_from_slice(&forged);
    i.publish(&topic("a"), &replayed);
    // Signed by A on A's own topic, but claiming to be B inside.
    i.publish(
        &topic("a"),
        &signed_by(&a, &topic("a"), &body("a-3", "b", 10)),
    );
    // B's own update is taken.
    i.publish(
        &topic("b"),
        &signed_by(&b, &topic("b"), &body("b-2", "b", 3)),
    );
    i.flush(Instant::now()).expect("flush");
    let out = i.take_outputs();
    let acks = acks(&out);
    let ids: Vec<(&str, &str, AckStatus)> = acks
        .iter()
        .map(|(t, a)| (t.as_str(), a.update_id.as_str(), a.status))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("dai/v1/lab/dev/a/ack", "a-1", AckStatus::Accepted),
            ("dai/v1/lab/dev/a/ack", "a-1", AckStatus::Accepted),
            ("dai/v1/lab/dev/a/ack", "a-3", AckStatus::Rejected),
            ("dai/v1/lab/dev/b/ack", "b-2", AckStatus::Accepted),
        ],
        "refused updates get no ack; a signed claim to be B is rejected"
    );
    assert!(
        acks[2]
            .1
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("names device \"b\""),
        "{:?}",
        acks[2]
    );
    let refused = &i.stats().refused;
    assert_eq!(refused.get("signature"), Some(&3), "{refused:?}");
    assert_eq!(refused.get("unsigned"), Some(&1), "{refused:?}");
    assert_eq!(refused.get("not_enrolled"), Some(&1), "{refused:?}");
    assert_eq!((i.stats().accepted, i.stats().duplicates), (2, 1));
    // B's accounting holds only B's own update.
    let pending = i.state.pending_devices("m").expect("pending");
    assert_eq!(pending, vec![("a".to_string(), 10), ("b".to_string(), 3)]);
}

#[test]
fn a_revoked_device_is_refused_once_the_registry_says_so() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 10);
    let a = dev_key(1);
    i.publish(
        &topic("a"),
        &signed_by(&a, &topic("a"), &body("a-1", "a", 1)),
    );
    i.flush(Instant::now()).expect("flush");
    assert_eq!(i.stats().accepted, 1);
    i.set_devices(keys(&["a"]));
    i.publish(
        &topic("a"),
        &signed_by(&a, &topic("a"), &body("a-2", "a", 1)),
    );
    i.publish(
        &topic("b"),
        &signed_by(&dev_key(2), &topic("b"), &body("b-1", "b", 1)),
    );
    i.flush(Instant::now()).expect("flush");
    assert_eq!(i.stats().refused.get("revoked"), Some(&1));
    assert_eq!(i.stats().accepted, 2, "the rest of the fleet carries on");
}

#[test]
fn wants_and_damaged_retained_globals_publish_the_current_global_again() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 1);
    let now = Instant::now();
    i.publish(
        &topic("a"),
        &signed_by(&dev_key(1), &topic("a"), &body("a-1", "a", 1)),
    );
    i.flush(now).expect("flush");
    let made: Vec<Vec<u8>> = i
        .take_outputs()
        .into_iter()
        .filter_map(|o| match o {
            Output::Global { payload, .. } => Some(payload),
            _ => None,
        })
        .collect();
    assert_eq!(made.len(), 1, "version 1 published");
    let global_topic = "dai/v1/lab/model/m/global";
    let published = |i: &mut Intake| -> usize {
        i.tick(now).expect("tick");
        i.take_outputs()
            .iter()
            .filter(|o| matches!(o, Output::Global { .. }))
            .count()
    };
    // Our own publish coming back changes nothing.
    i.publish(global_topic, &made[0]);
    assert_eq!(published(&mut i), 0);
    // Cleared by hand (an empty retained message) or overwritten: healed.
    i.publish(global_topic, b"");
    assert_eq!(published(&mut i), 1);
    i.publish(global_topic, b"junk");
    assert_eq!(published(&mut i), 1);
    // A device at version 0 asks: answered; one at version 1: not; junk:
    // not; many at once: one publish per tick.
    let ours = i.epoch();
    let want = |v: u64, epoch: u64| {
        Want {
            model: "m".into(),
            version: v,
            epoch,
        }
        .to_bytes()
    };
    i.publish("dai/v1/lab/dev/a/want", &want(0, 0));
    i.publish("dai/v1/lab/dev/b/want", &want(0, ours));
    assert_eq!(published(&mut i), 1);
    i.publish("dai/v1/lab/dev/a/want", &want(1, ours));
    i.publish("dai/v1/lab/dev/a/want", b"{");
    assert_eq!(published(&mut i), 0);
    // A device of a retired epoch (this state came after its global) is
    // answered even at a larger version; one of a newer epoch is not.
    i.publish("dai/v1/lab/dev/a/want", &want(9, ours - 1));
    assert_eq!(published(&mut i), 1);
    i.publish("dai/v1/lab/dev/a/want", &want(0, ours + 1));
    assert_eq!(published(&mut i), 0);
}
