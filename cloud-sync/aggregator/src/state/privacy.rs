//! Central DP in the registry: a round made with `--dp-noise` is clipped
//! to a fixed norm, averaged with equal weights and noised
//! ([`crate::dp`]); its version's metrics record the mechanism and the
//! (epsilon, delta) spent by every version of the model so far, so the
//! registry, the status page and `/metrics` say what a published model
//! cost. The spend is recomputed from the registry each time: it survives
//! restarts, and a version made without noise (before DP was turned on)
//! makes the reported epsilon infinite, because that round's data had no
//! protection.

use super::{DpSettings, State, StateError};
use crate::dp::Accountant;
use crate::{Aggregation, Clip, Contribution, Robust, aggregate};
use rusqlite::params;

/// What the model's versions spent so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Spent {
    pub accountant: Accountant,
    /// DP rounds counted.
    pub rounds: u64,
    /// A version with contributors was made without noise.
    pub unprotected: bool,
}

impl Spent {
    pub fn epsilon(&self, delta: f64) -> f64 {
        if self.unprotected {
            f64::INFINITY
        } else {
            self.accountant.epsilon(delta).0
        }
    }
}

impl State {
    /// The privacy spent by `model`'s versions (every version in this
    /// state file: one epoch).
    pub fn privacy_spent(&self, model: &str) -> Result<Spent, StateError> {
        spent(&self.conn, model)
    }
}

pub(super) fn spent(conn: &rusqlite::Connection, model: &str) -> Result<Spent, StateError> {
    let mut stmt = conn
        .prepare("SELECT contributors, metrics FROM versions WHERE model = ?1 ORDER BY version")?;
    let rows: Vec<(String, String)> = stmt
        .query_map(params![model], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut s = Spent {
        accountant: Accountant::default(),
        rounds: 0,
        unprotected: false,
    };
    // Rounds whose rows retention deleted, then the rows still here.
    let folded = super::retention::dp_folded(conn, model)?;
    for (z, n) in &folded.noised {
        s.accountant.compose(1.0, *z, *n);
        s.rounds += *n;
    }
    s.unprotected |= folded.unprotected;
    for (contributors, metrics) in rows {
        let m: serde_json::Value = serde_json::from_str(&metrics).unwrap_or_default();
        if !super::retention::contributed(&contributors, &m) {
            continue;
        }
        match m["dp"]["noise_multiplier"].as_f64() {
            Some(z) => {
                s.accountant.compose(1.0, z, 1);
                s.rounds += 1;
            }
            None => s.unprotected = true,
        }
    }
    Ok(s)
}

/// The DP round over `contribs`: clipped to `dp.clip_norm`, equal
/// weights, the mean plus Gaussian noise of standard deviation
/// `z * C / n` per coordinate. `None` when there is nothing to combine or
/// no randomness for the noise (then nothing is published).
pub(super) fn noisy_mean(contribs: &[Contribution], dp: &DpSettings) -> Option<Vec<Vec<f32>>> {
    let agg = Aggregation {
        clip: Clip::Fixed(dp.clip_norm),
        robust: Robust::Mean,
    };
    let ones = vec![1.0; contribs.len()];
    let (mut delta, _) = aggregate(contribs, &ones, &agg)?;
    let std = dp.noise_multiplier * dp.clip_norm / contribs.len() as f64;
    let count: usize = delta.iter().map(Vec::len).sum();
    let noise = match crate::dp::standard_normals(count) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "no randomness for the DP noise; nothing published");
            return None;
        }
    };
    for (v, g) in delta.iter_mut().flatten().zip(noise) {
        *v += (std * g) as f32;
    }
    Some(delta)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{base, base_file, settings, upd};
    use super::super::{Settings, Strategy};
    use super::*;

    fn dp_settings(target: Option<f64>) -> Settings {
        Settings {
            strategy: Strategy::FedAvg { min_updates: 2 },
            dp: Some(DpSettings {
                noise_multiplier: 1.0,
                clip_norm: 1.0,
                delta: 1e-5,
                target_epsilon: target,
            }),
            ..settings()
        }
    }

    fn one_round_epsilon(rounds: u64) -> f64 {
        let mut a = Accountant::default();
        a.compose(1.0, 1.0, rounds);
        a.epsilon(1e-5).0
    }

    #[test]
    fn dp_rounds_are_clipped_noised_accounted_and_stop_at_the_budget() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base_file()).expect("register");
        // Room for two rounds, not three.
        let cfg = dp_settings(Some((one_round_epsilon(2) + one_round_epsilon(3)) / 2.0));
        let base_params = base().params;
        let mut id = 0;
        for version in 0..3u64 {
            for _ in 0..2 {
                id += 1;
                let u = upd(&format!("u{id}"), &version.to_string(), 1_000_000, 10.0);
                s.ingest(&u, &cfg, |b| b.parse().ok()).expect("ingest");
            }
            let g = s.aggregate("m", &cfg, false, &mut None).expect("aggregate");
            if version == 2 {
                assert!(g.is_none(), "the third round would exceed the budget");
                break;
            }
            let g = g.expect("a DP version");
            let dp = &g.metrics["dp"];
            assert_eq!(dp["rounds"], version + 1);
            let eps = dp["epsilon"].as_f64().expect("epsilon");
            assert!((eps - one_round_epsilon(version + 1)).abs() < 1e-9, "{dp}");
            if version == 0 {
                // Clipped to norm 1 over 6 values, equal weights (the
                // claimed million samples do not matter), plus noise of
                // std 1 x 1 / 2 per coordinate.
                let (head, _) = dai_head::Head::from_bytes(&g.head_file).expect("head");
                let delta = head.params.minus(&base_params);
                let clipped = 10.0 / (6.0f32 * 100.0).sqrt();
                let values: Vec<f32> = delta.weights.iter().flatten().copied().collect();
                assert!(
                    values.iter().all(|d| (d - clipped).abs() < 2.5),
                    "{values:?}"
                );
                assert!(
                    values.iter().any(|d| (d - clipped).abs() > 1e-4),
                    "no noise: {values:?}"
                );
            }
        }
        assert_eq!(
            s.pending_count("m").expect("pending"),
            2,
            "kept, not published"
        );
        let spent = s.privacy_spent("m").expect("spent");
        assert_eq!(spent.rounds, 2);
        assert!((spent.epsilon(1e-5) - one_round_epsilon(2)).abs() < 1e-9);
    }

    #[test]
    fn a_version_made_without_noise_makes_epsilon_infinite() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base_file()).expect("register");
        let plain = Settings {
            strategy: Strategy::FedAvg { min_updates: 1 },
            ..settings()
        };
        s.ingest(&upd("u1", "0", 1, 0.5), &plain, |b| b.parse().ok())
            .expect("ingest");
        s.aggregate("m", &plain, false, &mut None)
            .expect("aggregate")
            .expect("plain version");
        let spent = s.privacy_spent("m").expect("spent");
        assert!(spent.unprotected && spent.epsilon(1e-5).is_infinite());
        // Nothing aggregated yet in a fresh state: nothing spent.
        let fresh = tempfile::tempdir().expect("tmp");
        let f = State::open(&fresh.path().join("agg.sqlite")).expect("open");
        f.register("m", &base_file()).expect("register");
        assert_eq!(f.privacy_spent("m").expect("spent").epsilon(1e-5), 0.0);
    }
}
