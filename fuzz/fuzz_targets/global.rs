//! A signed global as it arrives on `.../model/{model}/global`. The raw
//! input is offered as a whole wire message; then, so that what follows a
//! valid signature and checksum is explored, the input is taken as epoch and
//! version (16 bytes) and a zstd head, given the right sha256 and signed
//! with a fixed key.
#![no_main]

use dai_protocol::{decompress, global};
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[9; 32]);
    let pk = key.verifying_key();
    let _ = global::verify(data, &pk, "f", "digits");
    if data.len() < 16 {
        return;
    }
    let (ids, body) = data.split_at(16);
    let Ok(head) = decompress(body, global::MAX_RAW_BYTES) else {
        return;
    };
    let mut signed = ids.to_vec();
    signed.extend_from_slice(&Sha256::digest(&head));
    signed.extend_from_slice(body);
    let wire = global::seal(&key, "f", "digits", &signed);
    if let Ok(g) = global::verify(&wire, &pk, "f", "digits") {
        assert_eq!(g.model, "digits");
        assert_eq!(g.head_file, head);
        // The edge loads a verified global's head next.
        let _ = dai_head::Head::from_bytes(&g.head_file);
    }
});
