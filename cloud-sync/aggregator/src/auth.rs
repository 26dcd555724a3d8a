//! Who may submit updates: the enrolled devices of the fleet and their
//! Ed25519 keys, read from the fleet directory's registry
//! (`devices.json`, see `dai_trust::fs`). Pure: the service reads the
//! files and hands the intake a new [`DeviceKeys`] when they change.
//!
//! [`DeviceKeys::authenticate`] is the end-to-end check of one update:
//! the topic names a device, that device must be enrolled and not
//! revoked, and the payload must be signed by its key for this fleet and
//! this exact topic (`dai_protocol::signed`). Only then is the body
//! decoded, and its `meta.device` must equal the topic's device (checked
//! by the intake in every mode).

use dai_protocol::signed::{self, Kind};
use dai_trust::Registry;
use ed25519_dalek::VerifyingKey;
use std::collections::HashMap;

/// Why an update was refused before it was decoded. These get no ack: the
/// update id inside is not authenticated, so acking it could delete a
/// genuine update from its device's outbox.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("fleet {found:?} in the topic, expected {expected:?}")]
    Fleet { expected: String, found: String },
    #[error("device {0:?} is not enrolled in the fleet")]
    NotEnrolled(String),
    #[error("device {0:?} is revoked")]
    Revoked(String),
    #[error("unsigned update (a signed DAIU1 envelope is required)")]
    Unsigned,
    #[error("the signature is not device {0:?}'s for this fleet and topic")]
    Signature(String),
    #[error(
        "{0:?} is not one of this aggregator's tiers (--tier): its partial aggregates are not counted"
    )]
    NotATier(String),
}

impl Refusal {
    /// The `reason` label of `dai_cloud_updates_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Fleet { .. } => "fleet",
            Refusal::NotEnrolled(_) => "not_enrolled",
            Refusal::Revoked(_) => "revoked",
            Refusal::Unsigned => "unsigned",
            Refusal::Signature(_) => "signature",
            Refusal::NotATier(_) => "not_a_tier",
        }
    }
}

#[derive(Debug, Clone)]
struct Enrolled {
    key: VerifyingKey,
    revoked: bool,
}

/// The enrolled devices' keys.
#[derive(Debug, Clone)]
pub struct DeviceKeys {
    devices: HashMap<String, Enrolled>,
}

/// How updates are authenticated.
#[derive(Debug, Clone)]
pub enum DeviceAuth {
    /// Every update must be signed by its enrolled, unrevoked device.
    Signed(DeviceKeys),
    /// `--insecure-plaintext`: updates are taken as their topic names them
    /// (a signed envelope is opened without a check: there are no keys).
    Unchecked,
}

impl DeviceKeys {
    /// The keys of every device in `registry`.
    pub fn from_registry(registry: &Registry) -> Result<DeviceKeys, dai_trust::TrustError> {
        let mut devices = HashMap::with_capacity(registry.devices.len());
        for d in &registry.devices {
            let key = dai_trust::keys::public_from_hex(
                &d.public_key,
                &format!("public key of device {}", d.name),
            )?;
            devices.insert(
                d.name.to_string(),
                Enrolled {
                    key,
                    revoked: d.revoked_at.is_some(),
                },
            );
        }
        Ok(DeviceKeys { devices })
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

impl DeviceAuth {
    /// The update body of `payload`, received on `topic` (which names
    /// `fleet` and `device`), if `expected_fleet`'s device signed it.
    pub fn authenticate<'a>(
        &self,
        expected_fleet: &str,
        fleet: &str,
        device: &str,
        topic: &str,
        payload: &'a [u8],
    ) -> Result<&'a [u8], Refusal> {
        self.authenticate_kind(Kind::Update, expected_fleet, fleet, device, topic, payload)
    }

    /// [`DeviceAuth::authenticate`] for a signed message of `kind` (a
    /// tier's partial aggregate is signed by its enrolled key the same way).
    pub fn authenticate_kind<'a>(
        &self,
        kind: Kind,
        expected_fleet: &str,
        fleet: &str,
        device: &str,
        topic: &str,
        payload: &'a [u8],
    ) -> Result<&'a [u8], Refusal> {
        if fleet != expected_fleet {
            return Err(Refusal::Fleet {
                expected: expected_fleet.to_string(),
                found: fleet.to_string(),
            });
        }
        match self {
            DeviceAuth::Unchecked => Ok(match signed::parse(kind, payload) {
                Ok(sealed) => sealed.body,
                Err(_) => payload,
            }),
            DeviceAuth::Signed(keys) => {
                let enrolled = keys
                    .devices
                    .get(device)
                    .ok_or_else(|| Refusal::NotEnrolled(device.to_string()))?;
                if enrolled.revoked {
                    return Err(Refusal::Revoked(device.to_string()));
                }
                let sealed = signed::parse(kind, payload).map_err(|_| Refusal::Unsigned)?;
                sealed
                    .verify(&enrolled.key, fleet, topic)
                    .map_err(|_| Refusal::Signature(device.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dai_trust::{DeviceName, DeviceRecord, FleetName, Serial};
    use ed25519_dalek::SigningKey;

    fn registry(keys: &[(&str, &SigningKey, bool)]) -> Registry {
        let mut r = Registry::new(FleetName::parse("f").expect("fleet"));
        for (name, key, revoked) in keys {
            r.add(DeviceRecord {
                name: DeviceName::parse(name).expect("name"),
                serial: Serial::from_der_bytes(&[1, 2, 3]),
                public_key: hex::encode(key.verifying_key().to_bytes()),
                created_at: 0,
                not_after: i64::MAX,
                revoked_at: revoked.then_some(1),
            })
            .expect("add");
        }
        r
    }

    #[test]
    fn only_the_topic_devices_own_signature_for_this_fleet_passes() {
        let (a, b, c) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
            SigningKey::from_bytes(&[3; 32]),
        );
        let auth = DeviceAuth::Signed(
            DeviceKeys::from_registry(&registry(&[
                ("a", &a, false),
                ("b", &b, false),
                ("c", &c, true),
            ]))
            .expect("keys"),
        );
        let ta = "dai/v1/f/dev/a/update";
        let tb = "dai/v1/f/dev/b/update";
        let by_a = signed::seal(Kind::Update, &a, "f", ta, b"u");
        assert_eq!(auth.authenticate("f", "f", "a", ta, &by_a), Ok(&b"u"[..]));
        // A's envelope moved to B's topic, or A signing for B's topic.
        assert_eq!(
            auth.authenticate("f", "f", "b", tb, &by_a),
            Err(Refusal::Signature("b".into()))
        );
        let a_as_b = signed::seal(Kind::Update, &a, "f", tb, b"u");
        assert_eq!(
            auth.authenticate("f", "f", "b", tb, &a_as_b),
            Err(Refusal::Signature("b".into()))
        );
        assert_eq!(
            auth.authenticate("f", "f", "a", ta, b"u"),
            Err(Refusal::Unsigned)
        );
        let tm = "dai/v1/f/dev/mallory/update";
        assert_eq!(
            auth.authenticate("f", "f", "mallory", tm, &by_a),
            Err(Refusal::NotEnrolled("mallory".into()))
        );
        let tc = "dai/v1/f/dev/c/update";
        let by_c = signed::seal(Kind::Update, &c, "f", tc, b"u");
        assert_eq!(
            auth.authenticate("f", "f", "c", tc, &by_c),
            Err(Refusal::Revoked("c".into()))
        );
        assert!(matches!(
            auth.authenticate("f", "g", "a", ta, &by_a),
            Err(Refusal::Fleet { .. })
        ));
        // Unchecked mode strips an envelope and takes a plain payload.
        assert_eq!(
            DeviceAuth::Unchecked.authenticate("f", "f", "a", ta, &by_a),
            Ok(&b"u"[..])
        );
        assert_eq!(
            DeviceAuth::Unchecked.authenticate("f", "f", "a", ta, b"u"),
            Ok(&b"u"[..])
        );
    }
}
