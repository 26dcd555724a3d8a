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
//!
//! How the parts fit, in the order [`quantize`] runs them:
//! 1. [`batchnorm`]: BatchNormalization folded into the Conv before it, so
//!    its parameters are quantized with the Conv's weights (int8 modes).
//! 2. [`plan`]: which form each node gets (integer matmul, int8 weights,
//!    int8 embedding rows, int8 constants), from the mode and the options.
//! 3. [`calibrate`]: activation ranges of the integer matmuls' inputs in
//!    tract, optionally smoothed (SmoothQuant).
//! 4. [`rewrite`]: the new nodes and initializers, using the int8
//!    arithmetic of [`int8`]; then [`f16`] stores what stays float as f16
//!    (mode `f16`: every float constant).
//! 5. [`graph`]: unused values dropped, internal names shortened.
//! 6. [`verify`]: both models run in tract on the verification set; the
//!    refusals go into the [`report`], which also prints the table.

mod batchnorm;
mod calibrate;
mod f16;
mod graph;
mod int8;
mod plan;
mod report;
mod rewrite;
mod verify;

pub use batchnorm::fold_batchnorm;
pub use calibrate::ActRange;
pub use graph::{minify_names, prune_unused};
pub use report::{OutputCheck, QuantReport};
pub use verify::{Comparison, HeadCheck, compare};

use crate::ToolError;
use crate::calib::SampleSet;
use crate::runner::{InputSpec, Runner};
use dai_onnx::pb;
use prost::Message;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

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
    // Loaded first: a model tract cannot run is reported as such, before
    // any rewriting work.
    let reference = Runner::new(model, specs, opts.ignore_value_info, None)?;
    let mut candidate_model = if opts.mode == Mode::F16 {
        f16::to_f16(model, &mut rewritten)
    } else {
        int8_candidate(
            model,
            specs,
            calibration,
            opts,
            &mut rewritten,
            &mut skipped,
        )?
    };
    prune_unused(&mut candidate_model);
    if !opts.keep_names {
        minify_names(&mut candidate_model);
    }
    if rewritten.is_empty() {
        return Err(nothing_to_quantize(opts.mode));
    }
    let sizes = (
        model.encoded_len() as u64,
        candidate_model.encoded_len() as u64,
    );
    let candidate = Runner::new(&candidate_model, specs, opts.ignore_value_info, None);
    let mut report =
        QuantReport::unverified(opts, calibration, verification, sizes, rewritten, skipped);
    let labelled = verification.labels.is_some();
    report.tolerance = opts
        .tolerance
        .unwrap_or(if labelled { f32::INFINITY } else { 0.05 });
    match &candidate {
        Ok(candidate) => {
            verify::judge(&mut report, &reference, candidate, verification, opts)?;
            bench(&mut report, &reference, candidate, verification, opts)?;
        }
        Err(e) => report
            .refusal
            .push(format!("the quantized model does not run in tract: {e}")),
    }
    report.accepted = report.refusal.is_empty();
    let model = report.accepted.then_some(candidate_model);
    Ok((report, model))
}

/// Modes int8 and int8-weights: BN folded, nodes planned, activations
/// calibrated (and smoothed), the graph rewritten, the rest stored as f16.
fn int8_candidate(
    model: &pb::ModelProto,
    specs: &[InputSpec],
    calibration: &SampleSet,
    opts: &QuantizeOptions,
    rewritten: &mut BTreeMap<String, usize>,
    skipped: &mut Vec<String>,
) -> Result<pb::ModelProto, ToolError> {
    let (folded, bn) = fold_batchnorm(model);
    if bn > 0 {
        rewritten.insert("BatchNormalization folded".into(), bn);
    }
    let model = &folded;
    let plans = plan::plan_nodes(model, opts, skipped);
    let acts = plan::int8_activations(&plans);
    let ranges = if acts.is_empty() {
        HashMap::new()
    } else {
        if calibration.is_empty() {
            return Err(ToolError::Data {
                path: "--calibration".into(),
                message: "mode int8 needs calibration samples".into(),
            });
        }
        calibrate::calibrate(model, specs, &acts, calibration, opts)?
    };
    let (smooth, ranges) = if opts.smooth > 0.0 {
        calibrate::smoothing(&plans, &ranges, opts.smooth)
    } else {
        (HashMap::new(), ranges)
    };
    if !smooth.is_empty() {
        rewritten.insert("activations smoothed".into(), smooth.len());
    }
    let mut q = rewrite::rewrite(model, &plans, &ranges, &smooth, opts, rewritten);
    prune_unused(&mut q);
    // What stays float (biases, scales, norms) is stored as f16 too:
    // next to int8 weights it is a quarter of the file of a small model.
    let mut side = BTreeMap::new();
    let q = f16::to_f16(&q, &mut side);
    let n: usize = side.values().sum();
    if n > 0 {
        rewritten.insert("other float constants f16".into(), n);
    }
    Ok(q)
}

fn nothing_to_quantize(mode: Mode) -> ToolError {
    ToolError::Unsupported(format!(
        "nothing to quantize in mode {}: no MatMul/Gemm/Conv/Gather with constant float weights{}",
        mode.suffix(),
        if mode == Mode::F16 {
            " (no float constant of 16+ values)"
        } else {
            ""
        }
    ))
}

/// Latency of both models on the first verification sample (`--bench`).
fn bench(
    report: &mut QuantReport,
    reference: &Runner,
    candidate: &Runner,
    verification: &SampleSet,
    opts: &QuantizeOptions,
) -> Result<(), ToolError> {
    if opts.bench_runs > 0
        && let Some(sample) = verification.samples.first()
    {
        let a = reference.latency_ms(sample, opts.bench_runs)?;
        let b = candidate.latency_ms(sample, opts.bench_runs)?;
        report.latency_f32_ms = Some(a);
        report.latency_quantized_ms = Some(b);
        report.speedup = Some(a / b);
    }
    Ok(())
}
