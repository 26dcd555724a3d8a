//! The intake driven without a broker: publishes and ticks in, acks,
//! signed globals and monitor events out, against a real SQLite file.

use super::*;
use crate::monitor::Monitor;
use crate::state::Strategy;
use crate::state::fixtures::{base, base_file, settings};
use dai_head::Head;
use std::collections::BTreeMap;

const UPDATE_TOPIC: &str = "dai/v1/lab/dev/edge-1/update";
const ACK_TOPIC: &str = "dai/v1/lab/dev/edge-1/ack";
const GLOBAL_TOPIC: &str = "dai/v1/lab/model/m/global";

fn key() -> SigningKey {
    SigningKey::from_bytes(&[9u8; 32])
}

/// An intake over a fresh state file in `dir`, FedAvg with `min_updates`,
/// updates taken unsigned (`--insecure-plaintext`).
fn intake(dir: &std::path::Path, min_updates: usize) -> Intake {
    intake_with(dir, min_updates, DeviceAuth::Unchecked)
}

fn intake_with(dir: &std::path::Path, min_updates: usize, devices: DeviceAuth) -> Intake {
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
            signing_key: key(),
            server_optimizer: None,
            devices,
        },
    )
    .expect("intake")
}

/// Update `uN`'s device: `edge-N` (so `u1` comes from the device of
/// [`UPDATE_TOPIC`]); every id its own device, as one device has one live
/// contribution per base.
fn device_of(id: &str) -> String {
    format!("edge-{}", id.strip_prefix('u').unwrap_or(id))
}

/// The update topic of update `id`'s device.
fn topic(id: &str) -> String {
    format!("dai/v1/lab/dev/{}/update", device_of(id))
}

/// The ack topic of update `id`'s device.
fn ack_topic(id: &str) -> String {
    format!("dai/v1/lab/dev/{}/ack", device_of(id))
}

/// The fixture update, from [`device_of`] its id.
fn upd(id: &str, base: &str, samples: u64, v: f32) -> dai_protocol::update::Update {
    let mut u = crate::state::fixtures::upd(id, base, samples, v);
    u.meta.device = device_of(id);
    u
}

fn wire(id: &str, samples: u64, v: f32) -> Vec<u8> {
    upd(id, "1.0.0", samples, v).encode().expect("encode")
}

fn acks(outputs: &[Output]) -> Vec<(&str, &Ack)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Ack {
                topic,
                ack,
                payload,
            } => {
                let body = signed::open(Kind::Ack, &key().verifying_key(), "lab", topic, payload)
                    .expect("every ack is signed for its topic");
                assert_eq!(&Ack::from_bytes(body).expect("ack"), ack);
                Some((topic.as_str(), ack))
            }
            _ => None,
        })
        .collect()
}

/// Every global published: (topic, version, head), signature verified.
fn globals(outputs: &[Output]) -> Vec<(&str, u64, Head)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Global {
                topic,
                model,
                version,
                payload,
            } => {
                let g = dai_protocol::global::verify(payload, &key().verifying_key(), "lab", model)
                    .expect("signed with the configured key");
                assert_eq!(g.version, *version, "the head file carries its version");
                let (head, _) = Head::from_bytes(&g.head_file).expect("head");
                Some((topic.as_str(), *version, head))
            }
            _ => None,
        })
        .collect()
}

fn events(outputs: &[Output]) -> Vec<&MonitorEvent> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Monitor(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// Every weight and bias of `head` minus the base's.
fn deltas(head: &Head) -> Vec<f32> {
    let b = base();
    head.params
        .weights
        .iter()
        .flatten()
        .zip(b.params.weights.iter().flatten())
        .chain(
            head.params
                .biases
                .iter()
                .flatten()
                .zip(b.params.biases.iter().flatten()),
        )
        .map(|(a, b)| a - b)
        .collect()
}

fn assert_all_near(values: &[f32], expected: f32) {
    assert!(!values.is_empty());
    for v in values {
        assert!((v - expected).abs() < 1e-5, "{v} vs {expected}: {values:?}");
    }
}

#[test]
fn a_start_reports_each_model_and_publishes_nothing_for_a_base() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 2);
    assert_eq!(
        i.take_outputs(),
        vec![
            Output::Monitor(MonitorEvent::Global {
                model: "m".into(),
                version: 0,
                aggregated: false,
            }),
            Output::Monitor(MonitorEvent::Pending {
                model: "m".into(),
                count: 0,
            }),
        ]
    );
    assert!(i.take_outputs().is_empty(), "taking empties the queue");
}

#[test]
fn the_broker_session_subscribes_and_counts_disconnects_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 2);
    i.take_outputs();
    i.connected();
    assert_eq!(
        i.take_outputs(),
        vec![
            Output::Monitor(MonitorEvent::BrokerConnected),
            Output::Subscribe("dai/v1/lab/dev/+/update".into()),
            Output::Subscribe("dai/v1/lab/dev/+/status".into()),
            Output::Subscribe("dai/v1/lab/dev/+/want".into()),
            Output::Subscribe("dai/v1/lab/model/+/global".into()),
            Output::Subscribe("dai/v1/lab/dev/+/fetch".into()),
            Output::Subscribe("dai/v1/lab/dev/+/report".into()),
            Output::Subscribe("dai/v1/lab/model/+/bundle".into()),
            Output::Subscribe("dai/v1/lab/dev/+/partial".into()),
        ]
    );
    assert_eq!(
        SUBSCRIPTIONS, 8,
        "the count the service waits for is the filters above"
    );
    let monitor = Monitor::new();
    monitor.apply(MonitorEvent::BrokerConnected);
    // Lost, then a failed reconnect attempt: one disconnect.
    i.disconnected();
    i.disconnected();
    let out = i.take_outputs();
    assert_eq!(
        out,
        vec![
            Output::Monitor(MonitorEvent::BrokerLost {
                was_connected: true
            }),
            Output::Monitor(MonitorEvent::BrokerLost {
                was_connected: false
            }),
        ]
    );
    for e in events(&out) {
        monitor.apply(e.clone());
    }
    assert_eq!(monitor.broker_disconnects.get(), 1);
    assert_eq!(monitor.broker_connected.get(), 0);
    assert!(!monitor.live.lock().broker_connected);
}

/// A broker restarted without persistence loses the retained global: the
/// aggregator publishes the current one again when it reconnects.
#[test]
fn a_reconnect_publishes_the_current_global_again() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 2);
    i.connected();
    i.take_outputs();
    i.publish(&topic("u1"), &wire("u1", 1, 1.0));
    i.publish(&topic("u2"), &wire("u2", 3, 2.0));
    i.flush(Instant::now()).expect("flush");
    let made = i.take_outputs();
    assert_eq!(
        globals(&made).iter().map(|g| g.1).collect::<Vec<_>>(),
        vec![1]
    );
    i.disconnected();
    i.connected();
    let again = i.take_outputs();
    let g = globals(&again);
    assert_eq!(g.len(), 1, "{again:?}");
    assert_eq!((g[0].0, g[0].1), (GLOBAL_TOPIC, 1));
    assert_eq!(g[0].2, globals(&made)[0].2, "the same weights");
    // Before any global (version 0) a reconnect publishes nothing.
    let dir0 = tempfile::tempdir().expect("tmp");
    let mut fresh = intake(dir0.path(), 2);
    fresh.connected();
    fresh.disconnected();
    fresh.take_outputs();
    fresh.connected();
    assert!(globals(&fresh.take_outputs()).is_empty());
}

#[test]
fn valid_updates_are_acked_and_a_full_round_publishes_a_signed_global() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 2);
    i.take_outputs();
    let first = wire("u1", 1, 1.0);
    i.publish(UPDATE_TOPIC, &first);
    assert_eq!(
        i.take_outputs(),
        vec![Output::Monitor(MonitorEvent::UpdateBytes(
            first.len() as u64
        ))],
        "nothing is acked before the batch is recorded"
    );
    let u1_ack = Ack {
        update_id: "u1".into(),
        status: AckStatus::Accepted,
        reason: None,
        round: Some(1),
    };
    i.flush(Instant::now()).expect("flush");
    assert_eq!(
        i.take_outputs(),
        vec![
            Output::Monitor(MonitorEvent::Update {
                device: "edge-1".into(),
                update_id: "u1".into(),
                bytes: first.len(),
                outcome: Outcome::Accepted,
                reason: None,
            }),
            Output::Ack {
                topic: ACK_TOPIC.into(),
                ack: u1_ack.clone(),
                payload: signed::seal(Kind::Ack, &key(), "lab", ACK_TOPIC, &u1_ack.to_bytes()),
            },
            Output::Monitor(MonitorEvent::Pending {
                model: "m".into(),
                count: 1,
            }),
        ],
        "one of two updates: acked, no global yet"
    );

    i.publish(&topic("u2"), &wire("u2", 3, 2.0));
    i.flush(Instant::now()).expect("flush");
    let out = i.take_outputs();
    let a = acks(&out);
    assert_eq!(a.len(), 1);
    assert_eq!(
        (a[0].0, a[0].1.update_id.as_str(), a[0].1.status),
        (ack_topic("u2").as_str(), "u2", AckStatus::Accepted)
    );
    let g = globals(&out);
    assert_eq!(g.len(), 1);
    assert_eq!((g[0].0, g[0].1), (GLOBAL_TOPIC, 1));
    // FedAvg by sample count: (1 x 1.0 + 3 x 2.0) / 4 = 1.75.
    assert_all_near(&deltas(&g[0].2), 1.75);
    let ev = events(&out);
    assert!(ev.contains(&&MonitorEvent::Global {
        model: "m".into(),
        version: 1,
        aggregated: true,
    }));
    assert!(ev.contains(&&MonitorEvent::Pending {
        model: "m".into(),
        count: 0,
    }));
    assert!(
        ev.iter()
            .any(|e| matches!(e, MonitorEvent::AggregationSeconds(s) if *s >= 0.0))
    );
    // The ack goes out before the global it contributed to.
    let ack_at = out.iter().position(|o| matches!(o, Output::Ack { .. }));
    let global_at = out.iter().position(|o| matches!(o, Output::Global { .. }));
    assert!(ack_at < global_at, "{out:?}");
    assert_eq!(
        i.stats(),
        &ServiceStats {
            accepted: 2,
            rejected: 0,
            duplicates: 0,
            globals_published: 1,
            refused: BTreeMap::new(),
            superseded: 0,
            rebased: 0,
            ..ServiceStats::default()
        }
    );
}

#[test]
fn a_malformed_payload_gets_a_rejection_ack_with_the_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 1);
    i.take_outputs();
    i.publish(UPDATE_TOPIC, b"not an update");
    let mut wrong = upd("u9", "1.0.0", 1, 0.5);
    wrong.tensors[0].shape = vec![4];
    i.publish(&topic("u9"), &wrong.encode().expect("encode"));
    i.flush(Instant::now()).expect("flush");
    let out = i.take_outputs();
    let a = acks(&out);
    assert_eq!(a.len(), 2, "{out:?}");
    assert_eq!(a[0].0, ACK_TOPIC);
    assert_eq!(
        (a[0].1.update_id.as_str(), a[0].1.status),
        ("", AckStatus::Rejected)
    );
    let reason = a[0].1.reason.as_deref().expect("a reason");
    assert!(reason.starts_with("undecodable update: "), "{reason}");
    assert_eq!(
        (a[1].1.update_id.as_str(), a[1].1.status),
        ("u9", AckStatus::Rejected)
    );
    // Its shape is checked against the model's layout while decoding,
    // before any value is read; the refusal is acked by its id.
    assert_eq!(
        a[1].1.reason.as_deref(),
        Some(
            "undecodable update: tensor layers.0.weight: shape [4], the model's layout has [2, 2]"
        )
    );
    let outcomes: Vec<Outcome> = events(&out)
        .iter()
        .filter_map(|e| match e {
            MonitorEvent::Update { outcome, .. } => Some(*outcome),
            _ => None,
        })
        .collect();
    assert_eq!(outcomes, vec![Outcome::Undecodable, Outcome::Undecodable]);
    assert!(globals(&out).is_empty(), "nothing to aggregate");
    assert_eq!((i.stats().rejected, i.stats().accepted), (2, 0));
    // A rejection does not open a round.
    i.tick(Instant::now() + Duration::from_secs(3600))
        .expect("tick");
    assert!(globals(&i.take_outputs()).is_empty());
}

#[test]
fn a_duplicate_id_is_acked_as_duplicate_and_counted_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 2);
    i.take_outputs();
    let u1 = wire("u1", 1, 1.0);
    // Twice in one batch, and again in a later one.
    i.publish(UPDATE_TOPIC, &u1);
    i.publish(UPDATE_TOPIC, &u1);
    i.flush(Instant::now()).expect("flush");
    i.publish(UPDATE_TOPIC, &u1);
    i.flush(Instant::now()).expect("flush");
    let out = i.take_outputs();
    let got: Vec<(&str, AckStatus, Option<&str>)> = acks(&out)
        .iter()
        .map(|(_, a)| (a.update_id.as_str(), a.status, a.reason.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("u1", AckStatus::Accepted, None),
            ("u1", AckStatus::Accepted, Some(DUPLICATE_REASON)),
            ("u1", AckStatus::Accepted, Some(DUPLICATE_REASON)),
        ]
    );
    assert!(globals(&out).is_empty(), "still one update of two");
    assert_eq!((i.stats().accepted, i.stats().duplicates), (1, 2));
    assert_eq!(i.state.pending_count("m").expect("pending"), 1);

    i.publish(&topic("u2"), &wire("u2", 1, 3.0));
    i.flush(Instant::now()).expect("flush");
    let out = i.take_outputs();
    let g = globals(&out);
    assert_eq!(g.len(), 1);
    // (1.0 + 3.0) / 2 = 2.0; u1 counted three times would give 1.5.
    assert_all_near(&deltas(&g[0].2), 2.0);
}

#[test]
fn a_round_timeout_closes_a_round_with_fewer_updates() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 3);
    i.take_outputs();
    let t0 = Instant::now();
    i.publish(&topic("u1"), &wire("u1", 2, 0.5));
    i.flush(t0).expect("flush");
    i.take_outputs();
    i.tick(t0 + Duration::from_secs(59)).expect("tick");
    assert!(i.take_outputs().is_empty(), "the round is still open");
    // A second update does not restart the round's clock.
    i.publish(&topic("u2"), &wire("u2", 2, 1.5));
    i.flush(t0 + Duration::from_secs(30)).expect("flush");
    assert!(globals(&i.take_outputs()).is_empty(), "2 of 3");

    i.tick(t0 + Duration::from_secs(60)).expect("tick");
    let out = i.take_outputs();
    let g = globals(&out);
    assert_eq!(g.len(), 1, "{out:?}");
    assert_eq!(g[0].1, 1);
    assert_all_near(&deltas(&g[0].2), 1.0);
    assert!(events(&out).contains(&&MonitorEvent::Pending {
        model: "m".into(),
        count: 0,
    }));
    assert_eq!(i.stats().globals_published, 1);
    // Closed: later ticks publish nothing, and the next update opens a
    // new round with its own clock.
    i.tick(t0 + Duration::from_secs(600)).expect("tick");
    assert!(i.take_outputs().is_empty());
    let t1 = t0 + Duration::from_secs(700);
    i.publish(
        &topic("u3"),
        &upd("u3", "1.0.0+g1", 1, 1.0).encode().expect("encode"),
    );
    i.flush(t1).expect("flush");
    i.take_outputs();
    i.tick(t1 + Duration::from_secs(59)).expect("tick");
    assert!(globals(&i.take_outputs()).is_empty());
    i.tick(t1 + Duration::from_secs(60)).expect("tick");
    let g = globals(&i.take_outputs())
        .into_iter()
        .map(|(_, v, _)| v)
        .collect::<Vec<_>>();
    assert_eq!(g, vec![2]);
}

#[test]
fn heartbeats_update_the_device_monitor() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 2);
    i.take_outputs();
    let status = |device: &str, state: &str, pending: u64| {
        serde_json::to_vec(&Status {
            device: device.into(),
            state: state.into(),
            ts: 12.5,
            models: BTreeMap::from([("m".to_string(), 1)]),
            outbox_pending: pending,
        })
        .expect("json")
    };
    i.publish(
        "dai/v1/lab/dev/edge-1/status",
        &status("edge-1", "online", 3),
    );
    let out = i.take_outputs();
    assert_eq!(
        out,
        vec![Output::Monitor(MonitorEvent::Heartbeat {
            device: "edge-1".into(),
            view: Some(DeviceView {
                state: "online".into(),
                models: BTreeMap::from([("m".to_string(), 1)]),
                outbox_pending: 3,
                ts: 12.5,
            }),
        })]
    );
    let monitor = Monitor::new();
    let apply = |out: Vec<Output>| {
        for e in events(&out) {
            monitor.apply(e.clone());
        }
    };
    apply(out);
    i.publish(
        "dai/v1/lab/dev/edge-2/status",
        &status("edge-2", "offline", 4),
    );
    apply(i.take_outputs());
    assert_eq!(monitor.devices_online.get(), 1);
    assert_eq!(monitor.devices_known.get(), 2);
    assert_eq!(monitor.devices_outbox.get(), 7);
    assert_eq!(monitor.live.lock().devices["edge-1"].models["m"], 1);
    // An empty retained message clears the device.
    i.publish("dai/v1/lab/dev/edge-1/status", b"");
    apply(i.take_outputs());
    assert_eq!(monitor.devices_known.get(), 1);
    assert_eq!(monitor.devices_online.get(), 0);
    assert!(!monitor.live.lock().devices.contains_key("edge-1"));
    // Unreadable heartbeats and foreign topics change nothing, and
    // heartbeats never enter the update batch.
    i.publish("dai/v1/lab/dev/edge-1/status", b"{not json");
    // Nor does a valid heartbeat over its bound (padded with spaces).
    let mut big = status("edge-1", "online", 9);
    big.resize(dai_protocol::limits::MAX_STATUS_BYTES + 1, b' ');
    i.publish("dai/v1/lab/dev/edge-1/status", &big);
    i.publish(GLOBAL_TOPIC, b"x");
    i.publish("elsewhere/topic", b"x");
    assert!(i.take_outputs().is_empty());
    i.flush(Instant::now()).expect("flush");
    assert!(i.take_outputs().is_empty());
}

#[test]
fn a_version_made_by_another_process_is_published_on_the_next_tick() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 1);
    i.publish(&topic("u1"), &wire("u1", 1, 1.0));
    i.flush(Instant::now()).expect("flush");
    assert_eq!(globals(&i.take_outputs()).len(), 1);
    i.tick(Instant::now()).expect("tick");
    assert!(i.take_outputs().is_empty(), "version 1 is already out");

    // `dai-cloud models promote m 0` on the same file.
    let mut cli = State::open(&dir.path().join("agg.sqlite")).expect("open");
    cli.promote("m", 0, "operator").expect("promote");
    i.tick(Instant::now()).expect("tick");
    let out = i.take_outputs();
    let g = globals(&out);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].1, 2);
    assert_all_near(&deltas(&g[0].2), 0.0);
    assert!(events(&out).contains(&&MonitorEvent::Global {
        model: "m".into(),
        version: 2,
        aggregated: false,
    }));
    assert_eq!(i.stats().globals_published, 1, "only aggregations count");
    i.tick(Instant::now()).expect("tick");
    assert!(i.take_outputs().is_empty());

    // A restart publishes the current global (retained) for late joiners.
    drop(i);
    let mut again = intake(dir.path(), 1);
    let versions: Vec<u64> = globals(&again.take_outputs())
        .into_iter()
        .map(|(_, v, _)| v)
        .collect();
    assert_eq!(versions, vec![2]);
}

#[test]
fn a_batch_is_bounded_and_recorded_in_one_flush() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), MAX_BATCH + 1);
    i.take_outputs();
    for n in 0..MAX_BATCH {
        assert!(!i.batch_full(), "full after {n}");
        let id = format!("u{n}");
        i.publish(&topic(&id), &wire(&id, 1, 0.1));
    }
    assert!(i.batch_full());
    i.flush(Instant::now()).expect("flush");
    assert!(!i.batch_full());
    let out = i.take_outputs();
    let ids: Vec<String> = acks(&out)
        .iter()
        .map(|(_, a)| a.update_id.clone())
        .collect();
    let expected: Vec<String> = (0..MAX_BATCH).map(|n| format!("u{n}")).collect();
    assert_eq!(ids, expected, "every update acked, in arrival order");
    assert_eq!(i.stats().accepted, MAX_BATCH as u64);
    assert_eq!(
        i.state.pending_count("m").expect("pending"),
        MAX_BATCH,
        "not due yet"
    );
}

#[test]
fn base_versions_map_to_globals() {
    assert_eq!(base_of("1.0.0"), Some(0));
    assert_eq!(base_of("1.0.0+g7"), Some(7));
    assert_eq!(base_of("1.0.0+gx"), None);
    assert_eq!(base_of(""), None);
}

/// A device that trains three times before the next global sends three
/// cumulative deltas on one base: the round does not close on it alone, it
/// is counted once (the newest), and the replaced ids are acked as
/// superseded, never dropped silently.
#[test]
fn a_device_counts_once_per_round_however_often_it_trains() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 3);
    i.take_outputs();
    let solo = |id: &str, samples: u64| {
        let mut u = crate::state::fixtures::upd(id, "1.0.0", samples, 1.0);
        u.meta.device = "solo".into();
        u.encode().expect("encode")
    };
    let solo_topic = "dai/v1/lab/dev/solo/update";
    for (n, id) in ["s1", "s2", "s3"].iter().enumerate() {
        i.publish(solo_topic, &solo(id, 10 * (n as u64 + 1)));
        i.flush(Instant::now()).expect("flush");
    }
    let out = i.take_outputs();
    assert!(globals(&out).is_empty(), "one device closed a round of 3");
    let a: Vec<(&str, Option<&str>)> = acks(&out)
        .iter()
        .map(|(_, a)| (a.update_id.as_str(), a.reason.as_deref()))
        .collect();
    assert_eq!(a.len(), 5, "{a:?}");
    assert!(
        a.iter()
            .any(|(id, r)| *id == "s1" && r.is_some_and(|r| r.contains("superseded by s2")))
    );
    assert!(
        a.iter()
            .any(|(id, r)| *id == "s2" && r.is_some_and(|r| r.contains("superseded by s3")))
    );
    assert_eq!(i.stats().superseded, 2);
    assert_eq!(
        i.state.pending_devices("m").expect("pending"),
        vec![("solo".to_string(), 30)]
    );
    // Two more devices: the round closes on three devices, three updates.
    i.publish(&topic("u1"), &wire("u1", 10, 1.0));
    i.publish(&topic("u2"), &wire("u2", 10, 1.0));
    i.flush(Instant::now()).expect("flush");
    let out = i.take_outputs();
    assert_eq!(globals(&out).len(), 1, "{out:?}");
    let v = i.state.versions().expect("versions");
    let m = &v
        .iter()
        .rfind(|r| r.model == "m")
        .expect("a version")
        .metrics;
    assert_eq!(
        (m["devices"].as_u64(), m["updates"].as_u64()),
        (Some(3), Some(3))
    );
}

/// The fleet's old aggregator state is gone: updates on its globals get a
/// `rebase` ack (never "accepted", never counted), and the new epoch's
/// version 0 is published, signed, for the edges to adopt.
#[test]
fn an_update_of_a_retired_epoch_is_acked_rebase_and_version_0_published() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 1);
    let epoch = i.epoch();
    let now = Instant::now();
    i.connected();
    let _ = i.take_outputs();
    let old = |id: &str, label: &str| upd(id, label, 5, 1.0).encode().expect("encode");
    // Global 4 of an older epoch, and global 9 of no epoch (an older edge).
    i.publish(
        &topic("u1"),
        &old("u1", &format!("1.0.0+g4@e{}", epoch - 1)),
    );
    i.publish(&topic("u2"), &old("u2", "1.0.0+g9"));
    i.flush(now).expect("flush");
    i.tick(now).expect("tick");
    let out = i.take_outputs();
    let got: Vec<(&str, AckStatus)> = acks(&out)
        .iter()
        .map(|(_, a)| (a.update_id.as_str(), a.status))
        .collect();
    assert_eq!(got, [("u1", AckStatus::Rebase), ("u2", AckStatus::Rebase)]);
    assert_eq!((i.stats().rebased, i.stats().accepted), (2, 0));
    let published: Vec<&Vec<u8>> = out
        .iter()
        .filter_map(|o| match o {
            Output::Global {
                version: 0,
                payload,
                ..
            } => Some(payload),
            _ => None,
        })
        .collect();
    assert_eq!(published.len(), 1, "version 0 once: {out:?}");
    let g = dai_protocol::global::verify(published[0], &key().verifying_key(), "lab", "m")
        .expect("a signed version 0");
    assert_eq!((g.version, g.epoch), (0, epoch));
    // This epoch's label is taken.
    i.publish(&topic("u3"), &old("u3", &format!("1.0.0+g0@e{epoch}")));
    i.flush(now).expect("flush");
    assert_eq!(i.stats().accepted, 1);
}

/// Central DP: each published version reports the epsilon spent so far
/// to the monitor (/metrics, the status page), and the strategy line
/// names the mechanism.
#[test]
fn a_dp_round_reports_its_epsilon() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = State::open(&dir.path().join("agg.sqlite")).expect("open");
    let dp = crate::state::DpSettings {
        noise_multiplier: 1.5,
        clip_norm: 1.0,
        delta: 1e-5,
        target_epsilon: None,
    };
    let settings = Settings {
        strategy: Strategy::FedAvg { min_updates: 2 },
        dp: Some(dp),
        ..settings()
    };
    assert!(strategy_label(&settings, None).contains("central DP (noise 1.5 x clip 1"));
    let mut i = Intake::new(
        state,
        IntakeConfig {
            fleet: "lab".into(),
            models: vec![("m".into(), base_file())],
            settings,
            round_timeout: Duration::from_secs(60),
            signing_key: key(),
            server_optimizer: None,
            devices: DeviceAuth::Unchecked,
        },
    )
    .expect("intake");
    let _ = i.take_outputs();
    for id in ["u1", "u2"] {
        i.publish(&topic(id), &wire(id, 3, 0.5));
    }
    i.flush(Instant::now()).expect("flush");
    let out = i.take_outputs();
    let eps: Vec<f64> = events(&out)
        .iter()
        .filter_map(|e| match e {
            MonitorEvent::Privacy { epsilon, .. } => Some(*epsilon),
            _ => None,
        })
        .collect();
    let mut a = crate::dp::Accountant::default();
    a.compose(1.0, 1.5, 1);
    assert_eq!(eps.len(), 1, "{out:?}");
    assert!((eps[0] - a.epsilon(1e-5).0).abs() < 1e-9, "{eps:?}");
    assert_eq!(globals(&out).len(), 1);
}

#[test]
fn a_failed_state_write_acks_nothing_and_the_resend_is_taken_later() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 2);
    i.take_outputs();
    // Every write now fails inside SQLite (as on a full disk or an I/O
    // error: the transaction is rolled back).
    i.state
        .conn
        .pragma_update(None, "query_only", true)
        .expect("query_only");
    i.publish(&topic("u1"), &wire("u1", 10, 0.5));
    let err = i.flush(Instant::now()).expect_err("the write fails");
    let msg = crate::error_chain(&err);
    assert!(msg.contains("readonly"), "{msg}");
    let out = i.take_outputs();
    assert!(acks(&out).is_empty(), "nothing unstored is acked: {out:?}");
    assert_eq!(i.stats().accepted, 0);
    // Writes work again; the edge sends the same update again (it was never
    // acked) and it is taken, once.
    i.state
        .conn
        .pragma_update(None, "query_only", false)
        .expect("query_only");
    i.publish(&topic("u1"), &wire("u1", 10, 0.5));
    i.flush(Instant::now()).expect("flush");
    let out = i.take_outputs();
    let a = acks(&out);
    assert_eq!(a.len(), 1, "{out:?}");
    assert_eq!(
        (a[0].1.update_id.as_str(), a[0].1.status),
        ("u1", AckStatus::Accepted)
    );
    assert_eq!(i.state.seen_counts().expect("counts"), (1, 0));
}

/// A bundle added to the state file (by `models publish` in another
/// process) is offered signed and retained on the next tick; fetches get
/// their chunks within the per-tick budget; reports are recorded; an offer
/// on the topic that is not ours is published again.
#[test]
fn bundles_are_offered_served_in_budget_and_reported() {
    use dai_protocol::bundle::{CHUNK_BYTES, Chunk, Fetch, Offer, Report, ReportState};
    let dir = tempfile::tempdir().expect("tmp");
    let mut i = intake(dir.path(), 2);
    i.connected();
    i.take_outputs();
    let archive: Vec<u8> = (0..CHUNK_BYTES * 20).map(|n| (n % 241) as u8).collect();
    let offer = Offer::describe("m", "7", &archive, Default::default(), 1.0);
    let mut other = State::open(&dir.path().join("agg.sqlite")).expect("second handle");
    other.add_bundle(&offer, &archive).expect("add");
    i.tick(Instant::now()).expect("tick");
    let topic = "dai/v1/lab/model/m/bundle";
    let out = i.take_outputs();
    let sent = out
        .iter()
        .find_map(|o| match o {
            Output::Send {
                topic: t,
                retain: true,
                payload,
            } if t == topic => Some(payload.clone()),
            _ => None,
        })
        .expect("offer published retained");
    let body = signed::open(Kind::Offer, &key().verifying_key(), "lab", topic, &sent)
        .expect("signed by the aggregator");
    assert_eq!(Offer::from_bytes(body, "m").expect("offer"), offer);
    i.tick(Instant::now()).expect("tick");
    assert!(i.take_outputs().is_empty(), "offered once");

    // Three fetches of 8 chunks: the tick's budget of 16 is served.
    for from in [0, 8, 16] {
        let f = Fetch {
            sha256: offer.sha256.clone(),
            from,
            count: 8,
        };
        i.publish("dai/v1/lab/dev/edge-1/fetch", &f.to_bytes());
    }
    let chunks: Vec<u32> = i
        .take_outputs()
        .iter()
        .filter_map(|o| match o {
            Output::Send {
                topic,
                retain: false,
                payload,
            } if topic == "dai/v1/lab/dev/edge-1/chunk" => {
                let c = Chunk::decode(payload).expect("chunk");
                offer
                    .check_chunk(c.index, c.data)
                    .expect("the offer's chunk");
                Some(c.index)
            }
            _ => None,
        })
        .collect();
    assert_eq!(chunks, (0..16).collect::<Vec<_>>());
    i.tick(Instant::now()).expect("tick");
    let f = Fetch {
        sha256: offer.sha256.clone(),
        from: 16,
        count: 8,
    };
    i.publish("dai/v1/lab/dev/edge-1/fetch", &f.to_bytes());
    assert_eq!(
        i.take_outputs().len(),
        4,
        "chunks 16..20 after the next tick"
    );

    let r = Report {
        name: "m".into(),
        version: "7".into(),
        sha256: offer.sha256.clone(),
        state: ReportState::Loaded,
        received: 20,
        total: 20,
        detail: String::new(),
    };
    i.publish("dai/v1/lab/dev/edge-1/report", &r.to_bytes());
    let rows = other.bundle_reports().expect("reports");
    assert_eq!(
        (rows[0].device.as_str(), rows[0].state.as_str()),
        ("edge-1", "loaded")
    );

    // Our own retained offer echoed back changes nothing; another one is
    // replaced on the next tick.
    i.publish(topic, &sent);
    i.tick(Instant::now()).expect("tick");
    assert!(i.take_outputs().is_empty());
    i.publish(topic, b"DAIO1 forged");
    i.tick(Instant::now()).expect("tick");
    assert!(
        i.take_outputs()
            .iter()
            .any(|o| matches!(o, Output::Send { topic: t, payload, .. } if t == topic && *payload == sent)),
        "the offer is published again"
    );
}
