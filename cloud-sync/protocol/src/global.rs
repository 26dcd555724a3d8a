//! A global head published by the aggregator, signed with ed25519.
//!
//! Wire form: `"DAIG2"` (5 bytes) | signature (64) | epoch (u64 BE) |
//! version (u64 BE) | sha256 of the head file (32) | zstd(head.safetensors).
//! The signature covers `"dai/v1 global" 0 fleet 0 model 0` and everything
//! after it, so a global is bound to its fleet, model, version and the
//! aggregator's epoch (which changes when an aggregator starts a new
//! version line from an empty state). The head file's `__metadata__`
//! carries `model`, `version` (which must equal the signed one), `parent`
//! and `created_at`. Edges verify in this order: size, magic, signature,
//! decompression bound, checksum, model name and version, newer than
//! theirs.

use crate::{ProtocolError, compress, decompress};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

const MAGIC: &[u8; 5] = b"DAIG2";
const DOMAIN: &[u8] = b"dai/v1 global";
/// Magic, signature, epoch, version, checksum.
const HEADER: usize = 5 + 64 + 8 + 8 + 32;

/// Largest signed global model accepted (16 MiB compressed, 64 MiB raw).
pub const MAX_WIRE_BYTES: usize = 16 << 20;
pub const MAX_RAW_BYTES: usize = 64 << 20;

/// A verified global model.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalModel {
    pub model: String,
    pub version: u64,
    /// The aggregator epoch it was signed in.
    pub epoch: u64,
    pub parent: Option<u64>,
    pub created_at: f64,
    /// The head file (safetensors) as the edge stores and loads it.
    pub head_file: Vec<u8>,
    pub sha256: String,
}

fn signed_message(fleet: &str, model: &str, rest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + fleet.len() + model.len() + 3 + rest.len());
    m.extend_from_slice(DOMAIN);
    m.push(0);
    m.extend_from_slice(fleet.as_bytes());
    m.push(0);
    m.extend_from_slice(model.as_bytes());
    m.push(0);
    m.extend_from_slice(rest);
    m
}

fn metadata(head_file: &[u8]) -> Result<HashMap<String, String>, ProtocolError> {
    let (_, header) = safetensors::SafeTensors::read_metadata(head_file)
        .map_err(|e| ProtocolError::Format(e.to_string()))?;
    Ok(header.metadata().clone().unwrap_or_default())
}

fn model_and_version(md: &HashMap<String, String>) -> Result<(String, u64), ProtocolError> {
    let model = md
        .get("model")
        .cloned()
        .ok_or_else(|| ProtocolError::Metadata("missing `model`".into()))?;
    let version = md
        .get("version")
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| ProtocolError::Metadata("`version` must be an unsigned integer".into()))?;
    Ok((model, version))
}

/// Sign `head_file` (a head.safetensors whose metadata names model and
/// version) for `fleet` in aggregator `epoch`.
pub fn sign(
    head_file: &[u8],
    key: &SigningKey,
    fleet: &str,
    epoch: u64,
) -> Result<Vec<u8>, ProtocolError> {
    let (model, version) = model_and_version(&metadata(head_file)?)?;
    let digest = Sha256::digest(head_file);
    let body = compress(head_file, 3);
    let mut signed = Vec::with_capacity(48 + body.len());
    signed.extend_from_slice(&epoch.to_be_bytes());
    signed.extend_from_slice(&version.to_be_bytes());
    signed.extend_from_slice(&digest);
    signed.extend_from_slice(&body);
    Ok(seal(key, fleet, &model, &signed))
}

/// The wire form of `signed` (epoch, version, checksum, zstd head, laid
/// out as in the module docs) signed for `fleet` and `model`. [`sign`] lays
/// them out; the fuzz target calls this with arbitrary bytes so what
/// follows a valid signature is explored.
pub fn seal(key: &SigningKey, fleet: &str, model: &str, signed: &[u8]) -> Vec<u8> {
    let sig = key.sign(&signed_message(fleet, model, signed));
    let mut out = Vec::with_capacity(5 + 64 + signed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&sig.to_bytes());
    out.extend_from_slice(signed);
    out
}

/// Verify and open a signed global model of `expected_model` in `fleet`.
pub fn verify(
    bytes: &[u8],
    key: &VerifyingKey,
    fleet: &str,
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
            "not a DAIG2 signed global model".into(),
        ));
    }
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&bytes[5..69]);
    key.verify_strict(
        &signed_message(fleet, expected_model, &bytes[69..]),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| {
        ProtocolError::Signature(
            "ed25519 signature does not match the fleet's aggregator key, fleet and model".into(),
        )
    })?;
    decode_verified(bytes, expected_model)
}

/// Everything [`verify`] checks after the signature: decompression bound,
/// checksum, model name and version. Only for `bytes` whose signature was
/// verified (and for the fuzz target, which explores this part without
/// spending its time in ed25519).
pub fn decode_verified(bytes: &[u8], expected_model: &str) -> Result<GlobalModel, ProtocolError> {
    if bytes.len() < HEADER {
        return Err(ProtocolError::Format(
            "not a DAIG2 signed global model".into(),
        ));
    }
    let be = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let (epoch, signed_version) = (be(69), be(77));
    let head_file = decompress(&bytes[HEADER..], MAX_RAW_BYTES)?;
    let digest = Sha256::digest(&head_file);
    if digest.as_slice() != &bytes[85..117] {
        return Err(ProtocolError::Checksum(
            "sha256 of the head does not match the signed checksum".into(),
        ));
    }
    let md = metadata(&head_file)?;
    let (model, version) = model_and_version(&md)?;
    if model != expected_model {
        return Err(ProtocolError::Metadata(format!(
            "model {model:?}, expected {expected_model:?}"
        )));
    }
    if version != signed_version {
        return Err(ProtocolError::Metadata(format!(
            "version {version} in the head, {signed_version} signed"
        )));
    }
    Ok(GlobalModel {
        model,
        version,
        epoch,
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
        let wire = sign(&head("digits", "4"), &key, "lab", 9).expect("sign");
        let pk = key.verifying_key();
        let g = verify(&wire, &pk, "lab", "digits").expect("verify");
        assert_eq!((g.version, g.parent, g.epoch), (4, Some(3), 9));
        assert!(matches!(
            verify(&wire, &other.verifying_key(), "lab", "digits"),
            Err(ProtocolError::Signature(_))
        ));
        // Bound to its fleet and model.
        assert!(matches!(
            verify(&wire, &pk, "other-fleet", "digits"),
            Err(ProtocolError::Signature(_))
        ));
        assert!(matches!(
            verify(&wire, &pk, "lab", "other"),
            Err(ProtocolError::Signature(_))
        ));
        // Every signed byte counts: body, checksum, version and epoch.
        for at in [wire.len() - 1, 100, 80, 70] {
            let mut flipped = wire.clone();
            flipped[at] ^= 1;
            assert!(
                matches!(
                    verify(&flipped, &pk, "lab", "digits"),
                    Err(ProtocolError::Signature(_))
                ),
                "byte {at}"
            );
        }
        // A head whose metadata disagrees with what was signed.
        let mismatched = sign(&head("digits", "x"), &key, "lab", 1);
        assert!(matches!(mismatched, Err(ProtocolError::Metadata(_))));
        assert!(verify(b"junk", &pk, "lab", "digits").is_err());
        let hexed = hex::encode(key.to_bytes());
        assert_eq!(
            signing_key_from_hex(&hexed).expect("hex").to_bytes(),
            key.to_bytes()
        );
        assert!(verifying_key_from_hex("zz").is_err());
    }
}
