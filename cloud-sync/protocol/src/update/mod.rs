//! The update an edge sends: a head delta.
//!
//! Wire form: `zstd(safetensors)`. Tensors keep their names (`layers.0.weight`,
//! ...). With `f32` and `f16` each tensor is stored in that dtype; with `int8`
//! a tensor of shape `[rows, cols]` (a 1-D tensor is one row) is stored as I8
//! plus `{name}.scale`, F32 `[rows]`, where `value = int8 * scale` and
//! `scale = max|row| / 127`. With `topk8` (sparse) only the largest
//! [`TOPK_DENSITY`] of each tensor's entries by magnitude are sent:
//! `{name}.mask` U8 (a bitmap over the flattened tensor, bit `i % 8` of byte
//! `i / 8`), `{name}.values` I8 (the kept entries in index order) and
//! `{name}.scale` F32 `[1]`; the dense shapes are in the metadata key
//! `shapes` (JSON `{name: [dims]}`); the rest of the delta is zero.
//! `__metadata__` carries device, model, base_version, update_id,
//! sample_count, loss and encoding.
//! `cloud-sync/protocol/decode_update.py` reads it with `safetensors` and
//! `zstandard` alone.

use crate::{ProtocolError, compress, decompress};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;

/// How delta values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    F32,
    F16,
    Int8,
    /// Sparse: the top [`TOPK_DENSITY`] entries by magnitude, int8.
    Topk8,
}

/// Fraction of each tensor's entries a `topk8` update keeps.
pub const TOPK_DENSITY: f64 = 0.125;

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::Int8 => "int8",
            Encoding::Topk8 => "topk8",
        }
    }

    pub fn parse(s: &str) -> Option<Encoding> {
        Some(match s {
            "f32" => Encoding::F32,
            "f16" => Encoding::F16,
            "int8" => Encoding::Int8,
            "topk8" => Encoding::Topk8,
            _ => return None,
        })
    }
}

/// Who sent what, from which base.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateMeta {
    pub device: String,
    pub model: String,
    pub base_version: String,
    pub update_id: String,
    pub sample_count: u64,
    pub loss: f32,
    pub encoding: Encoding,
}

/// A decoded (f32) tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// An update: metadata and delta tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub meta: UpdateMeta,
    pub tensors: Vec<Tensor>,
}

/// Largest compressed update accepted by default (8 MiB).
pub const MAX_WIRE_BYTES: usize = 8 << 20;
/// Largest decompressed update accepted by default (64 MiB).
pub const MAX_RAW_BYTES: usize = 64 << 20;

fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [r, rest @ ..] => (*r, rest.iter().product()),
    }
}

impl Update {
    /// Serialise and compress with `meta.encoding`.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let m = &self.meta;
        let mut meta = HashMap::new();
        meta.insert("device".to_string(), m.device.clone());
        meta.insert("model".to_string(), m.model.clone());
        meta.insert("base_version".to_string(), m.base_version.clone());
        meta.insert("update_id".to_string(), m.update_id.clone());
        meta.insert("sample_count".to_string(), m.sample_count.to_string());
        meta.insert("loss".to_string(), m.loss.to_string());
        meta.insert("encoding".to_string(), m.encoding.as_str().to_string());
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut shapes = serde_json::Map::new();
        for t in &self.tensors {
            if t.values.len() != t.shape.iter().product::<usize>() {
                return Err(ProtocolError::Tensor {
                    name: t.name.clone(),
                    reason: format!("{} values for shape {:?}", t.values.len(), t.shape),
                });
            }
            match m.encoding {
                Encoding::F32 => owned.push((
                    t.name.clone(),
                    Dtype::F32,
                    t.shape.clone(),
                    t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )),
                Encoding::F16 => owned.push((
                    t.name.clone(),
                    Dtype::F16,
                    t.shape.clone(),
                    t.values
                        .iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect(),
                )),
                Encoding::Int8 => {
                    let (rows, cols) = rows_cols(&t.shape);
                    let mut q = Vec::with_capacity(t.values.len());
                    let mut scales = Vec::with_capacity(rows);
                    for row in t.values.chunks(cols.max(1)) {
                        let max = row.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                        scales.push(scale);
                        q.extend(
                            row.iter()
                                .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                        );
                    }
                    owned.push((t.name.clone(), Dtype::I8, t.shape.clone(), q));
                    owned.push((
                        format!("{}.scale", t.name),
                        Dtype::F32,
                        vec![rows],
                        scales.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ));
                }
                Encoding::Topk8 => {
                    let n = t.values.len();
                    let k = ((n as f64 * TOPK_DENSITY).ceil() as usize).clamp(n.min(1), n);
                    // The k-th largest magnitude is the threshold; ties
                    // are broken by index so exactly k entries are kept.
                    let mut order: Vec<usize> = (0..n).collect();
                    order.sort_by(|&a, &b| {
                        t.values[b]
                            .abs()
                            .total_cmp(&t.values[a].abs())
                            .then(a.cmp(&b))
                    });
                    let mut keep = vec![false; n];
                    for &i in &order[..k] {
                        keep[i] = true;
                    }
                    let max = order.first().map_or(0.0, |&i| t.values[i].abs());
                    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                    let mut mask = vec![0u8; n.div_ceil(8)];
                    let mut q = Vec::with_capacity(k);
                    for (i, v) in t.values.iter().enumerate() {
                        if keep[i] {
                            mask[i / 8] |= 1 << (i % 8);
                            q.push((v / scale).round().clamp(-127.0, 127.0) as i8 as u8);
                        }
                    }
                    shapes.insert(t.name.clone(), serde_json::json!(t.shape));
                    owned.push((
                        format!("{}.mask", t.name),
                        Dtype::U8,
                        vec![mask.len()],
                        mask,
                    ));
                    owned.push((format!("{}.values", t.name), Dtype::I8, vec![q.len()], q));
                    owned.push((
                        format!("{}.scale", t.name),
                        Dtype::F32,
                        vec![1],
                        scale.to_le_bytes().to_vec(),
                    ));
                }
            }
        }
        if m.encoding == Encoding::Topk8 {
            meta.insert(
                "shapes".to_string(),
                serde_json::Value::Object(shapes).to_string(),
            );
        }
        let views = owned
            .iter()
            .map(|(n, dt, s, b)| {
                TensorView::new(*dt, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ProtocolError::Format(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let raw = safetensors::serialize(views, Some(meta))
            .map_err(|e| ProtocolError::Format(e.to_string()))?;
        Ok(compress(&raw, 3))
    }

    /// Decompress, parse and dequantise, with size bounds.
    pub fn decode(bytes: &[u8]) -> Result<Update, ProtocolError> {
        Self::decode_with_limits(bytes, MAX_WIRE_BYTES, MAX_RAW_BYTES)
    }

    pub fn decode_with_limits(
        bytes: &[u8],
        wire_limit: usize,
        raw_limit: usize,
    ) -> Result<Update, ProtocolError> {
        decode_inner(bytes, wire_limit, raw_limit, None).map_err(|e| e.error)
    }

    /// Decode an update for a model whose tensors must be `layout_of(model)`:
    /// the aggregator's path. Only the safetensors header is decompressed
    /// before the model is known; the rest may then decompress to no more
    /// than the layout's f32 size (not [`MAX_RAW_BYTES`]), and every
    /// tensor's claimed name and shape is checked against the layout before
    /// any value is decoded. A refusal carries the metadata when that much
    /// was read, so it can be acked by update id.
    pub fn decode_for_layout<'a>(
        bytes: &[u8],
        wire_limit: usize,
        layout_of: impl FnOnce(&str) -> Option<&'a [(String, Vec<usize>)]>,
    ) -> Result<Update, Undecodable> {
        if bytes.len() > wire_limit {
            return Err(ProtocolError::TooLarge {
                size: bytes.len(),
                limit: wire_limit,
            }
            .into());
        }
        let (header_len, md) = peek_metadata(bytes)?;
        let meta = parse_meta(&md)?;
        let Some(layout) = layout_of(&meta.model) else {
            return Err(Undecodable {
                error: ProtocolError::Metadata(format!(
                    "model {:?} is not served by this aggregator",
                    meta.model
                )),
                meta: Some(Box::new(meta)),
            });
        };
        let raw_limit = 8 + header_len + layout_bytes(layout);
        decode_inner(bytes, wire_limit, raw_limit, Some(layout)).map_err(|mut e| {
            e.meta.get_or_insert_with(|| Box::new(meta));
            e
        })
    }

    /// L2 norm of the delta.
    pub fn norm(&self) -> f64 {
        self.tensors
            .iter()
            .flat_map(|t| t.values.iter())
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt()
    }
}

/// An update that did not decode, with its metadata if that was readable.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable {
    pub meta: Option<Box<UpdateMeta>>,
    pub error: ProtocolError,
}

impl From<ProtocolError> for Undecodable {
    fn from(error: ProtocolError) -> Undecodable {
        Undecodable { meta: None, error }
    }
}

impl std::fmt::Display for Undecodable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Undecodable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// Largest safetensors header read (metadata and tensor entries; an
/// update's is under a kilobyte per tensor).
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// Bytes an update of `layout` may decompress to beyond its header: every
/// tensor as f32 plus one f32 scale per row and per tensor (the largest
/// encoding), so no encoding of a valid update is refused.
fn layout_bytes(layout: &[(String, Vec<usize>)]) -> usize {
    layout
        .iter()
        .map(|(_, shape)| {
            let (rows, _) = rows_cols(shape);
            let n: usize = shape.iter().product();
            n.saturating_mul(4)
                .saturating_add(rows.saturating_mul(4))
                .saturating_add(4)
        })
        .fold(0usize, usize::saturating_add)
}

/// Decompress only the safetensors header and read its `__metadata__`:
/// (header length, metadata).
fn peek_metadata(bytes: &[u8]) -> Result<(usize, HashMap<String, String>), ProtocolError> {
    use std::io::Read;
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let mut z = zstd::stream::read::Decoder::new(bytes)
        .map_err(|e| ProtocolError::Compression(e.to_string()))?;
    let mut len = [0u8; 8];
    z.read_exact(&mut len)
        .map_err(|e| ProtocolError::Format(format!("reading the header length: {e}")))?;
    let n = u64::from_le_bytes(len);
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_HEADER_BYTES)
        .ok_or_else(|| {
            ProtocolError::Format(format!(
                "header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES}"
            ))
        })?;
    let mut header = vec![0u8; n];
    z.read_exact(&mut header)
        .map_err(|e| ProtocolError::Format(format!("reading the {n}-byte header: {e}")))?;
    let h: Header = serde_json::from_slice(&header)
        .map_err(|e| ProtocolError::Format(format!("header: {e}")))?;
    Ok((n, h.metadata))
}

/// The `__metadata__` fields of an update.
fn parse_meta(md: &HashMap<String, String>) -> Result<UpdateMeta, ProtocolError> {
    let get = |k: &str| {
        md.get(k)
            .cloned()
            .ok_or_else(|| ProtocolError::Metadata(format!("missing `{k}`")))
    };
    let encoding = Encoding::parse(&get("encoding")?).ok_or_else(|| {
        ProtocolError::Metadata(format!(
            "encoding {:?}: expected f32, f16, int8 or topk8",
            md.get("encoding")
        ))
    })?;
    let meta = UpdateMeta {
        device: get("device")?,
        model: get("model")?,
        base_version: get("base_version")?,
        update_id: get("update_id")?,
        sample_count: get("sample_count")?
            .parse()
            .map_err(|e| ProtocolError::Metadata(format!("sample_count: {e}")))?,
        loss: get("loss")?
            .parse()
            .map_err(|e| ProtocolError::Metadata(format!("loss: {e}")))?,
        encoding,
    };
    if meta.update_id.is_empty() || meta.update_id.len() > 256 {
        return Err(ProtocolError::Metadata(
            "update_id must be 1-256 characters".into(),
        ));
    }
    Ok(meta)
}

/// The whole decode; with a `layout`, names and shapes are checked against
/// it before values are read.
fn decode_inner(
    bytes: &[u8],
    wire_limit: usize,
    raw_limit: usize,
    layout: Option<&[(String, Vec<usize>)]>,
) -> Result<Update, Undecodable> {
    if bytes.len() > wire_limit {
        return Err(ProtocolError::TooLarge {
            size: bytes.len(),
            limit: wire_limit,
        }
        .into());
    }
    let raw = decompress(bytes, raw_limit)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&raw)
        .map_err(|e| ProtocolError::Format(e.to_string()))?;
    let md = header.metadata().clone().unwrap_or_default();
    let meta = parse_meta(&md)?;
    let with_meta = |error: ProtocolError| Undecodable {
        meta: Some(Box::new(meta.clone())),
        error,
    };
    let st = safetensors::SafeTensors::deserialize(&raw)
        .map_err(|e| with_meta(ProtocolError::Format(e.to_string())))?;
    let encoding = meta.encoding;
    if encoding == Encoding::Topk8 {
        return decode_topk8(meta.clone(), &st, &md, raw_limit, layout).map_err(with_meta);
    }
    decode_dense(meta.clone(), &st, layout).map_err(with_meta)
}

/// `f32`, `f16` and `int8` tensors (each with its `.scale`).
fn decode_dense(
    meta: UpdateMeta,
    st: &safetensors::SafeTensors<'_>,
    layout: Option<&[(String, Vec<usize>)]>,
) -> Result<Update, ProtocolError> {
    let encoding = meta.encoding;
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !n.ends_with(".scale"))
        .map(|s| s.to_string())
        .collect();
    names.sort();
    if let Some(layout) = layout {
        check_names(&names, layout)?;
    }
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let bad = |reason: String| ProtocolError::Tensor {
            name: name.clone(),
            reason,
        };
        let v = st.tensor(&name).map_err(|e| bad(e.to_string()))?;
        let shape = v.shape().to_vec();
        if let Some(layout) = layout {
            check_shape(&name, &shape, layout)?;
        }
        let values: Vec<f32> = match (encoding, v.dtype()) {
            (Encoding::F32, Dtype::F32) => v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            (Encoding::F16, Dtype::F16) => v
                .data()
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            (Encoding::Int8, Dtype::I8) => {
                let s = st
                    .tensor(&format!("{name}.scale"))
                    .map_err(|_| bad("int8 tensor without its .scale".into()))?;
                let (rows, cols) = rows_cols(&shape);
                if s.dtype() != Dtype::F32 || s.shape() != [rows] {
                    return Err(bad(format!("scale must be f32 [{rows}]")));
                }
                let scales: Vec<f32> = s
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                v.data()
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| (q as i8) as f32 * scales[i / cols.max(1)])
                    .collect()
            }
            (e, dt) => {
                return Err(bad(format!(
                    "dtype {dt:?} does not match encoding {}",
                    e.as_str()
                )));
            }
        };
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("value {i} is not finite")));
        }
        tensors.push(Tensor {
            name,
            shape,
            values,
        });
    }
    Ok(Update { meta, tensors })
}

/// The update's tensor names are exactly the layout's (both sorted).
fn check_names(names: &[String], layout: &[(String, Vec<usize>)]) -> Result<(), ProtocolError> {
    let want: Vec<&str> = layout.iter().map(|(n, _)| n.as_str()).collect();
    let have: Vec<&str> = names.iter().map(String::as_str).collect();
    if have != want {
        return Err(ProtocolError::Metadata(format!(
            "tensors {have:?} do not match the model's layout {want:?}"
        )));
    }
    Ok(())
}

fn check_shape(
    name: &str,
    shape: &[usize],
    layout: &[(String, Vec<usize>)],
) -> Result<(), ProtocolError> {
    match layout.iter().find(|(n, _)| n == name) {
        Some((_, want)) if want.as_slice() == shape => Ok(()),
        Some((_, want)) => Err(ProtocolError::Tensor {
            name: name.to_string(),
            reason: format!("shape {shape:?}, the model's layout has {want:?}"),
        }),
        None => Err(ProtocolError::Tensor {
            name: name.to_string(),
            reason: "not in the model's layout".into(),
        }),
    }
}

/// The sparse form: `{name}.mask`, `{name}.values`, `{name}.scale` and the
/// dense shapes in metadata, checked against each other.
fn decode_topk8(
    meta: UpdateMeta,
    st: &safetensors::SafeTensors<'_>,
    md: &HashMap<String, String>,
    raw_limit: usize,
    layout: Option<&[(String, Vec<usize>)]>,
) -> Result<Update, ProtocolError> {
    // The dense tensors this decodes to are bounded like a dense payload:
    // a few kilobytes of mask must not expand into gigabytes of f32.
    let mut budget = raw_limit / 4;
    let shapes: HashMap<String, Vec<usize>> = md
        .get("shapes")
        .ok_or_else(|| ProtocolError::Metadata("topk8 update without `shapes`".into()))
        .and_then(|s| {
            serde_json::from_str(s).map_err(|e| ProtocolError::Metadata(format!("shapes: {e}")))
        })?;
    let mut names: Vec<&String> = shapes.keys().collect();
    names.sort();
    if let Some(layout) = layout {
        let owned: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        check_names(&owned, layout)?;
    }
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let bad = |reason: String| ProtocolError::Tensor {
            name: name.clone(),
            reason,
        };
        let shape = shapes[name].clone();
        if let Some(layout) = layout {
            check_shape(name, &shape, layout)?;
        }
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= budget)
            .ok_or_else(|| {
                bad(format!(
                    "shape {shape:?} is too large: the update may decode to at most {raw_limit} bytes"
                ))
            })?;
        budget -= n;
        let part = |suffix: &str, dtype: Dtype| {
            let t = st
                .tensor(&format!("{name}.{suffix}"))
                .map_err(|_| bad(format!("topk8 tensor without its .{suffix}")))?;
            if t.dtype() != dtype {
                return Err(bad(format!(
                    ".{suffix} must be {dtype:?}, not {:?}",
                    t.dtype()
                )));
            }
            Ok(t)
        };
        let mask = part("mask", Dtype::U8)?;
        let values = part("values", Dtype::I8)?;
        let scale = part("scale", Dtype::F32)?;
        if mask.data().len() != n.div_ceil(8) {
            return Err(bad(format!(
                "mask has {} bytes, expected {} for shape {shape:?}",
                mask.data().len(),
                n.div_ceil(8)
            )));
        }
        let Ok(s) = <[u8; 4]>::try_from(scale.data()) else {
            return Err(bad("scale must be one f32".into()));
        };
        let scale = f32::from_le_bytes(s);
        let mut out = vec![0.0f32; n];
        let mut q = values.data().iter();
        for (i, slot) in out.iter_mut().enumerate() {
            if mask.data()[i / 8] & (1 << (i % 8)) != 0 {
                let v = q
                    .next()
                    .ok_or_else(|| bad("the mask selects more entries than .values has".into()))?;
                *slot = (*v as i8) as f32 * scale;
            }
        }
        if q.next().is_some() {
            return Err(bad("the mask selects fewer entries than .values has".into()));
        }
        if n % 8 != 0 && mask.data()[n / 8] >> (n % 8) != 0 {
            return Err(bad("mask bits set beyond the tensor".into()));
        }
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("value {i} is not finite")));
        }
        tensors.push(Tensor {
            name: name.clone(),
            shape,
            values: out,
        });
    }
    Ok(Update { meta, tensors })
}

/// The tensors of a head's params (a delta, usually) in the one layout
/// ([`dai_head::layout`]) the aggregator expects.
pub fn head_tensors(spec: &dai_head::HeadSpec, params: &dai_head::Params) -> Vec<Tensor> {
    dai_head::layout::named(spec, params)
        .into_iter()
        .map(|t| Tensor {
            name: t.name(),
            shape: t.dims(),
            values: t.values.to_vec(),
        })
        .collect()
}

/// `a += b`, tensor by tensor (matched by name; shapes must agree).
pub fn add_into(a: &mut [Tensor], b: &[Tensor]) {
    for t in a.iter_mut() {
        if let Some(o) = b
            .iter()
            .find(|o| o.name == t.name && o.values.len() == t.values.len())
        {
            for (x, y) in t.values.iter_mut().zip(&o.values) {
                *x += y;
            }
        }
    }
}

/// What an encoding lost: `intended - sent` (error feedback: the edge adds
/// it to its next delta, so nothing is dropped for good, only delayed).
pub fn residual(intended: &[Tensor], sent: &[Tensor]) -> Vec<Tensor> {
    intended
        .iter()
        .map(|t| {
            let s = sent.iter().find(|o| o.name == t.name);
            Tensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                values: t
                    .values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v - s.and_then(|o| o.values.get(i)).copied().unwrap_or(0.0))
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
