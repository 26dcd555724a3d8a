//! [`DeviceBundle`]: the one set of files an installer or an image writes
//! onto a device: its certificate, its private key, the fleet CA, the
//! aggregator's public key (to verify globals and acks) and the fleet and
//! device names. Made and checked here; written and read by [`crate::fs`].

use crate::TrustError;
use crate::ca::{FleetCa, IssuedCert, Role, Validity};
use crate::keys::SecretKey;
use crate::name::{DeviceName, FleetName};
use crate::verify::{PeerCert, verify_peer_cert};
use ed25519_dalek::VerifyingKey;
use std::time::SystemTime;

/// A device's identity.
#[derive(Debug)]
pub struct DeviceBundle {
    pub fleet: FleetName,
    pub device: DeviceName,
    pub cert_pem: String,
    /// The device's one key: TLS client key and update signing key.
    pub key: SecretKey,
    pub ca_pem: String,
    /// Verifies the aggregator's signed globals and acks.
    pub aggregator_public_key: VerifyingKey,
}

impl DeviceBundle {
    /// A fresh key for `device` and its certificate from `ca`.
    pub fn issue(
        ca: &FleetCa,
        aggregator_public_key: VerifyingKey,
        device: &DeviceName,
        validity: Validity,
    ) -> Result<(DeviceBundle, IssuedCert), TrustError> {
        let key = SecretKey::generate()?;
        let issued = ca.issue_device(device, &key.public(), validity)?;
        let bundle = DeviceBundle {
            fleet: ca.fleet().clone(),
            device: device.clone(),
            cert_pem: issued.cert_pem.clone(),
            key,
            ca_pem: ca.cert_pem().to_string(),
            aggregator_public_key,
        };
        Ok((bundle, issued))
    }

    /// The bundle is whole at `now`: the certificate chains to its CA, is a
    /// device certificate for this fleet and name, and the key is its key.
    pub fn verify(&self, now: SystemTime) -> Result<PeerCert, TrustError> {
        let cert = verify_peer_cert(&self.ca_pem, &self.cert_pem, now, Role::Device)?;
        if cert.fleet != self.fleet {
            return Err(TrustError::WrongFleet {
                expected: self.fleet.to_string(),
                found: cert.fleet.to_string(),
            });
        }
        if cert.name != self.device.as_str() {
            return Err(TrustError::WrongDevice {
                expected: self.device.to_string(),
                found: cert.name,
            });
        }
        if cert.public_key != self.key.public_bytes() {
            return Err(TrustError::KeyMismatch {
                what: "device certificate".into(),
            });
        }
        Ok(cert)
    }
}
