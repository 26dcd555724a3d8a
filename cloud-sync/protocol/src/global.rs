//! A global head published by the aggregator, signed with ed25519.
//!
//! Wire form: `"DAIG1"` (5 bytes) | signature (64) | sha256 of the head
//! file (32) | zstd(head.safetensors). The signature covers everything after
//! it (checksum and compressed head). The head file's `__metadata__` carries
//! `model`, `version` (global version, an integer), `parent` and
//! `created_at`. Edges verify in this order: size, magic, signature,
//! decompression bound, checksum, model name, version newer than theirs.

use crate::{ProtocolError, compress, decompress};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

const MAGIC: &[u8; 5] = b"DAIG1";
const HEADER: usize = 5 + 64 + 32;

/// Largest signed global model accepted (16 MiB compressed, 64 MiB raw).
pub const MAX_WIRE_BYTES: usize = 16 << 20;
pub const MAX_RAW_BYTES: usize = 64 << 20;

/// A verified global model.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalModel {
    pub model: String,
    pub version: u64,
    pub parent: Option<u64>,
    pub created_at: f64,
    /// The head file (safetensors) as the edge stores and loads it.
    pub head_file: Vec<u8>,
    pub sha256: String,
}

/// Sign `head_file` (a head.safetensors whose metadata names model/version).
pub fn sign(head_file: &[u8], key: &SigningKey) -> Vec<u8> {
    let digest = Sha256::digest(head_file);
    let body = compress(head_file, 3);
    let mut signed = Vec::with_capacity(32 + body.len());
    signed.extend_from_slice(&digest);
    signed.extend_from_slice(&body);
    let sig = key.sign(&signed);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&sig.to_bytes());
    out.extend_from_slice(&signed);
    out
}

/// Verify and open a signed global model.
pub fn verify(
    bytes: &[u8],
    key: &VerifyingKey,
    expected_model: &str,
) -> Result<GlobalModel, ProtocolError> {
    if bytes.len() > MAX_WIRE_BYTES {
        return Err(ProtocolError::TooLarge {
            size: bytes.len(),
            limit: MAX_WIRE_BYTES,
        });
    }
    if bytes.len() < HEADER || &bytes[..5] != MAGIC {
        return Err(ProtocolError::Format(
            "not a DAIG1 signed global model".into(),
        ));
    }
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&bytes[5..69]);
    key.verify(&bytes[69..], &Signature::from_bytes(&sig))
        .map_err(|_| {
            ProtocolError::Signature(
                "ed25519 signature does not match the fleet's aggregator key".into(),
            )
        })?;
    let head_file = decompress(&bytes[HEADER..], MAX_RAW_BYTES)?;
    let digest = Sha256::digest(&head_file);
    if digest.as_slice() != &bytes[69..101] {
        return Err(ProtocolError::Checksum(
            "sha256 of the head does not match the signed checksum".into(),
        ));
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&head_file)
        .map_err(|e| ProtocolError::Format(e.to_string()))?;
    let md: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
    let model = md
        .get("model")
        .cloned()
        .ok_or_else(|| ProtocolError::Metadata("missing `model`".into()))?;
    if model != expected_model {
        return Err(ProtocolError::Metadata(format!(
            "model {model:?}, expected {expected_model:?}"
        )));
    }
    let version = md
        .get("version")
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| ProtocolError::Metadata("`version` must be an unsigned integer".into()))?;
    Ok(GlobalModel {
        model,
        version,
        parent: md.get("parent").and_then(|p| p.parse().ok()),
        created_at: md
            .get("created_at")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0.0),
        sha256: hex::encode(digest),
        head_file,
    })
}

/// A signing key from 32 secret bytes (hex), as `dai-cloud keygen` writes it.
pub fn signing_key_from_hex(hex_secret: &str) -> Result<SigningKey, ProtocolError> {
    let bytes = hex::decode(hex_secret.trim())
        .map_err(|e| ProtocolError::Signature(format!("secret key: {e}")))?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| {
        ProtocolError::Signature("secret key: expected 32 bytes (64 hex digits)".into())
    })?;
    Ok(SigningKey::from_bytes(&arr))
}

/// A verifying key from 32 public bytes (hex).
pub fn verifying_key_from_hex(hex_public: &str) -> Result<VerifyingKey, ProtocolError> {
    let bytes = hex::decode(hex_public.trim())
        .map_err(|e| ProtocolError::Signature(format!("public key: {e}")))?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| {
        ProtocolError::Signature("public key: expected 32 bytes (64 hex digits)".into())
    })?;
    VerifyingKey::from_bytes(&arr).map_err(|e| ProtocolError::Signature(format!("public key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};

    fn head(model: &str, version: &str) -> Vec<u8> {
        let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut md = HashMap::new();
        md.insert("model".to_string(), model.to_string());
        md.insert("version".to_string(), version.to_string());
        md.insert("parent".to_string(), "3".to_string());
        let v = TensorView::new(Dtype::F32, vec![2], &data).expect("view");
        safetensors::serialize(vec![("layers.0.bias".to_string(), v)], Some(md)).expect("st")
    }

    #[test]
    fn signed_models_verify_and_tampering_is_caught() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let other = SigningKey::from_bytes(&[8u8; 32]);
        let wire = sign(&head("digits", "4"), &key);
        let g = verify(&wire, &key.verifying_key(), "digits").expect("verify");
        assert_eq!((g.version, g.parent), (4, Some(3)));
        assert!(matches!(
            verify(&wire, &other.verifying_key(), "digits"),
            Err(ProtocolError::Signature(_))
        ));
        let mut flipped = wire.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            verify(&flipped, &key.verifying_key(), "digits"),
            Err(ProtocolError::Signature(_))
        ));
        assert!(matches!(
            verify(&wire, &key.verifying_key(), "other"),
            Err(ProtocolError::Metadata(_))
        ));
        assert!(verify(b"junk", &key.verifying_key(), "digits").is_err());
        let hexed = hex::encode(key.to_bytes());
        assert_eq!(
            signing_key_from_hex(&hexed).expect("hex").to_bytes(),
            key.to_bytes()
        );
        assert!(verifying_key_from_hex("zz").is_err());
    }
}
