//! End-to-end signatures on updates and acks, so the broker need not be
//! trusted: a message is only what its sender's Ed25519 key signed.
//!
//! Wire form: a 5-byte magic (`DAIU1` for an update, signed by the device;
//! `DAIA1` for an ack, signed by the aggregator) | signature (64) | body.
//! The signature covers a domain string, the fleet, the exact topic the
//! message is published on and the body:
//!
//! ```text
//! "dai/v1 update" 0x00 fleet 0x00 topic 0x00 body
//! ```
//!
//! So a signed update cannot be moved to another device's topic or fleet,
//! an ack for one device cannot be replayed to another, and one kind of
//! message can never pass as the other. The body is the update's
//! `zstd(safetensors)` (its metadata carries device, update id and sample
//! count, all covered) or the ack's JSON. Verification is
//! `verify_strict` (no malleable or small-order signatures).

use crate::ProtocolError;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// What is signed; each has its own magic and domain string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A device's update on `.../dev/{device}/update`.
    Update,
    /// The aggregator's ack on `.../dev/{device}/ack`.
    Ack,
    /// The aggregator's bundle offer on `.../model/{model}/bundle`.
    Offer,
    /// A tier's partial aggregate on `.../dev/{tier}/partial`
    /// ([`crate::partial`]), signed by the tier's enrolled key.
    Partial,
}

impl Kind {
    fn magic(self) -> &'static [u8; 5] {
        match self {
            Kind::Update => b"DAIU1",
            Kind::Ack => b"DAIA1",
            Kind::Offer => b"DAIO1",
            Kind::Partial => b"DAIP1",
        }
    }

    fn domain(self) -> &'static [u8] {
        match self {
            Kind::Update => b"dai/v1 update",
            Kind::Ack => b"dai/v1 ack",
            Kind::Offer => b"dai/v1 bundle offer",
            Kind::Partial => b"dai/v1 partial aggregate",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Update => "update",
            Kind::Ack => "ack",
            Kind::Offer => "bundle offer",
            Kind::Partial => "partial aggregate",
        }
    }
}

const HEADER: usize = 5 + 64;

/// The bytes a signature covers.
fn message(kind: Kind, fleet: &str, topic: &str, body: &[u8]) -> Vec<u8> {
    let domain = kind.domain();
    let mut m = Vec::with_capacity(domain.len() + fleet.len() + topic.len() + body.len() + 3);
    m.extend_from_slice(domain);
    m.push(0);
    m.extend_from_slice(fleet.as_bytes());
    m.push(0);
    m.extend_from_slice(topic.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

/// `body` signed by `key` for `topic` in `fleet`.
pub fn seal(kind: Kind, key: &SigningKey, fleet: &str, topic: &str, body: &[u8]) -> Vec<u8> {
    let sig = key.sign(&message(kind, fleet, topic, body));
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(kind.magic());
    out.extend_from_slice(&sig.to_bytes());
    out.extend_from_slice(body);
    out
}

/// Does `wire` start like a signed message of `kind`?
pub fn is_sealed(kind: Kind, wire: &[u8]) -> bool {
    wire.len() >= HEADER && &wire[..5] == kind.magic()
}

/// The signature and body of a signed message, not yet verified.
#[derive(Debug, Clone, Copy)]
pub struct Sealed<'a> {
    kind: Kind,
    signature: Signature,
    pub body: &'a [u8],
}

/// Split `wire` into signature and body (no key needed yet: the caller
/// looks up the key of the device the topic names).
pub fn parse(kind: Kind, wire: &[u8]) -> Result<Sealed<'_>, ProtocolError> {
    if !is_sealed(kind, wire) {
        return Err(ProtocolError::Signature(format!(
            "expected a signed {} (magic {:?}), found no signature",
            kind.label(),
            String::from_utf8_lossy(kind.magic())
        )));
    }
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&wire[5..HEADER]);
    Ok(Sealed {
        kind,
        signature: Signature::from_bytes(&sig),
        body: &wire[HEADER..],
    })
}

impl<'a> Sealed<'a> {
    /// The body, if `key` signed it for `topic` in `fleet`.
    pub fn verify(
        &self,
        key: &VerifyingKey,
        fleet: &str,
        topic: &str,
    ) -> Result<&'a [u8], ProtocolError> {
        key.verify_strict(
            &message(self.kind, fleet, topic, self.body),
            &self.signature,
        )
        .map_err(|_| {
            ProtocolError::Signature(format!(
                "the {} signature does not verify for this key, fleet and topic",
                self.kind.label()
            ))
        })?;
        Ok(self.body)
    }
}

/// [`parse`] then [`Sealed::verify`].
pub fn open<'a>(
    kind: Kind,
    key: &VerifyingKey,
    fleet: &str,
    topic: &str,
    wire: &'a [u8],
) -> Result<&'a [u8], ProtocolError> {
    parse(kind, wire)?.verify(key, fleet, topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "dai/v1/f/dev/a/update";

    #[test]
    fn a_sealed_message_opens_only_for_its_key_fleet_topic_and_kind() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let other = SigningKey::from_bytes(&[4; 32]);
        let wire = seal(Kind::Update, &key, "f", T, b"body");
        let pk = key.verifying_key();
        assert_eq!(
            open(Kind::Update, &pk, "f", T, &wire).expect("opens"),
            b"body"
        );
        let refused = [
            open(Kind::Update, &other.verifying_key(), "f", T, &wire),
            open(Kind::Update, &pk, "g", T, &wire),
            open(Kind::Update, &pk, "f", "dai/v1/f/dev/b/update", &wire),
            open(Kind::Ack, &pk, "f", T, &wire),
        ];
        for r in refused {
            assert!(matches!(r, Err(ProtocolError::Signature(_))), "{r:?}");
        }
        let mut tampered = wire.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(open(Kind::Update, &pk, "f", T, &tampered).is_err());
        assert!(open(Kind::Update, &pk, "f", T, b"body").is_err());
        assert!(open(Kind::Update, &pk, "f", T, b"DAIU1short").is_err());
        // An ack sealed by the same key never passes as an update.
        let ack = seal(Kind::Ack, &key, "f", T, b"body");
        assert!(open(Kind::Update, &pk, "f", T, &ack).is_err());
        assert!(!is_sealed(Kind::Update, &ack));
    }
}
