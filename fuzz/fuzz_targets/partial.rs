//! A tier's partial aggregate as it arrives on `.../dev/{tier}/partial`:
//! the signed envelope's parser, then the header (length, JSON,
//! contributor rules) and the summed update, bounded by the digits head's
//! layout. What decodes must encode again to the same partial.
#![no_main]

use dai_protocol::partial::Partial;
use dai_protocol::signed::{self, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = signed::parse(Kind::Partial, data);
    let layout = [
        ("layers.0.bias".to_string(), vec![32]),
        ("layers.0.weight".to_string(), vec![32, 64]),
        ("layers.1.bias".to_string(), vec![10]),
        ("layers.1.weight".to_string(), vec![10, 32]),
    ];
    let Ok(p) = Partial::decode_for_layout(data, |m| (m == "digits").then_some(&layout[..])) else {
        return;
    };
    assert_eq!(p.sum.tensors.len(), layout.len());
    assert_eq!(p.votes as usize, p.contributors.len());
    if let Ok(bytes) = p.encode() {
        let back = Partial::decode_for_layout(&bytes, |m| (m == "digits").then_some(&layout[..]))
            .expect("an encoded partial decodes");
        assert_eq!(back.contributors, p.contributors);
        assert_eq!(back.weight.to_bits(), p.weight.to_bits());
    }
});
