//! The aggregator's durable state (SQLite): seen update ids, the pending
//! buffer, and the registry of global versions.
//!
//! [`State::ingest`] validates an update and records the outcome in ONE
//! transaction: the id goes into `seen` (accepted or rejected) and an
//! accepted update into `pending`. A redelivery (QoS 1 duplicates, a
//! restarted edge) therefore never counts twice, and a restart continues
//! with the same buffer. [`State::aggregate`] folds the pending buffer into
//! a new global version and clears it, also in one transaction.

use crate::{
    Aggregation, Contribution, FedAdam, Limits, ModelLayout, Rejection, aggregate,
    staleness_weight, validate,
};
use dai_protocol::messages::{Ack, AckStatus};
use dai_protocol::update::Update;
use dai_train::Head;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;

/// State errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("model {0:?} is not registered")]
    UnknownModel(String),
    #[error("stored head: {0}")]
    Head(String),
    #[error("model {model:?} has no version {version} (the newest is {current})")]
    UnknownVersion {
        model: String,
        version: u64,
        current: u64,
    },
    #[error("version {version} of {model:?} is already the current one")]
    AlreadyCurrent { model: String, version: u64 },
    #[error("version {version} of {model:?} has no parent to roll back to")]
    NoParent { model: String, version: u64 },
}

/// How pending updates become a global version.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// Synchronous rounds: aggregate when `min_updates` arrived (or the
    /// round timed out with at least one), weights = sample counts.
    FedAvg { min_updates: usize },
    /// Buffered asynchronous: aggregate every `k` updates, weights = sample
    /// counts x 1/sqrt(1 + staleness).
    FedBuff { k: usize },
}

/// Aggregator settings for one model.
#[derive(Debug, Clone)]
pub struct Settings {
    pub strategy: Strategy,
    pub aggregation: Aggregation,
    pub max_staleness: u64,
    pub reject_norm: f64,
}

/// The reason in the ack of a redelivered update id.
pub const DUPLICATE_REASON: &str = "duplicate delivery; counted once";

/// A new global version, ready to sign and publish.
#[derive(Debug, Clone, PartialEq)]
pub struct NewGlobal {
    pub model: String,
    pub version: u64,
    pub parent: u64,
    pub head_file: Vec<u8>,
    pub contributors: Vec<String>,
    /// What the registry records about it (updates, samples, mean loss, or
    /// where a promoted version came from).
    pub metrics: serde_json::Value,
}

/// A registry row.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VersionRow {
    pub model: String,
    pub version: u64,
    pub parent: Option<u64>,
    /// Update ids folded into this version (empty for a base or a promotion).
    pub contributors: Vec<String>,
    pub metrics: serde_json::Value,
    /// Unix seconds.
    pub created_at: f64,
}

/// The durable state.
#[derive(Debug)]
pub struct State {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS seen (
    update_id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    update_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    device TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    sample_count INTEGER NOT NULL,
    tensors BLOB NOT NULL,
    loss REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    parent INTEGER,
    head BLOB NOT NULL,
    contributors TEXT NOT NULL,
    created_at REAL NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (model, version)
);";

/// Columns added after the first schema: (table, column, definition).
/// State files written before them gain the column on open.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("pending", "loss", "REAL NOT NULL DEFAULT 0"),
    ("versions", "metrics", "TEXT NOT NULL DEFAULT '{}'"),
];

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl State {
    pub fn open(path: &Path) -> Result<State, StateError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(SCHEMA)?;
        for (table, column, def) in ADDED_COLUMNS {
            let present: bool = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))?
                .exists(params![column])?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))?;
            }
        }
        Ok(State { conn })
    }

    /// Register a model's base head as version 0 (idempotent).
    pub fn register(&self, model: &str, base_head: &[u8]) -> Result<(), StateError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO versions (model, version, parent, head, contributors, created_at)
             VALUES (?1, 0, NULL, ?2, '[]', ?3)",
            params![model, base_head, now()],
        )?;
        Ok(())
    }

    /// Newest global version of `model` and its head file.
    pub fn current(&self, model: &str) -> Result<(u64, Vec<u8>), StateError> {
        self.conn
            .query_row(
                "SELECT version, head FROM versions WHERE model = ?1 ORDER BY version DESC LIMIT 1",
                params![model],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| StateError::UnknownModel(model.to_string()))
    }

    fn layout(head_file: &[u8], model: &str) -> Result<ModelLayout, StateError> {
        let (head, _) = Head::from_bytes(head_file).map_err(|e| StateError::Head(e.to_string()))?;
        let mut tensors = Vec::new();
        for (i, l) in head.spec.layers.iter().enumerate() {
            tensors.push((format!("layers.{i}.weight"), vec![l.outputs, l.inputs]));
            tensors.push((format!("layers.{i}.bias"), vec![l.outputs]));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(ModelLayout {
            model: model.to_string(),
            tensors,
        })
    }

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
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut acks = Vec::with_capacity(updates.len());
        for update in updates {
            acks.push(Self::ingest_in(&tx, update, settings, &base_of)?);
        }
        tx.commit()?;
        Ok(acks)
    }

    fn ingest_in(
        tx: &rusqlite::Transaction<'_>,
        update: &Update,
        settings: &Settings,
        base_of: &impl Fn(&str) -> Option<u64>,
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
            .query_row(
                "SELECT version, head FROM versions WHERE model = ?1 ORDER BY version DESC LIMIT 1",
                params![m.model],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)),
            )
            .optional()?;
        let result = match &current {
            None => Err(Rejection::UnknownModel(m.model.clone())),
            Some((version, head)) => {
                let layout = Self::layout(head, &m.model)?;
                let limits = Limits {
                    current_version: *version,
                    max_staleness: settings.max_staleness,
                    reject_norm: settings.reject_norm,
                };
                validate(update, &layout, &limits, base_of, |_| seen)
            }
        };
        let ack = match result {
            Ok(c) => {
                tx.execute(
                    "INSERT INTO seen (update_id, device, model, status, reason, received_at) VALUES (?1, ?2, ?3, 'accepted', NULL, ?4)",
                    params![c.update_id, c.device, m.model, now()],
                )?;
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
                    status: if status == "accepted" {
                        AckStatus::Accepted
                    } else {
                        AckStatus::Rejected
                    },
                    reason: Some(DUPLICATE_REASON.into()),
                    round: None,
                }
            }
            Err(r) => {
                tx.execute(
                    "INSERT INTO seen (update_id, device, model, status, reason, received_at) VALUES (?1, ?2, ?3, 'rejected', ?4, ?5)",
                    params![m.update_id, m.device, m.model, r.to_string(), now()],
                )?;
                Ack {
                    update_id: m.update_id.clone(),
                    status: AckStatus::Rejected,
                    reason: Some(r.to_string()),
                    round: None,
                }
            }
        };
        Ok(ack)
    }

    /// Every global version, by model then version.
    pub fn versions(&self) -> Result<Vec<VersionRow>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT model, version, parent, contributors, created_at, metrics FROM versions ORDER BY model, version")?;
        let rows = stmt.query_map([], |r| {
            Ok(VersionRow {
                model: r.get(0)?,
                version: r.get::<_, i64>(1)? as u64,
                parent: r.get::<_, Option<i64>>(2)?.map(|p| p as u64),
                contributors: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
                created_at: r.get(4)?,
                metrics: serde_json::from_str(&r.get::<_, String>(5)?)
                    .unwrap_or(serde_json::Value::Null),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Registered model names.
    pub fn models(&self) -> Result<Vec<String>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT DISTINCT model FROM versions ORDER BY model")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Number of update ids seen, by status (`accepted`, `rejected`).
    pub fn seen_counts(&self) -> Result<(u64, u64), StateError> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(SUM(status = 'accepted'), 0), COALESCE(SUM(status = 'rejected'), 0) FROM seen",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// Make the weights of `version` the served global again. Versions only
    /// move forward (edges ignore a global that is not newer than theirs),
    /// so this writes a NEW version `current + 1` carrying those weights,
    /// with `metrics.promoted_from` saying where they came from.
    pub fn promote(
        &mut self,
        model: &str,
        version: u64,
        reason: &str,
    ) -> Result<NewGlobal, StateError> {
        self.promote_in(model, Some(version), reason)
    }

    /// `version` None: the parent of the current version (a rollback). The
    /// current version is read inside the writing transaction, so a
    /// concurrent aggregation cannot make it roll back the wrong one.
    fn promote_in(
        &mut self,
        model: &str,
        version: Option<u64>,
        reason: &str,
    ) -> Result<NewGlobal, StateError> {
        // IMMEDIATE: take the write lock first (waiting busy_timeout), so a
        // running aggregator and this CLI never fail with SQLITE_BUSY on a
        // read-to-write upgrade.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (current, parent): (u64, Option<i64>) = tx
            .query_row(
                "SELECT version, parent FROM versions WHERE model = ?1 ORDER BY version DESC LIMIT 1",
                params![model],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| StateError::UnknownModel(model.to_string()))?;
        let (version, reason) = match version {
            Some(v) => (v, reason.to_string()),
            None => (
                parent.ok_or_else(|| StateError::NoParent {
                    model: model.to_string(),
                    version: current,
                })? as u64,
                format!("rollback of version {current}"),
            ),
        };
        let reason = reason.as_str();
        let source: Vec<u8> = tx
            .query_row(
                "SELECT head FROM versions WHERE model = ?1 AND version = ?2",
                params![model, version as i64],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StateError::UnknownVersion {
                model: model.to_string(),
                version,
                current,
            })?;
        if version == current {
            return Err(StateError::AlreadyCurrent {
                model: model.to_string(),
                version,
            });
        }
        let (head, _) = Head::from_bytes(&source).map_err(|e| StateError::Head(e.to_string()))?;
        let new_version = current + 1;
        let file = stamped_head(&head, model, new_version, current)?;
        let metrics = serde_json::json!({"promoted_from": version, "reason": reason});
        tx.execute(
            "INSERT INTO versions (model, version, parent, head, contributors, created_at, metrics) VALUES (?1, ?2, ?3, ?4, '[]', ?5, ?6)",
            params![model, new_version as i64, current as i64, file, now(), metrics.to_string()],
        )?;
        tx.commit()?;
        Ok(NewGlobal {
            model: model.to_string(),
            version: new_version,
            parent: current,
            head_file: file,
            contributors: Vec::new(),
            metrics,
        })
    }

    /// Undo the newest version: promote its parent's weights.
    pub fn rollback(&mut self, model: &str) -> Result<NewGlobal, StateError> {
        self.promote_in(model, None, "")
    }

    pub fn pending_count(&self, model: &str) -> Result<usize, StateError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM pending WHERE model = ?1",
            params![model],
            |r| r.get::<_, i64>(0),
        )? as usize)
    }

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
        let pending = self.pending_count(model)?;
        let due = match settings.strategy {
            Strategy::FedAvg { min_updates } => pending >= min_updates.max(1),
            Strategy::FedBuff { k } => pending >= k.max(1),
        };
        if pending == 0 || !(due || force) {
            return Ok(None);
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (version, head_file): (u64, Vec<u8>) = tx.query_row(
            "SELECT version, head FROM versions WHERE model = ?1 ORDER BY version DESC LIMIT 1",
            params![model],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
        )?;
        let mut stmt = tx.prepare("SELECT update_id, device, base_version, sample_count, tensors, loss FROM pending WHERE model = ?1 ORDER BY rowid")?;
        let rows: Vec<(Contribution, f64)> = stmt
            .query_map(params![model], |r| {
                Ok((
                    Contribution {
                        update_id: r.get(0)?,
                        device: r.get(1)?,
                        base_version: r.get::<_, i64>(2)? as u64,
                        sample_count: r.get::<_, i64>(3)? as u64,
                        tensors: unpack(r.get_ref(4)?).unwrap_or_default(),
                    },
                    r.get(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        // A row that cannot be read back (a damaged state file) is dropped
        // with an error log, not retried forever: it would fail every
        // aggregation and stop the service, again after each restart.
        let (rows, broken): (Vec<_>, Vec<_>) =
            rows.into_iter().partition(|(c, _)| !c.tensors.is_empty());
        for (c, _) in &broken {
            tracing::error!(update = %c.update_id, device = %c.device, "pending update unreadable in the state file; dropped");
            tx.execute(
                "DELETE FROM pending WHERE update_id = ?1",
                params![c.update_id],
            )?;
        }
        if rows.is_empty() {
            tx.commit()?;
            return Ok(None);
        }
        let samples: u64 = rows.iter().map(|(c, _)| c.sample_count).sum();
        let mean_loss = rows
            .iter()
            .map(|(c, l)| l * c.sample_count as f64)
            .sum::<f64>()
            / (samples.max(1) as f64);
        let mut devices: Vec<&str> = rows.iter().map(|(c, _)| c.device.as_str()).collect();
        devices.sort_unstable();
        devices.dedup();
        let metrics = serde_json::json!({
            "updates": rows.len(),
            "devices": devices.len(),
            "samples": samples,
            "mean_loss": mean_loss,
            "max_staleness": rows.iter().map(|(c, _)| version.saturating_sub(c.base_version)).max().unwrap_or(0),
        });
        let contribs: Vec<Contribution> = rows.into_iter().map(|(c, _)| c).collect();
        let weights: Vec<f64> = contribs
            .iter()
            .map(|c| {
                let w = c.sample_count as f64;
                match settings.strategy {
                    Strategy::FedBuff { .. } => {
                        w * staleness_weight(version.saturating_sub(c.base_version))
                    }
                    Strategy::FedAvg { .. } => w,
                }
            })
            .collect();
        let Some(delta) = aggregate(&contribs, &weights, &settings.aggregation) else {
            return Ok(None);
        };
        let (mut head, _) =
            Head::from_bytes(&head_file).map_err(|e| StateError::Head(e.to_string()))?;
        // Tensors are in layout order: sorted names (layers.i.bias < layers.i.weight).
        let layout = Self::layout(&head_file, model)?;
        let mut global: Vec<Vec<f32>> = layout
            .tensors
            .iter()
            .map(|(name, _)| tensor_of(&head, name))
            .collect();
        match adam {
            Some(opt) => opt.apply(&mut global, &delta),
            None => {
                for (g, d) in global.iter_mut().zip(&delta) {
                    for (a, b) in g.iter_mut().zip(d) {
                        *a += b;
                    }
                }
            }
        }
        for ((name, _), values) in layout.tensors.iter().zip(global) {
            set_tensor(&mut head, name, values);
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
        Ok(Some(NewGlobal {
            model: model.to_string(),
            version: new_version,
            parent: version,
            head_file: new_file,
            contributors,
            metrics,
        }))
    }
}

/// Pending tensors as a blob: per tensor, a u32 LE count then f32 LE values
/// (JSON text cost more than the SQLite commit per update).
fn pack(tensors: &[Vec<f32>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tensors.iter().map(|t| 4 + 4 * t.len()).sum());
    for t in tensors {
        out.extend((t.len() as u32).to_le_bytes());
        for v in t {
            out.extend(v.to_le_bytes());
        }
    }
    out
}

/// [`pack`]'s inverse; state files written before it hold JSON text.
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

/// A head file stamped with its global version (edges read the version
/// from `__metadata__`).
fn stamped_head(
    head: &Head,
    model: &str,
    version: u64,
    parent: u64,
) -> Result<Vec<u8>, StateError> {
    let mut meta = std::collections::HashMap::new();
    meta.insert("model".to_string(), model.to_string());
    meta.insert("version".to_string(), version.to_string());
    meta.insert("parent".to_string(), parent.to_string());
    meta.insert("created_at".to_string(), now().to_string());
    head.to_bytes(&meta)
        .map_err(|e| StateError::Head(e.to_string()))
}

fn tensor_of(head: &Head, name: &str) -> Vec<f32> {
    let (i, is_w) = parse_name(name);
    if is_w {
        head.params.weights[i].clone()
    } else {
        head.params.biases[i].clone()
    }
}

fn set_tensor(head: &mut Head, name: &str, values: Vec<f32>) {
    let (i, is_w) = parse_name(name);
    if is_w {
        head.params.weights[i] = values;
    } else {
        head.params.biases[i] = values;
    }
}

/// `layers.{i}.weight|bias` -> (i, is_weight); names come from [`State::layout`].
fn parse_name(name: &str) -> (usize, bool) {
    let mut parts = name.split('.');
    let i = parts.nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    (i, name.ends_with(".weight"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Robust;
    use dai_protocol::update::{Encoding, Tensor, UpdateMeta};
    use dai_train::{Activation, HeadSpec, Loss};

    fn base() -> Head {
        Head::init(
            HeadSpec::new(&[2, 2], &[Activation::None], Loss::SoftmaxCrossEntropy).expect("spec"),
            1,
        )
    }

    fn upd(id: &str, base: &str, samples: u64, v: f32) -> Update {
        Update {
            meta: UpdateMeta {
                device: format!("dev-{id}"),
                model: "m".into(),
                base_version: base.into(),
                update_id: id.into(),
                sample_count: samples,
                loss: 0.1,
                encoding: Encoding::F32,
            },
            tensors: vec![
                Tensor {
                    name: "layers.0.weight".into(),
                    shape: vec![2, 2],
                    values: vec![v; 4],
                },
                Tensor {
                    name: "layers.0.bias".into(),
                    shape: vec![2],
                    values: vec![v; 2],
                },
            ],
        }
    }

    fn settings() -> Settings {
        Settings {
            strategy: Strategy::FedAvg { min_updates: 2 },
            aggregation: Aggregation {
                clip_norm: None,
                robust: Robust::Mean,
            },
            max_staleness: 3,
            reject_norm: 100.0,
        }
    }

    #[test]
    fn a_batch_is_one_transaction_and_dedups_within_itself() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base().to_bytes(&Default::default()).expect("bytes"))
            .expect("register");
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
                ("u3", AckStatus::Rejected, true),
                ("u2", AckStatus::Accepted, false),
            ]
        );
        assert_eq!(s.pending_count("m").expect("n"), 2);
        assert_eq!(s.seen_counts().expect("seen"), (2, 1));
    }

    #[test]
    fn an_unreadable_pending_row_is_dropped_not_fatal() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base().to_bytes(&Default::default()).expect("bytes"))
            .expect("register");
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
    fn rounds_aggregate_once_and_survive_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("agg.sqlite");
        let head0 = base();
        {
            let mut s = State::open(&path).expect("open");
            s.register("m", &head0.to_bytes(&Default::default()).expect("bytes"))
                .expect("register");
            let a = s
                .ingest(&upd("u1", "0", 1, 1.0), &settings(), |b| b.parse().ok())
                .expect("ingest");
            assert_eq!(a.status, AckStatus::Accepted);
            assert!(
                s.aggregate("m", &settings(), false, &mut None)
                    .expect("agg")
                    .is_none(),
                "one of two updates"
            );
        }
        // Restart: the pending update and the seen id survive.
        let mut s = State::open(&path).expect("reopen");
        assert_eq!(s.pending_count("m").expect("n"), 1);
        let dup = s
            .ingest(&upd("u1", "0", 1, 1.0), &settings(), |b| b.parse().ok())
            .expect("dup");
        assert_eq!(dup.status, AckStatus::Accepted);
        assert!(dup.reason.expect("reason").contains("counted once"));
        assert_eq!(
            s.pending_count("m").expect("n"),
            1,
            "a duplicate is not buffered twice"
        );
        s.ingest(&upd("u2", "0", 3, 2.0), &settings(), |b| b.parse().ok())
            .expect("ingest");
        let g = s
            .aggregate("m", &settings(), false, &mut None)
            .expect("agg")
            .expect("new version");
        assert_eq!((g.version, g.parent), (1, 0));
        assert_eq!(g.contributors, vec!["u1", "u2"]);
        let (new_head, md) = Head::from_bytes(&g.head_file).expect("head");
        assert_eq!(md["version"], "1");
        // FedAvg: (1*1 + 3*2) / 4 = 1.75 added to every weight.
        for (a, b) in new_head.params.weights[0]
            .iter()
            .zip(&head0.params.weights[0])
        {
            assert!((a - b - 1.75).abs() < 1e-6);
        }
        assert_eq!(s.pending_count("m").expect("n"), 0);
        // Stale and malformed updates are rejected with reasons.
        let bad = s
            .ingest(&upd("u3", "x", 1, 1.0), &settings(), |b| b.parse().ok())
            .expect("ingest");
        assert_eq!(bad.status, AckStatus::Rejected);
        assert!(bad.reason.expect("reason").contains("not a global version"));
        let unknown = s
            .ingest(
                &{
                    let mut u = upd("u4", "1", 1, 1.0);
                    u.meta.model = "zz".into();
                    u
                },
                &settings(),
                |b| b.parse().ok(),
            )
            .expect("ingest");
        assert_eq!(unknown.status, AckStatus::Rejected);
        assert_eq!(s.current("m").expect("current").0, 1);
    }
}
