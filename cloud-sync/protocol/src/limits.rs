//! Per-topic message bounds: the largest payload each topic carries and
//! whether a message on it may be retained. Both brokers' front doors use
//! them (the embedded broker's gate refuses a packet beyond them and closes
//! the connection; the shipped Mosquitto config caps packets at the largest
//! of them), so what a broker holds for one client is bounded by its topics
//! times these sizes.
//!
//! Sizes are of the MQTT payload as published: the signed envelope
//! included.

use crate::topics::Topic;
use crate::{bundle, global, messages, partial, update};

/// Room for an envelope around a bounded body (magic, signature, slack).
const ENVELOPE: usize = 1024;

/// The retained heartbeat: a few fields and one version per model.
pub const MAX_STATUS_BYTES: usize = 16 << 10;
/// One sensor event (a prediction as JSON).
pub const MAX_EVENT_BYTES: usize = 64 << 10;
/// One signed ack: an id of at most 256 bytes and a reason the aggregator
/// cuts to [`messages::MAX_REASON_BYTES`].
pub const MAX_ACK_BYTES: usize = 16 << 10;
/// One signed update.
pub const MAX_UPDATE_BYTES: usize = update::MAX_WIRE_BYTES + ENVELOPE;
/// One signed global (its bound includes its own header).
pub const MAX_GLOBAL_BYTES: usize = global::MAX_WIRE_BYTES;
/// The largest payload of any topic: the broker's packet bound.
pub const MAX_MESSAGE_BYTES: usize = MAX_GLOBAL_BYTES;

/// The largest payload a message on `topic` may carry.
pub fn max_payload(topic: &Topic) -> usize {
    match topic {
        Topic::Update { .. } => MAX_UPDATE_BYTES,
        Topic::Ack { .. } => MAX_ACK_BYTES,
        Topic::Status { .. } => MAX_STATUS_BYTES,
        Topic::Event { .. } => MAX_EVENT_BYTES,
        Topic::Want { .. } => messages::MAX_WANT_BYTES,
        Topic::Global { .. } => MAX_GLOBAL_BYTES,
        Topic::Bundle { .. } => bundle::MAX_OFFER_BYTES + ENVELOPE,
        Topic::Fetch { .. } => bundle::MAX_FETCH_BYTES,
        Topic::Chunk { .. } => bundle::MAX_CHUNK_WIRE_BYTES,
        Topic::Report { .. } => bundle::MAX_REPORT_BYTES,
        Topic::Partial { .. } => partial::MAX_PARTIAL_BYTES + ENVELOPE,
    }
}

/// Only the heartbeat (a device's last word), the globals and the bundle
/// offers (what a device connecting later needs) are retained; anything
/// else retained would only be memory a client makes the broker keep.
pub fn may_retain(topic: &Topic) -> bool {
    matches!(
        topic,
        Topic::Status { .. } | Topic::Global { .. } | Topic::Bundle { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_holds_what_its_encoder_makes_and_no_more_than_the_broker_takes() {
        let dev = |f: fn(String, String) -> Topic| f("f".into(), "d".into());
        let topics = [
            dev(|fleet, device| Topic::Update { fleet, device }),
            dev(|fleet, device| Topic::Ack { fleet, device }),
            dev(|fleet, device| Topic::Status { fleet, device }),
            dev(|fleet, device| Topic::Event { fleet, device }),
            dev(|fleet, device| Topic::Want { fleet, device }),
            Topic::Global {
                fleet: "f".into(),
                model: "m".into(),
            },
            Topic::Bundle {
                fleet: "f".into(),
                model: "m".into(),
            },
            dev(|fleet, device| Topic::Fetch { fleet, device }),
            dev(|fleet, device| Topic::Chunk { fleet, device }),
            dev(|fleet, device| Topic::Report { fleet, device }),
            dev(|fleet, device| Topic::Partial { fleet, device }),
        ];
        for t in &topics {
            assert!(max_payload(t) <= MAX_MESSAGE_BYTES, "{t:?}");
        }
        // The largest ack the aggregator can write fits its bound.
        // (Control characters: JSON writes each as 6 bytes; a cut must
        // fall on a character boundary.)
        for reason in ["\u{2}".repeat(10_000), "a\u{1F600}".repeat(1_000)] {
            let ack = messages::Ack {
                update_id: "\u{1}".repeat(256),
                status: messages::AckStatus::Rejected,
                reason: Some(reason),
                round: Some(u64::MAX),
            };
            let wire = ack.to_bytes();
            assert!(wire.len() + 69 <= MAX_ACK_BYTES, "{}", wire.len());
            let back = messages::Ack::from_bytes(&wire).expect("a cut ack still parses");
            assert!(
                back.reason
                    .is_some_and(|r| r.len() <= messages::MAX_REASON_BYTES + 3)
            );
        }
        assert_eq!(
            topics.iter().filter(|t| may_retain(t)).count(),
            3,
            "status, global and bundle offer only"
        );
    }
}
