//! Tensor bodies: JSON and raw little-endian requests decoded against a
//! model's input specs, answers encoded as JSON or raw bytes.
//!
//! Pure functions (no runtime, no HTTP types): the daemon's HTTP handlers
//! look the manifest up and call these. A refusal is a [`BadInput`] whose
//! message names the field at fault.
//!
//! JSON bodies are parsed once, straight into typed structs ([`parse_json`]):
//! a tensor's `data` becomes one `Vec` of 8-byte numbers while it is read,
//! never a `serde_json::Value` tree (about 15x the body's size in memory),
//! and the 8-byte numbers are narrowed to the input's dtype tensor by tensor.

use crate::TensorSpec;
use crate::tensor::{DType, Data, TensorData};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};

/// Why a body was refused (answered as 400 `bad_input`).
#[derive(Debug, Clone, PartialEq)]
pub struct BadInput(pub String);

/// Decoded inputs by name.
pub type Inputs = HashMap<String, TensorData>;

/// Parse a JSON body into `T` in one pass; an error names the path of the
/// field at fault (`inputs.x.data[3]`) and what was expected there.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, BadInput> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            BadInput(format!("malformed JSON body: {inner}"))
        } else if path == "." {
            BadInput(format!("JSON body: {inner}"))
        } else {
            BadInput(format!("{path}: {inner}"))
        }
    })
}

/// `{"inputs": {NAME: {dtype, shape, data}}}` (other top-level fields are
/// the endpoint's own: `label`, `labels`).
#[derive(Debug, Deserialize)]
pub struct InputsBody {
    pub inputs: BTreeMap<String, JsonTensor>,
}

/// One JSON tensor as sent: `dtype` is optional (the spec's is used).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object {dtype, shape, data}")]
pub struct JsonTensor {
    #[serde(default)]
    pub dtype: Option<String>,
    pub shape: Vec<usize>,
    pub data: Numbers,
}

/// A flat array of JSON numbers, kept as integers while every one is an
/// integer (so i64 inputs stay exact) and as f64 from the first fraction.
#[derive(Debug, Clone, PartialEq)]
pub enum Numbers {
    Ints(Vec<i64>),
    /// `first` is the index of the first element written with a fraction
    /// or exponent (what an integer input refuses).
    Floats {
        values: Vec<f64>,
        first: usize,
    },
}

impl Numbers {
    pub fn len(&self) -> usize {
        match self {
            Numbers::Ints(v) => v.len(),
            Numbers::Floats { values, .. } => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'de> Deserialize<'de> for Numbers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Numbers, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Numbers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a flat array of numbers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Numbers, A::Error> {
                // No capacity from the hint: the body's size bounds the array.
                let mut out = Numbers::Ints(Vec::new());
                while let Some(n) = seq.next_element::<Number>()? {
                    match (&mut out, n) {
                        (Numbers::Ints(v), Number::Int(i)) => v.push(i),
                        (Numbers::Ints(v), Number::Float(x)) => {
                            let first = v.len();
                            let mut values: Vec<f64> = v.iter().map(|&i| i as f64).collect();
                            values.push(x);
                            out = Numbers::Floats { values, first };
                        }
                        (Numbers::Floats { values, .. }, Number::Int(i)) => values.push(i as f64),
                        (Numbers::Floats { values, .. }, Number::Float(x)) => values.push(x),
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// One element of a `data` array.
enum Number {
    Int(i64),
    Float(f64),
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Number, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Number;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                Ok(i64::try_from(v).map_or(Number::Float(v as f64), Number::Int))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                Ok(Number::Float(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A parsed body's tensors checked against `specs` (a tensor without
/// `dtype` gets its spec's). Shapes and dtypes are checked against the
/// manifest later, by the runtime.
pub fn inputs_from_json(
    specs: &[TensorSpec],
    model: &str,
    inputs: BTreeMap<String, JsonTensor>,
) -> Result<Inputs, BadInput> {
    let mut out = HashMap::new();
    for (name, t) in inputs {
        let spec_dtype = specs
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.dtype)
            .ok_or_else(|| {
                BadInput(format!(
                    "unknown input {name:?}; model {model} takes {:?}",
                    specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
                ))
            })?;
        let tensor = tensor_from_json(&name, t, spec_dtype)?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// [`parse_json`] into [`InputsBody`] and [`inputs_from_json`]: the
/// `/infer` body.
pub fn decode_json(specs: &[TensorSpec], model: &str, body: &[u8]) -> Result<Inputs, BadInput> {
    let parsed: InputsBody = parse_json(body).map_err(|e| {
        // A body that is not the expected object at all gets its shape.
        if e.0.starts_with("JSON body:") {
            BadInput(format!(
                "{}; expected {{\"inputs\": {{NAME: {{dtype, shape, data}}}}}}",
                e.0
            ))
        } else {
            e
        }
    })?;
    inputs_from_json(specs, model, parsed.inputs)
}

/// One JSON tensor as `spec_dtype` (or its own `dtype`).
pub fn tensor_from_json(
    name: &str,
    t: JsonTensor,
    spec_dtype: DType,
) -> Result<TensorData, BadInput> {
    let bad = |m: String| BadInput(format!("inputs.{name}{m}"));
    let dtype = match &t.dtype {
        None => spec_dtype,
        Some(s) => DType::parse(s)
            .ok_or_else(|| bad(format!(".dtype: {s:?} is not one of f32, i64, i32, u8, i8")))?,
    };
    let data = narrow(name, t.data, dtype)?;
    TensorData::new(t.shape, data).map_err(|e| bad(format!(": {e}")))
}

/// The numbers as `dtype` values; integers must fit the dtype.
fn narrow(name: &str, items: Numbers, dtype: DType) -> Result<Data, BadInput> {
    let ints = |lo: i64, hi: i64| -> Result<Vec<i64>, BadInput> {
        let out_of_range = |i: usize, x: String| {
            BadInput(format!(
                "inputs.{name}.data[{i}]: expected an integer in {lo}..={hi} for {dtype}, got {x}"
            ))
        };
        match &items {
            Numbers::Ints(v) => match v.iter().position(|&x| x < lo || x > hi) {
                Some(i) => Err(out_of_range(i, v[i].to_string())),
                None => Ok(v.clone()),
            },
            Numbers::Floats { values, first } => Err(out_of_range(
                *first,
                values
                    .get(*first)
                    .map_or(String::new(), |x| format!("{x:?}")),
            )),
        }
    };
    // The ranges above make every `as` below exact.
    Ok(match dtype {
        DType::F32 => Data::F32(match items {
            Numbers::Ints(v) => v.into_iter().map(|x| x as f32).collect(),
            Numbers::Floats { values, .. } => values.into_iter().map(|x| x as f32).collect(),
        }),
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
            dynamic: Vec::new(),
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
        let cases: [(&[u8], &str); 11] = [
            (b"{", "malformed JSON body"),
            (br#"{"x": 1}"#, "JSON body: missing field `inputs`"),
            (br#"{"x": 1}"#, "expected {\"inputs\""),
            (
                br#"{"inputs": {"y": {"shape": [1], "data": [1]}}}"#,
                "unknown input \"y\"; model m takes [\"x\"]",
            ),
            (
                br#"{"inputs": {"x": 7}}"#,
                "inputs.x: invalid type: integer `7`, expected an object",
            ),
            (
                br#"{"inputs": {"x": {"shape": [2], "data": [1, 2], "extra": 1}}}"#,
                "inputs.x.extra: unknown field `extra`, expected one of `dtype`, `shape`, `data`",
            ),
            (
                br#"{"inputs": {"x": {"shape": [2], "data": [1, "2"]}}}"#,
                "inputs.x.data[1]: invalid type: string \"2\", expected a number",
            ),
            (
                br#"{"inputs": {"x": {"shape": [2], "data": [1, 2.5]}}}"#,
                "inputs.x.data[1]: expected an integer in 0..=255 for u8, got 2.5",
            ),
            (
                br#"{"inputs": {"x": {"dtype": "f64", "shape": [2], "data": [1, 2]}}}"#,
                "inputs.x.dtype: \"f64\" is not one of",
            ),
            (
                br#"{"inputs": {"x": {"shape": [2, -1], "data": [1, 2]}}}"#,
                "inputs.x.shape[1]: invalid value: integer `-1`, expected usize",
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
