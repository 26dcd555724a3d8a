//! Certificate verification. [`verify_peer_cert`] runs rustls-webpki's
//! path validation (the code rustls runs for a TLS client certificate:
//! Ed25519 signature by the CA, validity at `now`, basic constraints, the
//! clientAuth usage), then reads the names with x509-parser and requires
//! the SAN `urn:dai:{fleet}:{role}:{name}` to match the CA's fleet, the
//! expected role and the subject CN. [`verify_device_cert`] is that for a
//! device. [`inspect_cert`] reads the same fields without verifying.

use crate::ca::Role;
use crate::keys::{Serial, one_pem};
use crate::name::{DeviceName, FleetName, valid};
use crate::{TrustError, unix_secs, utc};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::time::{Duration, SystemTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::OID_SIG_ED25519;

/// What a certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub role: Role,
    pub fleet: FleetName,
    /// The CN and SAN name, valid per [`crate::name::valid`].
    pub name: String,
    pub serial: Serial,
    /// The raw Ed25519 public key.
    pub public_key: [u8; 32],
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// The device name in `cert_pem` if it is a device certificate the fleet
/// CA `ca_pem` issued, valid at `now`.
pub fn verify_device_cert(
    ca_pem: &str,
    cert_pem: &str,
    now: SystemTime,
) -> Result<DeviceName, TrustError> {
    let cert = verify_peer_cert(ca_pem, cert_pem, now, Role::Device)?;
    DeviceName::parse(&cert.name)
}

/// `cert_pem` checked against the fleet CA `ca_pem` at `now` for `role`.
pub fn verify_peer_cert(
    ca_pem: &str,
    cert_pem: &str,
    now: SystemTime,
    role: Role,
) -> Result<PeerCert, TrustError> {
    let ca_what = "fleet CA certificate";
    let ca_der: CertificateDer<'static> = one_pem(ca_pem.as_bytes(), ca_what, "CERTIFICATE")?;
    let der: CertificateDer<'static> = one_pem(cert_pem.as_bytes(), "certificate", "CERTIFICATE")?;
    let ca = inspect_ca(&ca_der)?;
    let anchor =
        webpki::anchor_from_trusted_cert(&ca_der).map_err(|source| TrustError::Certificate {
            what: ca_what.into(),
            source,
        })?;
    let ee = webpki::EndEntityCert::try_from(&der).map_err(|source| TrustError::Certificate {
        what: "certificate".into(),
        source,
    })?;
    let at = UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(unix_secs(now)).unwrap_or(0),
    ));
    let when = |t: UnixTime| utc(i64::try_from(t.as_secs()).unwrap_or(i64::MAX));
    let usage = if role == Role::Broker {
        webpki::KeyUsage::server_auth()
    } else {
        webpki::KeyUsage::client_auth()
    };
    ee.verify_for_usage(
        &[webpki::ring::ED25519],
        &[anchor],
        &[],
        at,
        usage,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { time, not_after } => TrustError::Expired {
            not_after: when(not_after),
            now: when(time),
        },
        webpki::Error::CertNotValidYet { time, not_before } => TrustError::NotYetValid {
            not_before: when(not_before),
            now: when(time),
        },
        source => TrustError::Untrusted { source },
    })?;
    let cert = read_fields(&der, "certificate")?;
    if cert.fleet != ca.fleet {
        return Err(TrustError::WrongFleet {
            expected: ca.fleet.to_string(),
            found: cert.fleet.to_string(),
        });
    }
    if cert.role != role {
        return Err(TrustError::WrongRole {
            expected: role,
            found: cert.role.to_string(),
        });
    }
    Ok(cert)
}

/// A peer's certificate as TLS presented it (DER), verified against the
/// fleet CA `ca_pem` at `now` for the role it claims (device, aggregator
/// or broker): who is on the other end of a mutual-TLS connection.
pub fn verify_peer_der(ca_pem: &str, der: &[u8], now: SystemTime) -> Result<PeerCert, TrustError> {
    let claimed = read_fields(der, "peer certificate")?;
    let pem = crate::keys::pem_encode("CERTIFICATE", der);
    verify_peer_cert(ca_pem, &pem, now, claimed.role)
}

/// The fields of `cert_pem`, NOT verified (for listings and for matching a
/// key to its certificate).
pub fn inspect_cert(cert_pem: &str, what: &str) -> Result<PeerCert, TrustError> {
    let der: CertificateDer<'static> = one_pem(cert_pem.as_bytes(), what, "CERTIFICATE")?;
    read_fields(&der, what)
}

/// A fleet CA's fleet and public key.
pub(crate) struct CaInfo {
    pub fleet: FleetName,
    pub public_key: [u8; 32],
}

pub(crate) fn inspect_ca(der: &[u8]) -> Result<CaInfo, TrustError> {
    let what = "fleet CA certificate";
    let x = parse(der, what)?;
    let bad = |reason: &str| TrustError::Contents {
        what: what.into(),
        reason: reason.into(),
    };
    if !x.is_ca() {
        return Err(bad("not a CA certificate (basicConstraints CA is not set)"));
    }
    if one_attr(x.subject().iter_common_name()).as_deref() != Some(crate::ca::CA_COMMON_NAME) {
        return Err(bad("expected the subject common name \"dai fleet CA\""));
    }
    let fleet = one_attr(x.subject().iter_organization())
        .ok_or_else(|| bad("expected one subject organisation (the fleet name)"))?;
    Ok(CaInfo {
        fleet: FleetName::parse(&fleet)?,
        public_key: ed25519_key(&x, what)?,
    })
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, TrustError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], x)) => Ok(x),
        _ => Err(TrustError::Contents {
            what: what.into(),
            reason: "not a DER X.509 certificate".into(),
        }),
    }
}

/// The value of the one attribute `it` yields, if there is exactly one
/// and it is a string.
fn one_attr<'a>(
    mut it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
) -> Option<String> {
    let first = it.next()?.as_str().ok()?.to_string();
    it.next().is_none().then_some(first)
}

fn ed25519_key(x: &X509Certificate<'_>, what: &str) -> Result<[u8; 32], TrustError> {
    let spki = x.public_key();
    let key: Option<[u8; 32]> = (spki.algorithm.algorithm == OID_SIG_ED25519)
        .then(|| spki.subject_public_key.data.as_ref().try_into().ok())
        .flatten();
    key.ok_or_else(|| TrustError::Contents {
        what: what.into(),
        reason: "expected an Ed25519 public key".into(),
    })
}

fn read_fields(der: &[u8], what: &str) -> Result<PeerCert, TrustError> {
    let x = parse(der, what)?;
    let bad = |reason: String| TrustError::Contents {
        what: what.into(),
        reason,
    };
    let sans = x
        .subject_alternative_name()
        .map_err(|_| bad("unreadable subjectAltName".into()))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let urns: Vec<&str> = sans
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) if u.starts_with("urn:dai:") => Some(*u),
            _ => None,
        })
        .collect();
    let [urn] = urns.as_slice() else {
        return Err(bad(format!(
            "expected one subjectAltName URI urn:dai:FLEET:ROLE:NAME, found {}",
            urns.len()
        )));
    };
    let parts: Vec<&str> = urn.split(':').collect();
    let &["urn", "dai", fleet, role_s, name] = &parts[..] else {
        return Err(bad(format!(
            "subjectAltName {urn:?}: expected urn:dai:FLEET:ROLE:NAME"
        )));
    };
    let role = Role::parse(role_s).ok_or_else(|| {
        bad(format!(
            "subjectAltName {urn:?}: role {role_s:?} is not device, aggregator or broker"
        ))
    })?;
    if !valid(name) {
        return Err(TrustError::InvalidName {
            what: role.as_str(),
            name: name.chars().take(80).collect(),
        });
    }
    let cn = one_attr(x.subject().iter_common_name()).unwrap_or_default();
    if cn != name {
        return Err(TrustError::NameMismatch {
            cn,
            san: name.to_string(),
        });
    }
    let validity = x.validity();
    Ok(PeerCert {
        role,
        fleet: FleetName::parse(fleet)?,
        name: name.to_string(),
        serial: Serial::from_der_bytes(x.raw_serial()),
        public_key: ed25519_key(&x, what)?,
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}
