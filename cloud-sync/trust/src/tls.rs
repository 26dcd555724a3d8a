//! rustls configurations made from fleet identities, with the `ring`
//! provider only (never aws-lc: the edge cross-builds for aarch64 and
//! armv7 and stays small).
//!
//! - [`client_config`]: a device's or the aggregator's MQTT connection:
//!   the broker's certificate must chain to the fleet CA and name the host
//!   dialled; the client presents its own certificate (mutual TLS).
//! - [`server_config`]: the embedded broker's listener: its broker
//!   certificate, and a client certificate chaining to the fleet CA is
//!   required (rustls' `WebPkiClientVerifier`); who the client is comes
//!   from [`crate::verify_peer_cert`] on the certificate it presented.
//!
//! TLS 1.3 and 1.2 (rustls' defaults); Ed25519 keys throughout.

use crate::TrustError;
use crate::keys::{SecretKey, one_pem};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;

pub use rustls::{ClientConfig, ServerConfig};

/// rustls' ring provider (the one crypto backend linked).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str) -> impl FnOnce(rustls::Error) -> TrustError + '_ {
    move |source| TrustError::Tls {
        what: what.to_string(),
        source,
    }
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TrustError> {
    let ca: CertificateDer<'static> =
        one_pem(ca_pem.as_bytes(), "fleet CA certificate", "CERTIFICATE")?;
    let mut store = RootCertStore::empty();
    store
        .add(ca)
        .map_err(tls_err("fleet CA certificate as a TLS trust anchor"))?;
    Ok(store)
}

fn identity(
    cert_pem: &str,
    key: &SecretKey,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TrustError> {
    let cert: CertificateDer<'static> = one_pem(cert_pem.as_bytes(), "certificate", "CERTIFICATE")?;
    let der = PrivatePkcs8KeyDer::from(key.to_pkcs8_der().to_vec());
    Ok((vec![cert], PrivateKeyDer::Pkcs8(der)))
}

/// A mutual-TLS client: trusts only the fleet CA, presents `cert_pem`
/// with `key`.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key: &SecretKey,
) -> Result<ClientConfig, TrustError> {
    let (chain, key) = identity(cert_pem, key)?;
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("TLS client protocol versions"))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err("TLS client certificate and key"))
}

/// The embedded broker's TLS server: presents `cert_pem` (a broker
/// certificate) with `key` and requires a client certificate from the
/// fleet CA.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key: &SecretKey,
) -> Result<ServerConfig, TrustError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .build()
            .map_err(|e| TrustError::Contents {
                what: "client certificate verifier".into(),
                reason: e.to_string(),
            })?;
    let (chain, key) = identity(cert_pem, key)?;
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("TLS server protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_err("TLS server certificate and key"))
}
