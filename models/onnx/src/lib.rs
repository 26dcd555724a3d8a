//! The ONNX file reader of `dai-models`: ONNX's protobuf messages ([`pb`],
//! prost), [`decode`] with a precise error, and the pure helpers the
//! rewriters (quantize, prune, export) and `inspect` share: element types,
//! initializers as f32 or i64, new tensors, nodes and attributes, input
//! shapes. No I/O and no tract, so the fuzz crate links exactly what
//! `dai-models` runs on a file it was given (`fuzz/fuzz_targets/onnx.rs`);
//! `dai-models` hands a model to tract as bytes.
//!
//! Every size here comes from the file: counts saturate, and data is read
//! only from buffers the decoder already holds, so nothing is allocated
//! from a claimed shape alone.

pub mod pb;

use prost::Message;
use std::collections::HashMap;

/// Why bytes are not an ONNX model we can read.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("not an ONNX model (protobuf decode failed: {0})")]
    Decode(#[from] prost::DecodeError),
    #[error("ONNX model has no graph")]
    NoGraph,
}

/// Decode ONNX bytes; refuses a model without a graph.
pub fn decode(bytes: &[u8]) -> Result<pb::ModelProto, OnnxError> {
    let model = pb::ModelProto::decode(bytes)?;
    if model.graph.is_none() {
        return Err(OnnxError::NoGraph);
    }
    Ok(model)
}

/// ONNX `TensorProto.DataType` codes used here.
pub mod dt {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
}

/// Human name of an ONNX element type.
pub fn dtype_name(code: i32) -> &'static str {
    match code {
        dt::FLOAT => "f32",
        dt::UINT8 => "u8",
        dt::INT8 => "i8",
        4 => "u16",
        5 => "i16",
        dt::INT32 => "i32",
        dt::INT64 => "i64",
        8 => "string",
        dt::BOOL => "bool",
        dt::FLOAT16 => "f16",
        dt::DOUBLE => "f64",
        12 => "u32",
        13 => "u64",
        16 => "bf16",
        _ => "other",
    }
}

/// Bytes per element of an ONNX element type (0 where variable or unknown).
pub fn dtype_size(code: i32) -> usize {
    match code {
        dt::UINT8 | dt::INT8 | dt::BOOL => 1,
        4 | 5 | dt::FLOAT16 | 16 => 2,
        dt::FLOAT | dt::INT32 | 12 => 4,
        dt::INT64 | dt::DOUBLE | 13 => 8,
        _ => 0,
    }
}

pub fn graph(model: &pb::ModelProto) -> &pb::GraphProto {
    // decode() refuses models without a graph; a default graph keeps this total.
    static EMPTY: std::sync::OnceLock<pb::GraphProto> = std::sync::OnceLock::new();
    model
        .graph
        .as_ref()
        .unwrap_or_else(|| EMPTY.get_or_init(pb::GraphProto::default))
}

/// Number of elements of a tensor with these dims.
/// Saturates instead of overflowing: dims come from the file, and a count
/// that large is refused by whatever compares it with the data it has.
pub fn numel(dims: &[i64]) -> usize {
    dims.iter().fold(1usize, |n, &d| {
        n.saturating_mul(usize::try_from(d).unwrap_or(0))
    })
}

/// Stored bytes of a tensor's data.
pub fn tensor_bytes(t: &pb::TensorProto) -> usize {
    if !t.raw_data.is_empty() {
        return t.raw_data.len();
    }
    numel(&t.dims).saturating_mul(dtype_size(t.data_type))
}

/// The values of a float tensor (f32, f16 or f64) as f32; None for other types.
pub fn to_f32(t: &pb::TensorProto) -> Option<Vec<f32>> {
    let n = numel(&t.dims);
    let v: Vec<f32> = match t.data_type {
        dt::FLOAT if !t.raw_data.is_empty() => t
            .raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        dt::FLOAT => t.float_data.clone(),
        dt::FLOAT16 if !t.raw_data.is_empty() => t
            .raw_data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        dt::FLOAT16 => t
            .int32_data
            .iter()
            .map(|&b| half::f16::from_bits(b as u16).to_f32())
            .collect(),
        dt::DOUBLE if !t.raw_data.is_empty() => t
            .raw_data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        dt::DOUBLE => t.double_data.iter().map(|&d| d as f32).collect(),
        _ => return None,
    };
    (v.len() == n).then_some(v)
}

/// The values of an integer tensor (i8, u8, i32, i64) as i64.
pub fn to_i64(t: &pb::TensorProto) -> Option<Vec<i64>> {
    let raw = !t.raw_data.is_empty();
    let v: Vec<i64> = match t.data_type {
        dt::INT8 if raw => t.raw_data.iter().map(|&b| b as i8 as i64).collect(),
        dt::UINT8 if raw => t.raw_data.iter().map(|&b| b as i64).collect(),
        dt::INT8 | dt::UINT8 | dt::INT32 if !raw => {
            t.int32_data.iter().map(|&v| v as i64).collect()
        }
        dt::INT32 => t
            .raw_data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        dt::INT64 if raw => t
            .raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        dt::INT64 => t.int64_data.clone(),
        _ => return None,
    };
    (v.len() == numel(&t.dims)).then_some(v)
}

fn dims(d: &[usize]) -> Vec<i64> {
    d.iter().map(|&v| v as i64).collect()
}

pub fn f32_tensor(name: &str, shape: &[usize], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims(shape),
        data_type: dt::FLOAT,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

pub fn f16_tensor(name: &str, shape: &[usize], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims(shape),
        data_type: dt::FLOAT16,
        raw_data: data
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        ..Default::default()
    }
}

pub fn i8_tensor(name: &str, shape: &[usize], data: &[i8]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims(shape),
        data_type: dt::INT8,
        raw_data: data.iter().map(|&v| v as u8).collect(),
        ..Default::default()
    }
}

pub fn u8_tensor(name: &str, shape: &[usize], data: &[u8]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims(shape),
        data_type: dt::UINT8,
        raw_data: data.to_vec(),
        ..Default::default()
    }
}

pub fn i32_tensor(name: &str, shape: &[usize], data: &[i32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims(shape),
        data_type: dt::INT32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.to_string(),
        name: name.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

pub fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

/// An attribute's integer value, if present.
pub fn get_int(n: &pb::NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// An attribute's float value, if present.
pub fn get_float(n: &pb::NodeProto, name: &str) -> Option<f32> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

/// The model's default-domain opset version.
pub fn opset(model: &pb::ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0)
}

/// Initializers by name, including `Constant` nodes' tensors.
pub fn constants(g: &pb::GraphProto) -> HashMap<String, &pb::TensorProto> {
    let mut m: HashMap<String, &pb::TensorProto> =
        g.initializer.iter().map(|t| (t.name.clone(), t)).collect();
    for n in &g.node {
        if n.op_type == "Constant"
            && let (Some(out), Some(t)) = (
                n.output.first(),
                n.attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref()),
            )
        {
            m.insert(out.clone(), t);
        }
    }
    m
}

/// Graph inputs that are real inputs (not initializers listed as inputs).
pub fn real_inputs(g: &pb::GraphProto) -> Vec<&pb::ValueInfoProto> {
    let inits: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    g.input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .collect()
}

/// Element type and dims of a value info (`None` for a symbolic or unknown dim).
pub fn value_shape(v: &pb::ValueInfoProto) -> (i32, Vec<Option<i64>>, Vec<String>) {
    use pb::tensor_shape_proto::dimension::Value;
    let mut elem = 0;
    let mut dims = Vec::new();
    let mut names = Vec::new();
    if let Some(pb::type_proto::Value::TensorType(t)) =
        v.r#type.as_ref().and_then(|t| t.value.as_ref())
    {
        elem = t.elem_type;
        if let Some(s) = &t.shape {
            for d in &s.dim {
                match &d.value {
                    Some(Value::DimValue(v)) if *v > 0 => {
                        dims.push(Some(*v));
                        names.push(v.to_string());
                    }
                    Some(Value::DimParam(p)) if !p.is_empty() => {
                        dims.push(None);
                        names.push(p.clone());
                    }
                    _ => {
                        dims.push(None);
                        names.push("?".into());
                    }
                }
            }
        }
    }
    (elem, dims, names)
}

/// Value names produced by nodes or given as inputs/initializers, for
/// choosing fresh names.
pub struct Names(std::collections::HashSet<String>);

impl Names {
    pub fn of(g: &pb::GraphProto) -> Names {
        let mut s = std::collections::HashSet::new();
        for n in &g.node {
            s.extend(n.output.iter().cloned());
            s.insert(n.name.clone());
        }
        s.extend(g.input.iter().map(|i| i.name.clone()));
        s.extend(g.initializer.iter().map(|i| i.name.clone()));
        Names(s)
    }

    /// `base`, or `base_2`, `base_3`... whichever is unused; reserved.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 2;
        while self.0.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.0.insert(name.clone());
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_sizes_saturate_instead_of_overflowing() {
        let t = pb::TensorProto {
            dims: vec![i64::MAX, i64::MAX, 3],
            data_type: dt::DOUBLE,
            ..Default::default()
        };
        assert_eq!(numel(&t.dims), usize::MAX);
        assert_eq!(tensor_bytes(&t), usize::MAX);
        // No data behind the claim: nothing is read, nothing allocated.
        assert_eq!(to_f32(&t), None);
        assert_eq!(numel(&[-4, 2]), 0);
    }

    #[test]
    fn data_that_does_not_fill_the_shape_is_not_a_tensor() {
        let mut t = f32_tensor("w", &[2, 3], &[1.0; 6]);
        assert_eq!(to_f32(&t).map(|v| v.len()), Some(6));
        t.raw_data.truncate(20);
        assert_eq!(to_f32(&t), None);
        let i = i32_tensor("i", &[2], &[7, -1]);
        assert_eq!(to_i64(&i), Some(vec![7, -1]));
    }

    #[test]
    fn bytes_without_a_graph_or_not_protobuf_are_refused() {
        assert!(matches!(decode(&[]), Err(OnnxError::NoGraph)));
        assert!(matches!(decode(&[0x0a, 0xff]), Err(OnnxError::Decode(_))));
    }
}
