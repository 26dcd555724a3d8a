//! Verification: the f32 and the rewritten model run side by side in tract
//! on the same samples; per output the largest and mean deviation, integer
//! outputs compared exactly, accuracy with labels (through a bundle's head
//! where the file is only its backbone). [`judge`] turns the comparison
//! into the report's refusals. Pruning uses [`compare`] too.

use super::{OutputCheck, QuantReport, QuantizeOptions};
use crate::ToolError;
use crate::calib::SampleSet;
use crate::progress::Progress;
use crate::runner::{self, Runner};
use crate::train_digits::argmax;
use tract_onnx::prelude::Tensor;

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
    let names = &reference.outputs;
    let mut tally = Tally::new(names.len());
    let mut bar = Progress::new(label, set.len());
    for (s, sample) in set.samples.iter().enumerate() {
        let a = reference.run(sample)?;
        let b = candidate.run(sample)?;
        tally.outputs(names, &a, &b)?;
        let head_out = match (head, head_at) {
            (Some(h), Some(o)) => Some(tally.head(h, &a[o], &b[o])?),
            _ => None,
        };
        if let Some(labels) = &set.labels {
            tally.score(labels, s, head_out.as_ref(), &a, &b)?;
        }
        bar.inc();
    }
    bar.finish();
    Ok(tally.finish(names, check, tolerance, head, set))
}

/// Deviations of one float output over the samples.
#[derive(Clone, Default)]
struct Deviation {
    max: f32,
    sum: f64,
    count: usize,
    ref_max: f32,
}

/// Everything [`compare`] accumulates over the samples.
struct Tally {
    outputs: Vec<Deviation>,
    is_float: Vec<bool>,
    int_bad: Vec<bool>,
    head_logits: Deviation,
    right_ref: usize,
    right_new: usize,
}

impl Tally {
    fn new(outputs: usize) -> Tally {
        Tally {
            outputs: vec![Deviation::default(); outputs],
            is_float: vec![true; outputs],
            int_bad: vec![false; outputs],
            head_logits: Deviation::default(),
            right_ref: 0,
            right_new: 0,
        }
    }

    /// One sample's outputs of both models: float ones by their deviation,
    /// integer ones (shapes, indices) must be equal.
    fn outputs(&mut self, names: &[String], a: &[Tensor], b: &[Tensor]) -> Result<(), ToolError> {
        if a.len() != b.len() {
            return Err(ToolError::Verify(format!(
                "the models give {} and {} outputs",
                a.len(),
                b.len()
            )));
        }
        for (o, (x, y)) in a.iter().zip(b).enumerate() {
            if x.shape() != y.shape() {
                return Err(ToolError::Verify(format!(
                    "output {:?}: shape {:?} became {:?}",
                    names[o],
                    x.shape(),
                    y.shape()
                )));
            }
            let float = x.datum_type().is_float();
            self.is_float[o] = float;
            let xv = runner::values_f32(x)?;
            let yv = runner::values_f32(y)?;
            if !float {
                self.int_bad[o] |= xv != yv;
                continue;
            }
            let dev = &mut self.outputs[o];
            for (p, q) in xv.iter().zip(&yv) {
                // A NaN counts as the largest possible deviation.
                let d = (p - q).abs();
                let d = if d.is_nan() { f32::INFINITY } else { d };
                dev.max = dev.max.max(d);
                dev.sum += d as f64;
                dev.ref_max = dev.ref_max.max(p.abs());
            }
            dev.count += xv.len();
        }
        Ok(())
    }

    /// One sample's accuracy: the argmax of the head's logits, else of the
    /// first float output, against the label of sample `s`.
    fn score(
        &mut self,
        labels: &[i64],
        s: usize,
        head_out: Option<&(Vec<f32>, Vec<f32>)>,
        a: &[Tensor],
        b: &[Tensor],
    ) -> Result<(), ToolError> {
        if let Some((hx, hy)) = head_out {
            self.count_right(labels[s] as usize, hx, hy);
        } else if let Some(o) = (0..a.len()).find(|&o| self.is_float[o]) {
            // Accuracy on the first float output: argmax over its last axis.
            let (xv, yv) = (runner::values_f32(&a[o])?, runner::values_f32(&b[o])?);
            self.count_right(labels[s] as usize, &xv, &yv);
        }
        Ok(())
    }

    fn count_right(&mut self, truth: usize, x: &[f32], y: &[f32]) {
        self.right_ref += (argmax(x) == truth) as usize;
        self.right_new += (argmax(y) == truth) as usize;
    }

    /// The head applied to both models' output `x` / `y`: the deviation of
    /// its logits; returns both logits for the accuracy.
    fn head(
        &mut self,
        h: &HeadCheck,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<(Vec<f32>, Vec<f32>), ToolError> {
        let (xv, yv) = (runner::values_f32(x)?, runner::values_f32(y)?);
        let rows = (xv.len() / h.head.spec.inputs().max(1)).max(1);
        let hx =
            dai_train::predict(&h.head, &xv, rows).map_err(|e| ToolError::Verify(e.to_string()))?;
        let hy =
            dai_train::predict(&h.head, &yv, rows).map_err(|e| ToolError::Verify(e.to_string()))?;
        let dev = &mut self.head_logits;
        for (p, q) in hx.iter().zip(&hy) {
            let d = (p - q).abs();
            dev.max = dev.max.max(if d.is_nan() { f32::INFINITY } else { d });
            // Only reported (the accuracy decides), so a NaN may stay in
            // the mean.
            dev.sum += d as f64;
            dev.ref_max = dev.ref_max.max(p.abs());
        }
        dev.count += hx.len();
        Ok((hx, hy))
    }

    fn finish(
        self,
        names: &[String],
        check: &[String],
        tolerance: f32,
        head: Option<&HeadCheck>,
        set: &SampleSet,
    ) -> Comparison {
        let mut outputs: Vec<OutputCheck> = (0..names.len())
            .filter(|&o| self.is_float[o] && (check.is_empty() || check.contains(&names[o])))
            .map(|o| {
                let d = &self.outputs[o];
                OutputCheck {
                    name: names[o].clone(),
                    max_abs_diff: d.max,
                    mean_abs_diff: (d.sum / d.count.max(1) as f64) as f32,
                    ref_max_abs: d.ref_max,
                    within_tolerance: d.max <= tolerance,
                }
            })
            .collect();
        if let (Some(h), true) = (head, self.head_logits.count > 0) {
            // Logits of the head: reported, judged by the accuracy (labels) only.
            outputs.push(OutputCheck {
                name: format!("{} (bundle head logits)", h.output),
                max_abs_diff: self.head_logits.max,
                mean_abs_diff: (self.head_logits.sum / self.head_logits.count as f64) as f32,
                ref_max_abs: self.head_logits.ref_max,
                within_tolerance: true,
            });
        }
        let n = set.len().max(1) as f64;
        Comparison {
            outputs,
            accuracy_ref: set.labels.as_ref().map(|_| self.right_ref as f64 / n),
            accuracy_new: set.labels.as_ref().map(|_| self.right_new as f64 / n),
            integer_mismatch: (0..names.len())
                .filter(|&o| self.int_bad[o])
                .map(|o| names[o].clone())
                .collect(),
        }
    }
}

/// Compare `candidate` with `reference` on the verification set and record
/// the deviations, the accuracy and every reason to refuse in `report`.
pub(super) fn judge(
    report: &mut QuantReport,
    reference: &Runner,
    candidate: &Runner,
    verification: &SampleSet,
    opts: &QuantizeOptions,
) -> Result<(), ToolError> {
    let tolerance = report.tolerance;
    let cmp = compare(
        reference,
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
    Ok(())
}
