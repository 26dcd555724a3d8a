//! Taking updates in: each one is validated against the model's current
//! version ([`crate::validate`]) and its outcome recorded — the id in
//! `seen`, an accepted update's tensors in `pending` — in the same
//! transaction, so an acked update is on disk and a redelivery is
//! recognised as a duplicate, even after a restart.

use super::{CURRENT_SQL, DUPLICATE_REASON, Settings, State, StateError, now};
use crate::{Limits, Rejection, validate};
use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::update::Update;
use rusqlite::{OptionalExtension, params};

/// A pending update replaced by a newer one of the same device and base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superseded {
    pub device: String,
    pub update_id: String,
    /// The update that replaced it.
    pub by: String,
    pub reason: String,
}

impl State {
    /// Validate and record one update; returns the ack to send.
    /// `base_of` maps the update's base_version string to a global version.
    pub fn ingest(
        &mut self,
        update: &Update,
        settings: &Settings,
        base_of: impl Fn(&str) -> Option<u64>,
    ) -> Result<Ack, StateError> {
        let mut acks = self.ingest_batch(&[update], settings, base_of)?;
        acks.pop()
            .ok_or_else(|| StateError::Head("no ack for a single update".into()))
    }

    /// [`State::ingest`] for several updates in ONE transaction (one disk
    /// sync instead of one per update: group commit). Acks come back in
    /// order; a later copy of an id in the same batch is a duplicate.
    pub fn ingest_batch(
        &mut self,
        updates: &[&Update],
        settings: &Settings,
        base_of: impl Fn(&str) -> Option<u64>,
    ) -> Result<Vec<Ack>, StateError> {
        Ok(self.ingest_batch_superseding(updates, settings, base_of)?.0)
    }

    /// [`State::ingest_batch`], and the pending updates the accepted ones
    /// superseded: a device has at most one live contribution per base
    /// version (its deltas are cumulative: `head - the global it started
    /// from`), so a newer accepted update replaces its pending one on the
    /// same base. The older one's `seen` row says so; the caller acks it as
    /// superseded.
    pub fn ingest_batch_superseding(
        &mut self,
        updates: &[&Update],
        settings: &Settings,
        base_of: impl Fn(&str) -> Option<u64>,
    ) -> Result<(Vec<Ack>, Vec<Superseded>), StateError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut acks = Vec::with_capacity(updates.len());
        let mut superseded = Vec::new();
        for update in updates {
            acks.push(Self::ingest_in(
                &tx,
                update,
                settings,
                &base_of,
                &mut superseded,
            )?);
        }
        tx.commit()?;
        Ok((acks, superseded))
    }

    fn ingest_in(
        tx: &rusqlite::Transaction<'_>,
        update: &Update,
        settings: &Settings,
        base_of: &impl Fn(&str) -> Option<u64>,
        superseded: &mut Vec<Superseded>,
    ) -> Result<Ack, StateError> {
        let m = &update.meta;
        let seen: bool = tx
            .query_row(
                "SELECT 1 FROM seen WHERE update_id = ?1",
                params![m.update_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        let current = tx
            .query_row(CURRENT_SQL, params![m.model], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()?;
        let result = match &current {
            None => Err(Rejection::UnknownModel(m.model.clone())),
            Some((version, head)) => {
                let layout = Self::layout(head, &m.model)?;
                let limits = Limits {
                    current_version: *version,
                    epoch: Self::epoch_in(tx)?,
                    max_staleness: settings.max_staleness,
                    reject_norm: settings.reject_norm,
                };
                validate(update, &layout, &limits, base_of, |_| seen)
            }
        };
        let ack = match result {
            Ok(c) => {
                let older: Vec<String> = tx
                    .prepare("SELECT update_id FROM pending WHERE model = ?1 AND device = ?2 AND base_version = ?3")?
                    .query_map(params![m.model, c.device, c.base_version as i64], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for old in older {
                    let reason = format!(
                        "superseded by {}: one live contribution per device and base",
                        c.update_id
                    );
                    tx.execute("DELETE FROM pending WHERE update_id = ?1", params![old])?;
                    tx.execute(
                        "UPDATE seen SET status = 'superseded', reason = ?2 WHERE update_id = ?1",
                        params![old, reason],
                    )?;
                    superseded.push(Superseded {
                        device: c.device.clone(),
                        update_id: old,
                        by: c.update_id.clone(),
                        reason,
                    });
                }
                tx.execute(
                    "INSERT INTO seen (update_id, device, model, status, reason, received_at) VALUES (?1, ?2, ?3, 'accepted', NULL, ?4)",
                    params![c.update_id, c.device, m.model, now()],
                )?;
                super::retention::count_ack(tx, true)?;
                tx.execute(
                    "INSERT INTO pending (update_id, model, device, base_version, sample_count, tensors, loss) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![c.update_id, m.model, c.device, c.base_version as i64, c.sample_count as i64, pack(&c.tensors), if m.loss.is_finite() { m.loss as f64 } else { 0.0 }],
                )?;
                Ack {
                    update_id: c.update_id,
                    status: AckStatus::Accepted,
                    reason: None,
                    round: current.as_ref().map(|(v, _)| v + 1),
                }
            }
            // A duplicate is acked as accepted again: the first copy was
            // persisted, so the edge may delete its outbox row.
            Err(Rejection::Duplicate(id)) => {
                let status: String = tx.query_row(
                    "SELECT status FROM seen WHERE update_id = ?1",
                    params![id],
                    |r| r.get(0),
                )?;
                Ack {
                    update_id: id,
                    status: match status.as_str() {
                        "accepted" | "superseded" => AckStatus::Accepted,
                        "rebase" => AckStatus::Rebase,
                        _ => AckStatus::Rejected,
                    },
                    reason: Some(DUPLICATE_REASON.into()),
                    round: None,
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
                super::retention::count_ack(tx, false)?;
                Ack {
                    update_id: m.update_id.clone(),
                    status,
                    reason: Some(r.to_string()),
                    round: None,
                }
            }
        };
        Ok(ack)
    }

    /// Distinct devices with a pending update of `model`, plus the updates
    /// folded into pending partial aggregates (what closes a FedAvg round:
    /// one device, one vote).
    pub fn pending_device_count(&self, model: &str) -> Result<usize, StateError> {
        Ok(self.conn.query_row(
            "SELECT (SELECT COUNT(DISTINCT device) FROM pending WHERE model = ?1 AND weight IS NULL)
                  + (SELECT COALESCE(SUM(votes), 0) FROM pending WHERE model = ?1 AND weight IS NOT NULL)",
            params![model],
            |r| r.get::<_, i64>(0),
        )? as usize)
    }

    /// Accepted updates of `model` waiting for the next aggregation (a
    /// partial aggregate counts the updates it folded).
    pub fn pending_count(&self, model: &str) -> Result<usize, StateError> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(SUM(votes), 0) FROM pending WHERE model = ?1",
            params![model],
            |r| r.get::<_, i64>(0),
        )? as usize)
    }

    /// (device, sample count) of each pending update of `model`, by
    /// device then id (what a round would count per device).
    pub fn pending_devices(&self, model: &str) -> Result<Vec<(String, u64)>, StateError> {
        let mut q = self.conn.prepare(
            "SELECT device, sample_count FROM pending WHERE model = ?1 ORDER BY device, update_id",
        )?;
        let rows = q.query_map(params![model], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Pending tensors as a blob: per tensor, a u32 LE count then f32 LE values
/// (JSON text cost more than the SQLite commit per update). Read back by
/// `aggregate::unpack`.
pub(super) fn pack(tensors: &[Vec<f32>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tensors.iter().map(|t| 4 + 4 * t.len()).sum());
    for t in tensors {
        out.extend((t.len() as u32).to_le_bytes());
        for v in t {
            out.extend(v.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{base_file, settings, upd};
    use super::*;

    #[test]
    fn a_batch_is_one_transaction_and_dedups_within_itself() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base_file()).expect("register");
        let (u1, u2, bad) = (
            upd("u1", "0", 1, 1.0),
            upd("u2", "0", 1, 2.0),
            upd("u3", "7", 1, 1.0),
        );
        let acks = s
            .ingest_batch(&[&u1, &u1, &bad, &u2], &settings(), |b| b.parse().ok())
            .expect("batch");
        let got: Vec<(&str, AckStatus, bool)> = acks
            .iter()
            .map(|a| (a.update_id.as_str(), a.status, a.reason.is_some()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("u1", AckStatus::Accepted, false),
                ("u1", AckStatus::Accepted, true),
                ("u3", AckStatus::Rebase, true),
                ("u2", AckStatus::Accepted, false),
            ]
        );
        assert_eq!(s.pending_count("m").expect("n"), 2);
        assert_eq!(s.seen_counts().expect("seen"), (2, 1));
    }

    #[test]
    fn a_refused_id_sent_again_keeps_its_answer() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base_file()).expect("register");
        // A base this state never made (its state was lost): rebase, and
        // so again on redelivery; an update with no samples: rejected.
        let unknown = upd("u1", "7", 1, 1.0);
        let empty = upd("u2", "0", 0, 1.0);
        let first = s
            .ingest(&unknown, &settings(), |b| b.parse().ok())
            .expect("first");
        assert_eq!(
            (first.status, first.reason.as_deref()),
            (
                AckStatus::Rebase,
                Some("base version 7 is newer than the current global version 0")
            )
        );
        let no = s
            .ingest(&empty, &settings(), |b| b.parse().ok())
            .expect("empty");
        assert_eq!(no.status, AckStatus::Rejected);
        for (u, status) in [(&unknown, AckStatus::Rebase), (&empty, AckStatus::Rejected)] {
            let again = s.ingest(u, &settings(), |b| b.parse().ok()).expect("again");
            assert_eq!(
                (again.status, again.reason.as_deref()),
                (status, Some(DUPLICATE_REASON))
            );
        }
        assert_eq!(s.seen_counts().expect("seen"), (0, 2));
        assert_eq!(s.pending_count("m").expect("n"), 0);
    }
}
