//! The quantization report: what was rewritten, the size before and after,
//! each checked output's deviation, accuracy and latency, and the verdict
//! with its reasons; printed as a table or serialised as `--json`.

use super::{Mode, QuantizeOptions};
use crate::calib::SampleSet;
use serde::Serialize;
use std::collections::BTreeMap;

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

impl QuantReport {
    /// The report of a candidate before verification: sizes and rewrites
    /// filled in, no outputs checked, not accepted.
    pub(super) fn unverified(
        opts: &QuantizeOptions,
        calibration: &SampleSet,
        verification: &SampleSet,
        (bytes_before, bytes_after): (u64, u64),
        rewritten: BTreeMap<String, usize>,
        skipped: Vec<String>,
    ) -> QuantReport {
        let int8 = opts.mode == Mode::Int8;
        QuantReport {
            mode: opts.mode,
            calibration: int8.then(|| format!("{:?} on {}", opts.calibration, calibration.source)),
            calibration_samples: if int8 { calibration.len() } else { 0 },
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
            refusal: Vec::new(),
        }
    }

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
