//! Calibration: the ranges of the activations the integer matmuls quantize,
//! measured by running the calibration set through tract (min/max, or
//! percentiles of a strided sample), and SmoothQuant's per-channel factors
//! computed from those ranges and the weights.

use super::plan::Plan;
use super::{Calibration, QuantizeOptions};
use crate::ToolError;
use crate::calib::SampleSet;
use crate::progress::Progress;
use crate::runner::{self, InputSpec, Runner};
use dai_onnx::pb;
use std::collections::HashMap;
use tract_onnx::prelude::Tensor;

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

/// Values kept for percentiles per activation over the whole set, so that
/// sorting them stays cheap on large activations.
const SAMPLE_CAP: usize = 400_000;

/// The range of each activation in `names` over `set`, run in tract.
pub(super) fn calibrate(
    model: &pb::ModelProto,
    specs: &[InputSpec],
    names: &[String],
    set: &SampleSet,
    opts: &QuantizeOptions,
) -> Result<HashMap<String, ActRange>, ToolError> {
    let runner = Runner::new(model, specs, opts.ignore_value_info, Some(names))?;
    let mut ranges: Vec<Range> = names.iter().map(|_| Range::new()).collect();
    let percentile = matches!(opts.calibration, Calibration::Percentile(_));
    let mut bar = Progress::new("calibrating", set.len());
    for sample in &set.samples {
        let outs = runner.run(sample)?;
        for (r, t) in ranges.iter_mut().zip(&outs) {
            r.observe(t, percentile.then_some(set.len()))?;
        }
        bar.inc();
    }
    bar.finish();
    let mut out = HashMap::new();
    for (name, r) in names.iter().zip(ranges) {
        out.insert(name.clone(), r.finish(name, opts.calibration)?);
    }
    Ok(out)
}

impl Range {
    fn new() -> Range {
        Range {
            lo: f32::INFINITY,
            hi: f32::NEG_INFINITY,
            ch_lo: Vec::new(),
            ch_hi: Vec::new(),
            sample: Vec::new(),
        }
    }

    /// Widen the range by one run's value of the activation; with
    /// `sample_runs` (the set's size, for percentiles) also keep a strided
    /// sample of its values.
    fn observe(&mut self, t: &Tensor, sample_runs: Option<usize>) -> Result<(), ToolError> {
        let v = runner::values_f32(t)?;
        let channels = t.shape().last().copied().unwrap_or(1).max(1);
        if self.ch_lo.len() != channels {
            self.ch_lo = vec![f32::INFINITY; channels];
            self.ch_hi = vec![f32::NEG_INFINITY; channels];
        }
        for (i, &x) in v.iter().enumerate() {
            if x.is_finite() {
                self.lo = self.lo.min(x);
                self.hi = self.hi.max(x);
                let c = i % channels;
                self.ch_lo[c] = self.ch_lo[c].min(x);
                self.ch_hi[c] = self.ch_hi[c].max(x);
            }
        }
        if let Some(runs) = sample_runs {
            let stride = (v.len() * runs / SAMPLE_CAP).max(1);
            self.sample
                .extend(v.iter().step_by(stride).filter(|x| x.is_finite()));
        }
        Ok(())
    }

    /// The calibrated range, widened to contain 0 (the u8 zero point must
    /// be representable).
    fn finish(mut self, name: &str, calibration: Calibration) -> Result<ActRange, ToolError> {
        if !self.lo.is_finite() {
            return Err(ToolError::Verify(format!(
                "calibration: activation {name:?} held no finite value"
            )));
        }
        if let Calibration::Percentile(p) = calibration
            && self.sample.len() > 100
        {
            self.sample.sort_by(f32::total_cmp);
            let at = |q: f64| self.sample[((self.sample.len() - 1) as f64 * q).round() as usize];
            self.lo = at(1.0 - p / 100.0);
            self.hi = at(p / 100.0);
        }
        Ok(ActRange {
            lo: self.lo.min(0.0),
            hi: self.hi.max(0.0),
            ch_lo: self
                .ch_lo
                .iter()
                .map(|v| if v.is_finite() { v.min(0.0) } else { 0.0 })
                .collect(),
            ch_hi: self
                .ch_hi
                .iter()
                .map(|v| if v.is_finite() { v.max(0.0) } else { 0.0 })
                .collect(),
        })
    }
}

/// SmoothQuant-style factors: for each calibrated activation feeding integer
/// matmuls, s_j = max|x_j|^a / max|W_j.|^(1-a) over its consumers' weight
/// rows. x / s is quantized and W rows are multiplied by s, which moves the
/// outlier channels of transformer activations into the weights. Returns
/// the factors and the ranges of x / s.
pub(super) fn smoothing(
    plans: &HashMap<usize, Plan>,
    ranges: &HashMap<String, ActRange>,
    alpha: f32,
) -> (HashMap<String, Vec<f32>>, HashMap<String, ActRange>) {
    let mut factors = HashMap::new();
    let mut adjusted = ranges.clone();
    for (x, wm) in weight_row_max(plans) {
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

/// Per integer-matmul activation, the largest |weight| of each input row
/// over all the matmuls reading it (those of another K are left out).
fn weight_row_max(plans: &HashMap<usize, Plan>) -> HashMap<String, Vec<f32>> {
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
    wmax
}
