//! `dai-models quantize`: int8 and f16 models in the graph form that tract
//! runs fastest, verified in tract before anything is written.
//!
//! What tract 0.23.9 does with each quantized form was measured on this
//! machine (docs/benchmarks.md, ARCHITECTURE.md):
//! - `QuantizeLinear` with a constant (calibrated) scale -> `MatMulInteger`
//!   (u8 activations x per-column i8 weights) -> `Cast` -> `Mul` by the
//!   folded scale runs on tract's int8 kernels: MiniLM-L3 2x faster than f32.
//!   That is mode `int8` for MatMul and Gemm.
//! - Every integer form of a convolution (QLinearConv, ConvInteger, QDQ) is
//!   2-10x SLOWER than f32 in tract (no fast int8 depthwise or im2col path),
//!   and QLinearAdd & co are not supported at all. So convolutions keep f32
//!   compute with int8 weights: `Cast(int8) * scale` on a constant, which
//!   tract folds at load (same speed, 4x smaller file).
//! - Embedding tables (`Gather` on a constant) become int8 rows with a
//!   per-row scale gathered alongside, so they stay int8 in memory too.
//! - Mode `int8-weights` uses the weight-only form everywhere (the file is
//!   4x smaller, the speed is f32's); mode `f16` stores float constants as
//!   f16 with a `Cast` (2x smaller).
//!
//! Activation ranges come from a calibration set run through tract (min/max
//! or percentiles). The result is run against the f32 model on a
//! verification set; beyond the tolerance (or the accuracy limit, with
//! labels) the model is refused with the report, and nothing is written.

use crate::ToolError;
use crate::calib::SampleSet;
use crate::progress::Progress;
use crate::proto::{self, Names, dt};
use crate::runner::{self, InputSpec, Runner};
use prost::Message;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use tract_onnx::pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Integer MatMul/Gemm compute; int8 weights for Conv and embeddings.
    Int8,
    /// int8 weights everywhere, f32 compute.
    Int8Weights,
    /// f16 weights, f32 compute.
    F16,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "int8" => Ok(Mode::Int8),
            "int8-weights" => Ok(Mode::Int8Weights),
            "f16" => Ok(Mode::F16),
            _ => Err(format!("--mode {s:?}: expected int8, int8-weights or f16")),
        }
    }
}

impl Mode {
    pub fn suffix(self) -> &'static str {
        match self {
            Mode::Int8 => "int8",
            Mode::Int8Weights => "int8w",
            Mode::F16 => "f16",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Calibration {
    MinMax,
    /// Clip the activation range to this percentile (e.g. 99.99) of values.
    Percentile(f64),
}

impl std::str::FromStr for Calibration {
    type Err = String;
    fn from_str(s: &str) -> Result<Calibration, String> {
        match s.split_once(':') {
            None if s == "minmax" => Ok(Calibration::MinMax),
            None if s == "percentile" => Ok(Calibration::Percentile(99.99)),
            Some(("percentile", p)) => match p.parse::<f64>() {
                Ok(p) if p > 50.0 && p <= 100.0 => Ok(Calibration::Percentile(p)),
                _ => Err(format!(
                    "--method {s:?}: the percentile must be in (50, 100]"
                )),
            },
            _ => Err(format!(
                "--method {s:?}: expected minmax, percentile or percentile:P (e.g. percentile:99.9)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub mode: Mode,
    pub calibration: Calibration,
    pub per_channel: bool,
    /// Largest allowed |quantized - f32| on any checked output. When None:
    /// 0.05 without labels; with labels only the accuracy limit applies
    /// (the deviation is still reported).
    pub tolerance: Option<f32>,
    /// MatMul/Gemm weights with fewer values than this keep f32 compute
    /// (int8 weights): below it the quantize/cast/rescale nodes cost more
    /// than the integer product saves (measured: the digits MLP).
    pub min_int8_params: usize,
    /// Keep value and node names (else internal names are shortened, which
    /// matters for small models).
    pub keep_names: bool,
    /// SmoothQuant migration strength for integer matmuls (0: off).
    pub smooth: f32,
    /// A bundle's head, for accuracy where the file is only the backbone.
    pub head: Option<HeadCheck>,
    /// Largest allowed accuracy drop in points (with labels).
    pub max_accuracy_drop: f64,
    /// Node names to keep in f32.
    pub exclude: Vec<String>,
    /// Outputs to check (all float graph outputs when empty).
    pub check_outputs: Vec<String>,
    /// Time this many runs of each model in tract (0: skip).
    pub bench_runs: usize,
    /// Load with tract's ignore_value_info (as the bundle says).
    pub ignore_value_info: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputCheck {
    pub name: String,
    pub max_abs_diff: f32,
    pub mean_abs_diff: f32,
    /// Largest |value| of the f32 output, for scale.
    pub ref_max_abs: f32,
    pub within_tolerance: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuantReport {
    pub mode: Mode,
    pub calibration: Option<String>,
    pub calibration_samples: usize,
    pub verification_samples: usize,
    pub verification_source: String,
    /// Rewritten nodes by kind ("MatMul int8 compute", "Conv int8 weights"...).
    pub rewritten: BTreeMap<String, usize>,
    pub skipped: Vec<String>,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub size_ratio: f64,
    pub outputs: Vec<OutputCheck>,
    pub tolerance: f32,
    pub accuracy_f32: Option<f64>,
    pub accuracy_quantized: Option<f64>,
    pub max_accuracy_drop: f64,
    pub latency_f32_ms: Option<f64>,
    pub latency_quantized_ms: Option<f64>,
    pub speedup: Option<f64>,
    pub accepted: bool,
    pub refusal: Vec<String>,
}

/// What to do with one node.
enum Plan {
    /// int8 x int8 matmul with a calibrated activation scale.
    IntMatMul {
        x: String,
        /// Weights as [K, N] row-major.
        w: Vec<f32>,
        k: usize,
        n: usize,
        alpha: f32,
        bias: Option<Box<pb::TensorProto>>,
        kind: &'static str,
    },
    /// Replace input `input` by int8 weights with scales along `axis`.
    WeightOnly {
        input: usize,
        axis: usize,
        kind: &'static str,
    },
    /// Embedding rows in int8 with per-row scales.
    GatherRows,
    /// Other large float constants (LSTM/GRU weights...): (input, axis) each
    /// given as int8 weights, f32 compute.
    Constants(Vec<(usize, usize)>),
}

fn float_const<'a>(
    consts: &'a HashMap<String, &pb::TensorProto>,
    name: &str,
) -> Option<(&'a pb::TensorProto, Vec<f32>)> {
    let t = consts.get(name)?;
    if !matches!(t.data_type, dt::FLOAT | dt::DOUBLE | dt::FLOAT16) {
        return None;
    }
    proto::to_f32(t).map(|v| (*t, v))
}

fn plan_nodes(
    model: &pb::ModelProto,
    opts: &QuantizeOptions,
    skipped: &mut Vec<String>,
) -> HashMap<usize, Plan> {
    let g = proto::graph(model);
    let consts = proto::constants(g);
    let int_ok = proto::opset(model) >= 10;
    let mut plans = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        if opts.exclude.iter().any(|e| e == &n.name) {
            skipped.push(format!("{} {:?}: excluded", n.op_type, n.name));
            continue;
        }
        let input = |k: usize| n.input.get(k).map(String::as_str).unwrap_or("");
        match n.op_type.as_str() {
            "MatMul" => {
                let Some((t, w)) = float_const(&consts, input(1)) else {
                    continue;
                };
                if t.dims.len() != 2 || consts.contains_key(input(0)) {
                    continue;
                }
                let (k, nn) = (t.dims[0] as usize, t.dims[1] as usize);
                if opts.mode == Mode::Int8 && int_ok && k * nn >= opts.min_int8_params {
                    plans.insert(
                        i,
                        Plan::IntMatMul {
                            x: input(0).to_string(),
                            w,
                            k,
                            n: nn,
                            alpha: 1.0,
                            bias: None,
                            kind: "MatMul int8 compute",
                        },
                    );
                } else {
                    plans.insert(
                        i,
                        Plan::WeightOnly {
                            input: 1,
                            axis: 1,
                            kind: "MatMul int8 weights",
                        },
                    );
                }
            }
            "Gemm" => {
                let Some((t, w)) = float_const(&consts, input(1)) else {
                    continue;
                };
                if t.dims.len() != 2 {
                    continue;
                }
                let trans_a = proto::get_int(n, "transA").unwrap_or(0) != 0;
                let trans_b = proto::get_int(n, "transB").unwrap_or(0) != 0;
                let alpha = proto::get_float(n, "alpha").unwrap_or(1.0);
                let beta = proto::get_float(n, "beta").unwrap_or(1.0);
                let c = if input(2).is_empty() {
                    Some(None)
                } else {
                    float_const(&consts, input(2)).map(|(t, v)| {
                        let v: Vec<f32> = v.iter().map(|x| x * beta).collect();
                        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                        Some(Box::new(proto::f32_tensor("", &shape, &v)))
                    })
                };
                let (r0, r1) = (t.dims[0] as usize, t.dims[1] as usize);
                if opts.mode == Mode::Int8
                    && int_ok
                    && !trans_a
                    && c.is_some()
                    && r0 * r1 >= opts.min_int8_params
                {
                    let (k, nn, w) = if trans_b {
                        let mut wt = vec![0.0; r0 * r1];
                        for a in 0..r0 {
                            for b in 0..r1 {
                                wt[b * r0 + a] = w[a * r1 + b];
                            }
                        }
                        (r1, r0, wt)
                    } else {
                        (r0, r1, w)
                    };
                    plans.insert(
                        i,
                        Plan::IntMatMul {
                            x: input(0).to_string(),
                            w,
                            k,
                            n: nn,
                            alpha,
                            bias: c.flatten(),
                            kind: "Gemm int8 compute",
                        },
                    );
                } else {
                    let axis = if trans_b { 0 } else { 1 };
                    plans.insert(
                        i,
                        Plan::WeightOnly {
                            input: 1,
                            axis,
                            kind: "Gemm int8 weights",
                        },
                    );
                }
            }
            "Conv" if float_const(&consts, input(1)).is_some() => {
                plans.insert(
                    i,
                    Plan::WeightOnly {
                        input: 1,
                        axis: 0,
                        kind: "Conv int8 weights",
                    },
                );
            }
            "Gather" => {
                let Some((t, _)) = float_const(&consts, input(0)) else {
                    continue;
                };
                if t.dims.len() == 2
                    && proto::get_int(n, "axis").unwrap_or(0) == 0
                    && proto::numel(&t.dims) >= 1024
                {
                    plans.insert(i, Plan::GatherRows);
                }
            }
            _ => {}
        }
        if plans.contains_key(&i)
            || matches!(
                n.op_type.as_str(),
                "Reshape" | "Shape" | "ConstantOfShape" | "Constant"
            )
        {
            continue;
        }
        // Anything else holding a large float constant (recurrent weights,
        // attention tables): int8 storage, f32 compute.
        let list: Vec<(usize, usize)> = n
            .input
            .iter()
            .enumerate()
            .filter_map(|(k, name)| {
                let t = consts.get(name.as_str())?;
                let big = matches!(t.data_type, dt::FLOAT | dt::DOUBLE | dt::FLOAT16)
                    && proto::numel(&t.dims) >= 1024;
                // Scales along the first axis longer than 1 (an LSTM's
                // [directions, 4 * hidden, inputs] -> axis 1).
                big.then(|| (k, t.dims.iter().position(|&d| d > 1).unwrap_or(0)))
            })
            .collect();
        if !list.is_empty() {
            plans.insert(i, Plan::Constants(list));
        }
    }
    plans
}

/// Fold each `BatchNormalization` that follows a `Conv` with constant
/// weights into that Conv (exact in f32: W' = W * g / sqrt(v + e) per output
/// channel, b' = (b - m) * g / sqrt(v + e) + beta). Inference graphs exported
/// from training frameworks keep BN separate; folded, its parameters vanish
/// and the Conv's weights carry them into quantization.
pub fn fold_batchnorm(model: &pb::ModelProto) -> (pb::ModelProto, usize) {
    let mut out = model.clone();
    let g = proto::graph(model);
    let consts = proto::constants(g);
    let mut consumers: HashMap<&str, usize> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            *consumers.entry(i.as_str()).or_insert(0) += 1;
        }
    }
    let outputs: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let producer: HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut names = Names::of(g);
    let mut replace: HashMap<usize, pb::NodeProto> = HashMap::new();
    let mut drop: HashSet<usize> = HashSet::new();
    let mut inits = Vec::new();
    for (bi, bn) in g.node.iter().enumerate() {
        if bn.op_type != "BatchNormalization" || bn.output.len() != 1 || bn.input.len() != 5 {
            continue;
        }
        let x = bn.input[0].as_str();
        let Some(&ci) = producer.get(x) else { continue };
        let conv = &g.node[ci];
        if conv.op_type != "Conv"
            || consumers.get(x) != Some(&1)
            || outputs.contains(x)
            || replace.contains_key(&ci)
        {
            continue;
        }
        let get = |k: usize| {
            bn.input
                .get(k)
                .and_then(|n| consts.get(n))
                .and_then(|t| proto::to_f32(t))
        };
        let (Some(gamma), Some(beta), Some(mean), Some(var)) = (get(1), get(2), get(3), get(4))
        else {
            continue;
        };
        let Some(wt) = conv.input.get(1).and_then(|n| consts.get(n)) else {
            continue;
        };
        let Some(w) = proto::to_f32(wt) else { continue };
        let c = wt.dims.first().copied().unwrap_or(0) as usize;
        if c == 0 || gamma.len() != c || beta.len() != c || mean.len() != c || var.len() != c {
            continue;
        }
        let bias = match conv.input.get(2).filter(|n| !n.is_empty()) {
            Some(name) => match consts.get(name).and_then(|t| proto::to_f32(t)) {
                Some(b) if b.len() == c => b,
                _ => continue,
            },
            None => vec![0.0; c],
        };
        let eps = proto::get_float(bn, "epsilon").unwrap_or(1e-5);
        let k: Vec<f32> = (0..c).map(|j| gamma[j] / (var[j] + eps).sqrt()).collect();
        let per = w.len() / c;
        let w2: Vec<f32> = w.iter().enumerate().map(|(i, v)| v * k[i / per]).collect();
        let b2: Vec<f32> = (0..c)
            .map(|j| (bias[j] - mean[j]) * k[j] + beta[j])
            .collect();
        let base = sanitize(if conv.name.is_empty() {
            &conv.output[0]
        } else {
            &conv.name
        });
        let w_name = names.fresh(&format!("{base}_weight_bn"));
        let b_name = names.fresh(&format!("{base}_bias_bn"));
        let dims: Vec<usize> = wt.dims.iter().map(|&d| d as usize).collect();
        inits.push(proto::f32_tensor(&w_name, &dims, &w2));
        inits.push(proto::f32_tensor(&b_name, &[c], &b2));
        let mut folded = conv.clone();
        folded.input.truncate(1);
        folded.input.push(w_name);
        folded.input.push(b_name);
        folded.output = vec![bn.output[0].clone()];
        replace.insert(ci, folded);
        drop.insert(bi);
    }
    let count = drop.len();
    if let Some(og) = out.graph.as_mut() {
        og.node = g
            .node
            .iter()
            .enumerate()
            .filter(|(i, _)| !drop.contains(i))
            .map(|(i, n)| replace.remove(&i).unwrap_or_else(|| n.clone()))
            .collect();
        og.initializer.extend(inits);
    }
    prune_unused(&mut out);
    (out, count)
}

/// Symmetric int8 values of `w` with one scale per index of `axis` (or one
/// for all when `per_channel` is off). Returns (values, scales).
fn quantize_weights(
    w: &[f32],
    dims: &[usize],
    axis: usize,
    per_channel: bool,
) -> (Vec<i8>, Vec<f32>) {
    let channels = if per_channel { dims[axis] } else { 1 };
    let inner: usize = dims[axis + 1..].iter().product();
    let chan = |i: usize| {
        if per_channel {
            (i / inner) % dims[axis]
        } else {
            0
        }
    };
    let mut max = vec![0.0f32; channels];
    for (i, v) in w.iter().enumerate() {
        let c = chan(i);
        max[c] = max[c].max(v.abs());
    }
    let scales: Vec<f32> = max
        .iter()
        .map(|m| if *m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let q = w
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[chan(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (q, scales)
}

/// For a 2-D weight, the scale axis (rows or columns) whose int8 copy has
/// the smaller error relative to each value's row and column magnitude.
/// Output channels are the usual choice, but a first layer with input
/// standardisation folded in (imu-anomaly: W / sd) has columns of very
/// different magnitude, and per-row scales zero its small columns.
fn best_axis_2d(w: &[f32], dims: &[usize], preferred: usize) -> usize {
    let (r, c) = (dims[0], dims[1]);
    let mut row_max = vec![0.0f32; r];
    let mut col_max = vec![0.0f32; c];
    for i in 0..r {
        for j in 0..c {
            let v = w[i * c + j].abs();
            row_max[i] = row_max[i].max(v);
            col_max[j] = col_max[j].max(v);
        }
    }
    let error = |axis: usize| -> f64 {
        let (q, s) = quantize_weights(w, dims, axis, true);
        let mut e = 0.0f64;
        for i in 0..r {
            for j in 0..c {
                let scale = if axis == 0 { s[i] } else { s[j] };
                let d = (w[i * c + j] - q[i * c + j] as f32 * scale) as f64;
                let (rm, cm) = (row_max[i].max(1e-12) as f64, col_max[j].max(1e-12) as f64);
                e += (d / rm).powi(2) + (d / cm).powi(2);
            }
        }
        e
    };
    let other = 1 - preferred;
    if error(other) < error(preferred) * 0.5 {
        other
    } else {
        preferred
    }
}

/// Activation range per tensor from calibration runs.
struct Range {
    lo: f32,
    hi: f32,
    /// Per channel of the last axis (for smoothing).
    ch_lo: Vec<f32>,
    ch_hi: Vec<f32>,
    /// A strided sample of values, for percentiles.
    sample: Vec<f32>,
}

/// A calibrated activation: its range and its per-channel (last axis) ranges.
#[derive(Debug, Clone)]
pub struct ActRange {
    pub lo: f32,
    pub hi: f32,
    pub ch_lo: Vec<f32>,
    pub ch_hi: Vec<f32>,
}

const SAMPLE_CAP: usize = 400_000;

fn calibrate(
    model: &pb::ModelProto,
    specs: &[InputSpec],
    names: &[String],
    set: &SampleSet,
    opts: &QuantizeOptions,
) -> Result<HashMap<String, ActRange>, ToolError> {
    let runner = Runner::new(model, specs, opts.ignore_value_info, Some(names))?;
    let mut ranges: Vec<Range> = names
        .iter()
        .map(|_| Range {
            lo: f32::INFINITY,
            hi: f32::NEG_INFINITY,
            ch_lo: Vec::new(),
            ch_hi: Vec::new(),
            sample: Vec::new(),
        })
        .collect();
    let mut bar = Progress::new("calibrating", set.len());
    for sample in &set.samples {
        let outs = runner.run(sample)?;
        for (r, t) in ranges.iter_mut().zip(&outs) {
            let v = runner::values_f32(t)?;
            let channels = t.shape().last().copied().unwrap_or(1).max(1);
            if r.ch_lo.len() != channels {
                r.ch_lo = vec![f32::INFINITY; channels];
                r.ch_hi = vec![f32::NEG_INFINITY; channels];
            }
            for (i, &x) in v.iter().enumerate() {
                if x.is_finite() {
                    r.lo = r.lo.min(x);
                    r.hi = r.hi.max(x);
                    let c = i % channels;
                    r.ch_lo[c] = r.ch_lo[c].min(x);
                    r.ch_hi[c] = r.ch_hi[c].max(x);
                }
            }
            if let Calibration::Percentile(_) = opts.calibration {
                let stride = (v.len() * set.len() / SAMPLE_CAP).max(1);
                r.sample
                    .extend(v.iter().step_by(stride).filter(|x| x.is_finite()));
            }
        }
        bar.inc();
    }
    bar.finish();
    let mut out = HashMap::new();
    for (name, mut r) in names.iter().zip(ranges) {
        if !r.lo.is_finite() {
            return Err(ToolError::Verify(format!(
                "calibration: activation {name:?} held no finite value"
            )));
        }
        if let Calibration::Percentile(p) = opts.calibration
            && r.sample.len() > 100
        {
            r.sample.sort_by(f32::total_cmp);
            let at = |q: f64| r.sample[((r.sample.len() - 1) as f64 * q).round() as usize];
            r.lo = at(1.0 - p / 100.0);
            r.hi = at(p / 100.0);
        }
        out.insert(
            name.clone(),
            ActRange {
                lo: r.lo.min(0.0),
                hi: r.hi.max(0.0),
                ch_lo: r
                    .ch_lo
                    .iter()
                    .map(|v| if v.is_finite() { v.min(0.0) } else { 0.0 })
                    .collect(),
                ch_hi: r
                    .ch_hi
                    .iter()
                    .map(|v| if v.is_finite() { v.max(0.0) } else { 0.0 })
                    .collect(),
            },
        );
    }
    Ok(out)
}

/// SmoothQuant-style factors: for each calibrated activation feeding integer
/// matmuls, s_j = max|x_j|^a / max|W_j.|^(1-a) over its consumers' weight
/// rows. x / s is quantized and W rows are multiplied by s, which moves the
/// outlier channels of transformer activations into the weights. Returns
/// the factors and the ranges of x / s.
fn smoothing(
    plans: &HashMap<usize, Plan>,
    ranges: &HashMap<String, ActRange>,
    alpha: f32,
) -> (HashMap<String, Vec<f32>>, HashMap<String, ActRange>) {
    let mut wmax: HashMap<String, Vec<f32>> = HashMap::new();
    for p in plans.values() {
        if let Plan::IntMatMul { x, w, k, n, .. } = p {
            let e = wmax.entry(x.clone()).or_insert_with(|| vec![0.0; *k]);
            if e.len() != *k {
                continue;
            }
            for j in 0..*k {
                for c in 0..*n {
                    e[j] = e[j].max(w[j * n + c].abs());
                }
            }
        }
    }
    let mut factors = HashMap::new();
    let mut adjusted = ranges.clone();
    for (x, wm) in wmax {
        let Some(r) = ranges.get(&x) else { continue };
        if r.ch_lo.len() != wm.len() {
            continue;
        }
        let s: Vec<f32> = (0..wm.len())
            .map(|j| {
                let a = r.ch_lo[j].abs().max(r.ch_hi[j].abs());
                if a <= 0.0 || wm[j] <= 0.0 {
                    1.0
                } else {
                    (a.powf(alpha) / wm[j].powf(1.0 - alpha)).clamp(1e-4, 1e4)
                }
            })
            .collect();
        let lo = (0..s.len())
            .map(|j| r.ch_lo[j] / s[j])
            .fold(0.0f32, f32::min);
        let hi = (0..s.len())
            .map(|j| r.ch_hi[j] / s[j])
            .fold(0.0f32, f32::max);
        if let Some(a) = adjusted.get_mut(&x) {
            a.lo = lo;
            a.hi = hi;
        }
        factors.insert(x, s);
    }
    (factors, adjusted)
}

/// u8 scale and zero point covering [lo, hi] (which contains 0).
fn activation_params(lo: f32, hi: f32) -> (f32, u8) {
    let scale = ((hi - lo) / 255.0).max(1e-8);
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// Where the rewrite puts new nodes and initializers, and the weights
/// already given an int8 copy (shared weights are stored once).
struct Emit<'a> {
    names: &'a mut Names,
    nodes: &'a mut Vec<pb::NodeProto>,
    inits: &'a mut Vec<pb::TensorProto>,
    cache: &'a mut HashMap<(String, usize), String>,
}

impl Emit<'_> {
    /// The name of an f32 value computed as `Cast(int8 copy) * scales` of
    /// constant `src` (scales along `axis`); tract folds it at load.
    fn dequantized(
        &mut self,
        consts: &HashMap<String, &pb::TensorProto>,
        src: &str,
        axis: usize,
        per_channel: bool,
    ) -> Option<String> {
        let t = consts.get(src)?;
        if let Some(f) = self.cache.get(&(src.to_string(), axis)) {
            return Some(f.clone());
        }
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let w = proto::to_f32(t)?;
        let axis = if dims.is_empty() {
            return None;
        } else if per_channel && dims.len() == 2 {
            best_axis_2d(&w, &dims, axis)
        } else {
            axis.min(dims.len() - 1)
        };
        let (q, s) = quantize_weights(&w, &dims, axis, per_channel);
        let base = sanitize(src);
        let q_name = self.names.fresh(&format!("{base}_int8"));
        let s_name = self.names.fresh(&format!("{base}_scale"));
        let c_name = self.names.fresh(&format!("{base}_cast"));
        let f_name = self.names.fresh(&format!("{base}_dequantized"));
        self.inits.push(proto::i8_tensor(&q_name, &dims, &q));
        let mut s_dims = vec![1usize; dims.len()];
        if s.len() > 1 {
            s_dims[axis] = s.len();
        }
        self.inits.push(proto::f32_tensor(&s_name, &s_dims, &s));
        let cast = self.names.fresh(&format!("{base}_to_f32"));
        self.nodes.push(proto::node(
            "Cast",
            &cast,
            &[&q_name],
            &[&c_name],
            vec![proto::attr_int("to", dt::FLOAT as i64)],
        ));
        let mul = self.names.fresh(&format!("{base}_dequantize"));
        self.nodes.push(proto::node(
            "Mul",
            &mul,
            &[&c_name, &s_name],
            &[&f_name],
            vec![],
        ));
        self.cache.insert((src.to_string(), axis), f_name.clone());
        Some(f_name)
    }
}

/// Rewrite the graph. `ranges` holds activation ranges (int8 mode).
fn rewrite(
    model: &pb::ModelProto,
    plans: &HashMap<usize, Plan>,
    ranges: &HashMap<String, ActRange>,
    smooth: &HashMap<String, Vec<f32>>,
    opts: &QuantizeOptions,
    rewritten: &mut BTreeMap<String, usize>,
) -> pb::ModelProto {
    let mut out = model.clone();
    let g = proto::graph(model);
    let consts = proto::constants(g);
    let mut names = Names::of(g);
    let mut nodes: Vec<pb::NodeProto> = Vec::new();
    let mut inits: Vec<pb::TensorProto> = Vec::new();
    // Activation -> (quantized name, zero-point name, scale).
    let mut quantized_acts: HashMap<String, (String, String, f32)> = HashMap::new();
    // (constant, axis) -> f32 name of its dequantized copy.
    let mut weight_only: HashMap<(String, usize), String> = HashMap::new();
    let mut gather_tables: HashMap<String, (String, String)> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        match plans.get(&i) {
            Some(Plan::IntMatMul {
                x,
                w,
                k,
                n: cols,
                alpha,
                bias,
                kind,
            }) => {
                let Some(r) = ranges.get(x) else {
                    nodes.push(n.clone());
                    continue;
                };
                let (lo, hi) = (r.lo, r.hi);
                let factors = smooth.get(x).filter(|f| f.len() == *k);
                let (xq, zx, sx) = quantized_acts
                    .entry(x.clone())
                    .or_insert_with(|| {
                        let (sx, zp) = activation_params(lo, hi);
                        let base = sanitize(x);
                        let s_name = names.fresh(&format!("{base}_scale"));
                        let z_name = names.fresh(&format!("{base}_zero_point"));
                        let q_name = names.fresh(&format!("{base}_quantized"));
                        inits.push(proto::f32_tensor(&s_name, &[], &[sx]));
                        inits.push(proto::u8_tensor(&z_name, &[], &[zp]));
                        let source = match factors {
                            Some(f) => {
                                let inv: Vec<f32> = f.iter().map(|v| 1.0 / v).collect();
                                let inv_name = names.fresh(&format!("{base}_smooth"));
                                let xs = names.fresh(&format!("{base}_smoothed"));
                                inits.push(proto::f32_tensor(&inv_name, &[inv.len()], &inv));
                                nodes.push(proto::node(
                                    "Mul",
                                    &names.fresh(&format!("{base}_smooth_mul")),
                                    &[x, &inv_name],
                                    &[&xs],
                                    vec![],
                                ));
                                xs
                            }
                            None => x.clone(),
                        };
                        nodes.push(proto::node(
                            "QuantizeLinear",
                            &names.fresh(&format!("{base}_quantize")),
                            &[&source, &s_name, &z_name],
                            &[&q_name],
                            vec![],
                        ));
                        (q_name, z_name, sx)
                    })
                    .clone();
                let smoothed: Vec<f32>;
                let w = match factors {
                    Some(f) => {
                        smoothed = w.iter().enumerate().map(|(i, v)| v * f[i / cols]).collect();
                        &smoothed
                    }
                    None => w,
                };
                let (wq, sw) = quantize_weights(w, &[*k, *cols], 1, opts.per_channel);
                let sw: Vec<f32> = if sw.len() == 1 {
                    vec![sw[0]; *cols]
                } else {
                    sw
                };
                let base = sanitize(if n.name.is_empty() {
                    &n.output[0]
                } else {
                    &n.name
                });
                let w_name = names.fresh(&format!("{base}_weight_int8"));
                let s_name = names.fresh(&format!("{base}_output_scale"));
                inits.push(proto::i8_tensor(&w_name, &[*k, *cols], &wq));
                let out_scale: Vec<f32> = sw.iter().map(|s| s * sx * alpha).collect();
                inits.push(proto::f32_tensor(&s_name, &[*cols], &out_scale));
                let acc = names.fresh(&format!("{base}_acc"));
                let accf = names.fresh(&format!("{base}_acc_f32"));
                nodes.push(proto::node(
                    "MatMulInteger",
                    &names.fresh(&format!("{base}_matmul_int8")),
                    &[&xq, &w_name, &zx],
                    &[&acc],
                    vec![],
                ));
                nodes.push(proto::node(
                    "Cast",
                    &names.fresh(&format!("{base}_cast")),
                    &[&acc],
                    &[&accf],
                    vec![proto::attr_int("to", dt::FLOAT as i64)],
                ));
                let y = &n.output[0];
                match bias {
                    Some(b) => {
                        let scaled = names.fresh(&format!("{base}_scaled"));
                        let b_name = names.fresh(&format!("{base}_bias"));
                        let mut b = (**b).clone();
                        b.name = b_name.clone();
                        inits.push(b);
                        nodes.push(proto::node(
                            "Mul",
                            &names.fresh(&format!("{base}_rescale")),
                            &[&accf, &s_name],
                            &[&scaled],
                            vec![],
                        ));
                        nodes.push(proto::node(
                            "Add",
                            &names.fresh(&format!("{base}_add_bias")),
                            &[&scaled, &b_name],
                            &[y],
                            vec![],
                        ));
                    }
                    None => {
                        nodes.push(proto::node(
                            "Mul",
                            &names.fresh(&format!("{base}_rescale")),
                            &[&accf, &s_name],
                            &[y],
                            vec![],
                        ));
                    }
                }
                *rewritten.entry((*kind).to_string()).or_insert(0) += 1;
            }
            Some(Plan::WeightOnly { input, axis, kind }) => {
                let mut m = n.clone();
                let mut ctx = Emit {
                    names: &mut names,
                    nodes: &mut nodes,
                    inits: &mut inits,
                    cache: &mut weight_only,
                };
                if let Some(f) = ctx.dequantized(&consts, &n.input[*input], *axis, opts.per_channel)
                {
                    m.input[*input] = f;
                    *rewritten.entry((*kind).to_string()).or_insert(0) += 1;
                }
                nodes.push(m);
            }
            Some(Plan::Constants(list)) => {
                let mut m = n.clone();
                let mut ctx = Emit {
                    names: &mut names,
                    nodes: &mut nodes,
                    inits: &mut inits,
                    cache: &mut weight_only,
                };
                for &(input, axis) in list {
                    if let Some(f) =
                        ctx.dequantized(&consts, &n.input[input], axis, opts.per_channel)
                    {
                        m.input[input] = f;
                        *rewritten
                            .entry(format!("{} int8 constants", n.op_type))
                            .or_insert(0) += 1;
                    }
                }
                nodes.push(m);
            }
            Some(Plan::GatherRows) => {
                let src = n.input[0].clone();
                let Some(t) = consts.get(&src) else {
                    nodes.push(n.clone());
                    continue;
                };
                let (q_name, s_name) = gather_tables
                    .entry(src.clone())
                    .or_insert_with(|| {
                        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                        let w = proto::to_f32(t).unwrap_or_default();
                        let (q, s) = quantize_weights(&w, &dims, 0, true);
                        let base = sanitize(&src);
                        let q_name = names.fresh(&format!("{base}_int8"));
                        let s_name = names.fresh(&format!("{base}_row_scale"));
                        inits.push(proto::i8_tensor(&q_name, &dims, &q));
                        inits.push(proto::f32_tensor(&s_name, &[dims[0], 1], &s));
                        (q_name, s_name)
                    })
                    .clone();
                let base = sanitize(if n.name.is_empty() {
                    &n.output[0]
                } else {
                    &n.name
                });
                let ids = &n.input[1];
                let rows = names.fresh(&format!("{base}_rows_int8"));
                let scales = names.fresh(&format!("{base}_row_scales"));
                let rows_f = names.fresh(&format!("{base}_rows_f32"));
                nodes.push(proto::node(
                    "Gather",
                    &names.fresh(&format!("{base}_gather_int8")),
                    &[&q_name, ids],
                    &[&rows],
                    vec![],
                ));
                nodes.push(proto::node(
                    "Gather",
                    &names.fresh(&format!("{base}_gather_scale")),
                    &[&s_name, ids],
                    &[&scales],
                    vec![],
                ));
                nodes.push(proto::node(
                    "Cast",
                    &names.fresh(&format!("{base}_cast")),
                    &[&rows],
                    &[&rows_f],
                    vec![proto::attr_int("to", dt::FLOAT as i64)],
                ));
                nodes.push(proto::node(
                    "Mul",
                    &names.fresh(&format!("{base}_dequantize")),
                    &[&rows_f, &scales],
                    &[&n.output[0]],
                    vec![],
                ));
                *rewritten.entry("Gather int8 rows".to_string()).or_insert(0) += 1;
            }
            None => nodes.push(n.clone()),
        }
    }
    if let Some(og) = out.graph.as_mut() {
        og.node = nodes;
        og.initializer.extend(inits);
    }
    out
}

/// f16 storage of every float constant with at least 16 values.
fn to_f16(model: &pb::ModelProto, rewritten: &mut BTreeMap<String, usize>) -> pb::ModelProto {
    let mut out = model.clone();
    let Some(g) = out.graph.as_mut() else {
        return out;
    };
    let mut names = Names::of(g);
    let mut casts = Vec::new();
    let mut inits = Vec::new();
    for t in g.initializer.iter_mut() {
        if t.data_type == dt::FLOAT
            && proto::numel(&t.dims) >= 16
            && let Some(v) = proto::to_f32(t)
        {
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let h = names.fresh(&format!("{}_f16", sanitize(&t.name)));
            inits.push(proto::f16_tensor(&h, &dims, &v));
            casts.push(proto::node(
                "Cast",
                &names.fresh(&format!("{}_to_f32", sanitize(&t.name))),
                &[&h],
                &[&t.name],
                vec![proto::attr_int("to", dt::FLOAT as i64)],
            ));
            t.name.clear(); // dropped below
            *rewritten.entry("initializer f16".into()).or_insert(0) += 1;
        }
    }
    g.initializer.retain(|t| !t.name.is_empty());
    let mut nodes = Vec::new();
    for n in std::mem::take(&mut g.node) {
        let value = n
            .attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref());
        if n.op_type == "Constant"
            && let Some(t) = value
            && t.data_type == dt::FLOAT
            && proto::numel(&t.dims) >= 16
            && let Some(v) = proto::to_f32(t)
        {
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let h = names.fresh(&format!("{}_f16", sanitize(&n.output[0])));
            inits.push(proto::f16_tensor(&h, &dims, &v));
            nodes.push(proto::node(
                "Cast",
                &n.name,
                &[&h],
                &[&n.output[0]],
                vec![proto::attr_int("to", dt::FLOAT as i64)],
            ));
            *rewritten.entry("Constant f16".into()).or_insert(0) += 1;
            continue;
        }
        nodes.push(n);
    }
    casts.extend(nodes);
    g.node = casts;
    g.initializer.extend(inits);
    out
}

/// Short names for every internal value (graph inputs and outputs keep
/// theirs) and no node names: in small models the names are a large part of
/// the file (digits: a third).
pub fn minify_names(model: &mut pb::ModelProto) {
    let Some(g) = model.graph.as_mut() else {
        return;
    };
    let keep: HashSet<String> = g
        .input
        .iter()
        .map(|i| i.name.clone())
        .chain(g.output.iter().map(|o| o.name.clone()))
        .collect();
    let mut map: HashMap<String, String> = HashMap::new();
    let mut next = 0usize;
    let mut short = |old: &str, map: &mut HashMap<String, String>| -> String {
        if old.is_empty() || keep.contains(old) {
            return old.to_string();
        }
        map.entry(old.to_string())
            .or_insert_with(|| {
                let mut n = next;
                next += 1;
                let mut s = String::from("_");
                loop {
                    s.push(char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
                    n /= 36;
                    if n == 0 {
                        break;
                    }
                }
                s
            })
            .clone()
    };
    for t in g.initializer.iter_mut() {
        t.name = short(&t.name, &mut map);
    }
    for n in g.node.iter_mut() {
        n.name.clear();
        for i in n.input.iter_mut() {
            *i = short(i, &mut map);
        }
        for o in n.output.iter_mut() {
            *o = short(o, &mut map);
        }
    }
    // Initializers listed as inputs in old IRs are renamed with them.
    for v in g.value_info.iter_mut() {
        v.name = short(&v.name, &mut map);
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Drop initializers and Constant nodes nothing reads any more, graph inputs
/// that named dropped initializers, and value_info of vanished values.
pub fn prune_unused(model: &mut pb::ModelProto) {
    let Some(g) = model.graph.as_mut() else {
        return;
    };
    let mut dropped: HashSet<String> = HashSet::new();
    loop {
        let used: HashSet<String> = g
            .node
            .iter()
            .flat_map(|n| n.input.iter().cloned())
            .chain(g.output.iter().map(|o| o.name.clone()))
            .collect();
        let before = g.node.len() + g.initializer.len();
        g.initializer.retain(|t| {
            let keep = used.contains(&t.name);
            if !keep {
                dropped.insert(t.name.clone());
            }
            keep
        });
        g.node
            .retain(|n| n.op_type != "Constant" || n.output.iter().any(|o| used.contains(o)));
        if g.node.len() + g.initializer.len() == before {
            break;
        }
    }
    // Older exporters list initializers as graph inputs too.
    g.input.retain(|i| !dropped.contains(&i.name));
    let known: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .collect();
    g.value_info.retain(|v| known.contains(&v.name));
}

/// Compare two models' outputs on `set` in tract.
pub struct Comparison {
    pub outputs: Vec<OutputCheck>,
    pub accuracy_ref: Option<f64>,
    pub accuracy_new: Option<f64>,
    pub integer_mismatch: Vec<String>,
}

/// A bundle's trainable head, applied after the graph's output `input` to
/// judge accuracy where the ONNX file is only the backbone.
#[derive(Debug, Clone)]
pub struct HeadCheck {
    pub head: dai_train::Head,
    /// ONNX name of the output the head reads.
    pub input: String,
    /// API name of the head's output (for the report).
    pub output: String,
}

pub fn compare(
    reference: &Runner,
    candidate: &Runner,
    set: &SampleSet,
    check: &[String],
    tolerance: f32,
    label: &str,
    head: Option<&HeadCheck>,
) -> Result<Comparison, ToolError> {
    let head_at = head.and_then(|h| reference.outputs.iter().position(|o| o == &h.input));
    let mut head_max = 0.0f32;
    let mut head_sum = 0.0f64;
    let mut head_count = 0usize;
    let mut head_ref_max = 0.0f32;
    let names = &reference.outputs;
    let mut max = vec![0.0f32; names.len()];
    let mut sum = vec![0.0f64; names.len()];
    let mut count = vec![0usize; names.len()];
    let mut ref_max = vec![0.0f32; names.len()];
    let mut is_float = vec![true; names.len()];
    let mut int_bad = vec![false; names.len()];
    let (mut right_ref, mut right_new) = (0usize, 0usize);
    let mut bar = Progress::new(label, set.len());
    for (s, sample) in set.samples.iter().enumerate() {
        let a = reference.run(sample)?;
        let b = candidate.run(sample)?;
        if a.len() != b.len() {
            return Err(ToolError::Verify(format!(
                "the models give {} and {} outputs",
                a.len(),
                b.len()
            )));
        }
        for (o, (x, y)) in a.iter().zip(&b).enumerate() {
            if x.shape() != y.shape() {
                return Err(ToolError::Verify(format!(
                    "output {:?}: shape {:?} became {:?}",
                    names[o],
                    x.shape(),
                    y.shape()
                )));
            }
            let float = x.datum_type().is_float();
            is_float[o] = float;
            let xv = runner::values_f32(x)?;
            let yv = runner::values_f32(y)?;
            if !float {
                int_bad[o] |= xv != yv;
                continue;
            }
            for (p, q) in xv.iter().zip(&yv) {
                let d = (p - q).abs();
                let d = if d.is_nan() { f32::INFINITY } else { d };
                max[o] = max[o].max(d);
                sum[o] += d as f64;
                ref_max[o] = ref_max[o].max(p.abs());
            }
            count[o] += xv.len();
        }
        let mut head_out = None;
        if let (Some(h), Some(o)) = (head, head_at) {
            let (xv, yv) = (runner::values_f32(&a[o])?, runner::values_f32(&b[o])?);
            let rows = (xv.len() / h.head.spec.inputs().max(1)).max(1);
            let hx = dai_train::predict(&h.head, &xv, rows)
                .map_err(|e| ToolError::Verify(e.to_string()))?;
            let hy = dai_train::predict(&h.head, &yv, rows)
                .map_err(|e| ToolError::Verify(e.to_string()))?;
            for (p, q) in hx.iter().zip(&hy) {
                let d = (p - q).abs();
                head_max = head_max.max(if d.is_nan() { f32::INFINITY } else { d });
                head_sum += d as f64;
                head_ref_max = head_ref_max.max(p.abs());
            }
            head_count += hx.len();
            head_out = Some((hx, hy));
        }
        if let Some(labels) = &set.labels {
            if let Some((hx, hy)) = &head_out {
                let truth = labels[s] as usize;
                right_ref += (crate::train_digits::argmax(hx) == truth) as usize;
                right_new += (crate::train_digits::argmax(hy) == truth) as usize;
            } else if let Some(o) = (0..a.len()).find(|&o| is_float[o]) {
                // Accuracy on the first float output: argmax over its last axis.
                let (xv, yv) = (runner::values_f32(&a[o])?, runner::values_f32(&b[o])?);
                let truth = labels[s] as usize;
                right_ref += (crate::train_digits::argmax(&xv) == truth) as usize;
                right_new += (crate::train_digits::argmax(&yv) == truth) as usize;
            }
        }
        bar.inc();
    }
    bar.finish();
    let mut outputs: Vec<OutputCheck> = (0..names.len())
        .filter(|&o| is_float[o] && (check.is_empty() || check.contains(&names[o])))
        .map(|o| OutputCheck {
            name: names[o].clone(),
            max_abs_diff: max[o],
            mean_abs_diff: (sum[o] / count[o].max(1) as f64) as f32,
            ref_max_abs: ref_max[o],
            within_tolerance: max[o] <= tolerance,
        })
        .collect();
    if let (Some(h), true) = (head, head_count > 0) {
        // Logits of the head: reported, judged by the accuracy (labels) only.
        outputs.push(OutputCheck {
            name: format!("{} (bundle head logits)", h.output),
            max_abs_diff: head_max,
            mean_abs_diff: (head_sum / head_count as f64) as f32,
            ref_max_abs: head_ref_max,
            within_tolerance: true,
        });
    }
    let n = set.len().max(1) as f64;
    Ok(Comparison {
        outputs,
        accuracy_ref: set.labels.as_ref().map(|_| right_ref as f64 / n),
        accuracy_new: set.labels.as_ref().map(|_| right_new as f64 / n),
        integer_mismatch: (0..names.len())
            .filter(|&o| int_bad[o])
            .map(|o| names[o].clone())
            .collect(),
    })
}

/// Quantize `model`. Returns the report and, when accepted, the model.
pub fn quantize(
    model: &pb::ModelProto,
    specs: &[InputSpec],
    calibration: &SampleSet,
    verification: &SampleSet,
    opts: &QuantizeOptions,
) -> Result<(QuantReport, Option<pb::ModelProto>), ToolError> {
    let mut skipped = Vec::new();
    let mut rewritten = BTreeMap::new();
    let reference = Runner::new(model, specs, opts.ignore_value_info, None)?;
    let candidate_model = if opts.mode == Mode::F16 {
        to_f16(model, &mut rewritten)
    } else {
        let (folded, bn) = fold_batchnorm(model);
        if bn > 0 {
            rewritten.insert("BatchNormalization folded".into(), bn);
        }
        let model = &folded;
        let plans = plan_nodes(model, opts, &mut skipped);
        let acts: Vec<String> = {
            let mut seen = HashSet::new();
            let mut v: Vec<String> = plans
                .values()
                .filter_map(|p| match p {
                    Plan::IntMatMul { x, .. } => Some(x.clone()),
                    _ => None,
                })
                .filter(|x| seen.insert(x.clone()))
                .collect();
            v.sort();
            v
        };
        let ranges = if acts.is_empty() {
            HashMap::new()
        } else {
            if calibration.is_empty() {
                return Err(ToolError::Data {
                    path: "--calibration".into(),
                    message: "mode int8 needs calibration samples".into(),
                });
            }
            calibrate(model, specs, &acts, calibration, opts)?
        };
        let (smooth, ranges) = if opts.smooth > 0.0 {
            smoothing(&plans, &ranges, opts.smooth)
        } else {
            (HashMap::new(), ranges)
        };
        if !smooth.is_empty() {
            rewritten.insert("activations smoothed".into(), smooth.len());
        }
        let mut q = rewrite(model, &plans, &ranges, &smooth, opts, &mut rewritten);
        prune_unused(&mut q);
        // What stays float (biases, scales, norms) is stored as f16 too:
        // next to int8 weights it is a quarter of the file of a small model.
        let mut side = BTreeMap::new();
        let q = to_f16(&q, &mut side);
        let n: usize = side.values().sum();
        if n > 0 {
            rewritten.insert("other float constants f16".into(), n);
        }
        q
    };
    let mut candidate_model = candidate_model;
    prune_unused(&mut candidate_model);
    if !opts.keep_names {
        minify_names(&mut candidate_model);
    }
    if rewritten.is_empty() {
        return Err(ToolError::Unsupported(format!(
            "nothing to quantize in mode {}: no MatMul/Gemm/Conv/Gather with constant float weights{}",
            opts.mode.suffix(),
            if opts.mode == Mode::F16 {
                " (no float constant of 16+ values)"
            } else {
                ""
            }
        )));
    }
    let bytes_before = model.encoded_len() as u64;
    let bytes_after = candidate_model.encoded_len() as u64;
    let mut refusal = Vec::new();
    let candidate = match Runner::new(&candidate_model, specs, opts.ignore_value_info, None) {
        Ok(r) => Some(r),
        Err(e) => {
            refusal.push(format!("the quantized model does not run in tract: {e}"));
            None
        }
    };
    let mut report = QuantReport {
        mode: opts.mode,
        calibration: (opts.mode == Mode::Int8)
            .then(|| format!("{:?} on {}", opts.calibration, calibration.source)),
        calibration_samples: if opts.mode == Mode::Int8 {
            calibration.len()
        } else {
            0
        },
        verification_samples: verification.len(),
        verification_source: verification.source.clone(),
        rewritten,
        skipped,
        bytes_before,
        bytes_after,
        size_ratio: bytes_before as f64 / bytes_after.max(1) as f64,
        outputs: Vec::new(),
        tolerance: f32::INFINITY,
        accuracy_f32: None,
        accuracy_quantized: None,
        max_accuracy_drop: opts.max_accuracy_drop,
        latency_f32_ms: None,
        latency_quantized_ms: None,
        speedup: None,
        accepted: false,
        refusal,
    };
    let labelled = verification.labels.is_some();
    let tolerance = opts
        .tolerance
        .unwrap_or(if labelled { f32::INFINITY } else { 0.05 });
    report.tolerance = tolerance;
    if let Some(candidate) = &candidate {
        let cmp = compare(
            &reference,
            candidate,
            verification,
            &opts.check_outputs,
            tolerance,
            "verifying",
            opts.head.as_ref(),
        )?;
        for o in &cmp.outputs {
            if !o.within_tolerance {
                report.refusal.push(format!(
                    "output {:?}: max |quantized - f32| = {:.4} > tolerance {} (f32 values up to {:.3})",
                    o.name, o.max_abs_diff, tolerance, o.ref_max_abs
                ));
            }
        }
        for name in &cmp.integer_mismatch {
            report.refusal.push(format!(
                "integer output {name:?} differs from the f32 model's"
            ));
        }
        if let (Some(a), Some(b)) = (cmp.accuracy_ref, cmp.accuracy_new) {
            let drop = (a - b) * 100.0;
            if drop > opts.max_accuracy_drop {
                report.refusal.push(format!(
                    "accuracy fell {drop:.2} points ({:.2}% -> {:.2}%), more than --max-accuracy-drop {}",
                    a * 100.0,
                    b * 100.0,
                    opts.max_accuracy_drop
                ));
            }
        }
        report.outputs = cmp.outputs;
        report.accuracy_f32 = cmp.accuracy_ref;
        report.accuracy_quantized = cmp.accuracy_new;
        if opts.bench_runs > 0
            && let Some(sample) = verification.samples.first()
        {
            let a = reference.latency_ms(sample, opts.bench_runs)?;
            let b = candidate.latency_ms(sample, opts.bench_runs)?;
            report.latency_f32_ms = Some(a);
            report.latency_quantized_ms = Some(b);
            report.speedup = Some(a / b);
        }
    }
    report.accepted = report.refusal.is_empty();
    let model = report.accepted.then_some(candidate_model);
    Ok((report, model))
}

impl QuantReport {
    pub fn table(&self) -> String {
        use crate::inspect::human_bytes;
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "mode          {}", self.mode.suffix());
        if let Some(c) = &self.calibration {
            let _ = writeln!(
                s,
                "calibration   {c} ({} samples)",
                self.calibration_samples
            );
        }
        let _ = writeln!(
            s,
            "verification  {} ({} samples)",
            self.verification_source, self.verification_samples
        );
        let _ = writeln!(
            s,
            "size          {} -> {} ({:.2}x smaller)",
            human_bytes(self.bytes_before),
            human_bytes(self.bytes_after),
            self.size_ratio
        );
        let _ = writeln!(s, "rewritten");
        for (k, v) in &self.rewritten {
            let _ = writeln!(s, "  {k:<26} {v:>5}");
        }
        for k in &self.skipped {
            let _ = writeln!(s, "  kept f32: {k}");
        }
        let tol = if self.tolerance.is_finite() {
            format!("within {}", self.tolerance)
        } else {
            "checked (labels: accuracy decides)".to_string()
        };
        let _ = writeln!(
            s,
            "\n| output | max abs diff | mean abs diff | f32 max abs | {tol} |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for o in &self.outputs {
            let _ = writeln!(
                s,
                "| {} | {:.2e} | {:.2e} | {:.3} | {} |",
                o.name,
                o.max_abs_diff,
                o.mean_abs_diff,
                o.ref_max_abs,
                if o.within_tolerance { "yes" } else { "NO" }
            );
        }
        if let (Some(a), Some(b)) = (self.accuracy_f32, self.accuracy_quantized) {
            let _ = writeln!(
                s,
                "\naccuracy      f32 {:.2}% -> {:.2}% ({:+.2} points; limit -{})",
                a * 100.0,
                b * 100.0,
                (b - a) * 100.0,
                self.max_accuracy_drop
            );
        }
        if let (Some(a), Some(b), Some(x)) =
            (self.latency_f32_ms, self.latency_quantized_ms, self.speedup)
        {
            let _ = writeln!(
                s,
                "latency       tract f32 {a:.3} ms -> {b:.3} ms ({x:.2}x)"
            );
        }
        if self.accepted {
            let _ = writeln!(s, "\nverdict       ACCEPTED");
        } else {
            let _ = writeln!(s, "\nverdict       REFUSED, nothing written:");
            for r in &self.refusal {
                let _ = writeln!(s, "  - {r}");
            }
        }
        s
    }
}
