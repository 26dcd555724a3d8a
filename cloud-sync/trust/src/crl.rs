//! The fleet's certificate revocation list, for a broker that checks client
//! certificates with OpenSSL (Mosquitto's `crlfile`; the embedded broker
//! and the aggregator read `revocations.json` instead): an X.509 v2 CRL
//! (PEM `X509 CRL`) signed by the fleet CA's Ed25519 key through rcgen,
//! listing the serial and revocation time of every revoked certificate,
//! with the CA's key identifier as its authority key identifier and a CRL
//! number.
//!
//! OpenSSL refuses every client certificate once the CRL's nextUpdate has
//! passed (`CRL has expired`), and one whose thisUpdate is still ahead of
//! the broker's clock (`CRL is not yet valid`). So thisUpdate is set back
//! by [`CLOCK_SKEW`], like a certificate's notBefore, and nextUpdate is
//! [`CRL_DAYS`] ahead: long, because nobody re-issues it on a timer. It is
//! re-issued on every revocation instead (`dai-cloud devices revoke`,
//! `dai-cloud fleet crl`), and a broker must get a fresh one at least that
//! often.

use crate::ca::{CLOCK_SKEW, FleetCa};
use crate::keys::{Serial, pem_encode};
use crate::{TrustError, unix_secs, utc};
use rcgen::{CertificateRevocationListParams, RevokedCertParams, SerialNumber};
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;

/// How long a CRL is valid (its nextUpdate after "now"), days.
pub const CRL_DAYS: u32 = 365;

impl FleetCa {
    /// A CRL revoking each `(serial, revoked_at)` (Unix seconds), issued at
    /// `now` with CRL number `crl_number` (which must grow from one CRL to
    /// the next: a relying party may keep the higher-numbered one).
    pub fn crl(
        &self,
        revoked: &[(Serial, i64)],
        now: SystemTime,
        crl_number: u64,
    ) -> Result<String, TrustError> {
        let at = |secs: i64, what: &dyn Fn() -> String| {
            OffsetDateTime::from_unix_timestamp(secs).map_err(|_| TrustError::Contents {
                what: what(),
                reason: format!("time {} does not fit a CRL", utc(secs)),
            })
        };
        let this_update = unix_secs(now.checked_sub(CLOCK_SKEW).unwrap_or(now));
        let next_update = unix_secs(
            now.checked_add(Duration::from_secs(u64::from(CRL_DAYS) * 86_400))
                .unwrap_or(now),
        );
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for (serial, revoked_at) in revoked {
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial.as_bytes()),
                revocation_time: at(*revoked_at, &|| format!("revocation of serial {serial}"))?,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: at(this_update, &|| "CRL thisUpdate".into())?,
            next_update: at(next_update, &|| "CRL nextUpdate".into())?,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.key_id(),
        };
        let crl = params
            .signed_by(&self.issuer())
            .map_err(|source| TrustError::Generate { source })?;
        Ok(pem_encode("X509 CRL", crl.der()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FleetName, Validity};
    use ed25519_dalek::Verifier;
    use x509_parser::extensions::ParsedExtension;

    fn ca() -> FleetCa {
        FleetCa::generate(
            FleetName::parse("lab").expect("fleet name"),
            Validity::days_from(SystemTime::now(), 3650),
        )
        .expect("CA")
    }

    /// Parses `pem` and checks what every CRL of `ca` must be: its issuer
    /// and authority key identifier are the CA's, its Ed25519 signature
    /// verifies with the CA's key, its times and number are as issued.
    /// Returns the revoked serials and times.
    fn check(ca: &FleetCa, pem: &str, now: SystemTime, number: u64) -> Vec<(Serial, i64)> {
        let crl_der: rustls_pki_types::CertificateRevocationListDer<'_> =
            rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).expect("PEM");
        let (rest, crl) = x509_parser::parse_x509_crl(&crl_der).expect("a CRL");
        assert!(rest.is_empty());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("CA");

        assert_eq!(crl.issuer().as_raw(), ca_cert.subject().as_raw());
        assert_eq!(crl.issuer().to_string(), "O=lab, CN=dai fleet CA");
        assert_eq!(crl.version().map(|v| v.0), Some(1), "v2");
        assert_eq!(
            crl.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ED25519
        );
        let ca_public = ed25519_dalek::VerifyingKey::from_bytes(
            ca_cert
                .public_key()
                .subject_public_key
                .data
                .as_ref()
                .try_into()
                .expect("32 bytes"),
        )
        .expect("CA key");
        let signature =
            ed25519_dalek::Signature::from_slice(&crl.signature_value.data).expect("64 bytes");
        ca_public
            .verify(crl.tbs_cert_list.as_ref(), &signature)
            .expect("the CA's signature");
        let mut forged = crl.tbs_cert_list.as_ref().to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(ca_public.verify(&forged, &signature).is_err());

        let ski = ca_cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        let aki = crl
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        assert!(ski.is_some());
        assert_eq!(aki, ski, "authority key identifier = the CA's");
        assert_eq!(
            crl.crl_number().map(ToString::to_string),
            Some(number.to_string())
        );
        let now = unix_secs(now);
        assert_eq!(
            crl.last_update().timestamp(),
            now - CLOCK_SKEW.as_secs() as i64
        );
        assert_eq!(
            crl.next_update().map(|t| t.timestamp()),
            Some(now + i64::from(CRL_DAYS) * 86_400)
        );
        crl.iter_revoked_certificates()
            .map(|r| {
                (
                    Serial::from_der_bytes(r.raw_serial()),
                    r.revocation_date.timestamp(),
                )
            })
            .collect()
    }

    #[test]
    fn a_crl_lists_exactly_the_revoked_serials_signed_by_the_ca() {
        let ca = ca();
        let now = SystemTime::now();
        let revoked: Vec<(Serial, i64)> = (0..3)
            .map(|i| (Serial::generate().expect("serial"), 1_796_000_000 + i))
            .collect();
        let pem = ca.crl(&revoked, now, 1_796_000_100).expect("CRL");
        assert!(pem.starts_with("-----BEGIN X509 CRL-----\n"), "{pem}");
        assert_eq!(check(&ca, &pem, now, 1_796_000_100), revoked);
    }

    #[test]
    fn an_empty_crl_revokes_nothing() {
        let ca = ca();
        let now = SystemTime::now();
        let pem = ca.crl(&[], now, 7).expect("CRL");
        assert!(check(&ca, &pem, now, 7).is_empty());
    }

    #[test]
    fn a_crl_from_a_ca_read_back_is_the_same_issuers() {
        let ca = ca();
        let back = FleetCa::from_pem(ca.cert_pem(), &ca.key_pem()).expect("read back");
        let now = SystemTime::now();
        let serial = Serial::generate().expect("serial");
        let pem = back.crl(&[(serial.clone(), 1)], now, 2).expect("CRL");
        assert_eq!(check(&ca, &pem, now, 2), [(serial, 1)]);
    }
}
