//! A tier's own state (`dai-cloud run --role site|intake`): the outbox of
//! partial aggregates it owes upstream, and the root's globals it adopts.
//! - [`State::fold_partial`] (in `aggregate`) closes a round into a
//!   partial ([`to_outbox`]), in the same transaction that clears the
//!   pending buffer: an update the tier acked is either pending or in an
//!   outbox partial, never neither. A partial leaves the outbox only when
//!   the root acks it ([`State::partial_acked`]), like an edge's update.
//! - [`State::adopt_global`] records a root global (verified by the
//!   caller) as this state's version, and takes the root's epoch, so the
//!   tier validates its devices' bases against the root's version line.

use super::{CURRENT_SQL, State, StateError, now};
use crate::{Contribution, ModelLayout};
use dai_protocol::base::{self, GlobalId};
use dai_protocol::global::GlobalModel;
use dai_protocol::partial::{Contributor, Partial};
use dai_protocol::update::{Encoding, Tensor, Update, UpdateMeta};
use rusqlite::{OptionalExtension, params};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS partials_out (
    partial_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    votes INTEGER NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL
);";

/// A partial aggregate waiting in the outbox: its encoded body (not yet
/// signed: the intake signs it for its topic when it sends it).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub partial_id: String,
    pub model: String,
    pub votes: u64,
    pub body: Vec<u8>,
}

/// The bundle part of a partial's base label (any non-empty text: only
/// the `+g{version}@e{epoch}` part is read).
const BASE_LABEL: &str = "partial";

/// Write the round's partial aggregate into the outbox: the mean `delta`
/// (layout order) times `weight`, over the contributions it folded.
pub(super) fn to_outbox(
    tx: &rusqlite::Transaction<'_>,
    tier: &str,
    layout: &ModelLayout,
    delta: &[Vec<f32>],
    weight: f64,
    contribs: &[Contribution],
    metrics: &serde_json::Value,
) -> Result<Outgoing, StateError> {
    // The oldest base of the round: the root judges staleness by it.
    let oldest = contribs.iter().map(|c| c.base_version).min().unwrap_or(0);
    let epoch = State::epoch_in(tx)?;
    let label = base::label(
        BASE_LABEL,
        (oldest > 0).then_some(GlobalId {
            epoch,
            version: oldest,
        }),
    );
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| StateError::Partial(format!("no randomness: {e}")))?;
    let partial_id = format!("p-{tier}-{}", hex::encode(r));
    let samples = contribs.iter().map(|c| c.sample_count).sum::<u64>().max(1);
    let tensors = layout
        .tensors
        .iter()
        .zip(delta)
        .map(|((name, shape), d)| Tensor {
            name: name.clone(),
            shape: shape.clone(),
            values: d.iter().map(|v| (f64::from(*v) * weight) as f32).collect(),
        })
        .collect();
    let p = Partial {
        sum: Update {
            meta: UpdateMeta {
                device: tier.to_string(),
                model: layout.model.clone(),
                base_version: label,
                update_id: partial_id.clone(),
                sample_count: metrics["claimed_samples"]
                    .as_u64()
                    .unwrap_or(samples)
                    .max(1),
                loss: metrics["mean_loss"].as_f64().unwrap_or(0.0) as f32,
                encoding: Encoding::F32,
            },
            tensors,
        },
        weight,
        votes: contribs.len() as u64,
        contributors: contribs
            .iter()
            .map(|c| Contributor {
                update_id: c.update_id.clone(),
                device: c.device.clone(),
            })
            .collect(),
    };
    let body = p.encode().map_err(|e| StateError::Partial(e.to_string()))?;
    tx.execute(
        "INSERT INTO partials_out (partial_id, model, votes, body, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![partial_id, layout.model, p.votes as i64, body, now()],
    )?;
    Ok(Outgoing {
        partial_id,
        model: layout.model.clone(),
        votes: p.votes,
        body,
    })
}

impl State {
    /// The partials the root has not acked yet, oldest first.
    pub fn outbox(&self) -> Result<Vec<Outgoing>, StateError> {
        let mut q = self.conn.prepare(
            "SELECT partial_id, model, votes, body FROM partials_out ORDER BY created_at, partial_id",
        )?;
        let rows = q.query_map([], |r| {
            Ok(Outgoing {
                partial_id: r.get(0)?,
                model: r.get(1)?,
                votes: r.get::<_, i64>(2)?.max(0) as u64,
                body: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The root acked `partial_id` (counted, or refused for good): it
    /// leaves the outbox. Whether it was there.
    pub fn partial_acked(&self, partial_id: &str) -> Result<bool, StateError> {
        Ok(self.conn.execute(
            "DELETE FROM partials_out WHERE partial_id = ?1",
            params![partial_id],
        )? > 0)
    }

    /// Record the root's global `g` (its signature already verified) as
    /// this state's version of its model: newer versions of the same
    /// epoch are added; a global of another epoch (the root's state was
    /// made again) replaces every version but the base and becomes this
    /// state's epoch. Whether anything changed.
    pub fn adopt_global(&mut self, g: &GlobalModel) -> Result<bool, StateError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let epoch = Self::epoch_in(&tx)?;
        let current: Option<i64> = tx
            .query_row(CURRENT_SQL, params![g.model], |r| r.get(0))
            .optional()?;
        let Some(current) = current else {
            return Err(StateError::UnknownModel(g.model.clone()));
        };
        if g.epoch == epoch && g.version <= current as u64 {
            return Ok(false);
        }
        if g.epoch != epoch {
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'epoch'",
                params![g.epoch.to_string()],
            )?;
            tx.execute(
                "DELETE FROM versions WHERE model = ?1 AND version > 0",
                params![g.model],
            )?;
            // Deltas on the old line's versions cannot count on the new
            // one (the root would ask for a rebase); on the shipped head
            // they still can.
            let dropped = tx.execute(
                "DELETE FROM pending WHERE model = ?1 AND base_version > 0",
                params![g.model],
            )?;
            if dropped > 0 {
                tracing::warn!(model = %g.model, dropped, old_epoch = epoch, epoch = g.epoch, "the root started a new version line: pending updates on the old one dropped");
            }
        }
        if g.version > 0 {
            tx.execute(
                "INSERT OR REPLACE INTO versions (model, version, parent, head, contributors, created_at, metrics) VALUES (?1, ?2, ?3, ?4, '[]', ?5, ?6)",
                params![g.model, g.version as i64, g.parent.map(|p| p as i64), g.head_file, now(), serde_json::json!({"from": "upstream", "epoch": g.epoch}).to_string()],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }
}
