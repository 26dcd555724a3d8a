//! The HTTP API's tensor bodies: JSON (`/infer`, `/samples`) and raw
//! little-endian (`application/octet-stream`), against two fixed input
//! layouts (one batching image model, one fixed-shape token model).
#![no_main]

use dai_infer::TensorSpec;
use dai_infer::codec;
use dai_infer::tensor::DType;
use libfuzzer_sys::fuzz_target;

fn spec(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        onnx_name: None,
        dtype,
        shape: shape.to_vec(),
        dynamic: Vec::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    let image = [spec("x", DType::F32, &[1, 3, 4, 4])];
    let tokens = [
        spec("input_ids", DType::I64, &[1, 8]),
        spec("attention_mask", DType::I64, &[1, 8]),
        spec("flags", DType::U8, &[2]),
    ];
    for specs in [&image[..], &tokens[..]] {
        if let Ok(inputs) = codec::decode_json(specs, "m", data) {
            for t in inputs.values() {
                // What decodes is a consistent tensor that encodes again.
                let v = codec::tensor_json(t);
                assert!(v.get("data").is_some());
            }
        }
        let _ = codec::decode_raw(specs, true, data);
        let _ = codec::decode_raw(specs, false, data);
    }
});
