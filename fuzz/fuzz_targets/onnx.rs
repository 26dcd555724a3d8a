//! An ONNX file as `dai-models` reads one it was given (`inspect`,
//! `quantize`, `prune`, `bundle`): the protobuf decode of `dai-onnx`, then
//! every reader helper the tools call on a decoded graph (input shapes,
//! initializers as numbers, attributes, fresh names). What decodes must
//! encode to bytes that decode to the same model.
#![no_main]

use dai_onnx::pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = dai_onnx::decode(data) else {
        return;
    };
    let _ = dai_onnx::opset(&model);
    let g = dai_onnx::graph(&model);
    for v in dai_onnx::real_inputs(g).into_iter().chain(&g.output) {
        let (_, dims, names) = dai_onnx::value_shape(v);
        assert_eq!(dims.len(), names.len());
    }
    for t in dai_onnx::constants(g).values() {
        let n = dai_onnx::numel(&t.dims);
        let _ = dai_onnx::tensor_bytes(t);
        if let Some(v) = dai_onnx::to_f32(t) {
            assert_eq!(v.len(), n);
        }
        if let Some(v) = dai_onnx::to_i64(t) {
            assert_eq!(v.len(), n);
        }
    }
    for n in &g.node {
        let _ = dai_onnx::get_int(n, "axis");
        let _ = dai_onnx::get_float(n, "epsilon");
    }
    let mut names = dai_onnx::Names::of(g);
    let fresh = names.fresh("x");
    assert!(!g.node.iter().any(|n| n.output.contains(&fresh)));
    // Bytes, not models, are compared: a NaN float attribute is not equal
    // to itself.
    let bytes = model.encode_to_vec();
    let again = pb::ModelProto::decode(bytes.as_slice()).expect("our encoding decodes");
    assert_eq!(again.encode_to_vec(), bytes);
});
