//! Sample sets for calibration and verification: model inputs (and labels
//! when known) read from a file or made up deterministically.
//!
//! Formats (chosen by the argument):
//! - `random:N[:SEED]`: N synthetic samples. f32 inputs uniform in [-1, 1);
//!   integer inputs named like a mask are 1, other integer inputs (token ids)
//!   uniform in [1000, 5000). No labels.
//! - `*.csv` / `*.csv.gz`: one sample per line, the single f32 input's
//!   values then an integer label (the layout of `models/data/digits.csv.gz`).
//! - `*.safetensors`: one tensor per model input, named like it, samples on
//!   axis 0; an optional integer tensor `labels` of N values.

use crate::ToolError;
use crate::proto;
use crate::runner::InputSpec;
use safetensors::{Dtype, SafeTensors};
use std::io::Read;
use std::path::Path;
use tract_onnx::prelude::*;

/// Model inputs for each sample, in the spec's order, plus labels if known.
pub struct SampleSet {
    pub source: String,
    pub samples: Vec<Vec<Tensor>>,
    pub labels: Option<Vec<i64>>,
}

impl SampleSet {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The first `n` samples (all when fewer).
    pub fn take(&self, n: usize) -> SampleSet {
        SampleSet {
            source: self.source.clone(),
            samples: self.samples.iter().take(n).cloned().collect(),
            labels: self
                .labels
                .as_ref()
                .map(|l| l.iter().take(n).copied().collect()),
        }
    }
}

fn bad(source: &str, message: String) -> ToolError {
    ToolError::Data {
        path: source.to_string(),
        message,
    }
}

/// Load `arg` for a model with these inputs. Each sample has the spec's
/// shape (its axis 0 is the rows of one run, usually 1).
pub fn load(arg: &str, specs: &[InputSpec]) -> Result<SampleSet, ToolError> {
    if let Some(rest) = arg.strip_prefix("random:") {
        let mut parts = rest.split(':');
        let n: usize = parts
            .next()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(arg, "expected random:N[:SEED] with N >= 1".into()))?;
        let seed: u64 = match parts.next() {
            Some(s) => s
                .parse()
                .map_err(|_| bad(arg, format!("seed {s:?} is not an integer")))?,
            None => 17,
        };
        return random(n, seed, specs);
    }
    let path = Path::new(arg);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if name.ends_with(".safetensors") {
        safetensors(path, specs)
    } else if name.ends_with(".csv") || name.ends_with(".csv.gz") {
        csv(path, specs)
    } else {
        Err(bad(
            arg,
            "unknown calibration format: expected random:N[:SEED], a .csv/.csv.gz file or a .safetensors file".into(),
        ))
    }
}

fn random(n: usize, seed: u64, specs: &[InputSpec]) -> Result<SampleSet, ToolError> {
    let mut rng = dai_train::Rng::new(seed);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let mut one = Vec::new();
        for s in specs {
            let count: usize = s.shape.iter().product();
            let mask = s.name.to_ascii_lowercase().contains("mask");
            let t = match s.elem {
                proto::dt::FLOAT => {
                    let v: Vec<f32> = (0..count).map(|_| rng.uniform() * 2.0 - 1.0).collect();
                    Tensor::from_shape(&s.shape, &v)
                }
                proto::dt::INT64 => {
                    let v: Vec<i64> = (0..count)
                        .map(|_| {
                            if mask {
                                1
                            } else {
                                1000 + (rng.next_u64() % 4000) as i64
                            }
                        })
                        .collect();
                    Tensor::from_shape(&s.shape, &v)
                }
                proto::dt::INT32 => {
                    let v: Vec<i32> = (0..count)
                        .map(|_| {
                            if mask {
                                1
                            } else {
                                1000 + (rng.next_u64() % 4000) as i32
                            }
                        })
                        .collect();
                    Tensor::from_shape(&s.shape, &v)
                }
                other => {
                    return Err(ToolError::Unsupported(format!(
                        "random samples for input {:?} of type {}",
                        s.name,
                        proto::dtype_name(other)
                    )));
                }
            };
            one.push(t.map_err(|e| ToolError::Runtime(e.to_string()))?);
        }
        samples.push(one);
    }
    Ok(SampleSet {
        source: format!("random:{n}:{seed}"),
        samples,
        labels: None,
    })
}

fn csv(path: &Path, specs: &[InputSpec]) -> Result<SampleSet, ToolError> {
    let src = path.display().to_string();
    let [spec] = specs else {
        return Err(bad(
            &src,
            format!(
                "CSV samples need a model with one input, this one has {}",
                specs.len()
            ),
        ));
    };
    if spec.elem != proto::dt::FLOAT {
        return Err(bad(
            &src,
            format!("input {:?} is {}, CSV gives f32", spec.name, spec.dtype),
        ));
    }
    let features: usize = spec.shape.iter().product();
    let file = std::fs::File::open(path).map_err(|e| bad(&src, e.to_string()))?;
    let mut text = String::new();
    if src.ends_with(".gz") {
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .map_err(|e| bad(&src, format!("not gzip text: {e}")))?;
    } else {
        std::io::BufReader::new(file)
            .read_to_string(&mut text)
            .map_err(|e| bad(&src, e.to_string()))?;
    }
    let mut samples = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != features + 1 {
            return Err(bad(
                &format!("{src}:{}", i + 1),
                format!(
                    "{} values, expected {features} features for {:?} {:?} and a label",
                    cells.len(),
                    spec.name,
                    spec.shape
                ),
            ));
        }
        let mut v = Vec::with_capacity(features);
        for (c, cell) in cells[..features].iter().enumerate() {
            v.push(cell.trim().parse::<f32>().map_err(|_| {
                bad(
                    &format!("{src}:{}", i + 1),
                    format!("column {}: {cell:?} is not a number", c + 1),
                )
            })?);
        }
        let label = cells[features].trim().parse::<i64>().map_err(|_| {
            bad(
                &format!("{src}:{}", i + 1),
                format!("label {:?} is not an integer", cells[features]),
            )
        })?;
        samples.push(vec![
            Tensor::from_shape(&spec.shape, &v).map_err(|e| ToolError::Runtime(e.to_string()))?,
        ]);
        labels.push(label);
    }
    if samples.is_empty() {
        return Err(bad(&src, "no samples".into()));
    }
    Ok(SampleSet {
        source: src,
        samples,
        labels: Some(labels),
    })
}

fn safetensors(path: &Path, specs: &[InputSpec]) -> Result<SampleSet, ToolError> {
    let src = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| bad(&src, e.to_string()))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| bad(&src, format!("not safetensors: {e}")))?;
    // Every input must hold the same number of samples; the first sets it.
    let mut n = None;
    let mut per_input: Vec<Vec<Tensor>> = Vec::new();
    for spec in specs {
        per_input.push(input_samples(&st, spec, specs, &src, &mut n)?);
    }
    let n = n.unwrap_or(0);
    if n == 0 {
        return Err(bad(&src, "no samples".into()));
    }
    let labels = safetensors_labels(&st, &src, n)?;
    // Stored input by input; a sample is one tensor of each, in spec order.
    let mut samples = vec![Vec::new(); n];
    for list in per_input {
        for (s, t) in list.into_iter().enumerate() {
            samples[s].push(t);
        }
    }
    Ok(SampleSet {
        source: src,
        samples,
        labels,
    })
}

/// The samples of one model input, split along axis 0 of its tensor in
/// `st`; `n` is the sample count the inputs so far agreed on.
fn input_samples(
    st: &SafeTensors,
    spec: &InputSpec,
    specs: &[InputSpec],
    src: &str,
    n: &mut Option<usize>,
) -> Result<Vec<Tensor>, ToolError> {
    let t = st.tensor(&spec.name).map_err(|_| {
        bad(
            src,
            format!(
                "no tensor {:?} (the model's inputs are {:?})",
                spec.name,
                specs.iter().map(|s| &s.name).collect::<Vec<_>>()
            ),
        )
    })?;
    let shape = t.shape();
    let per_sample: usize = spec.shape.iter().product();
    let total: usize = shape.iter().product();
    if shape.is_empty() || !total.is_multiple_of(per_sample) || shape[1..] != spec.shape[1..] {
        return Err(bad(
            &format!("{src}: {}", spec.name),
            format!(
                "shape {shape:?}, expected [N, {:?}...] to match {:?}",
                &spec.shape[1..],
                spec.shape
            ),
        ));
    }
    let count = total / per_sample;
    if *n.get_or_insert(count) != count {
        return Err(bad(
            src,
            format!(
                "{:?} holds {count} samples, other inputs {}",
                spec.name,
                n.unwrap_or(0)
            ),
        ));
    }
    let want = match spec.elem {
        proto::dt::FLOAT => Dtype::F32,
        proto::dt::INT64 => Dtype::I64,
        proto::dt::INT32 => Dtype::I32,
        _ => {
            return Err(ToolError::Unsupported(format!(
                "safetensors samples for input type {}",
                spec.dtype
            )));
        }
    };
    if t.dtype() != want {
        return Err(bad(
            &format!("{src}: {}", spec.name),
            format!("dtype {:?}, the model input is {}", t.dtype(), spec.dtype),
        ));
    }
    let data = t.data();
    let width = proto::dtype_size(spec.elem);
    let mut list = Vec::with_capacity(count);
    for s in 0..count {
        let chunk = &data[s * per_sample * width..(s + 1) * per_sample * width];
        list.push(sample_tensor(spec, chunk)?);
    }
    Ok(list)
}

/// One sample's little-endian bytes as a tensor of the input's shape; the
/// dtype was checked against the input's (f32, i64 or i32) before.
fn sample_tensor(spec: &InputSpec, chunk: &[u8]) -> Result<Tensor, ToolError> {
    let t = match spec.elem {
        proto::dt::FLOAT => {
            let v: Vec<f32> = chunk
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_shape(&spec.shape, &v)
        }
        proto::dt::INT64 => {
            let v: Vec<i64> = chunk
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            Tensor::from_shape(&spec.shape, &v)
        }
        _ => {
            let v: Vec<i32> = chunk
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_shape(&spec.shape, &v)
        }
    };
    t.map_err(|e| ToolError::Runtime(e.to_string()))
}

/// The optional `labels` tensor (i64 or i32, one per sample); `None` when
/// the file has none, so accuracy is not judged.
fn safetensors_labels(
    st: &SafeTensors,
    src: &str,
    n: usize,
) -> Result<Option<Vec<i64>>, ToolError> {
    let Ok(t) = st.tensor("labels") else {
        return Ok(None);
    };
    let v: Vec<i64> = match t.dtype() {
        Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        Dtype::I32 => t
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        d => {
            return Err(bad(
                &format!("{src}: labels"),
                format!("dtype {d:?}, expected i64 or i32"),
            ));
        }
    };
    if v.len() != n {
        return Err(bad(
            &format!("{src}: labels"),
            format!("{} labels for {n} samples", v.len()),
        ));
    }
    Ok(Some(v))
}
