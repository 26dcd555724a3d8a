//! Partial aggregates from tiers ([`dai_protocol::partial`]) into the
//! root's pending buffer, in one transaction like an update:
//! - the partial's own id goes into `seen`, so a redelivery is acked as a
//!   duplicate and counted once;
//! - every contributor's update id goes into `seen` too: exactly once in
//!   effect is by contributor. A partial that names an id already counted
//!   (directly, or in another tier's partial) is refused whole, with the
//!   ids in the reason: a sum cannot be trimmed, so the tier folds again
//!   without them and sends a new partial;
//! - the mean delta (`sum / weight`) is validated like an update (layout,
//!   finite values, base, epoch, staleness, norm bound) and kept in
//!   `pending` with its weight and votes; [`super::aggregate`] combines it
//!   as a weighted mean.
//!
//! What the root cannot check: how the tier weighed, clipped or robustly
//! combined the updates it folded (it sees only the sum), nor that the
//! contributors really sent what the tier says. It trusts the tiers it
//! lists (`--tier`), as the tiers trust nothing but their devices'
//! signatures. Central DP needs the individual updates, so it runs on the
//! tiers (each accounts its own releases) and a root with DP refuses
//! partials; the root's combination of noised partials is post-processing
//! of them and spends nothing more.

use super::{CURRENT_SQL, DUPLICATE_REASON, Settings, State, StateError, now};
use crate::{Limits, Rejection, validate};
use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::partial::Partial;
use dai_protocol::update::Update;
use rusqlite::{OptionalExtension, params};

/// Contributor ids named in a refusal (the count is always given).
const NAMED: usize = 5;

impl State {
    /// Validate and record one partial aggregate; returns the ack for the
    /// tier.
    pub fn ingest_partial(
        &mut self,
        p: &Partial,
        settings: &Settings,
        base_of: impl Fn(&str) -> Option<u64>,
    ) -> Result<Ack, StateError> {
        let m = &p.sum.meta;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let seen_status: Option<String> = tx
            .query_row(
                "SELECT status FROM seen WHERE update_id = ?1",
                params![m.update_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(status) = seen_status {
            return Ok(Ack {
                update_id: m.update_id.clone(),
                status: match status.as_str() {
                    "accepted" => AckStatus::Accepted,
                    "rebase" => AckStatus::Rebase,
                    _ => AckStatus::Rejected,
                },
                reason: Some(DUPLICATE_REASON.into()),
                round: None,
            });
        }
        let verdict = Self::judge_partial(&tx, p, settings, &base_of)?;
        let ack = match verdict {
            Ok(c) => {
                tx.execute(
                    "INSERT INTO seen (update_id, device, model, status, reason, received_at) VALUES (?1, ?2, ?3, 'accepted', ?4, ?5)",
                    params![c.update_id, c.device, m.model, format!("partial aggregate of {} updates", p.votes), now()],
                )?;
                let reason = format!("in partial {} of tier {}", m.update_id, m.device);
                let mut add = tx.prepare(
                    "INSERT INTO seen (update_id, device, model, status, reason, received_at) VALUES (?1, ?2, ?3, 'accepted', ?4, ?5)",
                )?;
                let at = now();
                for k in &p.contributors {
                    add.execute(params![k.update_id, k.device, m.model, reason, at])?;
                }
                drop(add);
                super::retention::count_ack(&tx, true)?;
                tx.execute(
                    "INSERT INTO pending (update_id, model, device, base_version, sample_count, tensors, loss, weight, votes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![c.update_id, m.model, c.device, c.base_version as i64, c.sample_count as i64, super::ingest::pack(&c.tensors), if m.loss.is_finite() { m.loss as f64 } else { 0.0 }, p.weight, p.votes as i64],
                )?;
                let round: Option<i64> = tx
                    .query_row(CURRENT_SQL, params![m.model], |r| r.get(0))
                    .optional()?;
                Ack {
                    update_id: c.update_id,
                    status: AckStatus::Accepted,
                    reason: None,
                    round: round.map(|v| v as u64 + 1),
                }
            }
            Err(r) => {
                let (label, status) = if r.is_rebase() {
                    ("rebase", AckStatus::Rebase)
                } else {
                    ("rejected", AckStatus::Rejected)
                };
                tx.execute(
                    "INSERT INTO seen (update_id, device, model, status, reason, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![m.update_id, m.device, m.model, label, r.to_string(), now()],
                )?;
                super::retention::count_ack(&tx, false)?;
                Ack {
                    update_id: m.update_id.clone(),
                    status,
                    reason: Some(r.to_string()),
                    round: None,
                }
            }
        };
        tx.commit()?;
        Ok(ack)
    }

    /// The partial's verdict: its mean as a contribution, or why not.
    fn judge_partial(
        tx: &rusqlite::Transaction<'_>,
        p: &Partial,
        settings: &Settings,
        base_of: &impl Fn(&str) -> Option<u64>,
    ) -> Result<Result<crate::Contribution, Rejection>, StateError> {
        let m = &p.sum.meta;
        if settings.dp.is_some() {
            return Ok(Err(Rejection::Tier(
                "this aggregator adds central DP, which needs the individual updates a partial hides: run DP on the tiers (--dp-noise there), where the updates are visible".into(),
            )));
        }
        let mut counted = Vec::new();
        {
            let mut q = tx.prepare("SELECT 1 FROM seen WHERE update_id = ?1")?;
            for k in &p.contributors {
                if q.exists(params![k.update_id])? {
                    counted.push(k.update_id.as_str());
                }
            }
        }
        if !counted.is_empty() {
            let named: Vec<String> = counted
                .iter()
                .take(NAMED)
                .map(|s| format!("{s:?}"))
                .collect();
            return Ok(Err(Rejection::Tier(format!(
                "{} of its {} contributors were already counted ({}{}): fold again without them",
                counted.len(),
                p.contributors.len(),
                named.join(", "),
                if counted.len() > NAMED { ", ..." } else { "" }
            ))));
        }
        let current = tx
            .query_row(CURRENT_SQL, params![m.model], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()?;
        let Some((version, head)) = current else {
            return Ok(Err(Rejection::UnknownModel(m.model.clone())));
        };
        let layout = Self::layout(&head, &m.model)?;
        let limits = Limits {
            current_version: version,
            epoch: Self::epoch_in(tx)?,
            max_staleness: settings.max_staleness,
            reject_norm: settings.reject_norm,
        };
        Ok(validate(&mean_of(p), &layout, &limits, base_of, |_| false))
    }
}

/// The partial's mean delta as an update (what `validate` checks: a mean
/// of bounded deltas is bounded by the same norm).
fn mean_of(p: &Partial) -> Update {
    let mut mean = p.sum.clone();
    let scale = (1.0 / p.weight) as f32;
    for t in &mut mean.tensors {
        for v in &mut t.values {
            *v *= scale;
        }
    }
    mean
}
