//! Keys and serial numbers. [`SecretKey`] is an `ed25519-dalek` signing key
//! from the operating system's randomness, stored as PKCS#8 PEM (the form
//! rustls loads for TLS, `-----BEGIN PRIVATE KEY-----`) or, for the
//! aggregator, also as the 64 hex digits `dai-cloud keygen` writes. It signs
//! certificates through rcgen's `SigningKey` trait, so every signature here
//! is made by `ed25519-dalek`.

use crate::TrustError;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rustls_pki_types::pem::{PemObject, SectionKind};
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::Zeroizing;

/// An Ed25519 private key (zeroed on drop by `ed25519-dalek`).
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", hex::encode(self.public_bytes()))
    }
}

impl SecretKey {
    /// A new key from the operating system's randomness.
    pub fn generate() -> Result<Self, TrustError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|source| TrustError::Random { source })?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    pub fn from_signing_key(key: SigningKey) -> Self {
        Self(key)
    }

    /// Read a PKCS#8 PEM (`PRIVATE KEY`) key; `what` names it in errors.
    pub fn from_pkcs8_pem(pem: &str, what: &str) -> Result<Self, TrustError> {
        let der = one_pem::<rustls_pki_types::PrivatePkcs8KeyDer<'static>>(
            pem.as_bytes(),
            what,
            "PRIVATE KEY",
        )?;
        SigningKey::from_pkcs8_der(der.secret_pkcs8_der())
            .map(Self)
            .map_err(|source| TrustError::Key {
                what: what.to_string(),
                source,
            })
    }

    /// PKCS#8 PEM, LF line endings (see [`SecretKey::to_pkcs8_der`]).
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem_encode("PRIVATE KEY", &self.to_pkcs8_der()))
    }

    /// PKCS#8 v1 DER (RFC 8410: the private key only), what rustls takes as
    /// a `PrivatePkcs8KeyDer`. Not v2 with the public key, which
    /// `ed25519-dalek` writes by default: OpenSSL 3.0 refuses that form
    /// ("unsupported"), and ring, rustls and dalek read both.
    pub fn to_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        let bytes = KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        };
        let der = bytes
            .to_pkcs8_der()
            .expect("an Ed25519 key always encodes as PKCS#8");
        Zeroizing::new(der.as_bytes().to_vec())
    }

    /// The 32-byte secret as hex (the `dai-cloud keygen` file format).
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.to_bytes()))
    }

    /// A key from 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str, what: &str) -> Result<Self, TrustError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(s.trim(), bytes.as_mut()).map_err(|_| TrustError::Contents {
            what: what.to_string(),
            reason: "expected 64 hex digits (an Ed25519 secret key)".into(),
        })?;
        Ok(Self(SigningKey::from_bytes(&bytes)))
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.0
    }

    pub fn public(&self) -> VerifyingKey {
        self.0.verifying_key()
    }

    pub fn public_bytes(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    pub(crate) fn signer(&self) -> Signer25519<'_> {
        Signer25519 {
            key: Some(&self.0),
            public: self.public_bytes(),
        }
    }
}

/// An Ed25519 public key as 64 hex digits (the `aggregator.pub` format).
pub fn public_to_hex(key: &VerifyingKey) -> String {
    hex::encode(key.to_bytes())
}

/// A public key from 64 hex digits; `what` names it in errors.
pub fn public_from_hex(s: &str, what: &str) -> Result<VerifyingKey, TrustError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut bytes)
        .ok()
        .and_then(|()| VerifyingKey::from_bytes(&bytes).ok())
        .ok_or_else(|| TrustError::PublicKey {
            what: what.to_string(),
        })
}

/// rcgen's view of an Ed25519 key: the public half for the certificate
/// being issued, and (for the issuer) the private half that signs it.
pub(crate) struct Signer25519<'a> {
    key: Option<&'a SigningKey>,
    public: [u8; 32],
}

impl Signer25519<'_> {
    pub(crate) fn public_only(key: &VerifyingKey) -> Signer25519<'static> {
        Signer25519 {
            key: None,
            public: key.to_bytes(),
        }
    }
}

impl rcgen::PublicKeyData for Signer25519<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

impl rcgen::SigningKey for Signer25519<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let key = self.key.ok_or(rcgen::Error::RemoteKeyError)?;
        Ok(key.sign(msg).to_bytes().to_vec())
    }
}

/// A certificate serial number: 16 random bytes, the first in 0x01..=0x7f
/// so its DER INTEGER is exactly these bytes (positive, no padding).
/// Written as lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Serial(Vec<u8>);

impl Serial {
    pub fn generate() -> Result<Self, TrustError> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|source| TrustError::Random { source })?;
        b[0] = (b[0] & 0x7f).max(1);
        Ok(Self(b.to_vec()))
    }

    /// The bytes of a DER INTEGER as a certificate holds them.
    pub fn from_der_bytes(b: &[u8]) -> Self {
        Self(b.to_vec())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&hex::encode(&self.0))
    }
}

impl std::str::FromStr for Serial {
    type Err = TrustError;
    fn from_str(s: &str) -> Result<Self, TrustError> {
        match hex::decode(s) {
            Ok(b) if !b.is_empty() && b.len() <= 20 => Ok(Self(b)),
            _ => Err(TrustError::Contents {
                what: format!("serial {:?}", s.chars().take(48).collect::<String>()),
                reason: "expected 1-20 bytes as hex".into(),
            }),
        }
    }
}

impl TryFrom<String> for Serial {
    type Error = TrustError;
    fn try_from(s: String) -> Result<Self, TrustError> {
        s.parse()
    }
}

impl From<Serial> for String {
    fn from(s: Serial) -> String {
        s.to_string()
    }
}

/// PEM text of one block, LF line endings, 64-character lines.
pub(crate) fn pem_encode(label: &'static str, der: &[u8]) -> String {
    pem_rfc7468::encode_string(label, pem_rfc7468::LineEnding::LF, der)
        .expect("PEM encoding of a DER document in memory")
}

/// The one PEM block of type `T` in `bytes`. Any other block counts too:
/// a certificate file that also holds a private key is a mistake to report.
pub(crate) fn one_pem<T: PemObject>(
    bytes: &[u8],
    what: &str,
    label: &'static str,
) -> Result<T, TrustError> {
    let mut blocks = Vec::new();
    for item in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(bytes) {
        blocks.push(item.map_err(|source| TrustError::Pem {
            what: what.to_string(),
            source,
        })?);
    }
    let found = blocks.len();
    match blocks.pop() {
        Some((kind, der)) if found == 1 => {
            T::from_pem(kind, der).ok_or_else(|| TrustError::PemLabel {
                what: what.to_string(),
                expected: label,
                found: format!("{kind:?}"),
            })
        }
        _ => Err(TrustError::PemCount {
            what: what.to_string(),
            label,
            found,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs8_and_hex_round_trip() {
        let k = SecretKey::generate().expect("key");
        let pem = k.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{}", *pem);
        let back = SecretKey::from_pkcs8_pem(&pem, "test key").expect("read back");
        assert_eq!(back.public_bytes(), k.public_bytes());
        let back = SecretKey::from_hex(&k.to_hex(), "hex key").expect("hex");
        assert_eq!(back.public_bytes(), k.public_bytes());
        let public = public_from_hex(&public_to_hex(&k.public()), "pub").expect("pub");
        assert_eq!(public, k.public());
    }

    #[test]
    fn bad_keys_say_what_they_are() {
        let e = SecretKey::from_pkcs8_pem("hello", "device.key.pem").expect_err("no pem");
        assert_eq!(
            e.to_string(),
            "device.key.pem: expected exactly one PEM block labelled PRIVATE KEY, found 0 blocks"
        );
        let k = SecretKey::generate().expect("key");
        let two = format!("{}{}", *k.to_pkcs8_pem(), *k.to_pkcs8_pem());
        assert!(SecretKey::from_pkcs8_pem(&two, "k").is_err());
        let e = SecretKey::from_hex("abc", "aggregator.key").expect_err("short");
        assert!(
            e.to_string().starts_with("aggregator.key: expected 64 hex"),
            "{e}"
        );
        assert!(public_from_hex("zz", "aggregator.pub").is_err());
    }

    #[test]
    fn serials_are_positive_and_round_trip() {
        for _ in 0..64 {
            let s = Serial::generate().expect("serial");
            assert_eq!(s.as_bytes().len(), 16);
            assert!((1..=0x7f).contains(&s.as_bytes()[0]));
            assert_eq!(s.to_string().parse::<Serial>().expect("hex"), s);
        }
        assert!("".parse::<Serial>().is_err());
        assert!("xyz".parse::<Serial>().is_err());
    }
}
