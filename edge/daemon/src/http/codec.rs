//! Tensor bodies: JSON and raw little-endian requests decoded against a
//! model's input specs, answers encoded as JSON or raw bytes.
//!
//! Pure functions (no runtime, no HTTP types): [`super::infer`] and
//! [`super::training`] look the manifest up and call these. A refusal is a
//! [`BadInput`] whose message names the field at fault.

use dai_infer::TensorSpec;
use dai_infer::tensor::{DType, Data, TensorData};
use serde_json::{Value, json};
use std::collections::HashMap;

/// Why a body was refused (answered as 400 `bad_input`).
#[derive(Debug, Clone, PartialEq)]
pub struct BadInput(pub String);

/// Decoded inputs by name.
pub type Inputs = HashMap<String, TensorData>;

/// `{"inputs": {NAME: {dtype, shape, data}}}` against `specs` (a tensor
/// without `dtype` gets its spec's). Shapes and dtypes are checked against
/// the manifest later, by the runtime.
pub fn decode_json(specs: &[TensorSpec], model: &str, body: &[u8]) -> Result<Inputs, BadInput> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| BadInput(format!("malformed JSON body: {e}")))?;
    let inputs = v.get("inputs").and_then(Value::as_object).ok_or_else(|| {
        BadInput("JSON body: expected {\"inputs\": {NAME: {dtype, shape, data}}}".into())
    })?;
    let mut out = HashMap::new();
    for (name, t) in inputs {
        let dtype = specs
            .iter()
            .find(|s| &s.name == name)
            .map(|s| s.dtype)
            .ok_or_else(|| {
                BadInput(format!(
                    "unknown input {name:?}; model {model} takes {:?}",
                    specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
                ))
            })?;
        out.insert(name.clone(), tensor_from_json(name, t, dtype)?);
    }
    Ok(out)
}

/// Decode one JSON tensor; `spec_dtype` is used when the request gives none.
pub fn tensor_from_json(name: &str, v: &Value, spec_dtype: DType) -> Result<TensorData, BadInput> {
    let bad = |m: String| BadInput(format!("inputs.{name}{m}"));
    let obj = v
        .as_object()
        .ok_or_else(|| bad(": expected an object {dtype, shape, data}".into()))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data"))
    {
        return Err(bad(format!(
            ": unknown field {k:?}; expected dtype, shape, data"
        )));
    }
    let dtype = match obj.get("dtype") {
        None | Some(Value::Null) => spec_dtype,
        Some(Value::String(s)) => DType::parse(s)
            .ok_or_else(|| bad(format!(".dtype: {s:?} is not one of f32, i64, i32, u8, i8")))?,
        Some(other) => return Err(bad(format!(".dtype: expected a string, got {other}"))),
    };
    let shape: Vec<usize> = match obj.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .enumerate()
            .map(|(i, d)| {
                d.as_u64().map(|x| x as usize).ok_or_else(|| {
                    bad(format!(
                        ".shape[{i}]: expected a non-negative integer, got {d}"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad(".shape: expected an array of integers".into())),
    };
    let Some(Value::Array(items)) = obj.get("data") else {
        return Err(bad(".data: expected a flat array of numbers".into()));
    };
    let data = json_data(name, items, dtype)?;
    TensorData::new(shape, data).map_err(|e| bad(format!(": {e}")))
}

/// The `data` array as `dtype` values; integers must fit the dtype.
fn json_data(name: &str, items: &[Value], dtype: DType) -> Result<Data, BadInput> {
    let float = |(i, x): (usize, &Value)| -> Result<f32, BadInput> {
        x.as_f64().map(|v| v as f32).ok_or_else(|| {
            BadInput(format!(
                "inputs.{name}.data[{i}]: expected a number, got {x}"
            ))
        })
    };
    let int = |i: usize, x: &Value, lo: i64, hi: i64| -> Result<i64, BadInput> {
        match x.as_i64() {
            Some(v) if v >= lo && v <= hi => Ok(v),
            _ => Err(BadInput(format!(
                "inputs.{name}.data[{i}]: expected an integer in {lo}..={hi} for {dtype}, got {x}"
            ))),
        }
    };
    let ints = |lo: i64, hi: i64| -> Result<Vec<i64>, BadInput> {
        items
            .iter()
            .enumerate()
            .map(|(i, x)| int(i, x, lo, hi))
            .collect()
    };
    // The ranges above make every `as` below exact.
    Ok(match dtype {
        DType::F32 => Data::F32(
            items
                .iter()
                .enumerate()
                .map(float)
                .collect::<Result<_, _>>()?,
        ),
        DType::I64 => Data::I64(ints(i64::MIN, i64::MAX)?),
        DType::I32 => Data::I32(
            ints(i32::MIN as i64, i32::MAX as i64)?
                .into_iter()
                .map(|v| v as i32)
                .collect(),
        ),
        DType::U8 => Data::U8(ints(0, 255)?.into_iter().map(|v| v as u8).collect()),
        DType::I8 => Data::I8(ints(-128, 127)?.into_iter().map(|v| v as i8).collect()),
    })
}

/// A raw body: the inputs' little-endian bytes concatenated in `specs`
/// order. With `batching`, any whole number of rows (axis 0 of every input
/// becomes that count); without, exactly one request's bytes.
pub fn decode_raw(specs: &[TensorSpec], batching: bool, body: &[u8]) -> Result<Inputs, BadInput> {
    let row_bytes: usize = specs
        .iter()
        .map(|s| s.row_elems() * s.dtype.size_of())
        .sum();
    let layout = specs
        .iter()
        .map(|s| format!("{} {} {:?}", s.name, s.dtype, s.shape))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = if batching {
        if body.is_empty() || row_bytes == 0 || !body.len().is_multiple_of(row_bytes) {
            return Err(BadInput(format!(
                "raw body of {} bytes is not a whole number of rows of {row_bytes} bytes ({layout}, little-endian, in this order)",
                body.len()
            )));
        }
        body.len() / row_bytes
    } else {
        let expected: usize = specs.iter().map(|s| s.elems() * s.dtype.size_of()).sum();
        if body.len() != expected {
            return Err(BadInput(format!(
                "raw body of {} bytes, expected exactly {expected} bytes ({layout}, little-endian, in this order)",
                body.len()
            )));
        }
        1
    };
    let mut offset = 0;
    let mut out = HashMap::new();
    for s in specs {
        let mut shape = s.shape.clone();
        if batching && let Some(axis0) = shape.first_mut() {
            *axis0 = rows;
        }
        let n: usize = shape.iter().product::<usize>() * s.dtype.size_of();
        let bytes = body
            .get(offset..offset + n)
            .ok_or_else(|| BadInput(format!("raw body too short for input {}", s.name)))?;
        let data = Data::from_le_bytes(s.dtype, bytes).map_err(|e| BadInput(e.0))?;
        offset += n;
        out.insert(
            s.name.clone(),
            TensorData::new(shape, data).map_err(|e| BadInput(e.0))?,
        );
    }
    Ok(out)
}

/// `{"dtype", "shape", "data"}` of an output.
pub fn tensor_json(t: &TensorData) -> Value {
    let data: Value = match &t.data {
        Data::F32(v) => v.iter().map(|x| json!(x)).collect(),
        Data::I64(v) => v.iter().map(|x| json!(x)).collect(),
        Data::I32(v) => v.iter().map(|x| json!(x)).collect(),
        Data::U8(v) => v.iter().map(|x| json!(x)).collect(),
        Data::I8(v) => v.iter().map(|x| json!(x)).collect(),
    };
    json!({ "dtype": t.dtype(), "shape": t.shape, "data": data })
}

/// Outputs as one raw body (little-endian, in order) and the
/// `x-dai-output-shapes` value: `name:dtype:AxBxC` per output, comma-separated.
pub fn encode_raw(names: &[String], tensors: &[TensorData]) -> (Vec<u8>, String) {
    let mut bytes = Vec::new();
    let mut shapes = Vec::new();
    for (n, t) in names.iter().zip(tensors) {
        bytes.extend(t.data.to_le_bytes());
        let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        shapes.push(format!("{n}:{}:{}", t.dtype(), dims.join("x")));
    }
    (bytes, shapes.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            onnx_name: None,
            dtype,
            shape: shape.to_vec(),
        }
    }

    fn err(r: Result<Inputs, BadInput>) -> String {
        r.expect_err("refused").0
    }

    #[test]
    fn json_takes_the_spec_dtype_when_none_is_given() {
        let specs = [
            spec("x", DType::F32, &[1, 3]),
            spec("ids", DType::I64, &[1, 2]),
        ];
        let body = br#"{"inputs": {"x": {"shape": [1, 3], "data": [1, 2.5, -3]},
                        "ids": {"dtype": "i64", "shape": [1, 2], "data": [7, -9]}}}"#;
        let t = decode_json(&specs, "m", body).expect("decodes");
        assert_eq!(t["x"].data, Data::F32(vec![1.0, 2.5, -3.0]));
        assert_eq!(t["ids"].data, Data::I64(vec![7, -9]));
        assert_eq!(t["ids"].shape, vec![1, 2]);
    }

    #[test]
    fn json_refusals_name_the_field() {
        let specs = [spec("x", DType::U8, &[1, 2])];
        let cases: [(&[u8], &str); 8] = [
            (b"{", "malformed JSON body"),
            (br#"{"x": 1}"#, "expected {\"inputs\""),
            (
                br#"{"inputs": {"y": {}}}"#,
                "unknown input \"y\"; model m takes [\"x\"]",
            ),
            (br#"{"inputs": {"x": []}}"#, "inputs.x: expected an object"),
            (
                br#"{"inputs": {"x": {"shape": [2], "data": [1, 2], "extra": 1}}}"#,
                "inputs.x: unknown field \"extra\"",
            ),
            (
                br#"{"inputs": {"x": {"dtype": "f64", "shape": [2], "data": [1, 2]}}}"#,
                "inputs.x.dtype: \"f64\" is not one of",
            ),
            (
                br#"{"inputs": {"x": {"shape": [2, -1], "data": [1, 2]}}}"#,
                "inputs.x.shape[1]: expected a non-negative integer, got -1",
            ),
            (
                br#"{"inputs": {"x": {"shape": [2], "data": [1, 256]}}}"#,
                "inputs.x.data[1]: expected an integer in 0..=255 for u8, got 256",
            ),
        ];
        for (body, want) in cases {
            let e = err(decode_json(&specs, "m", body));
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
        let e = err(decode_json(
            &specs,
            "m",
            br#"{"inputs": {"x": {"shape": [3], "data": [1, 2]}}}"#,
        ));
        assert!(
            e.contains("inputs.x: shape [3] needs 3 elements, got 2"),
            "{e}"
        );
    }

    #[test]
    fn raw_batching_bodies_are_whole_rows() {
        let specs = [
            spec("a", DType::F32, &[1, 2]),
            spec("b", DType::U8, &[1, 1]),
        ];
        // Two rows: a = [[1, 2], [3, 4]], b = [[5], [6]].
        let mut body: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        body.extend([5u8, 6]);
        let t = decode_raw(&specs, true, &body).expect("decodes");
        assert_eq!(t["a"].shape, vec![2, 2]);
        assert_eq!(t["a"].data, Data::F32(vec![1.0, 2.0, 3.0, 4.0]));
        assert_eq!(t["b"].data, Data::U8(vec![5, 6]));
        let e = err(decode_raw(&specs, true, &body[..body.len() - 1]));
        assert!(
            e.contains("raw body of 17 bytes is not a whole number of rows of 9 bytes"),
            "{e}"
        );
        assert!(err(decode_raw(&specs, true, &[])).contains("raw body of 0 bytes"));
    }

    #[test]
    fn raw_fixed_bodies_are_exact() {
        let specs = [spec("s", DType::I32, &[2])];
        let body: Vec<u8> = [7i32, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = decode_raw(&specs, false, &body).expect("decodes");
        assert_eq!(t["s"].data, Data::I32(vec![7, -1]));
        let e = err(decode_raw(&specs, false, &body[..4]));
        assert!(e.contains("expected exactly 8 bytes (s i32 [2]"), "{e}");
    }

    #[test]
    fn outputs_encode_as_json_and_raw() {
        let t = TensorData::new(vec![1, 2], Data::F32(vec![0.5, -1.0])).expect("tensor");
        assert_eq!(
            tensor_json(&t),
            json!({"dtype": "f32", "shape": [1, 2], "data": [0.5, -1.0]})
        );
        let ids = TensorData::new(vec![3], Data::I64(vec![1, 2, 3])).expect("tensor");
        let (bytes, shapes) = encode_raw(&["p".into(), "ids".into()], &[t, ids]);
        assert_eq!(bytes.len(), 8 + 24);
        assert_eq!(&bytes[..4], 0.5f32.to_le_bytes());
        assert_eq!(shapes, "p:f32:1x2,ids:i64:3");
    }
}
