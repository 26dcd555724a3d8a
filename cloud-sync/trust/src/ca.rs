//! The fleet CA and what it issues, with rcgen: a self-signed Ed25519 CA
//! (subject `O={fleet}, CN=dai fleet CA`, path length 0: it signs end
//! entities only) and end-entity certificates for devices and for the
//! aggregator (subject `O={fleet}, OU={role}, CN={name}`, URI SAN
//! `urn:dai:{fleet}:{role}:{name}`, a random 16-byte serial, key usage
//! digitalSignature, extended key usage clientAuth, basicConstraints
//! CA:false, authority key identifier). Every certificate is verified
//! against the CA right after it is made, so what is handed out is what
//! [`crate::verify_peer_cert`] and rustls accept.

use crate::keys::{SecretKey, Serial, Signer25519, one_pem, pem_encode};
use crate::name::{DeviceName, FleetName, valid};
use crate::verify::{PeerCert, inspect_cert, verify_peer_cert};
use crate::{TrustError, unix_secs};
use ed25519_dalek::VerifyingKey;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use std::fmt;
use std::time::{Duration, SystemTime};
use zeroize::Zeroizing;

/// The common name of every fleet CA (the fleet is its organisation).
pub const CA_COMMON_NAME: &str = "dai fleet CA";
/// The aggregator's certificate name (and its MQTT client id prefix).
pub const AGGREGATOR_NAME: &str = "dai-cloud";
/// The broker certificate's name (its CN and SAN URI name).
pub const BROKER_NAME: &str = "broker";
/// Names no device may have: the CNs of the aggregator and the broker.
pub const RESERVED_NAMES: &[&str] = &[AGGREGATOR_NAME, BROKER_NAME];
/// How far `not_before` is set back from "now", for clocks a little behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// Who a certificate is for; the `{role}` of its SAN and its OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Device,
    Aggregator,
    /// The MQTT broker's TLS server certificate (serverAuth, DNS and IP
    /// names): the embedded broker's or a Mosquitto's.
    Broker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Aggregator => "aggregator",
            Role::Broker => "broker",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Role> {
        match s {
            "device" => Some(Role::Device),
            "aggregator" => Some(Role::Aggregator),
            "broker" => Some(Role::Broker),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From [`CLOCK_SKEW`] before `now` until `days` days after it.
    pub fn days_from(now: SystemTime, days: u32) -> Validity {
        Validity {
            not_before: now.checked_sub(CLOCK_SKEW).unwrap_or(now),
            not_after: now
                .checked_add(Duration::from_secs(u64::from(days) * 86_400))
                .unwrap_or(now),
        }
    }

    fn to_rcgen(self) -> Result<(time::OffsetDateTime, time::OffsetDateTime), TrustError> {
        let (from, to) = (unix_secs(self.not_before), unix_secs(self.not_after));
        if to <= from {
            return Err(TrustError::Validity);
        }
        let at = |s| time::OffsetDateTime::from_unix_timestamp(s).map_err(|_| TrustError::Validity);
        Ok((at(from)?, at(to)?))
    }

    /// A moment inside the period (where the fresh certificate is checked).
    fn midpoint(self) -> SystemTime {
        let span = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + span / 2
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub role: Role,
    /// The CN and SAN name (a [`DeviceName`] for a device).
    pub name: String,
    pub serial: Serial,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    pub cert_pem: String,
}

/// The fleet's certificate authority: its certificate and Ed25519 key.
#[derive(Debug)]
pub struct FleetCa {
    fleet: FleetName,
    key: SecretKey,
    cert_der: Vec<u8>,
    cert_pem: String,
}

/// A key identifier (SubjectKeyIdentifier, AuthorityKeyIdentifier): the
/// first 20 bytes of the SHA-256 of the SubjectPublicKeyInfo, what rcgen's
/// `KeyIdMethod::Sha256` makes when it has a crypto backend.
fn key_id(public: &VerifyingKey) -> KeyIdMethod {
    use rcgen::PublicKeyData;
    use sha2::Digest;
    let spki = Signer25519::public_only(public).subject_public_key_info();
    KeyIdMethod::PreSpecified(sha2::Sha256::digest(spki)[..20].to_vec())
}

/// The parts of the CA's parameters an [`Issuer`] uses: identical for a
/// new CA and one read back, so both issue the same issuer name and
/// authority key identifier.
fn ca_params(fleet: &FleetName, ca_public: &VerifyingKey) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, fleet.as_str());
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = key_id(ca_public);
    p
}

impl FleetCa {
    /// A new CA with a fresh key.
    pub fn generate(fleet: FleetName, validity: Validity) -> Result<FleetCa, TrustError> {
        let key = SecretKey::generate()?;
        let mut p = ca_params(&fleet, &key.public());
        (p.not_before, p.not_after) = validity.to_rcgen()?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.serial_number = Some(SerialNumber::from_slice(Serial::generate()?.as_bytes()));
        let cert = p
            .self_signed(&key.signer())
            .map_err(|source| TrustError::Generate { source })?;
        let cert_der = cert.der().to_vec();
        Ok(FleetCa {
            cert_pem: pem_encode("CERTIFICATE", &cert_der),
            cert_der,
            fleet,
            key,
        })
    }

    /// A CA read back from its certificate and key PEM: the fleet is the
    /// certificate's organisation, and the key must be the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<FleetCa, TrustError> {
        let what = "fleet CA certificate";
        let der: CertificateDer<'static> = one_pem(cert_pem.as_bytes(), what, "CERTIFICATE")?;
        let key = SecretKey::from_pkcs8_pem(key_pem, "fleet CA key")?;
        let info = crate::verify::inspect_ca(&der)?;
        if info.public_key != key.public_bytes() {
            return Err(TrustError::KeyMismatch { what: what.into() });
        }
        Ok(FleetCa {
            fleet: info.fleet,
            key,
            cert_pem: pem_encode("CERTIFICATE", &der),
            cert_der: der.to_vec(),
        })
    }

    pub fn fleet(&self) -> &FleetName {
        &self.fleet
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn key_pem(&self) -> Zeroizing<String> {
        self.key.to_pkcs8_pem()
    }

    /// rcgen's view of the CA as a signer (for [`crate::crl`]).
    pub(crate) fn issuer(&self) -> Issuer<'static, Signer25519<'_>> {
        Issuer::new(
            ca_params(&self.fleet, &self.key.public()),
            self.key.signer(),
        )
    }

    /// The CA's key identifier (its subject key identifier).
    pub(crate) fn key_id(&self) -> KeyIdMethod {
        key_id(&self.key.public())
    }

    /// A device certificate for `public` (the device's own key).
    pub fn issue_device(
        &self,
        name: &DeviceName,
        public: &VerifyingKey,
        validity: Validity,
    ) -> Result<IssuedCert, TrustError> {
        // A broker knows a client by its certificate's CN alone (Mosquitto's
        // use_identity_as_username): a device named like the aggregator
        // would get the aggregator's ACL there.
        if RESERVED_NAMES.contains(&name.as_str()) {
            return Err(TrustError::ReservedName {
                name: name.to_string(),
            });
        }
        self.issue(Role::Device, name.as_str(), public, validity)
    }

    /// A TLS server certificate for the broker, valid for `hosts` (DNS
    /// names or IP addresses, as clients dial them), for `public`.
    pub fn issue_broker(
        &self,
        hosts: &[String],
        public: &VerifyingKey,
        validity: Validity,
    ) -> Result<IssuedCert, TrustError> {
        let mut sans = Vec::with_capacity(hosts.len());
        for h in hosts {
            sans.push(match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(h.clone().try_into().map_err(|_| TrustError::InvalidHost {
                        host: h.chars().take(80).collect(),
                    })?)
                }
            });
        }
        if sans.is_empty() {
            return Err(TrustError::InvalidHost {
                host: String::new(),
            });
        }
        self.issue_with(Role::Broker, BROKER_NAME, public, validity, sans)
    }

    pub(crate) fn issue(
        &self,
        role: Role,
        name: &str,
        public: &VerifyingKey,
        validity: Validity,
    ) -> Result<IssuedCert, TrustError> {
        self.issue_with(role, name, public, validity, Vec::new())
    }

    fn issue_with(
        &self,
        role: Role,
        name: &str,
        public: &VerifyingKey,
        validity: Validity,
        extra_sans: Vec<SanType>,
    ) -> Result<IssuedCert, TrustError> {
        if !valid(name) {
            return Err(TrustError::InvalidName {
                what: role.as_str(),
                name: name.chars().take(80).collect(),
            });
        }
        let serial = Serial::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.fleet.as_str());
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        let uri = format!("urn:dai:{}:{role}:{name}", self.fleet);
        p.subject_alt_names = vec![SanType::URI(
            uri.try_into()
                .map_err(|source| TrustError::Generate { source })?,
        )];
        p.subject_alt_names.extend(extra_sans);
        (p.not_before, p.not_after) = validity.to_rcgen()?;
        p.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![if role == Role::Broker {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        p.use_authority_key_identifier_extension = true;
        p.key_identifier_method = key_id(public);
        let issuer = Issuer::new(
            ca_params(&self.fleet, &self.key.public()),
            self.key.signer(),
        );
        let cert = p
            .signed_by(&Signer25519::public_only(public), &issuer)
            .map_err(|source| TrustError::Generate { source })?;
        let cert_pem = pem_encode("CERTIFICATE", cert.der());
        let check = verify_peer_cert(&self.cert_pem, &cert_pem, validity.midpoint(), role)?;
        debug_assert_eq!(check.serial, serial);
        Ok(IssuedCert {
            role,
            name: name.to_string(),
            serial,
            not_before: check.not_before,
            not_after: check.not_after,
            cert_pem,
        })
    }
}

/// The aggregator's identity: the Ed25519 key that signs globals and acks
/// (the `dai-cloud run --key` file) and its certificate from the fleet CA,
/// CN [`AGGREGATOR_NAME`], for its own mutual-TLS connection.
#[derive(Debug)]
pub struct AggregatorKey {
    key: SecretKey,
    cert: PeerCert,
    cert_pem: String,
}

impl AggregatorKey {
    /// A fresh key and its certificate.
    pub fn generate(ca: &FleetCa, validity: Validity) -> Result<AggregatorKey, TrustError> {
        let key = SecretKey::generate()?;
        let issued = ca.issue(Role::Aggregator, AGGREGATOR_NAME, &key.public(), validity)?;
        AggregatorKey::from_parts(key, issued.cert_pem)
    }

    /// The key and certificate read back; the key must be the
    /// certificate's and the certificate an aggregator's.
    pub fn from_parts(key: SecretKey, cert_pem: String) -> Result<AggregatorKey, TrustError> {
        let what = "aggregator certificate";
        let cert = inspect_cert(&cert_pem, what)?;
        if cert.role != Role::Aggregator {
            return Err(TrustError::WrongRole {
                expected: Role::Aggregator,
                found: cert.role.to_string(),
            });
        }
        if cert.public_key != key.public_bytes() {
            return Err(TrustError::KeyMismatch { what: what.into() });
        }
        Ok(AggregatorKey {
            key,
            cert,
            cert_pem,
        })
    }

    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    pub fn signing_key(&self) -> &ed25519_dalek::SigningKey {
        self.key.signing_key()
    }

    pub fn public(&self) -> VerifyingKey {
        self.key.public()
    }

    pub fn public_hex(&self) -> String {
        crate::keys::public_to_hex(&self.key.public())
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert(&self) -> &PeerCert {
        &self.cert
    }
}
