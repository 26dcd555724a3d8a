//! `dai-trust`: fleet identity. A fleet CA issues every device, and the
//! aggregator, an Ed25519 certificate; the key behind it is the one key the
//! device holds, so the same key authenticates its MQTT connection (mutual
//! TLS, rustls with the ring provider) and signs its updates.
//!
//! Layout (everything but [`fs`] is pure: bytes and times in, bytes out):
//! - [`name`]: [`DeviceName`] and [`FleetName`], the topic segment rule
//!   (`[A-Za-z0-9._-]{1,64}`) a certificate name must follow;
//! - [`keys`]: [`SecretKey`] (an `ed25519-dalek` key, PKCS#8 PEM) and
//!   [`Serial`];
//! - [`ca`]: [`FleetCa`] (self-signed CA, issues certificates with rcgen),
//!   [`AggregatorKey`] (signs globals and acks, and has its own certificate),
//!   [`Validity`], [`IssuedCert`];
//! - [`crl`]: [`FleetCa::crl`], the CA-signed X.509 CRL of revoked serials
//!   (`crl.pem`) for an OpenSSL broker (Mosquitto's `crlfile`);
//! - [`verify`]: [`verify_device_cert`] (rustls-webpki path validation to the
//!   CA, then the names read with x509-parser) and [`PeerCert`];
//! - [`bundle`]: [`DeviceBundle`], what an installer writes onto a device;
//! - [`registry`]: [`Registry`] of enrolled devices (`devices.json`) and
//!   [`Revocations`] (`revocations.json`);
//! - [`tls`]: rustls client and server configurations (ring provider) for
//!   mutual TLS from these identities;
//! - [`token`]: HTTP bearer tokens read from their files (both APIs);
//! - [`fs`]: the file layout of a bundle directory and of a fleet directory,
//!   size-capped reads and private (0600) writes.
//!
//! A certificate names its holder twice: the subject CN is the name and a
//! URI SAN `urn:dai:{fleet}:{role}:{name}` carries fleet, role (`device` or
//! `aggregator`) and name. Verification requires both to agree, so a device
//! certificate can never pass as the aggregator's.
//!
//! Every error is a [`TrustError`]; none is printed with its source inside
//! the message (callers print the chain).

pub mod bundle;
pub mod ca;
pub mod crl;
pub mod fs;
pub mod keys;
pub mod name;
pub mod registry;
pub mod tls;
pub mod token;
pub mod verify;

#[cfg(test)]
mod tests;

pub use bundle::DeviceBundle;
pub use ca::{AggregatorKey, FleetCa, IssuedCert, Role, Validity};
pub use keys::{SecretKey, Serial};
pub use name::{DeviceName, FleetName};
pub use registry::{DeviceRecord, Registry, Revocations, Revoked};
pub use verify::{PeerCert, verify_device_cert, verify_peer_cert, verify_peer_der};

use std::path::PathBuf;

/// Why an identity operation failed. Each variant says what was refused
/// and what was expected; an underlying error is its `source`.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{what} name {name:?}: expected 1-64 characters of [A-Za-z0-9._-]")]
    InvalidName { what: &'static str, name: String },
    #[error("{what}: expected exactly one PEM block labelled {label}, found {found} blocks")]
    PemCount {
        what: String,
        label: &'static str,
        found: usize,
    },
    #[error("{what}: expected a PEM block labelled {expected}, found a {found} block")]
    PemLabel {
        what: String,
        expected: &'static str,
        found: String,
    },
    #[error("{what}: not valid PEM")]
    Pem {
        what: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what}: not an Ed25519 PKCS#8 private key")]
    Key {
        what: String,
        #[source]
        source: ed25519_dalek::pkcs8::Error,
    },
    #[error("{what}: not an Ed25519 public key (expected 64 hex digits)")]
    PublicKey { what: String },
    #[error("{what}: not a usable X.509 certificate")]
    Certificate {
        what: String,
        #[source]
        source: webpki::Error,
    },
    #[error("{what}: {reason}")]
    Contents { what: String, reason: String },
    #[error("{what}: the private key does not belong to the certificate")]
    KeyMismatch { what: String },
    #[error("the certificate does not chain to the fleet CA")]
    Untrusted {
        #[source]
        source: webpki::Error,
    },
    #[error("the certificate expired at {not_after} (now {now})")]
    Expired { not_after: String, now: String },
    #[error("the certificate is not valid before {not_before} (now {now})")]
    NotYetValid { not_before: String, now: String },
    #[error("the certificate's role is {found}, expected {expected}")]
    WrongRole { expected: Role, found: String },
    #[error("the certificate is for fleet {found:?}, expected fleet {expected:?}")]
    WrongFleet { expected: String, found: String },
    #[error("the certificate's common name {cn:?} differs from its name {san:?} in the SAN")]
    NameMismatch { cn: String, san: String },
    #[error("the certificate is for device {found:?}, expected device {expected:?}")]
    WrongDevice { expected: String, found: String },
    #[error(
        "device name {name:?} is reserved (the aggregator's and the broker's certificate names)"
    )]
    ReservedName { name: String },
    #[error("device {name:?} is already enrolled (serial {serial})")]
    Duplicate { name: String, serial: Serial },
    #[error("device {name:?} is not enrolled")]
    UnknownDevice { name: String },
    #[error("device {name:?} (serial {serial}) is revoked")]
    Revoked { name: String, serial: Serial },
    #[error("broker host {host:?}: expected a DNS name or an IP address")]
    InvalidHost { host: String },
    #[error("{what}")]
    Tls {
        what: String,
        #[source]
        source: rustls::Error,
    },
    #[error("the validity period is empty or does not fit a certificate")]
    Validity,
    #[error("generating a certificate")]
    Generate {
        #[source]
        source: rcgen::Error,
    },
    #[error("no randomness from the operating system")]
    Random {
        #[source]
        source: getrandom::Error,
    },
    #[error("{path}: {size} bytes exceeds the limit of {limit} for this file")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: not the expected JSON document")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<TrustError>,
    },
    #[error("{path} already exists")]
    Exists { path: PathBuf },
}

/// `2026-12-01T21:32:23Z` from Unix seconds (for messages and listings).
pub fn utc(unix_secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix_secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("@{unix_secs}"),
    }
}

/// Unix seconds of a `SystemTime` (negative before 1970).
pub fn unix_secs(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}
