//! On-device training: the `heads` table (every accepted head version, one
//! active per model), `training_runs` (each run's outcome, accuracies and
//! the newest sample it consumed) and `residuals` (error feedback of lossy
//! update encodings). [`Store::accept_head`] writes a new head, its outbox
//! row, its residual and its run's outcome in one transaction.

use crate::{Store, StoreError, now};
use rusqlite::{OptionalExtension, params};

/// A training run as recorded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub model: String,
    pub started_at: f64,
    pub finished_at: Option<f64>,
    pub outcome: String,
    pub backend: String,
    pub samples: i64,
    pub epochs: serde_json::Value,
    pub val_acc_before: Option<f64>,
    pub val_acc_after: Option<f64>,
    pub reason: Option<String>,
}

/// What a finished run hands to the store in one transaction.
#[derive(Debug, Clone)]
pub struct AcceptedHead<'a> {
    pub model: &'a str,
    pub base_version: &'a str,
    pub weights: &'a [u8],
    /// The update for cloud sync: a delta against the base head.
    pub update_id: &'a str,
    /// The update's `base_version` label (which global, which epoch),
    /// kept with the outbox row so a new epoch can retire it.
    pub update_base: &'a str,
    /// Local DP: the noise multiplier the uploaded delta was noised with
    /// (recorded as a release in the same transaction); `None`: not noised.
    pub local_dp_noise: Option<f64>,
    pub delta_payload: &'a [u8],
    pub encoding: &'a str,
    pub sample_count: i64,
    pub loss: f64,
    /// Error feedback: what the encoding dropped from this delta (an f32
    /// update payload), stored with the outbox row; `None` clears it.
    pub residual: Option<&'a [u8]>,
}

impl Store {
    /// Local DP: the noise multiplier of every noised update of `model`,
    /// oldest first.
    pub fn local_dp_releases(&self, model: &str) -> Result<Vec<f64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT noise_multiplier FROM local_dp_releases WHERE model = ?1 ORDER BY id",
        )?;
        let rows = stmt
            .query_map(params![model], |r| r.get(0))?
            .collect::<Result<Vec<f64>, _>>()?;
        Ok(rows)
    }

    /// The active trained head of `model` for `base_version`: (version, weights).
    pub fn active_head(
        &self,
        model: &str,
        base_version: &str,
    ) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT version, weights FROM heads WHERE model = ?1 AND base_version = ?2 AND active = 1",
                params![model, base_version],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Start a run; returns its id.
    pub fn start_run(&self, model: &str, backend: &str, samples: i64) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO training_runs (model, started_at, outcome, backend, samples) VALUES (?1, ?2, 'running', ?3, ?4)",
            params![model, now(), backend, samples],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// Finish a run that did not produce a new head.
    pub fn finish_run(
        &self,
        run: i64,
        outcome: &str,
        epochs: &serde_json::Value,
        before: Option<f64>,
        after: Option<f64>,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE training_runs SET finished_at = ?2, outcome = ?3, epochs = ?4, val_acc_before = ?5,
             val_acc_after = ?6, reason = ?7 WHERE id = ?1",
            params![run, now(), outcome, epochs.to_string(), before, after, reason],
        )?;
        Ok(())
    }

    /// Record the newest sample id a run trained on.
    pub fn set_run_last_sample(&self, run: i64, last_sample_id: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE training_runs SET last_sample_id = ?2 WHERE id = ?1",
            params![run, last_sample_id],
        )?;
        Ok(())
    }

    /// Newest sample id the last completed run of `model` consumed (runs
    /// that were aborted, interrupted or failed do not count: their samples
    /// are still new).
    pub fn last_consumed_sample(&self, model: &str) -> Result<i64, StoreError> {
        Ok(self.conn().query_row(
            "SELECT COALESCE(MAX(last_sample_id), 0) FROM training_runs
             WHERE model = ?1 AND outcome IN ('accepted', 'rejected', 'diverged')",
            params![model],
            |r| r.get(0),
        )?)
    }

    /// Close a run that ended with an error (it stays visible as failed).
    pub fn fail_running(&self, model: &str, reason: &str) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE training_runs SET outcome = 'failed', finished_at = ?2, reason = ?3
             WHERE model = ?1 AND outcome = 'running'",
            params![model, now(), reason],
        )?)
    }

    /// Accept a new head: in ONE transaction record it as the active version,
    /// queue its delta in the outbox and close the run. Either all of it is
    /// stored or none (a crash mid-way leaves the previous head active and
    /// no half-written outbox row). Returns the new head version.
    pub fn accept_head(
        &self,
        run: i64,
        head: &AcceptedHead<'_>,
        epochs: &serde_json::Value,
        before: f64,
        after: f64,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ts = now();
        let (version, base_head): (i64, i64) = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) + 1,
                    COALESCE((SELECT version FROM heads WHERE model = ?1 AND base_version = ?2 AND active = 1), 0)
             FROM heads WHERE model = ?1",
            params![head.model, head.base_version],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        tx.execute(
            "UPDATE heads SET active = 0 WHERE model = ?1",
            params![head.model],
        )?;
        tx.execute(
            "INSERT INTO heads (model, version, base_version, base_head_version, weights, created_at, active, run_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7)",
            params![head.model, version, head.base_version, base_head, head.weights, ts, run],
        )?;
        tx.execute(
            "INSERT INTO outbox (update_id, model, base_version, head_version, sample_count, loss, encoding, payload, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                head.update_id,
                head.model,
                head.update_base,
                version,
                head.sample_count,
                head.loss,
                head.encoding,
                head.delta_payload,
                ts
            ],
        )?;
        if let Some(z) = head.local_dp_noise {
            tx.execute(
                "INSERT INTO local_dp_releases (model, update_id, noise_multiplier, released_at) VALUES (?1, ?2, ?3, ?4)",
                params![head.model, head.update_id, z, ts],
            )?;
        }
        tx.execute(
            "UPDATE training_runs SET finished_at = ?2, outcome = 'accepted', epochs = ?3, val_acc_before = ?4,
             val_acc_after = ?5 WHERE id = ?1",
            params![run, ts, epochs.to_string(), before, after],
        )?;
        match head.residual {
            Some(r) => tx.execute(
                "INSERT INTO residuals (model, payload, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (model) DO UPDATE SET payload = ?2, updated_at = ?3",
                params![head.model, r, ts],
            )?,
            None => tx.execute(
                "DELETE FROM residuals WHERE model = ?1",
                params![head.model],
            )?,
        };
        tx.commit()?;
        Ok(version)
    }

    /// The error-feedback residual of `model` (see [`AcceptedHead::residual`]).
    pub fn residual(&self, model: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT payload FROM residuals WHERE model = ?1",
                params![model],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Runs of a model, newest first.
    pub fn runs(&self, model: &str, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, model, started_at, finished_at, outcome, backend, samples, epochs, val_acc_before, val_acc_after, reason
             FROM training_runs WHERE model = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![model, limit as i64], |r| {
            Ok(RunRecord {
                id: r.get(0)?,
                model: r.get(1)?,
                started_at: r.get(2)?,
                finished_at: r.get(3)?,
                outcome: r.get(4)?,
                backend: r.get(5)?,
                samples: r.get(6)?,
                epochs: serde_json::from_str(&r.get::<_, String>(7)?)
                    .unwrap_or(serde_json::Value::Null),
                val_acc_before: r.get(8)?,
                val_acc_after: r.get(9)?,
                reason: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Runs left `running` by a crash: mark them `interrupted`.
    pub fn close_interrupted_runs(&self) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE training_runs SET outcome = 'interrupted', finished_at = ?1,
             reason = 'the daemon stopped during the run' WHERE outcome = 'running'",
            params![now()],
        )?)
    }
}
