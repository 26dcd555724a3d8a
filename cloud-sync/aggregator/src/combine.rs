//! Combining a round's contributions into one delta (pure): each update is
//! clipped first ([`Clip`]: off, a fixed L2 bound, or adaptive, a multiple
//! of the round's median update norm), then combined ([`Robust`]: the
//! weighted mean of FedAvg, a weighted coordinate-wise trimmed mean, or
//! the coordinate-wise median).
//!
//! The defaults ([`Aggregation::default`]) are what `dai-cloud run` uses
//! unless told otherwise, chosen to hold with a fifth of the devices
//! hostile: adaptive clipping at [`DEFAULT_CLIP_MULTIPLE`] x the median
//! norm bounds what any one update can move (scaling attacks), and the
//! trimmed mean drops [`DEFAULT_TRIM`] of the weight from each end of every
//! coordinate (sign flips and outliers), while still weighing the rest by
//! sample count as FedAvg does.

use crate::{Contribution, norm};

/// How each update is bounded before combining.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clip {
    Off,
    /// Scale updates down to this L2 norm.
    Fixed(f64),
    /// Scale updates down to `multiple` x the median L2 norm of the
    /// round's updates: no fixed number fits every model and stage of
    /// training, and hostile updates cannot move the median while they are
    /// fewer than half.
    Adaptive {
        multiple: f64,
    },
}

/// How contributions are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Robust {
    /// Weighted mean (FedAvg).
    Mean,
    /// Per coordinate: drop `fraction` of the total weight from each end
    /// of the sorted values, then the weighted mean of the rest.
    TrimmedMean { fraction: f64 },
    /// Coordinate-wise median (unweighted).
    Median,
}

/// Aggregation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregation {
    pub clip: Clip,
    pub robust: Robust,
}

/// Default adaptive clipping bound, in median norms.
pub const DEFAULT_CLIP_MULTIPLE: f64 = 1.0;
/// Default weight trimmed from each end of every coordinate.
pub const DEFAULT_TRIM: f64 = 0.3;

impl Default for Aggregation {
    fn default() -> Aggregation {
        Aggregation {
            clip: Clip::Adaptive {
                multiple: DEFAULT_CLIP_MULTIPLE,
            },
            robust: Robust::TrimmedMean {
                fraction: DEFAULT_TRIM,
            },
        }
    }
}

impl Aggregation {
    /// Plain FedAvg: no clipping, the weighted mean.
    pub const PLAIN: Aggregation = Aggregation {
        clip: Clip::Off,
        robust: Robust::Mean,
    };

    /// How the status page and logs name it, e.g.
    /// `clip 1x median norm, trimmed mean 30%`.
    pub fn label(&self) -> String {
        let clip = match self.clip {
            Clip::Off => "no clipping".to_string(),
            Clip::Fixed(n) => format!("clip at norm {n}"),
            Clip::Adaptive { multiple } => format!("clip {multiple}x median norm"),
        };
        let robust = match self.robust {
            Robust::Mean => "weighted mean".to_string(),
            Robust::Median => "coordinate median".to_string(),
            Robust::TrimmedMean { fraction } => {
                format!("trimmed mean {}%", (fraction * 100.0).round())
            }
        };
        format!("{clip}, {robust}")
    }
}

/// The clipping bound for a round with these update norms.
pub fn clip_bound(clip: Clip, norms: &[f64]) -> Option<f64> {
    match clip {
        Clip::Off => None,
        Clip::Fixed(n) => Some(n),
        Clip::Adaptive { multiple } => {
            let mut v: Vec<f64> = norms.iter().copied().filter(|n| n.is_finite()).collect();
            if v.is_empty() {
                return None;
            }
            v.sort_by(f64::total_cmp);
            let n = v.len();
            let median = if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            };
            Some(median * multiple)
        }
    }
}

/// Combine `contribs` with `weights` (e.g. sample counts x staleness
/// weights). Returns the aggregated delta in layout order and the clipping
/// bound used, or `None` when there is nothing to aggregate or the
/// contributions' tensors differ in count or length (callers check them
/// against the model's layout first).
pub fn aggregate(
    contribs: &[Contribution],
    weights: &[f64],
    agg: &Aggregation,
) -> Option<(Vec<Vec<f32>>, Option<f64>)> {
    if contribs.is_empty() || contribs.len() != weights.len() {
        return None;
    }
    let first = &contribs[0].tensors;
    let same_shape = |c: &Contribution| {
        c.tensors.len() == first.len()
            && c.tensors.iter().zip(first).all(|(a, b)| a.len() == b.len())
    };
    if !contribs.iter().all(same_shape) {
        return None;
    }
    let norms: Vec<f64> = contribs.iter().map(|c| norm(&c.tensors)).collect();
    let bound = clip_bound(agg.clip, &norms);
    let scale: Vec<f64> = norms
        .iter()
        .map(|&n| match bound {
            Some(b) if n > b && n > 0.0 => b / n,
            _ => 1.0,
        })
        .collect();
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let mut out = Vec::with_capacity(first.len());
    let mut column: Vec<(f64, f64)> = Vec::with_capacity(contribs.len());
    for (t, shape) in first.iter().enumerate() {
        let mut agg_t = vec![0.0f32; shape.len()];
        for (i, slot) in agg_t.iter_mut().enumerate() {
            column.clear();
            column.extend(
                contribs
                    .iter()
                    .zip(weights.iter().zip(&scale))
                    .map(|(c, (w, s))| (c.tensors[t][i] as f64 * s, *w)),
            );
            *slot = combine(&mut column, total, agg.robust) as f32;
        }
        out.push(agg_t);
    }
    Some((out, bound))
}

/// One coordinate: `column` holds (value, weight) pairs, `total` their
/// weight.
fn combine(column: &mut [(f64, f64)], total: f64, robust: Robust) -> f64 {
    match robust {
        Robust::Mean => column.iter().map(|(v, w)| v * w).sum::<f64>() / total,
        Robust::Median => {
            column.sort_by(|a, b| a.0.total_cmp(&b.0));
            let n = column.len();
            if n % 2 == 1 {
                column[n / 2].0
            } else {
                (column[n / 2 - 1].0 + column[n / 2].0) / 2.0
            }
        }
        Robust::TrimmedMean { fraction } => {
            column.sort_by(|a, b| a.0.total_cmp(&b.0));
            // Keep the weight between `cut` and `total - cut` along the
            // sorted values; an entry straddling a cut counts in part.
            let cut = total * fraction.clamp(0.0, 0.49);
            let (lo, hi) = (cut, total - cut);
            let (mut at, mut sum, mut kept) = (0.0f64, 0.0f64, 0.0f64);
            for &(v, w) in column.iter() {
                let (start, end) = (at, at + w);
                at = end;
                let part = (end.min(hi) - start.max(lo)).max(0.0);
                sum += v * part;
                kept += part;
            }
            if kept > 0.0 {
                sum / kept
            } else {
                // Nothing left between the cuts (cannot happen for a
                // fraction below one half): fall back to the mean.
                column.iter().map(|(v, w)| v * w).sum::<f64>() / total
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contrib(v: f32, samples: u64) -> Contribution {
        Contribution {
            update_id: format!("{v}"),
            device: "d".into(),
            base_version: 5,
            sample_count: samples,
            tensors: vec![vec![v, -v]],
        }
    }

    fn run(cs: &[Contribution], w: &[f64], clip: Clip, robust: Robust) -> Vec<Vec<f32>> {
        aggregate(cs, w, &Aggregation { clip, robust })
            .expect("aggregate")
            .0
    }

    #[test]
    fn fedavg_weights_by_samples_and_robust_options_resist_outliers() {
        let cs = vec![contrib(1.0, 1), contrib(2.0, 3)];
        let w: Vec<f64> = cs.iter().map(|c| c.sample_count as f64).collect();
        assert_eq!(
            run(&cs, &w, Clip::Off, Robust::Mean),
            vec![vec![1.75, -1.75]]
        );

        let with_outlier = vec![
            contrib(1.0, 1),
            contrib(1.1, 1),
            contrib(0.9, 1),
            contrib(1.0, 1),
            contrib(1000.0, 1),
        ];
        let ones = vec![1.0; with_outlier.len()];
        assert_eq!(
            run(&with_outlier, &ones, Clip::Off, Robust::Median)[0][0],
            1.0
        );
        let trimmed = run(
            &with_outlier,
            &ones,
            Clip::Off,
            Robust::TrimmedMean { fraction: 0.2 },
        );
        assert!((trimmed[0][0] - 1.0333).abs() < 1e-3, "{trimmed:?}");
        let plain = run(&with_outlier, &ones, Clip::Off, Robust::Mean);
        assert!(
            plain[0][0] > 100.0,
            "the plain mean is dragged by the outlier"
        );
        // Clipping bounds each update's influence, fixed or adaptive.
        let clipped = run(
            &with_outlier,
            &ones,
            Clip::Fixed(2.0_f64.sqrt()),
            Robust::Mean,
        );
        assert!(clipped[0][0] <= 1.0001, "{clipped:?}");
        let adaptive = run(
            &with_outlier,
            &ones,
            Clip::Adaptive { multiple: 2.0 },
            Robust::Mean,
        );
        // The outlier is scaled to 2x the median norm (value 2.0).
        assert!((adaptive[0][0] - 1.2).abs() < 1e-4, "{adaptive:?}");
        assert!(aggregate(&[], &[], &Aggregation::PLAIN).is_none());
    }

    #[test]
    fn the_trimmed_mean_trims_by_weight_and_keeps_fedavg_weights() {
        // Three equal devices: a fifth of the weight off each end cuts
        // into the extremes in part.
        let cs = vec![contrib(0.0, 1), contrib(1.0, 1), contrib(5.0, 1)];
        let w = vec![1.0; 3];
        let t = run(&cs, &w, Clip::Off, Robust::TrimmedMean { fraction: 0.2 });
        let expect = (0.0 * 0.4 + 1.0 + 5.0 * 0.4) / 1.8;
        assert!((t[0][0] as f64 - expect).abs() < 1e-6, "{t:?}");
        // With no trimming it is the weighted mean.
        let cs = vec![contrib(1.0, 1), contrib(2.0, 3)];
        let w = vec![1.0, 3.0];
        let t = run(&cs, &w, Clip::Off, Robust::TrimmedMean { fraction: 0.0 });
        assert!((t[0][0] - 1.75).abs() < 1e-6, "{t:?}");
        // A heavy hostile device loses its weight at the trimmed end.
        let cs = vec![
            contrib(1.0, 10),
            contrib(1.0, 10),
            contrib(1.0, 10),
            contrib(1.0, 10),
            contrib(-50.0, 10),
        ];
        let w = vec![10.0; 5];
        let t = run(&cs, &w, Clip::Off, Robust::TrimmedMean { fraction: 0.2 });
        assert!((t[0][0] - 1.0).abs() < 1e-6, "{t:?}");
    }

    #[test]
    fn labels_name_what_is_in_force() {
        assert_eq!(
            Aggregation::default().label(),
            "clip 1x median norm, trimmed mean 30%"
        );
        assert_eq!(Aggregation::PLAIN.label(), "no clipping, weighted mean");
        assert_eq!(
            clip_bound(Clip::Adaptive { multiple: 3.0 }, &[1.0, 2.0, 9.0]),
            Some(6.0)
        );
        assert_eq!(clip_bound(Clip::Adaptive { multiple: 3.0 }, &[]), None);
    }
}
