//! The reference fixtures as bench inputs: single-row tensors in manifest
//! order, and the `in.<name>` safetensors file `bench/ort_latency.py` reads.

use super::repo;
use dai_infer::Bundle;
use dai_infer::tensor::{Data, TensorData};
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

/// Single-row inputs in manifest order, from the fixture.
pub fn inputs(model: &str, bundle: &Bundle) -> Vec<(String, TensorData)> {
    let bytes =
        std::fs::read(repo().join(format!("tests/fixtures/{model}.safetensors"))).expect("fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    bundle
        .manifest
        .inputs
        .iter()
        .map(|spec| {
            let view = st
                .tensor(&format!("in.{}", spec.name))
                .expect("fixture input");
            let data = Data::from_le_bytes(spec.dtype, view.data()).expect("decode");
            let t = TensorData::new(view.shape().to_vec(), data).expect("tensor");
            let t = if bundle.manifest.batching {
                t.slice_rows(0, 1).expect("row")
            } else {
                t
            };
            (spec.name.clone(), t)
        })
        .collect()
}

pub fn write_inputs(path: &Path, inputs: &[(String, TensorData)]) {
    let owned: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = inputs
        .iter()
        .map(|(n, t)| {
            let dt = match &t.data {
                Data::F32(_) => Dtype::F32,
                Data::I64(_) => Dtype::I64,
                Data::I32(_) => Dtype::I32,
                Data::U8(_) => Dtype::U8,
                Data::I8(_) => Dtype::I8,
            };
            (format!("in.{n}"), t.data.to_le_bytes(), t.shape.clone(), dt)
        })
        .collect();
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, b, s, dt)| (n.clone(), TensorView::new(*dt, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write inputs");
}
