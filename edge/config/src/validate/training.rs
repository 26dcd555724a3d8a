//! The `training:` section: the scheduler's thresholds, the optimiser and
//! the sample store bounds.

use super::Problems;
use crate::TrainingConfig;

pub(super) fn check(p: &mut Problems<'_>, t: &TrainingConfig) {
    p.check(
        (1..=1_000_000).contains(&t.min_new_samples),
        "training.min_new_samples",
        t.min_new_samples,
        "expected 1..=1000000",
    );
    p.check(
        t.max_cpu_percent.is_finite() && t.max_cpu_percent > 0.0 && t.max_cpu_percent <= 100.0,
        "training.max_cpu_percent",
        t.max_cpu_percent,
        "expected percent in (0, 100]",
    );
    p.check(
        (1..=86_400).contains(&t.check_interval_sec),
        "training.check_interval_sec",
        t.check_interval_sec,
        "expected seconds in 1..=86400",
    );
    p.check(
        t.learning_rate.is_finite() && t.learning_rate > 0.0 && t.learning_rate <= 10.0,
        "training.learning_rate",
        t.learning_rate,
        "expected (0, 10]",
    );
    p.check(
        t.momentum.is_finite() && (0.0..1.0).contains(&t.momentum),
        "training.momentum",
        t.momentum,
        "expected [0, 1)",
    );
    p.check(
        (1..=10_000_000).contains(&t.max_samples_per_model),
        "training.max_samples_per_model",
        t.max_samples_per_model,
        "expected 1..=10000000",
    );
    p.check(
        t.max_validation_drop.is_finite() && (0.0..=1.0).contains(&t.max_validation_drop),
        "training.max_validation_drop",
        t.max_validation_drop,
        "expected [0, 1]",
    );
    p.check(
        (2..=100).contains(&t.holdout_every),
        "training.holdout_every",
        t.holdout_every,
        "expected 2..=100",
    );
}
