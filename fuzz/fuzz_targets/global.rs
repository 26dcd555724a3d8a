//! A signed global as it arrives on `.../model/{model}/global`. The raw
//! input goes through `global::verify` (refused unless it is a DAIG2
//! message with a valid signature); then, so that what follows a valid
//! signature is explored without spending each run in ed25519, the input is
//! taken as epoch and version (16 bytes) and a zstd head, given the right
//! sha256, and decoded as `verify` does once the signature checked out.
//! Heads are taken up to 1 MiB here (64 MiB in production, the same code):
//! frames that expand to the production bound only make each run slow.
#![no_main]

use dai_protocol::{decompress, global};
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[9; 32]);
    let _ = global::verify(data, &key.verifying_key(), "f", "digits");
    if data.len() < 16 {
        return;
    }
    let (ids, body) = data.split_at(16);
    let Ok(head) = decompress(body, 1 << 20) else {
        return;
    };
    let mut wire = b"DAIG2".to_vec();
    wire.extend_from_slice(&[0u8; 64]);
    wire.extend_from_slice(ids);
    wire.extend_from_slice(&Sha256::digest(&head));
    wire.extend_from_slice(body);
    if let Ok(g) = global::decode_verified(&wire, "digits") {
        assert_eq!(g.model, "digits");
        assert_eq!(g.head_file, head);
        // The edge loads a verified global's head next.
        let _ = dai_head::Head::from_bytes(&g.head_file);
    }
});
