//! The uplink's decisions on what arrives and what is due, without a
//! socket or a clock: the session (`session.rs`) measures elapsed times and
//! does the I/O, these functions say what to do, so the rules are tested
//! without a broker.

use dai_protocol::base::GlobalId;
use dai_protocol::messages::Ack;
use dai_protocol::signed::{self, Kind};
use dai_protocol::topics::Topic;
use ed25519_dalek::VerifyingKey;
use std::time::Duration;

/// Longest backoff factor between resends of one update (`2^6` = 64x the
/// ack timeout).
const MAX_RESEND_DOUBLINGS: u32 = 6;

/// Whether an outbox row is published on this tick.
///
/// `last` is the row's in-flight record on this connection: how long ago
/// it was last published and how many times it was already published again
/// without an ack. Returns `None` when it is not due yet, otherwise the
/// resend count to record: `Some(0)` for a first publish, `Some(n + 1)` for
/// a republish.
pub(crate) fn resend_due(last: Option<(Duration, u32)>, ack_timeout: Duration) -> Option<u32> {
    let Some((since, n)) = last else {
        return Some(0);
    };
    // Each resend waits twice as long (up to 64x), so an aggregator that is
    // down for hours does not get a backlog of copies queued in its session.
    // Saturating: a huge configured timeout means "never", not a panic.
    let wait = ack_timeout.saturating_mul(1u32 << n.min(MAX_RESEND_DOUBLINGS));
    (since >= wait).then_some(n + 1)
}

/// Whether the heartbeat is due; `None` means none was sent on this
/// connection yet.
pub(crate) fn heartbeat_due(since_last: Option<Duration>, every: Duration) -> bool {
    since_last.is_none_or(|d| d >= every)
}

/// What a verified global model is, against the one served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GlobalVerdict {
    /// Newer (a larger version, or a newer epoch): store and serve it.
    Apply,
    /// The retained copy of what is served (arrives on every (re)connect).
    AlreadyServed,
    /// Below the one served (an older version, or any version of an older
    /// epoch: a replayed global of a retired version line): refused.
    Older,
}

pub(crate) fn global_verdict(global: GlobalId, current: GlobalId) -> GlobalVerdict {
    use std::cmp::Ordering::*;
    match global.cmp(&current) {
        Greater => GlobalVerdict::Apply,
        Equal => GlobalVerdict::AlreadyServed,
        Less => GlobalVerdict::Older,
    }
}

/// An incoming publish, sorted by topic.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// On the device's own ack topic: the verified, decoded ack, or why it
    /// was refused (unsigned, not the aggregator's signature for this
    /// topic, unreadable). A refused ack deletes nothing.
    Ack(Result<Ack, String>),
    /// On a model's global topic; the payload is verified by the session
    /// (it needs the key and the version served).
    Global { model: String },
    /// Anything else (a topic we did not subscribe to, or unparsable).
    Ignored,
}

/// Who the uplink is and whom it trusts, for [`classify`].
pub(crate) struct Trust<'a> {
    pub fleet: &'a str,
    /// This device's ack topic; an ack on any other is ignored.
    pub ack_topic: &'a str,
    pub aggregator: &'a VerifyingKey,
}

pub(crate) fn classify(topic: &str, payload: &[u8], trust: &Trust<'_>) -> Incoming {
    match Topic::parse(topic) {
        Ok(Topic::Ack { .. }) if topic == trust.ack_topic => Incoming::Ack(
            signed::open(Kind::Ack, trust.aggregator, trust.fleet, topic, payload)
                .and_then(Ack::from_bytes)
                .map_err(|e| e.to_string()),
        ),
        Ok(Topic::Global { fleet, model }) if fleet == trust.fleet => Incoming::Global { model },
        _ => Incoming::Ignored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dai_protocol::messages::AckStatus;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn first_publish_is_always_due() {
        assert_eq!(resend_due(None, T), Some(0));
    }

    #[test]
    fn resends_wait_for_the_timeout_doubling_each_time() {
        assert_eq!(resend_due(Some((Duration::from_secs(9), 0)), T), None);
        assert_eq!(resend_due(Some((T, 0)), T), Some(1));
        assert_eq!(resend_due(Some((Duration::from_secs(19), 1)), T), None);
        assert_eq!(resend_due(Some((Duration::from_secs(20), 1)), T), Some(2));
        assert_eq!(resend_due(Some((Duration::from_secs(40), 3)), T), None);
        assert_eq!(resend_due(Some((Duration::from_secs(80), 3)), T), Some(4));
    }

    #[test]
    fn resend_wait_is_capped_at_64x() {
        assert_eq!(resend_due(Some((Duration::from_secs(639), 6)), T), None);
        assert_eq!(resend_due(Some((Duration::from_secs(640), 6)), T), Some(7));
        assert_eq!(
            resend_due(Some((Duration::from_secs(640), 40)), T),
            Some(41)
        );
    }

    #[test]
    fn a_huge_timeout_does_not_overflow() {
        assert_eq!(
            resend_due(Some((Duration::from_secs(1), 6)), Duration::MAX),
            None
        );
    }

    #[test]
    fn heartbeat_is_due_first_and_then_every_period() {
        assert!(heartbeat_due(None, T));
        assert!(!heartbeat_due(Some(Duration::from_secs(9)), T));
        assert!(heartbeat_due(Some(T), T));
    }

    #[test]
    fn globals_apply_only_when_newer() {
        let g = |epoch, version| GlobalId { epoch, version };
        assert_eq!(global_verdict(g(1, 3), g(1, 2)), GlobalVerdict::Apply);
        assert_eq!(global_verdict(g(1, 1), g(0, 0)), GlobalVerdict::Apply);
        assert_eq!(
            global_verdict(g(1, 2), g(1, 2)),
            GlobalVerdict::AlreadyServed
        );
        assert_eq!(global_verdict(g(1, 1), g(1, 2)), GlobalVerdict::Older);
        // A new epoch (the aggregator lost its state and started again)
        // wins whatever the version; a replayed old epoch never does.
        assert_eq!(global_verdict(g(2, 0), g(1, 50)), GlobalVerdict::Apply);
        assert_eq!(global_verdict(g(1, 99), g(2, 0)), GlobalVerdict::Older);
    }

    fn topic(t: Topic) -> String {
        match t.build() {
            Ok(s) => s,
            Err(e) => panic!("topic: {e}"),
        }
    }

    #[test]
    fn incoming_messages_are_sorted_by_topic() {
        let ack_topic = topic(Topic::Ack {
            fleet: "f".into(),
            device: "d".into(),
        });
        let global_topic = topic(Topic::Global {
            fleet: "f".into(),
            model: "m".into(),
        });
        let ack = Ack {
            update_id: "u1".into(),
            status: AckStatus::Accepted,
            reason: None,
            round: None,
        };
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let forger = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
        let public = key.verifying_key();
        let trust = Trust {
            fleet: "f",
            ack_topic: &ack_topic,
            aggregator: &public,
        };
        let bytes = ack.to_bytes();
        let signed = signed::seal(Kind::Ack, &key, "f", &ack_topic, &bytes);
        match classify(&ack_topic, &signed, &trust) {
            Incoming::Ack(Ok(a)) => assert_eq!(a.update_id, "u1"),
            other => panic!("{other:?}"),
        }
        // Forged acks: unsigned, another key, signed for another device's
        // topic, garbage under a good signature.
        let other_topic = topic(Topic::Ack {
            fleet: "f".into(),
            device: "e".into(),
        });
        for forged in [
            bytes.clone(),
            signed::seal(Kind::Ack, &forger, "f", &ack_topic, &bytes),
            signed::seal(Kind::Ack, &key, "f", &other_topic, &bytes),
            signed::seal(Kind::Update, &key, "f", &ack_topic, &bytes),
            signed::seal(Kind::Ack, &key, "f", &ack_topic, b"{"),
        ] {
            assert!(
                matches!(classify(&ack_topic, &forged, &trust), Incoming::Ack(Err(_))),
                "forged ack accepted"
            );
        }
        // Another device's genuine ack is not ours.
        let theirs = signed::seal(Kind::Ack, &key, "f", &other_topic, &bytes);
        assert!(matches!(
            classify(&other_topic, &theirs, &trust),
            Incoming::Ignored
        ));
        match classify(&global_topic, b"anything", &trust) {
            Incoming::Global { model } => assert_eq!(model, "m"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify("not/ours", b"", &trust),
            Incoming::Ignored
        ));
        let status = topic(Topic::Status {
            fleet: "f".into(),
            device: "d".into(),
        });
        assert!(matches!(classify(&status, b"", &trust), Incoming::Ignored));
    }
}
