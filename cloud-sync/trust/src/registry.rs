//! The fleet's records: [`Registry`] (`devices.json`, every device ever
//! enrolled) and [`Revocations`] (`revocations.json`, what a broker or the
//! aggregator refuses). Both are JSON with a `version` (1), unknown fields
//! refused. Times are Unix seconds.
//!
//! `devices.json`:
//! ```json
//! {"version": 1, "fleet": "lab", "devices": [
//!   {"name": "cam-1", "serial": "5b0e…", "public_key": "9f2c…(64 hex)",
//!    "created_at": 1796000000, "not_after": 1953680000, "revoked_at": null}]}
//! ```
//! `revocations.json`:
//! ```json
//! {"version": 1, "fleet": "lab", "revoked": [
//!   {"name": "cam-1", "serial": "5b0e…", "revoked_at": 1796100000}]}
//! ```
//! A certificate is revoked when its serial or its name is listed: a name
//! stays revoked (a replacement device is enrolled under a new name), so a
//! revoked name can never come back through a second certificate.

use crate::TrustError;
use crate::keys::Serial;
use crate::name::{DeviceName, FleetName};
use crate::verify::PeerCert;
use serde::{Deserialize, Serialize};

const VERSION: u32 = 1;

/// One enrolled device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    pub name: DeviceName,
    pub serial: Serial,
    /// The device's Ed25519 public key, 64 hex digits.
    pub public_key: String,
    pub created_at: i64,
    /// The end of the certificate's validity.
    pub not_after: i64,
    pub revoked_at: Option<i64>,
}

/// Every device enrolled in a fleet (`devices.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    version: u32,
    pub fleet: FleetName,
    pub devices: Vec<DeviceRecord>,
}

impl Registry {
    pub fn new(fleet: FleetName) -> Registry {
        Registry {
            version: VERSION,
            fleet,
            devices: Vec::new(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&DeviceRecord> {
        self.devices.iter().find(|d| d.name.as_str() == name)
    }

    /// Refuses a name already enrolled (revoked ones included).
    pub fn check_new(&self, name: &DeviceName) -> Result<(), TrustError> {
        if crate::ca::RESERVED_NAMES.contains(&name.as_str()) {
            return Err(TrustError::ReservedName {
                name: name.to_string(),
            });
        }
        match self.get(name.as_str()) {
            Some(d) => Err(TrustError::Duplicate {
                name: name.to_string(),
                serial: d.serial.clone(),
            }),
            None => Ok(()),
        }
    }

    pub fn add(&mut self, record: DeviceRecord) -> Result<(), TrustError> {
        self.check_new(&record.name)?;
        self.devices.push(record);
        Ok(())
    }

    /// Marks `name` revoked at `at`; `Ok(false)` if it already was (its
    /// first revocation time is kept).
    pub fn revoke(&mut self, name: &str, at: i64) -> Result<bool, TrustError> {
        let d = self
            .devices
            .iter_mut()
            .find(|d| d.name.as_str() == name)
            .ok_or_else(|| TrustError::UnknownDevice {
                name: name.chars().take(80).collect(),
            })?;
        if d.revoked_at.is_some() {
            return Ok(false);
        }
        d.revoked_at = Some(at);
        Ok(true)
    }

    /// The revocation list these records imply.
    pub fn revocations(&self) -> Revocations {
        Revocations {
            version: VERSION,
            fleet: self.fleet.clone(),
            revoked: self
                .devices
                .iter()
                .filter_map(|d| {
                    Some(Revoked {
                        name: d.name.clone(),
                        serial: d.serial.clone(),
                        revoked_at: d.revoked_at?,
                    })
                })
                .collect(),
        }
    }

    pub fn to_json(&self) -> String {
        pretty(self)
    }

    /// `what` names the document in errors (a file name, usually).
    pub fn from_json(bytes: &[u8], what: &str) -> Result<Registry, TrustError> {
        let r: Registry = from_json(bytes, what)?;
        check_version(r.version, what)?;
        let mut names: Vec<&str> = r.devices.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(TrustError::Contents {
                what: what.into(),
                reason: format!("device {:?} is listed twice", w[0]),
            });
        }
        Ok(r)
    }
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    pub name: DeviceName,
    pub serial: Serial,
    pub revoked_at: i64,
}

/// The fleet's revocation list (`revocations.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocations {
    version: u32,
    pub fleet: FleetName,
    pub revoked: Vec<Revoked>,
}

impl Revocations {
    pub fn new(fleet: FleetName) -> Revocations {
        Revocations {
            version: VERSION,
            fleet,
            revoked: Vec::new(),
        }
    }

    /// Is a certificate with this name or this serial revoked?
    pub fn is_revoked(&self, name: &str, serial: &Serial) -> bool {
        self.revoked
            .iter()
            .any(|r| r.name.as_str() == name || &r.serial == serial)
    }

    /// A verified certificate refused when revoked.
    pub fn check(&self, cert: &PeerCert) -> Result<(), TrustError> {
        if self.is_revoked(&cert.name, &cert.serial) {
            return Err(TrustError::Revoked {
                name: cert.name.clone(),
                serial: cert.serial.clone(),
            });
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        pretty(self)
    }

    pub fn from_json(bytes: &[u8], what: &str) -> Result<Revocations, TrustError> {
        let r: Revocations = from_json(bytes, what)?;
        check_version(r.version, what)?;
        Ok(r)
    }
}

fn pretty<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("plain structs serialise");
    s.push('\n');
    s
}

fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, TrustError> {
    serde_json::from_slice(bytes).map_err(|source| TrustError::Json {
        what: what.into(),
        source,
    })
}

fn check_version(v: u32, what: &str) -> Result<(), TrustError> {
    if v == VERSION {
        Ok(())
    } else {
        Err(TrustError::Contents {
            what: what.into(),
            reason: format!("version {v}, expected {VERSION}"),
        })
    }
}
