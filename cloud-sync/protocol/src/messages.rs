//! JSON messages: the aggregator's ack for one update (sent signed, see
//! [`crate::signed`]), the edge's retained status heartbeat (its last will
//! is the same shape, "offline") and its request for a newer global.

use serde::{Deserialize, Serialize};

/// Outcome of one update, sent on `.../dev/{device}/ack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub update_id: String,
    /// `accepted` (persisted; safe to delete from the outbox), `rejected`,
    /// or `rebase`: its base is not a global of the aggregator's epoch (a
    /// new version line), so it can never count; the edge drops it and
    /// trains again from the current global, which the aggregator
    /// publishes.
    pub status: AckStatus,
    /// Why it was rejected (or a note), for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The global version the update will be folded into, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    Accepted,
    Rejected,
    Rebase,
}

/// Retained heartbeat on `.../dev/{device}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub device: String,
    /// `online` or `offline` (the last will).
    pub state: String,
    pub ts: f64,
    /// Model -> serving global version.
    #[serde(default)]
    pub models: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub outbox_pending: u64,
}

/// A device's request on `.../dev/{device}/want`: "I serve `version` of
/// `model` from aggregator `epoch`; publish the current global if it is
/// newer or of another epoch" (epoch 0: no global yet). The aggregator
/// answers with the retained global itself, so a lost or cleared retained
/// message heals for every device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Want {
    pub model: String,
    pub version: u64,
    #[serde(default)]
    pub epoch: u64,
}

/// Largest want message read (it is two short fields).
pub const MAX_WANT_BYTES: usize = 1024;

impl Want {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Want, crate::ProtocolError> {
        if b.len() > MAX_WANT_BYTES {
            return Err(crate::ProtocolError::TooLarge {
                size: b.len(),
                limit: MAX_WANT_BYTES,
            });
        }
        serde_json::from_slice(b).map_err(|e| crate::ProtocolError::Format(format!("want: {e}")))
    }
}

/// An ack's reason is cut to this many bytes (at a character boundary):
/// it may quote a decoder's error about attacker-chosen bytes, and an ack
/// must stay within [`crate::limits::MAX_ACK_BYTES`].
pub const MAX_REASON_BYTES: usize = 1024;

impl Ack {
    /// JSON, with the reason cut to [`MAX_REASON_BYTES`].
    pub fn to_bytes(&self) -> Vec<u8> {
        match &self.reason {
            Some(r) if r.len() > MAX_REASON_BYTES => {
                let mut end = MAX_REASON_BYTES;
                while !r.is_char_boundary(end) {
                    end -= 1;
                }
                let cut = Ack {
                    reason: Some(format!("{}…", &r[..end])),
                    ..self.clone()
                };
                serde_json::to_vec(&cut).unwrap_or_default()
            }
            _ => serde_json::to_vec(self).unwrap_or_default(),
        }
    }

    pub fn from_bytes(b: &[u8]) -> Result<Ack, crate::ProtocolError> {
        serde_json::from_slice(b).map_err(|e| crate::ProtocolError::Format(format!("ack: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_round_trip_and_refusal() {
        let a = Ack {
            update_id: "u1".into(),
            status: AckStatus::Rejected,
            reason: Some("stale base".into()),
            round: None,
        };
        assert_eq!(Ack::from_bytes(&a.to_bytes()).expect("ack"), a);
        assert!(Ack::from_bytes(br#"{"update_id":"u","status":"maybe"}"#).is_err());
    }
}
