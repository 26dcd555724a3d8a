//! The root's side of tiers: partial aggregates from a listed tier count
//! as the updates they folded, at their weighted mean, and exactly once by
//! contributor, whichever path (another partial, the device itself) an id
//! comes back on. Anyone else's partials are refused.

use super::*;
use crate::state::fixtures::{base, settings, upd};
use crate::state::{DpSettings, SampleCap, Strategy};
use dai_head::Head;
use dai_protocol::partial::Contributor;
use dai_trust::{DeviceName, DeviceRecord, FleetName, Registry, Serial};

fn agg_key() -> SigningKey {
    SigningKey::from_bytes(&[9u8; 32])
}

/// Enrolled: device `a` (key 1), tiers `site-1` (key 5) and `rogue` (key
/// 6); only `site-1` is listed as a tier.
fn intake(dir: &std::path::Path, min_updates: usize, dp: Option<DpSettings>) -> Intake {
    let mut r = Registry::new(FleetName::parse("lab").expect("fleet"));
    for (name, n) in [("a", 1u8), ("site-1", 5), ("rogue", 6)] {
        r.add(DeviceRecord {
            name: DeviceName::parse(name).expect("name"),
            serial: Serial::from_der_bytes(&[n]),
            public_key: hex::encode(SigningKey::from_bytes(&[n; 32]).verifying_key().to_bytes()),
            created_at: 0,
            not_after: i64::MAX,
            revoked_at: None,
        })
        .expect("add");
    }
    let state = State::open(&dir.join("agg.sqlite")).expect("open");
    let mut i = Intake::new(
        state,
        IntakeConfig {
            fleet: "lab".into(),
            models: vec![("m".into(), crate::state::fixtures::base_file())],
            settings: Settings {
                strategy: Strategy::FedAvg { min_updates },
                sample_cap: SampleCap::Equal,
                dp,
                ..settings()
            },
            round_timeout: Duration::from_secs(60),
            signing_key: agg_key(),
            server_optimizer: None,
            devices: DeviceAuth::Signed(DeviceKeys::from_registry(&r).expect("keys")),
        },
    )
    .expect("intake");
    i.set_tiers(vec!["site-1".into()]);
    i.take_outputs();
    i
}

/// A partial of `tier` folding `ids` (each update's values all `v`, one
/// vote each, so the sum is `ids.len() * v`).
fn partial(tier: &str, id: &str, ids: &[&str], v: f32) -> Partial {
    let mut sum = upd(id, "1.0.0", 10 * ids.len() as u64, v * ids.len() as f32);
    sum.meta.device = tier.into();
    Partial {
        sum,
        weight: ids.len() as f64,
        votes: ids.len() as u64,
        contributors: ids
            .iter()
            .map(|u| Contributor {
                update_id: u.to_string(),
                device: format!("behind-{u}"),
            })
            .collect(),
    }
}

fn send(i: &mut Intake, on: &str, key: u8, p: &Partial) {
    let topic = format!("dai/v1/lab/dev/{on}/partial");
    let body = p.encode().expect("encode");
    let wire = signed::seal(
        Kind::Partial,
        &SigningKey::from_bytes(&[key; 32]),
        "lab",
        &topic,
        &body,
    );
    i.publish(&topic, &wire);
}

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

fn global_delta(out: &[Output]) -> Option<Vec<f32>> {
    out.iter().find_map(|o| match o {
        Output::Global { payload, .. } => {
            let g = dai_protocol::global::verify(payload, &agg_key().verifying_key(), "lab", "m")
                .expect("signed global");
            let (head, _) = Head::from_bytes(&g.head_file).expect("head");
            let b = base();
            Some(
                head.params
                    .weights
                    .iter()
                    .flatten()
                    .zip(b.params.weights.iter().flatten())
                    .map(|(x, y)| x - y)
                    .collect(),
            )
        }
        _ => None,
    })
}

#[test]
fn a_partial_counts_its_votes_at_its_weighted_mean() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 3, None);
    let now = Instant::now();
    // Two updates folded on the tier (values 1 and 2: sum 3, weight 2).
    let mut p = partial("site-1", "p1", &["u1", "u2"], 1.5);
    assert_eq!(p.sum.tensors[0].values[0], 3.0);
    p.sum.meta.loss = 0.2;
    send(&mut i, "site-1", 5, &p);
    i.flush(now).expect("flush");
    let out = i.take_outputs();
    let a = acks(&out);
    assert_eq!(a.len(), 1);
    assert_eq!(
        a[0].0, "dai/v1/lab/dev/site-1/ack",
        "acked on the tier's topic"
    );
    assert_eq!(
        (a[0].1.status, a[0].1.reason.clone()),
        (AckStatus::Accepted, None)
    );
    assert!(
        global_delta(&out).is_none(),
        "2 of 3 votes: the round stays open"
    );
    assert_eq!(i.state.pending_count("m").expect("pending"), 2);
    // A device of the root itself is the third vote.
    let mut d = upd("ua", "1.0.0", 500, 6.0);
    d.meta.device = "a".into();
    let topic = "dai/v1/lab/dev/a/update";
    let wire = signed::seal(
        Kind::Update,
        &SigningKey::from_bytes(&[1; 32]),
        "lab",
        topic,
        &d.encode().expect("encode"),
    );
    i.publish(topic, &wire);
    i.flush(now).expect("flush");
    let out = i.take_outputs();
    // (3 + 6) / (2 + 1): the partial weighs its two votes, the device one
    // (one device one vote: its 500 claimed samples do not count).
    let delta = global_delta(&out).expect("the round closed on 3 votes");
    for v in delta {
        assert!((v - 3.0).abs() < 1e-5, "{v}");
    }
    assert_eq!(i.stats().partials, 1);
    assert_eq!(i.stats().partial_votes, 2);
    let metrics = &i.state.recent_versions(1).expect("versions")[0].metrics;
    assert_eq!(metrics["updates"], 3, "{metrics}");
    assert_eq!(metrics["partials"], 1, "{metrics}");
}

#[test]
fn every_contributor_counts_once_whichever_way_it_comes_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 10, None);
    let now = Instant::now();
    let p1 = partial("site-1", "p1", &["u1", "u2"], 1.0);
    send(&mut i, "site-1", 5, &p1);
    i.flush(now).expect("flush");
    // The same partial again (a QoS 1 redelivery): acked, counted once.
    send(&mut i, "site-1", 5, &p1);
    i.flush(now).expect("flush");
    // Another partial that folded u2 again (the tier lost its state, or a
    // second intake replica saw the same update): refused whole, naming it.
    send(
        &mut i,
        "site-1",
        5,
        &partial("site-1", "p2", &["u3", "u2"], 1.0),
    );
    i.flush(now).expect("flush");
    // The device behind u1 sending it straight to the root: a duplicate.
    let mut d = upd("u1", "1.0.0", 5, 9.0);
    d.meta.device = "a".into();
    let topic = "dai/v1/lab/dev/a/update";
    let wire = signed::seal(
        Kind::Update,
        &SigningKey::from_bytes(&[1; 32]),
        "lab",
        topic,
        &d.encode().expect("encode"),
    );
    i.publish(topic, &wire);
    i.flush(now).expect("flush");
    let got: Vec<(String, AckStatus, Option<String>)> = acks(&i.take_outputs())
        .into_iter()
        .map(|(_, a)| (a.update_id, a.status, a.reason))
        .collect();
    assert_eq!(got[0], ("p1".into(), AckStatus::Accepted, None));
    assert_eq!(
        got[1],
        (
            "p1".into(),
            AckStatus::Accepted,
            Some(DUPLICATE_REASON.into())
        )
    );
    assert_eq!((got[2].0.as_str(), got[2].1), ("p2", AckStatus::Rejected));
    let why = got[2].2.clone().unwrap_or_default();
    assert!(
        why.contains("1 of its 2 contributors were already counted") && why.contains("\"u2\""),
        "{why}"
    );
    assert_eq!(
        got[3],
        (
            "u1".into(),
            AckStatus::Accepted,
            Some(DUPLICATE_REASON.into())
        )
    );
    assert_eq!(
        i.state.pending_count("m").expect("pending"),
        2,
        "u1 and u2, once"
    );
    // A fixed p2 (u2 folded out) under a new id counts.
    send(&mut i, "site-1", 5, &partial("site-1", "p3", &["u3"], 1.0));
    i.flush(now).expect("flush");
    assert_eq!(i.state.pending_count("m").expect("pending"), 3);
}

#[test]
fn only_a_listed_tier_signing_its_own_partials_is_heard() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 10, None);
    let now = Instant::now();
    // Enrolled, but not a tier of this root.
    send(&mut i, "rogue", 6, &partial("rogue", "r1", &["x1"], 1.0));
    // rogue's key on site-1's topic.
    send(&mut i, "site-1", 6, &partial("site-1", "r2", &["x2"], 1.0));
    // A plain device pretending to be a tier.
    send(&mut i, "a", 1, &partial("a", "r3", &["x3"], 1.0));
    i.flush(now).expect("flush");
    let out = i.take_outputs();
    assert!(acks(&out).is_empty(), "refused unacked: {out:?}");
    let refused = &i.stats().refused;
    assert_eq!(refused.get("not_a_tier"), Some(&2), "{refused:?}");
    assert_eq!(refused.get("signature"), Some(&1), "{refused:?}");
    // site-1 signing a partial that names another tier: rejected, acked.
    send(&mut i, "site-1", 5, &partial("site-2", "r4", &["x4"], 1.0));
    i.flush(now).expect("flush");
    let a = acks(&i.take_outputs());
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].1.status, AckStatus::Rejected);
    assert!(
        a[0].1
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("names tier \"site-2\""),
        "{:?}",
        a[0].1
    );
    assert_eq!(i.state.pending_count("m").expect("pending"), 0);
}

#[test]
fn a_root_with_central_dp_refuses_partials_and_bounds_their_norm() {
    let dir = tempfile::tempdir().expect("tmp");
    let dp = DpSettings {
        noise_multiplier: 1.0,
        clip_norm: 1.0,
        delta: 1e-5,
        target_epsilon: None,
    };
    let mut i = intake(dir.path(), 10, Some(dp));
    send(&mut i, "site-1", 5, &partial("site-1", "p1", &["u1"], 1.0));
    i.flush(Instant::now()).expect("flush");
    let a = acks(&i.take_outputs());
    assert!(
        a[0].1
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("run DP on the tiers"),
        "{:?}",
        a[0].1
    );
    // Without DP, a partial whose mean is beyond the norm bound is refused
    // like an update (the fixture's bound is 100).
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 10, None);
    send(
        &mut i,
        "site-1",
        5,
        &partial("site-1", "p2", &["u1", "u2"], 80.0),
    );
    i.flush(Instant::now()).expect("flush");
    let a = acks(&i.take_outputs());
    assert_eq!(a[0].1.status, AckStatus::Rejected);
    assert!(
        a[0].1
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("exceeds the bound"),
        "{:?}",
        a[0].1
    );
}

/// A tier intake of `site-1` (key 5) under `dp`, FedAvg rounds of 2.
fn dp_tier(dir: &std::path::Path, dp: DpSettings) -> Intake {
    let mut i = intake(dir, 2, Some(dp));
    i.set_tier(tier::TierConfig {
        name: "site-1".into(),
        key: SigningKey::from_bytes(&[5; 32]),
        root: agg_key().verifying_key(),
        forward_globals: true,
    });
    i
}

fn device_update(i: &mut Intake, id: &str, v: f32) {
    let mut d = upd(id, "1.0.0", 10, v);
    d.meta.device = "a".into();
    let topic = "dai/v1/lab/dev/a/update";
    let wire = signed::seal(
        Kind::Update,
        &SigningKey::from_bytes(&[1; 32]),
        "lab",
        topic,
        &d.encode().expect("encode"),
    );
    i.publish(topic, &wire);
}

#[test]
fn a_tier_noises_its_partials_and_accounts_each_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let dp = DpSettings {
        noise_multiplier: 1.0,
        clip_norm: 0.5,
        delta: 1e-5,
        target_epsilon: None,
    };
    let mut i = dp_tier(dir.path(), dp);
    let now = Instant::now();
    // Two updates of one device supersede each other: round timeout then.
    device_update(&mut i, "u1", 3.0);
    i.flush(now).expect("flush");
    i.tick(now + Duration::from_secs(61)).expect("tick");
    let outbox = i.state.outbox().expect("outbox");
    assert_eq!(outbox.len(), 1, "the round went into the outbox");
    let layout = i.layouts.get("m").cloned().expect("layout");
    let p = Partial::decode_for_layout(&outbox[0].body, |_| Some(layout.as_slice()))
        .expect("a partial");
    // Equal weights under DP: the weight is the count; the update (norm
    // 3 x sqrt(6)) was clipped to 0.5 before the noise.
    assert_eq!((p.weight, p.votes), (1.0, 1));
    assert_eq!(p.contributors[0].update_id, "u1");
    let spent = i.state.privacy_spent("m").expect("spent");
    assert_eq!(spent.rounds, 1, "the release is accounted");
    assert!(spent.epsilon(1e-5).is_finite());
    // The tier published nothing of its own: no global, no signature.
    assert!(
        !i.take_outputs()
            .iter()
            .any(|o| matches!(o, Output::Global { .. })),
        "a tier never signs a global"
    );
}

#[test]
fn a_tier_past_its_privacy_budget_sends_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let dp = DpSettings {
        noise_multiplier: 0.3,
        clip_norm: 0.5,
        delta: 1e-5,
        target_epsilon: Some(0.01),
    };
    let mut i = dp_tier(dir.path(), dp);
    let now = Instant::now();
    device_update(&mut i, "u1", 1.0);
    i.flush(now).expect("flush");
    i.tick(now + Duration::from_secs(61)).expect("tick");
    assert!(i.state.outbox().expect("outbox").is_empty());
    assert_eq!(i.state.privacy_spent("m").expect("spent").rounds, 0);
    assert_eq!(
        i.state.pending_count("m").expect("pending"),
        1,
        "kept, not released"
    );
}

#[test]
fn an_unacked_partial_goes_again_and_an_acked_one_never() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 1, None);
    i.set_tier(tier::TierConfig {
        name: "site-1".into(),
        key: SigningKey::from_bytes(&[5; 32]),
        root: agg_key().verifying_key(),
        forward_globals: true,
    });
    i.upstream_connected().expect("connected");
    let now = Instant::now();
    device_update(&mut i, "u1", 1.0);
    i.flush(now).expect("flush");
    let sent = |out: &[Output]| {
        out.iter()
            .filter(|o| matches!(o, Output::Upstream(tier::Upstream::Publish { .. })))
            .count()
    };
    assert_eq!(sent(&i.take_outputs()), 1, "folded and sent");
    i.tick(now + Duration::from_secs(5)).expect("tick");
    assert_eq!(sent(&i.take_outputs()), 0, "not again before RESEND_AFTER");
    i.tick(now + tier::RESEND_AFTER + Duration::from_secs(1))
        .expect("tick");
    assert_eq!(sent(&i.take_outputs()), 1, "no ack: sent again");
    // The root's ack (signed for the tier's ack topic) empties the outbox.
    let id = i.state.outbox().expect("outbox")[0].partial_id.clone();
    let topic = "dai/v1/lab/dev/site-1/ack";
    let ack = Ack {
        update_id: id,
        status: AckStatus::Accepted,
        reason: None,
        round: Some(1),
    };
    let wire = signed::seal(Kind::Ack, &agg_key(), "lab", topic, &ack.to_bytes());
    // An ack signed by anyone else changes nothing.
    let forged = signed::seal(
        Kind::Ack,
        &SigningKey::from_bytes(&[6; 32]),
        "lab",
        topic,
        &ack.to_bytes(),
    );
    i.upstream_publish(topic, &forged).expect("forged");
    assert_eq!(i.state.outbox().expect("outbox").len(), 1);
    i.upstream_publish(topic, &wire).expect("ack");
    assert!(i.state.outbox().expect("outbox").is_empty());
    i.tick(now + tier::RESEND_AFTER * 3).expect("tick");
    assert_eq!(sent(&i.take_outputs()), 0, "acked: never again");
}
