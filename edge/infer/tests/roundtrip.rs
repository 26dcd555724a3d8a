//! Property tests: the HTTP API's tensor bodies (raw little-endian and
//! JSON) and bundle manifests decode to what was encoded.

use dai_infer::TensorSpec;
use dai_infer::bundle::{Manifest, parse_manifest};
use dai_infer::codec;
use dai_infer::tensor::{DType, Data, TensorData};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::I64),
        Just(DType::I32),
        Just(DType::U8),
        Just(DType::I8)
    ]
}

fn data(dtype: DType, n: usize) -> BoxedStrategy<Data> {
    match dtype {
        DType::F32 => prop::collection::vec(-1e30f32..1e30, n)
            .prop_map(Data::F32)
            .boxed(),
        DType::I64 => prop::collection::vec(any::<i64>(), n)
            .prop_map(Data::I64)
            .boxed(),
        DType::I32 => prop::collection::vec(any::<i32>(), n)
            .prop_map(Data::I32)
            .boxed(),
        DType::U8 => prop::collection::vec(any::<u8>(), n)
            .prop_map(Data::U8)
            .boxed(),
        DType::I8 => prop::collection::vec(any::<i8>(), n)
            .prop_map(Data::I8)
            .boxed(),
    }
}

/// 1-3 inputs, each a dtype and a shape [rows, 1-4 more dims of 1-5].
fn inputs(rows: usize) -> impl Strategy<Value = Vec<(TensorSpec, TensorData)>> {
    prop::collection::vec((dtype(), prop::collection::vec(1usize..6, 0..3)), 1..4).prop_flat_map(
        move |specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (dtype, rest))| {
                    let mut shape = vec![rows];
                    shape.extend(rest);
                    let n: usize = shape.iter().product();
                    data(dtype, n).prop_map(move |d| {
                        let mut spec_shape = shape.clone();
                        spec_shape[0] = 1;
                        (
                            TensorSpec {
                                name: format!("in{i}"),
                                onnx_name: None,
                                dtype,
                                shape: spec_shape,
                                dynamic: Vec::new(),
                            },
                            TensorData::new(shape.clone(), d).expect("consistent"),
                        )
                    })
                })
                .collect::<Vec<_>>()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn raw_bodies_round_trip(
        (batching, tensors) in (1usize..4, any::<bool>()).prop_flat_map(|(rows, batching)| {
            inputs(if batching { rows } else { 1 }).prop_map(move |t| (batching, t))
        })
    ) {
        let (specs, values): (Vec<_>, Vec<_>) = tensors.into_iter().unzip();
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let (body, _) = codec::encode_raw(&names, &values);
        let back = codec::decode_raw(&specs, batching, &body).expect("decodes");
        for (n, v) in names.iter().zip(&values) {
            prop_assert_eq!(&back[n], v);
        }
    }

    #[test]
    fn json_bodies_round_trip(tensors in inputs(2)) {
        let (specs, values): (Vec<_>, Vec<_>) = tensors.into_iter().unzip();
        let mut inputs = serde_json::Map::new();
        for (s, v) in specs.iter().zip(&values) {
            inputs.insert(s.name.clone(), codec::tensor_json(v));
        }
        let body = serde_json::json!({ "inputs": inputs }).to_string();
        let back = codec::decode_json(&specs, "m", body.as_bytes()).expect("decodes");
        for (s, v) in specs.iter().zip(&values) {
            prop_assert_eq!(&back[&s.name], v);
        }
    }

    #[test]
    fn manifests_round_trip_through_toml(
        which in 0usize..5,
        description in "\\PC{0,60}",
        metric in -1e9f64..1e9,
    ) {
        let shipped = ["digits", "imu-anomaly", "minilm-l3", "pp-ocr-cls", "silero-vad"];
        let path = format!("{}/../../models/zoo/{}/manifest.toml", env!("CARGO_MANIFEST_DIR"), shipped[which]);
        let text = std::fs::read_to_string(&path).expect("a shipped manifest");
        let mut m: Manifest = parse_manifest(&text).expect("the shipped manifest parses");
        m.description = description;
        m.metrics.insert("property".into(), metric);
        let again = parse_manifest(&toml::to_string(&m).expect("serialises")).expect("parses");
        prop_assert_eq!(again, m);
    }
}
