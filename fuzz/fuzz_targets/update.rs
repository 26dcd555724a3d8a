//! An update as it arrives on `.../dev/{device}/update`: the signed
//! envelope's parser, then the zstd safetensors payload through both
//! decoders (the plain one, and the aggregator's, bounded by the digits
//! head's layout); what decodes is re-encoded. The signature itself is
//! ed25519-dalek's and is not explored here (it would cost most of each
//! run), so the payload is fed directly.
//!
//! The plain decoder runs with a 1 MiB output bound instead of the
//! production 64 MiB: the bound is a parameter of the same code, and a
//! fuzzer that learns to write zstd frames expanding to 64 MiB otherwise
//! spends each run filling memory (1.2 k runs/s against tens of
//! thousands).
#![no_main]

use dai_protocol::signed::{self, Kind};
use dai_protocol::update::{Encoding, MAX_WIRE_BYTES, Update};

const RAW_BOUND: usize = 1 << 20;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = signed::parse(Kind::Update, data);
    let layout = [
        ("layers.0.bias".to_string(), vec![32]),
        ("layers.0.weight".to_string(), vec![32, 64]),
        ("layers.1.bias".to_string(), vec![10]),
        ("layers.1.weight".to_string(), vec![10, 32]),
    ];
    if let Ok(u) = Update::decode_for_layout(data, MAX_WIRE_BYTES, |m| {
        (m == "digits").then_some(&layout[..])
    }) {
        // What passes the layout check has exactly the layout's tensors.
        assert_eq!(u.tensors.len(), layout.len());
    }
    let Ok(update) = Update::decode_with_limits(data, MAX_WIRE_BYTES, RAW_BOUND) else {
        return;
    };
    // What decodes must encode again, and an f32 re-encode is lossless.
    let mut again = update.clone();
    again.meta.encoding = Encoding::F32;
    if let Ok(bytes) = again.encode() {
        let back = Update::decode(&bytes).expect("an encoded update decodes");
        assert_eq!(back.tensors, {
            let mut t = again.tensors.clone();
            t.sort_by(|a, b| a.name.cmp(&b.name));
            t
        });
    }
});
