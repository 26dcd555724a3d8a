//! Property tests: a head and a set of validation rows survive their
//! safetensors files exactly, for arbitrary layer sizes, activations,
//! losses, parameters and metadata.

use dai_head::rows::Rows;
use dai_head::{Activation, Head, HeadSpec, Loss};
use proptest::prelude::*;
use std::collections::HashMap;

fn spec() -> impl Strategy<Value = HeadSpec> {
    (
        prop::collection::vec(1usize..12, 2..5),
        prop::collection::vec(
            prop_oneof![
                Just(Activation::Relu),
                Just(Activation::Gelu),
                Just(Activation::None)
            ],
            4,
        ),
        prop_oneof![Just(Loss::SoftmaxCrossEntropy), Just(Loss::Mse)],
    )
        .prop_map(|(sizes, acts, loss)| {
            HeadSpec::new(&sizes, &acts[..sizes.len() - 1], loss).expect("a valid spec")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn heads_round_trip_exactly(
        spec in spec(),
        seed in any::<u64>(),
        extra in prop::collection::hash_map("[a-z_]{1,12}", "\\PC{0,24}", 0..4),
    ) {
        let head = Head::init(spec, seed);
        // `format`, `loss` and `activations` are the file's own keys.
        let extra: HashMap<String, String> = extra
            .into_iter()
            .filter(|(k, _)| !matches!(k.as_str(), "format" | "loss" | "activations"))
            .collect();
        let bytes = head.to_bytes(&extra).expect("saves");
        let (back, md) = Head::from_bytes(&bytes).expect("loads");
        prop_assert_eq!(&back, &head);
        for (k, v) in &extra {
            prop_assert_eq!(md.get(k), Some(v));
        }
    }

    #[test]
    fn validation_rows_round_trip_exactly(
        features in 1usize..16,
        labels in prop::collection::vec(0u32..10, 1..40),
        seed in any::<u32>(),
    ) {
        let x: Vec<f32> = (0..labels.len() * features)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let rows = Rows { x, features, labels };
        let back = Rows::from_bytes(&rows.to_bytes().expect("saves")).expect("loads");
        prop_assert_eq!(back, rows);
    }
}
