//! `dai-store`: the edge daemon's SQLite store (one file in the data dir).
//!
//! Opened in WAL mode with `synchronous=NORMAL` (a power cut loses at most
//! the last transaction, never corrupts) and a busy timeout. The schema is
//! versioned with `PRAGMA user_version`; [`MIGRATIONS`] run in order inside
//! one transaction each, so an interrupted upgrade leaves the old version.
//!
//! Tables: `models` (every version ever loaded, with its checksum),
//! `model_events` (load / reload / failure history), `metric_snapshots`
//! (periodic JSON snapshots of the daemon's figures), and for on-device
//! training `samples` (head input vectors + labels, train/holdout split,
//! bounded per model), `heads` (every accepted head version, one active),
//! `training_runs`, and `outbox` (updates waiting for cloud sync). A new
//! head, its outbox row and its run's outcome are written in one
//! transaction ([`Store::accept_head`]).

use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Store errors callers can branch on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database {path} has schema version {found}, newer than this build knows ({known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
}

/// Schema migrations; index + 1 is the `user_version` after applying.
pub const MIGRATIONS: &[&str] = &[
    // 1: models and metrics
    "CREATE TABLE models (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        dir TEXT NOT NULL,
        first_loaded_at REAL NOT NULL,
        last_loaded_at REAL NOT NULL,
        load_count INTEGER NOT NULL DEFAULT 1,
        active INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (name, version, sha256)
    );
    CREATE TABLE model_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('loaded', 'failed')),
        version TEXT,
        detail TEXT NOT NULL
    );
    CREATE TABLE metric_snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        snapshot TEXT NOT NULL
    );
    CREATE INDEX metric_snapshots_ts ON metric_snapshots (ts);",
    // 2: on-device training: samples, head versions, runs, the update outbox
    "CREATE TABLE samples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model TEXT NOT NULL,
        base_version TEXT NOT NULL,
        features BLOB NOT NULL,
        label INTEGER NOT NULL,
        split TEXT NOT NULL CHECK (split IN ('train', 'holdout')),
        source TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX samples_model ON samples (model, id);
    CREATE TABLE heads (
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        base_version TEXT NOT NULL,
        base_head_version INTEGER NOT NULL,
        weights BLOB NOT NULL,
        created_at REAL NOT NULL,
        active INTEGER NOT NULL DEFAULT 0,
        run_id INTEGER,
        PRIMARY KEY (model, version)
    );
    CREATE TABLE training_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        outcome TEXT NOT NULL,
        backend TEXT NOT NULL,
        samples INTEGER NOT NULL,
        epochs TEXT NOT NULL DEFAULT '[]',
        val_acc_before REAL,
        val_acc_after REAL,
        reason TEXT
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        update_id TEXT NOT NULL UNIQUE,
        model TEXT NOT NULL,
        base_version TEXT NOT NULL,
        head_version INTEGER NOT NULL,
        sample_count INTEGER NOT NULL,
        loss REAL NOT NULL,
        encoding TEXT NOT NULL,
        payload BLOB NOT NULL,
        created_at REAL NOT NULL
    );",
    // 3: a run remembers the newest sample it saw, so "new samples" is
    // counted by id (retention pruning keeps counts flat).
    "ALTER TABLE training_runs ADD COLUMN last_sample_id INTEGER NOT NULL DEFAULT 0;",
    // 4: global models received from the aggregator
    "CREATE TABLE globals (
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        head BLOB NOT NULL,
        sha256 TEXT NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (model, version)
    );",
    // 5: error feedback: what a lossy update encoding has not sent yet
    "CREATE TABLE residuals (
        model TEXT PRIMARY KEY,
        payload BLOB NOT NULL,
        updated_at REAL NOT NULL
    );",
];

/// A stored training sample (the head's input vector and its label).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: i64,
    pub features: Vec<f32>,
    pub label: u32,
    pub holdout: bool,
}

/// A sample to store.
#[derive(Debug, Clone, Copy)]
pub struct NewSample<'a> {
    pub model: &'a str,
    pub base_version: &'a str,
    pub features: &'a [f32],
    pub label: u32,
    /// `api`, `feedback` or `sensor`.
    pub source: &'a str,
}

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
    pub delta_payload: &'a [u8],
    pub encoding: &'a str,
    pub sample_count: i64,
    pub loss: f64,
    /// Error feedback: what the encoding dropped from this delta (an f32
    /// update payload), stored with the outbox row; `None` clears it.
    pub residual: Option<&'a [u8]>,
}

/// A pending update in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub update_id: String,
    pub model: String,
    pub base_version: String,
    pub head_version: i64,
    pub sample_count: i64,
    pub loss: f64,
    pub encoding: String,
    pub payload: Vec<u8>,
}

/// splitmix64 of a row id: spreads the hold-out choice evenly.
fn holdout_hash(id: i64) -> u64 {
    let mut z = (id as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn f32_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn blob_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A model version as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRecord {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub dir: String,
    pub first_loaded_at: f64,
    pub last_loaded_at: f64,
    pub load_count: i64,
    pub active: bool,
}

/// The store. Cheap to share behind an `Arc`; one connection, serialised.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Store {
    /// Open (creating if needed) `data_dir/dai.sqlite` and migrate it.
    pub fn open_in(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        Self::open(&data_dir.join("dai.sqlite"))
    }

    /// Open the database file at `path` and migrate it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(path = %path.display(), version = i + 1, "store migrated");
        }
        Ok(Store {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Record that `name` `version` (file `sha256`) is now the active one.
    pub fn record_model_loaded(
        &self,
        name: &str,
        version: &str,
        sha256: &str,
        dir: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ts = now();
        tx.execute(
            "UPDATE models SET active = 0 WHERE name = ?1",
            params![name],
        )?;
        tx.execute(
            "INSERT INTO models (name, version, sha256, dir, first_loaded_at, last_loaded_at, load_count, active)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, 1, 1)
             ON CONFLICT (name, version, sha256) DO UPDATE SET
               last_loaded_at = excluded.last_loaded_at, dir = excluded.dir,
               load_count = load_count + 1, active = 1",
            params![name, version, sha256, dir, ts],
        )?;
        tx.execute(
            "INSERT INTO model_events (ts, name, kind, version, detail) VALUES (?1, ?2, 'loaded', ?3, ?4)",
            params![ts, name, version, format!("sha256 {sha256} from {dir}")],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Record a failed load (the error text as shown to the operator).
    pub fn record_model_failed(&self, name: &str, error: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO model_events (ts, name, kind, version, detail) VALUES (?1, ?2, 'failed', NULL, ?3)",
            params![now(), name, error],
        )?;
        Ok(())
    }

    /// Every recorded model version, newest load first.
    pub fn models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, version, sha256, dir, first_loaded_at, last_loaded_at, load_count, active
             FROM models ORDER BY last_loaded_at DESC, name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ModelRecord {
                name: r.get(0)?,
                version: r.get(1)?,
                sha256: r.get(2)?,
                dir: r.get(3)?,
                first_loaded_at: r.get(4)?,
                last_loaded_at: r.get(5)?,
                load_count: r.get(6)?,
                active: r.get::<_, i64>(7)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Recent model events as (ts, name, kind, detail), newest first.
    pub fn model_events(
        &self,
        limit: usize,
    ) -> Result<Vec<(f64, String, String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT ts, name, kind, detail FROM model_events ORDER BY id DESC LIMIT ?1")?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Append a metrics snapshot and keep only the newest `keep`.
    pub fn insert_snapshot(
        &self,
        snapshot: &serde_json::Value,
        keep: usize,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO metric_snapshots (ts, snapshot) VALUES (?1, ?2)",
            params![now(), snapshot.to_string()],
        )?;
        conn.execute(
            "DELETE FROM metric_snapshots WHERE id <= (SELECT id FROM metric_snapshots ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            params![keep as i64],
        )?;
        Ok(())
    }

    /// The newest snapshot, if any.
    pub fn latest_snapshot(&self) -> Result<Option<(f64, serde_json::Value)>, StoreError> {
        let conn = self.conn();
        let row: Option<(f64, String)> = conn
            .query_row(
                "SELECT ts, snapshot FROM metric_snapshots ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.map(|(ts, s)| {
            (
                ts,
                serde_json::from_str(&s).unwrap_or(serde_json::Value::Null),
            )
        }))
    }

    /// Store labelled samples in ONE transaction (all or none). About one
    /// in `holdout_every` is kept for validation, chosen by a hash of the
    /// row id so that every model gets its share however requests of
    /// different models interleave. Keeps at most `max_per_model` samples
    /// per model, deleting the oldest. Returns the sample ids.
    pub fn insert_samples(
        &self,
        samples: &[NewSample<'_>],
        holdout_every: i64,
        max_per_model: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut ids = Vec::with_capacity(samples.len());
        let ts = now();
        for sample in samples {
            let next: i64 =
                tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM samples", [], |r| {
                    r.get(0)
                })?;
            let split =
                if holdout_every > 0 && holdout_hash(next).is_multiple_of(holdout_every as u64) {
                    "holdout"
                } else {
                    "train"
                };
            tx.execute(
                "INSERT INTO samples (id, model, base_version, features, label, split, source, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    next,
                    sample.model,
                    sample.base_version,
                    f32_blob(sample.features),
                    sample.label,
                    split,
                    sample.source,
                    ts
                ],
            )?;
            ids.push(next);
        }
        let mut models: Vec<&str> = samples.iter().map(|s| s.model).collect();
        models.dedup();
        for model in models {
            tx.execute(
                "DELETE FROM samples WHERE model = ?1 AND id <= (
                    SELECT id FROM samples WHERE model = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![model, max_per_model],
            )?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Samples of `model`/`base_version` newer than sample id `after`.
    pub fn samples_since(
        &self,
        model: &str,
        base_version: &str,
        after: i64,
    ) -> Result<i64, StoreError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM samples WHERE model = ?1 AND base_version = ?2 AND id > ?3",
            params![model, base_version, after],
            |r| r.get(0),
        )?)
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

    /// Record the newest sample id a run trained on.
    pub fn set_run_last_sample(&self, run: i64, last_sample_id: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE training_runs SET last_sample_id = ?2 WHERE id = ?1",
            params![run, last_sample_id],
        )?;
        Ok(())
    }

    /// Close a run that ended with an error (it stays visible as failed).
    pub fn fail_running(&self, model: &str, reason: &str) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE training_runs SET outcome = 'failed', finished_at = ?2, reason = ?3
             WHERE model = ?1 AND outcome = 'running'",
            params![model, now(), reason],
        )?)
    }

    /// Samples of `model` taken with `base_version`, oldest first.
    pub fn samples(&self, model: &str, base_version: &str) -> Result<Vec<Sample>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, features, label, split FROM samples WHERE model = ?1 AND base_version = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![model, base_version], |r| {
            Ok(Sample {
                id: r.get(0)?,
                features: blob_f32(&r.get::<_, Vec<u8>>(1)?),
                label: r.get(2)?,
                holdout: r.get::<_, String>(3)? == "holdout",
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// (train, holdout, newest id) counts of a model's samples.
    pub fn sample_counts(&self, model: &str) -> Result<(i64, i64, i64), StoreError> {
        Ok(self.conn().query_row(
            "SELECT COALESCE(SUM(split = 'train'), 0), COALESCE(SUM(split = 'holdout'), 0), COALESCE(MAX(id), 0)
             FROM samples WHERE model = ?1",
            params![model],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?)
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
                head.base_version,
                version,
                head.sample_count,
                head.loss,
                head.encoding,
                head.delta_payload,
                ts
            ],
        )?;
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

    /// Pending outbox rows, oldest first.
    pub fn outbox(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, update_id, model, base_version, head_version, sample_count, loss, encoding, payload
             FROM outbox ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                update_id: r.get(1)?,
                model: r.get(2)?,
                base_version: r.get(3)?,
                head_version: r.get(4)?,
                sample_count: r.get(5)?,
                loss: r.get(6)?,
                encoding: r.get(7)?,
                payload: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Keep at most `max` outbox rows, dropping the oldest; returns the
    /// dropped update ids (the caller counts and logs them).
    pub fn trim_outbox(&self, max: i64) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ids: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT update_id FROM outbox WHERE id <= (SELECT id FROM outbox ORDER BY id DESC LIMIT 1 OFFSET ?1) ORDER BY id",
            )?;
            let rows = stmt.query_map(params![max], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        tx.execute(
            "DELETE FROM outbox WHERE id <= (SELECT id FROM outbox ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            params![max],
        )?;
        tx.commit()?;
        Ok(ids)
    }

    /// The aggregator answered for this update: drop the row. Returns
    /// whether a row was there.
    pub fn delete_outbox(&self, update_id: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM outbox WHERE update_id = ?1",
            params![update_id],
        )? > 0)
    }

    /// Adopt a verified global head: store it and make it the active head
    /// (a new local head version, no outbox row), in one transaction.
    /// Returns the local head version.
    pub fn adopt_global(
        &self,
        model: &str,
        base_version: &str,
        global_version: i64,
        head: &[u8],
        sha256: &str,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ts = now();
        tx.execute(
            "INSERT OR IGNORE INTO globals (model, version, head, sha256, received_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![model, global_version, head, sha256, ts],
        )?;
        let version: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM heads WHERE model = ?1",
            params![model],
            |r| r.get(0),
        )?;
        tx.execute(
            "UPDATE heads SET active = 0 WHERE model = ?1",
            params![model],
        )?;
        tx.execute(
            "INSERT INTO heads (model, version, base_version, base_head_version, weights, created_at, active, run_id)
             VALUES (?1, ?2, ?3, 0, ?4, ?5, 1, NULL)",
            params![model, version, base_version, head, ts],
        )?;
        tx.commit()?;
        Ok(version)
    }

    /// The newest global of `model`: (version, head file).
    pub fn latest_global(&self, model: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT version, head FROM globals WHERE model = ?1 ORDER BY version DESC LIMIT 1",
                params![model],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    pub fn outbox_count(&self, model: &str) -> Result<i64, StoreError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM outbox WHERE model = ?1",
            params![model],
            |r| r.get(0),
        )?)
    }

    pub fn snapshot_count(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM metric_snapshots", [], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_records_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let s = Store::open_in(dir.path()).expect("open");
            assert_eq!(s.schema_version().expect("v"), MIGRATIONS.len() as i64);
            s.record_model_loaded("m", "1", "aa", "/x").expect("rec");
            s.record_model_loaded("m", "2", "bb", "/x").expect("rec");
            s.record_model_loaded("m", "2", "bb", "/x")
                .expect("rec again");
            s.record_model_failed("bad", "sha256 mismatch")
                .expect("fail");
            for i in 0..5 {
                s.insert_snapshot(&serde_json::json!({ "i": i }), 3)
                    .expect("snap");
            }
        }
        let s = Store::open_in(dir.path()).expect("reopen");
        let models = s.models().expect("models");
        assert_eq!(models.len(), 2);
        let active: Vec<_> = models.iter().filter(|m| m.active).collect();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].version, "2");
        assert_eq!(active[0].load_count, 2);
        assert_eq!(s.snapshot_count().expect("n"), 3);
        let (_, latest) = s.latest_snapshot().expect("q").expect("some");
        assert_eq!(latest["i"], 4);
        let events = s.model_events(10).expect("events");
        assert_eq!(events[0].1, "bad");
        assert_eq!(events[0].2, "failed");
        let journal: String = s
            .conn()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("wal");
        assert_eq!(journal, "wal");
    }

    #[test]
    fn outbox_is_bounded_oldest_first_and_globals_are_adopted() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open_in(dir.path()).expect("open");
        for i in 0..3 {
            let run = s.start_run("m", "cpu", 10).expect("run");
            let id = format!("u{i}");
            s.accept_head(
                run,
                &AcceptedHead {
                    model: "m",
                    base_version: "1",
                    weights: b"w",
                    update_id: &id,
                    delta_payload: b"p",
                    encoding: "f32",
                    sample_count: 10,
                    loss: 0.5,
                    residual: (i < 2).then_some(id.as_bytes()),
                },
                &serde_json::json!([]),
                0.5,
                0.6,
            )
            .expect("accept");
        }
        assert_eq!(
            s.residual("m").expect("residual"),
            None,
            "the last run sent everything: the residual is cleared"
        );
        assert_eq!(s.trim_outbox(2).expect("trim"), vec!["u0".to_string()]);
        assert_eq!(
            s.outbox(10)
                .expect("outbox")
                .iter()
                .map(|r| r.update_id.as_str())
                .collect::<Vec<_>>(),
            ["u1", "u2"]
        );
        assert!(s.delete_outbox("u1").expect("delete"));
        assert!(!s.delete_outbox("u1").expect("again"));
        let v = s
            .adopt_global("m", "1", 4, b"global-head", "abc")
            .expect("adopt");
        assert_eq!(
            v, 4,
            "local head versions continue after the three trained ones"
        );
        assert_eq!(
            s.active_head("m", "1").expect("active"),
            Some((4, b"global-head".to_vec()))
        );
        assert_eq!(s.latest_global("m").expect("global").map(|g| g.0), Some(4));
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("dai.sqlite");
        {
            let c = Connection::open(&path).expect("c");
            c.pragma_update(None, "user_version", 99).expect("v");
        }
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
