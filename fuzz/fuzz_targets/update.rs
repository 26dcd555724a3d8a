//! An update as it arrives on `.../dev/{device}/update`: the signed
//! envelope, then the zstd safetensors payload, decoded as the aggregator
//! does (with its layout check) and, when it decodes, re-encoded.
#![no_main]

use dai_protocol::signed::{self, Kind};
use dai_protocol::update::{Encoding, Update};
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;

const TOPIC: &str = "dai/v1/f/dev/a/update";

fuzz_target!(|data: &[u8]| {
    // Raw bytes through the envelope parser (almost always refused) ...
    let _ = signed::parse(Kind::Update, data);
    // ... and the bytes as a sealed body, so the payload decoder behind a
    // valid signature is what gets explored.
    let key = SigningKey::from_bytes(&[7; 32]);
    let wire = signed::seal(Kind::Update, &key, "f", TOPIC, data);
    let Ok(body) = signed::open(Kind::Update, &key.verifying_key(), "f", TOPIC, &wire) else {
        panic!("a sealed body must open with its own key");
    };
    let Ok(update) = Update::decode(body) else {
        return;
    };
    // What decodes must encode again, and an f32 re-encode is lossless.
    let mut again = update.clone();
    again.meta.encoding = Encoding::F32;
    if let Ok(bytes) = again.encode() {
        let back = Update::decode(&bytes).expect("an encoded update decodes");
        assert_eq!(back.tensors.len(), again.tensors.len());
    }
});
