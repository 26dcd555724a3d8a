//! Folding the pending buffer into a new global version: the strategy
//! decides when (FedAvg round size, FedBuff K, or a forced round timeout),
//! [`crate::aggregate`] combines the deltas (weighted mean, clipping,
//! trimmed mean, median; FedBuff's staleness discount in the weights), the
//! server optimiser (FedAdam) or a plain sum applies them to the current
//! head, and the new version is written and the buffer cleared in one
//! transaction.

use super::privacy;
use super::versions::stamped_head;
use super::{CURRENT_SQL, NewGlobal, Settings, State, StateError, Strategy, now};
use crate::{Contribution, FedAdam, ModelLayout, aggregate, staleness_weight};
use dai_head::Head;
use rusqlite::params;

impl State {
    /// Fold the pending buffer of `model` into a new global version if the
    /// strategy says so (or `force` with at least one update, e.g. a round
    /// timeout). `adam` is the server optimiser (FedAdam); `None` adds the
    /// aggregated delta as is. Returns the new version.
    pub fn aggregate(
        &mut self,
        model: &str,
        settings: &Settings,
        force: bool,
        adam: &mut Option<FedAdam>,
    ) -> Result<Option<NewGlobal>, StateError> {
        Ok(
            match self.close_round(model, settings, force, adam, None)? {
                Some(Closed::Global(g)) => Some(g),
                _ => None,
            },
        )
    }

    /// On a tier: fold the pending buffer of `model` into a partial
    /// aggregate in the outbox (see [`super::tier`]) when the strategy
    /// says so, instead of a new version. The robust options and clipping
    /// apply here, where the individual updates are visible.
    pub fn fold_partial(
        &mut self,
        model: &str,
        settings: &Settings,
        force: bool,
        tier: &str,
    ) -> Result<Option<super::tier::Outgoing>, StateError> {
        Ok(
            match self.close_round(model, settings, force, &mut None, Some(tier))? {
                Some(Closed::Partial(p)) => Some(p),
                _ => None,
            },
        )
    }

    fn close_round(
        &mut self,
        model: &str,
        settings: &Settings,
        force: bool,
        adam: &mut Option<FedAdam>,
        fold: Option<&str>,
    ) -> Result<Option<Closed>, StateError> {
        let pending = self.pending_count(model)?;
        let due = match settings.strategy {
            // A round closes on distinct devices, not updates.
            Strategy::FedAvg { min_updates } => {
                self.pending_device_count(model)? >= min_updates.max(1)
            }
            Strategy::FedBuff { k } => pending >= k.max(1),
        };
        if pending == 0 || !(due || force) {
            return Ok(None);
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (version, head_file): (u64, Vec<u8>) =
            tx.query_row(CURRENT_SQL, params![model], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })?;
        let layout = State::layout(&head_file, model)?;
        let rows = readable_pending(&tx, &layout)?;
        if rows.is_empty() {
            tx.commit()?;
            return Ok(None);
        }
        let mut metrics = round_metrics(&rows, version);
        let tiers = partial_weights(&tx, model)?;
        if !tiers.is_empty() {
            metrics["partials"] = tiers.len().into();
            metrics["updates"] = (rows.len() - tiers.len()
                + tiers.values().map(|&(_, v)| v as usize).sum::<usize>())
            .into();
        }
        let mut contribs: Vec<Contribution> = rows.into_iter().map(|(c, _)| c).collect();
        // The sample cap is the tiers' business for what they folded.
        let direct = |c: &Contribution| !tiers.contains_key(&c.update_id);
        let claims: Vec<u64> = contribs
            .iter()
            .filter(|c| direct(c))
            .map(|c| c.sample_count)
            .collect();
        let cap = settings.sample_cap.for_round(&claims);
        let mut capped = 0usize;
        if let Some(cap) = cap {
            for c in contribs
                .iter_mut()
                .filter(|c| direct(c) && c.sample_count > cap)
            {
                if settings.sample_cap != crate::state::SampleCap::Equal {
                    tracing::warn!(%model, update = %c.update_id, device = %c.device, claimed = c.sample_count, cap, "sample count above the round's cap; weighed at the cap");
                }
                c.sample_count = cap;
                capped += 1;
            }
        }
        metrics["sample_cap"] = cap.map_or(serde_json::Value::Null, |c| c.into());
        metrics["capped"] = capped.into();
        metrics["claimed_samples"] = metrics["samples"].clone();
        metrics["samples"] = contribs.iter().map(|c| c.sample_count).sum::<u64>().into();
        // Nothing to combine (e.g. zero total weight), or a DP round that
        // would exceed the budget: the transaction is dropped, so the
        // buffer stays as it was.
        let delta = match &settings.dp {
            // Partials are refused under DP (`partials`), so none is here.
            None if !tiers.is_empty() => {
                let Some(delta) = tiered_mean(&contribs, &tiers, settings.strategy, version) else {
                    return Ok(None);
                };
                metrics["clip_norm"] = serde_json::Value::Null;
                metrics["aggregation"] =
                    "weighted mean of partial aggregates and updates (robust options apply on the tiers)"
                        .into();
                delta
            }
            None => {
                let weights = weights(&contribs, settings.strategy, version);
                let Some((delta, clip)) = aggregate(&contribs, &weights, &settings.aggregation)
                else {
                    return Ok(None);
                };
                metrics["clip_norm"] = clip.map_or(serde_json::Value::Null, |c| c.into());
                metrics["aggregation"] = settings.aggregation.label().into();
                delta
            }
            Some(dp) => {
                let mut spent = privacy::spent(&tx, model)?;
                spent.accountant.compose(1.0, dp.noise_multiplier, 1);
                spent.rounds += 1;
                let epsilon = spent.epsilon(dp.delta);
                if let Some(target) = dp.target_epsilon
                    && epsilon > target
                {
                    tracing::warn!(%model, epsilon, target, delta = dp.delta, "privacy budget spent: no new version is published (--dp-target-epsilon)");
                    return Ok(None);
                }
                let Some(delta) = privacy::noisy_mean(&contribs, dp) else {
                    return Ok(None);
                };
                metrics["clip_norm"] = dp.clip_norm.into();
                metrics["aggregation"] = "DP: clip, equal-weight mean, Gaussian noise".into();
                metrics["dp"] = serde_json::json!({
                    "noise_multiplier": dp.noise_multiplier,
                    "clip_norm": dp.clip_norm,
                    "delta": dp.delta,
                    "rounds": spent.rounds,
                    "epsilon": if epsilon.is_finite() { serde_json::json!(epsilon) } else { serde_json::json!("inf") },
                });
                delta
            }
        };
        if let Some(tier) = fold {
            // A DP round is an equal-weight mean: it weighs its count. The
            // release is accounted here, in the transaction that makes it.
            let total: f64 = match &settings.dp {
                Some(dp) => {
                    super::retention::add_dp_round(&tx, model, dp.noise_multiplier)?;
                    contribs.len() as f64
                }
                None => contribs
                    .iter()
                    .map(|c| weight_of(c, &tiers, settings.strategy, version))
                    .filter(|w| w.is_finite() && *w > 0.0)
                    .sum(),
            };
            let out =
                super::tier::to_outbox(&tx, tier, &layout, &delta, total, &contribs, &metrics)?;
            tx.execute("DELETE FROM pending WHERE model = ?1", params![model])?;
            tx.commit()?;
            return Ok(Some(Closed::Partial(out)));
        }
        let saved_adam = adam.clone();
        let head = apply_delta(&head_file, model, &delta, adam)?;
        if let Some(v) = &settings.validation
            && let Some(set) = v.sets.get(model)
        {
            let (current, _) =
                Head::from_bytes(&head_file).map_err(|e| StateError::Head(e.to_string()))?;
            let score = |h: &Head| set.accuracy(h).map_err(StateError::Head);
            let (before, after) = (score(&current)?, score(&head)?);
            metrics["validation"] =
                serde_json::json!({"before": before, "after": after, "rows": set.labels.len()});
            if after < before - v.margin {
                // The round is discarded, not published: the current
                // global stays, the updates' `seen` rows say why, and the
                // server optimiser forgets the step.
                let reason = format!(
                    "round discarded: the candidate global's validation accuracy {after:.4} is more than {} below the current {before:.4}",
                    v.margin
                );
                let ids: Vec<&str> = contribs.iter().map(|c| c.update_id.as_str()).collect();
                tracing::warn!(%model, version, before, after, margin = v.margin, updates = ?ids, "{reason}");
                for c in &contribs {
                    tx.execute(
                        "UPDATE seen SET status = 'discarded', reason = ?2 WHERE update_id = ?1",
                        params![c.update_id, reason],
                    )?;
                }
                tx.execute("DELETE FROM pending WHERE model = ?1", params![model])?;
                tx.commit()?;
                *adam = saved_adam;
                return Ok(None);
            }
        }
        let new_version = version + 1;
        let new_file = stamped_head(&head, model, new_version, version)?;
        let contributors: Vec<String> = contribs.iter().map(|c| c.update_id.clone()).collect();
        tx.execute(
            "INSERT INTO versions (model, version, parent, head, contributors, created_at, metrics) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![model, new_version as i64, version as i64, new_file, serde_json::to_string(&contributors).unwrap_or_default(), now(), metrics.to_string()],
        )?;
        tx.execute("DELETE FROM pending WHERE model = ?1", params![model])?;
        tx.commit()?;
        Ok(Some(Closed::Global(NewGlobal {
            model: model.to_string(),
            version: new_version,
            parent: version,
            head_file: new_file,
            contributors,
            metrics,
        })))
    }
}

/// What closing a round made.
enum Closed {
    Global(NewGlobal),
    Partial(super::tier::Outgoing),
}

/// The pending updates of `layout`'s model in arrival order, each with
/// its loss. A row that cannot be read back or does not fit the layout
/// (fewer or shorter tensors: a damaged state file) is deleted with an
/// error log, not retried forever: it would fail every aggregation and
/// stop the service, again after each restart.
fn readable_pending(
    tx: &rusqlite::Transaction<'_>,
    layout: &ModelLayout,
) -> Result<Vec<(Contribution, f64)>, StateError> {
    let mut stmt = tx.prepare("SELECT update_id, device, base_version, sample_count, tensors, loss FROM pending WHERE model = ?1 ORDER BY rowid")?;
    let rows: Vec<(Contribution, Option<&'static str>, f64)> = stmt
        .query_map(params![layout.model], |r| {
            let (tensors, problem) = match unpack(r.get_ref(4)?) {
                None => (Vec::new(), Some("is unreadable")),
                Some(t) if !fits(&t, layout) => {
                    (Vec::new(), Some("does not fit the model's layout"))
                }
                Some(t) => (t, None),
            };
            Ok((
                Contribution {
                    update_id: r.get(0)?,
                    device: r.get(1)?,
                    base_version: r.get::<_, i64>(2)? as u64,
                    sample_count: r.get::<_, i64>(3)? as u64,
                    tensors,
                },
                problem,
                r.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    drop(stmt);
    let mut readable = Vec::with_capacity(rows.len());
    for (c, problem, loss) in rows {
        let Some(problem) = problem else {
            readable.push((c, loss));
            continue;
        };
        tracing::error!(update = %c.update_id, device = %c.device, "pending update in the state file {problem}; dropped");
        tx.execute(
            "DELETE FROM pending WHERE update_id = ?1",
            params![c.update_id],
        )?;
    }
    Ok(readable)
}

/// Whether unpacked `tensors` have the layout's count and each its length.
fn fits(tensors: &[Vec<f32>], layout: &ModelLayout) -> bool {
    tensors.len() == layout.tensors.len()
        && tensors
            .iter()
            .zip(&layout.tensors)
            .all(|(t, (_, shape))| t.len() == shape.iter().product::<usize>())
}

/// What the registry records about a round: updates, devices, samples,
/// the sample-weighted mean loss and the largest staleness.
fn round_metrics(rows: &[(Contribution, f64)], version: u64) -> serde_json::Value {
    let samples: u64 = rows.iter().map(|(c, _)| c.sample_count).sum();
    let mean_loss = rows
        .iter()
        .map(|(c, l)| l * c.sample_count as f64)
        .sum::<f64>()
        / (samples.max(1) as f64);
    let mut devices: Vec<&str> = rows.iter().map(|(c, _)| c.device.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    serde_json::json!({
        "updates": rows.len(),
        "devices": devices.len(),
        "samples": samples,
        "mean_loss": mean_loss,
        "max_staleness": rows.iter().map(|(c, _)| version.saturating_sub(c.base_version)).max().unwrap_or(0),
    })
}

/// (weight, votes) of each pending partial aggregate of `model`, by id.
fn partial_weights(
    tx: &rusqlite::Transaction<'_>,
    model: &str,
) -> Result<std::collections::HashMap<String, (f64, u64)>, StateError> {
    let mut q = tx.prepare(
        "SELECT update_id, weight, votes FROM pending WHERE model = ?1 AND weight IS NOT NULL",
    )?;
    let rows = q.query_map(params![model], |r| {
        Ok((
            r.get::<_, String>(0)?,
            (r.get::<_, f64>(1)?, r.get::<_, i64>(2)?.max(0) as u64),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A round with partial aggregates: the weighted mean of every pending
/// delta, a partial's mean weighing its total weight (so the result is the
/// sum of the tiers' sums over the sum of their weights), a device's
/// update its capped sample count; FedBuff's staleness discount on both.
/// `None` when the weights add up to nothing.
fn tiered_mean(
    contribs: &[Contribution],
    tiers: &std::collections::HashMap<String, (f64, u64)>,
    strategy: Strategy,
    version: u64,
) -> Option<Vec<Vec<f32>>> {
    let first = contribs.first()?;
    let mut acc: Vec<Vec<f64>> = first.tensors.iter().map(|t| vec![0.0; t.len()]).collect();
    let mut total = 0.0f64;
    for c in contribs {
        let w = weight_of(c, tiers, strategy, version);
        if !(w.is_finite() && w > 0.0) {
            continue;
        }
        total += w;
        for (a, t) in acc.iter_mut().zip(&c.tensors) {
            for (x, v) in a.iter_mut().zip(t) {
                *x += w * f64::from(*v);
            }
        }
    }
    (total > 0.0).then(|| {
        acc.into_iter()
            .map(|a| a.into_iter().map(|x| (x / total) as f32).collect())
            .collect()
    })
}

/// One pending delta's weight in a round: a partial's total weight, an
/// update's (capped) sample count; FedBuff's staleness discount on both.
fn weight_of(
    c: &Contribution,
    tiers: &std::collections::HashMap<String, (f64, u64)>,
    strategy: Strategy,
    version: u64,
) -> f64 {
    let w = tiers
        .get(&c.update_id)
        .map_or(c.sample_count as f64, |&(w, _)| w);
    match strategy {
        Strategy::FedBuff { .. } => w * staleness_weight(version.saturating_sub(c.base_version)),
        Strategy::FedAvg { .. } => w,
    }
}

/// Sample counts, discounted by staleness for FedBuff.
fn weights(contribs: &[Contribution], strategy: Strategy, version: u64) -> Vec<f64> {
    contribs
        .iter()
        .map(|c| {
            let w = c.sample_count as f64;
            match strategy {
                Strategy::FedBuff { .. } => {
                    w * staleness_weight(version.saturating_sub(c.base_version))
                }
                Strategy::FedAvg { .. } => w,
            }
        })
        .collect()
}

/// The current head with `delta` (layout order) applied: through the
/// server optimiser, or added as is.
fn apply_delta(
    head_file: &[u8],
    model: &str,
    delta: &[Vec<f32>],
    adam: &mut Option<FedAdam>,
) -> Result<Head, StateError> {
    let (mut head, _) = Head::from_bytes(head_file).map_err(|e| StateError::Head(e.to_string()))?;
    // Tensors are in layout order: sorted names (layers.i.bias < layers.i.weight).
    let layout = State::layout(head_file, model)?;
    let mut global: Vec<Vec<f32>> = layout
        .tensors
        .iter()
        .map(|(name, _)| tensor_of(&head, name))
        .collect();
    match adam {
        Some(opt) => opt.apply(&mut global, delta),
        None => {
            for (g, d) in global.iter_mut().zip(delta) {
                for (a, b) in g.iter_mut().zip(d) {
                    *a += b;
                }
            }
        }
    }
    for ((name, _), values) in layout.tensors.iter().zip(global) {
        set_tensor(&mut head, name, values)?;
    }
    Ok(head)
}

/// `ingest::pack`'s inverse; state files written before it hold JSON text.
fn unpack(v: rusqlite::types::ValueRef<'_>) -> Option<Vec<Vec<f32>>> {
    match v {
        rusqlite::types::ValueRef::Text(t) => serde_json::from_slice(t).ok(),
        rusqlite::types::ValueRef::Blob(mut b) => {
            let mut out = Vec::new();
            while !b.is_empty() {
                let (n, rest) = b.split_first_chunk::<4>()?;
                let n = u32::from_le_bytes(*n) as usize;
                let bytes = rest.get(..n.checked_mul(4)?)?;
                out.push(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                );
                b = &rest[n * 4..];
            }
            Some(out)
        }
        _ => None,
    }
}

/// The tensor `name` of `head`; names come from [`State::layout`], so an
/// unknown one is a bug and reads as empty (which fails the shape checks).
fn tensor_of(head: &Head, name: &str) -> Vec<f32> {
    dai_head::layout::named(&head.spec, &head.params)
        .into_iter()
        .find(|t| t.name() == name)
        .map(|t| t.values.to_vec())
        .unwrap_or_default()
}

fn set_tensor(head: &mut Head, name: &str, values: Vec<f32>) -> Result<(), StateError> {
    dai_head::layout::set(&head.spec, &mut head.params, name, values)
        .map_err(|e| StateError::Head(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{base_file, settings, upd};
    use super::super::ingest::pack;
    use super::*;

    #[test]
    fn an_unreadable_pending_row_is_dropped_not_fatal() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base_file()).expect("register");
        s.ingest(&upd("u1", "0", 1, 1.0), &settings(), |b| b.parse().ok())
            .expect("ingest");
        s.conn
            .execute(
                "INSERT INTO pending (update_id, model, device, base_version, sample_count, tensors) VALUES ('bad', 'm', 'd', 0, 1, X'0100')",
                [],
            )
            .expect("corrupt row");
        let g = s
            .aggregate("m", &settings(), false, &mut None)
            .expect("aggregation survives")
            .expect("a global from the readable update");
        assert_eq!(g.contributors, vec!["u1".to_string()]);
        assert_eq!(s.pending_count("m").expect("n"), 0);
    }

    #[test]
    fn a_pending_row_that_does_not_fit_the_layout_is_dropped_not_fatal() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("agg.sqlite");
        {
            let mut s = State::open(&path).expect("open");
            s.register("m", &base_file()).expect("register");
            s.ingest(&upd("u1", "0", 1, 1.0), &settings(), |b| b.parse().ok())
                .expect("ingest");
            s.ingest(&upd("u2", "0", 3, 2.0), &settings(), |b| b.parse().ok())
                .expect("ingest");
            // Framed correctly, but the layout is bias [2] then weight [2, 2]:
            // one tensor too few, and a weight one value short.
            for (id, tensors) in [
                ("few", vec![vec![1.0; 2]]),
                ("short", vec![vec![1.0; 2], vec![1.0; 3]]),
            ] {
                s.conn
                    .execute(
                        "INSERT INTO pending (update_id, model, device, base_version, sample_count, tensors) VALUES (?1, 'm', 'd', 0, 1, ?2)",
                        params![id, pack(&tensors)],
                    )
                    .expect("misfit row");
            }
            assert_eq!(s.pending_count("m").expect("n"), 4);
        }
        // After a restart, as the service would run it.
        let mut s = State::open(&path).expect("reopen");
        let g = s
            .aggregate("m", &settings(), false, &mut None)
            .expect("aggregation survives")
            .expect("a global from the fitting updates");
        assert_eq!(g.contributors, vec!["u1".to_string(), "u2".to_string()]);
        let (head, _) = Head::from_bytes(&g.head_file).expect("head");
        let (base, _) = Head::from_bytes(&base_file()).expect("base");
        // FedAvg of u1 (1 x 1.0) and u2 (3 x 2.0) = 1.75; the misfits add nothing.
        for (a, b) in head.params.weights[0].iter().zip(&base.params.weights[0]) {
            assert!((a - b - 1.75).abs() < 1e-6, "{a} - {b}");
        }
        assert_eq!(g.metrics["updates"], 2);
        assert_eq!(s.pending_count("m").expect("n"), 0, "misfits are gone");
    }

    #[test]
    fn aggregate_refuses_contributions_of_different_shapes() {
        let contrib = |id: &str, tensors: Vec<Vec<f32>>| Contribution {
            update_id: id.into(),
            device: "d".into(),
            base_version: 0,
            sample_count: 1,
            tensors,
        };
        let good = contrib("good", vec![vec![1.0; 2], vec![1.0; 4]]);
        for bad in [
            contrib("few", vec![vec![1.0; 2]]),
            contrib("short", vec![vec![1.0; 2], vec![1.0; 3]]),
            contrib("long", vec![vec![1.0; 2], vec![1.0; 5]]),
            contrib("empty", vec![]),
        ] {
            for robust in [
                crate::Robust::Mean,
                crate::Robust::Median,
                crate::Robust::TrimmedMean { fraction: 0.2 },
            ] {
                let agg = crate::Aggregation {
                    clip: crate::Clip::Fixed(1.0),
                    robust,
                };
                for pair in [[good.clone(), bad.clone()], [bad.clone(), good.clone()]] {
                    assert_eq!(
                        aggregate(&pair, &[1.0, 1.0], &agg),
                        None,
                        "{} with {:?}",
                        bad.update_id,
                        robust
                    );
                }
            }
        }
    }

    #[test]
    fn pack_and_unpack_round_trip_and_refuse_short_blobs() {
        let t = vec![vec![1.0, -2.5], vec![], vec![3.25]];
        let blob = pack(&t);
        assert_eq!(
            unpack(rusqlite::types::ValueRef::Blob(&blob)),
            Some(t.clone())
        );
        assert_eq!(unpack(rusqlite::types::ValueRef::Blob(&blob[..7])), None);
        assert_eq!(
            unpack(rusqlite::types::ValueRef::Text(b"[[1.0,-2.5],[],[3.25]]")),
            Some(t)
        );
    }

    #[test]
    fn an_inflated_sample_count_weighs_no_more_than_the_cap() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base_file()).expect("register");
        let five = Settings {
            strategy: Strategy::FedAvg { min_updates: 5 },
            ..settings()
        };
        // Four devices with 100 samples push +1; one claims 10^15 and
        // pushes -1. Uncapped, the global would move by ~-1.
        for i in 0..4 {
            s.ingest(&upd(&format!("h{i}"), "0", 100, 1.0), &five, |b| {
                b.parse().ok()
            })
            .expect("ingest");
        }
        s.ingest(&upd("big", "0", 1_000_000_000_000_000, -1.0), &five, |b| {
            b.parse().ok()
        })
        .expect("ingest");
        let g = s
            .aggregate("m", &five, false, &mut None)
            .expect("agg")
            .expect("a full round");
        // Capped at 2 x the median claim (100): (4*100 - 200) / 600.
        let (head, _) = Head::from_bytes(&g.head_file).expect("head");
        let base = super::super::fixtures::base();
        let moved = head.params.weights[0][0] - base.params.weights[0][0];
        assert!((moved - 200.0 / 600.0).abs() < 1e-4, "moved {moved}");
        assert_eq!(g.metrics["sample_cap"], 200);
        assert_eq!(g.metrics["capped"], 1);
        assert_eq!(g.metrics["samples"], 600);
        assert_eq!(g.metrics["claimed_samples"], 1_000_000_000_000_400u64);
        // Off: the claim decides.
        assert_eq!(crate::state::SampleCap::Off.for_round(&[1, 2]), None);
        assert_eq!(
            crate::state::SampleCap::Auto.for_round(&[100, 100, 100, 100, u64::MAX]),
            Some(200)
        );
        assert_eq!(crate::state::SampleCap::parse("0"), None);
        assert_eq!(
            crate::state::SampleCap::parse("500"),
            Some(crate::state::SampleCap::Fixed(500))
        );
    }

    #[test]
    fn fedbuff_discounts_stale_updates_and_records_round_metrics() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base_file()).expect("register");
        let fedbuff = Settings {
            strategy: Strategy::FedBuff { k: 1 },
            ..settings()
        };
        s.ingest(&upd("u1", "0", 1, 1.0), &fedbuff, |b| b.parse().ok())
            .expect("ingest");
        let v1 = s
            .aggregate("m", &fedbuff, false, &mut None)
            .expect("agg")
            .expect("K = 1");
        // Two updates against version 0 while version 1 is current: the
        // stale one (staleness 1) weighs 1/sqrt(2) of the fresh one.
        let fedbuff2 = Settings {
            strategy: Strategy::FedBuff { k: 2 },
            ..settings()
        };
        s.ingest(&upd("u2", "0", 1, 1.0), &fedbuff2, |b| b.parse().ok())
            .expect("stale");
        s.ingest(&upd("u3", "1", 1, 0.0), &fedbuff2, |b| b.parse().ok())
            .expect("fresh");
        let v2 = s
            .aggregate("m", &fedbuff2, false, &mut None)
            .expect("agg")
            .expect("K = 2");
        let w = staleness_weight(1);
        let expected = (w / (w + 1.0)) as f32;
        let (h1, _) = Head::from_bytes(&v1.head_file).expect("v1");
        let (h2, _) = Head::from_bytes(&v2.head_file).expect("v2");
        for (a, b) in h2.params.weights[0].iter().zip(&h1.params.weights[0]) {
            assert!((a - b - expected).abs() < 1e-6, "{a} - {b} vs {expected}");
        }
        assert_eq!(v2.metrics["updates"], 2);
        assert_eq!(v2.metrics["devices"], 2);
        assert_eq!(v2.metrics["samples"], 2);
        assert_eq!(v2.metrics["max_staleness"], 1);
        assert!((v2.metrics["mean_loss"].as_f64().expect("loss") - 0.1).abs() < 1e-6);
    }
}
