//! `dai-store`: the edge daemon's SQLite store (one file in the data dir).
//!
//! Opened in WAL mode with `synchronous=FULL` and a busy timeout. FULL syncs
//! the WAL at every commit, so a committed transaction survives a power
//! cut. NORMAL (syncing only at checkpoints) would not corrupt the file but
//! would lose every commit since the last checkpoint, and here that can
//! double-count: a head and its outbox row are committed, the update is
//! published and counted by the aggregator, power is cut, the commit is
//! gone, and the same samples train and go up again under a new id. The
//! cost is one fsync per commit (measured in docs/reliability.md). The schema is
//! versioned with `PRAGMA user_version`; [`MIGRATIONS`] run in order inside
//! one transaction each, so an interrupted upgrade leaves the old version.
//!
//! How the parts fit: this file owns the connection ([`Store::open`], the
//! pragmas, the migrations) and [`StoreError`]; every table family adds its
//! methods to [`Store`] in its own module, through the one serialised
//! connection:
//! - `models`: `models` (every version ever loaded, with its checksum) and
//!   `model_events` (load / failure history);
//! - `snapshots`: `metric_snapshots` (periodic JSON snapshots of the
//!   daemon's figures, bounded);
//! - `samples`: `samples` for on-device training (head input vectors +
//!   labels, train/holdout split, bounded per model);
//! - `training`: `heads` (every accepted head version, one active),
//!   `training_runs` and `residuals`; a new head, its outbox row and its
//!   run's outcome are written in one transaction ([`Store::accept_head`]);
//! - `outbox`: `outbox` (updates waiting for cloud sync, removed on ack);
//! - `globals`: `globals` (global heads from the aggregator, adopted as the
//!   active head in one transaction, [`Store::adopt_global`]);
//! - [`retention`]: heads, globals, runs and model events pruned to a
//!   fixed count per model ([`Store::prune`]);
//! - [`quarantine`]: a corrupt file is moved aside at open and a fresh
//!   store started ([`Store::open_or_quarantine`]).

mod globals;
mod models;
mod outbox;
pub mod quarantine;
pub mod retention;
mod samples;
mod snapshots;
mod training;

pub use globals::{Adopted, StoredGlobal};
pub use models::ModelRecord;
pub use outbox::OutboxRow;
pub use quarantine::Quarantine;
pub use retention::{Pruned, Retention};
pub use samples::{NewSample, Sample};
pub use training::{AcceptedHead, RunRecord};

use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Store errors callers can branch on.
///
/// A variant with a source does not repeat it in its own message: chain
/// printers (`{:#}` of anyhow) show each part once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data dir {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SQLite's own message; the variant adds no text of its own, so code
    /// that prints `{}` (logs, API answers) still shows what SQLite said.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// `PRAGMA quick_check` found damage (its first findings).
    #[error("the database file is corrupt: {0}")]
    Corrupt(String),
    #[error("database {path} has schema version {found}, newer than this build knows ({known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
}

impl StoreError {
    /// SQLite could not write for lack of space (`SQLITE_FULL`): the
    /// transaction was rolled back, nothing stored before it is touched,
    /// and the same write succeeds once space returns.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _))
            if f.code == rusqlite::ErrorCode::DiskFull)
    }
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
    // 6: the aggregator epoch of each global (0: received before epochs)
    "ALTER TABLE globals ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;",
    // 7: local DP: one row per noised update that left (or will leave) the
    // device, so the epsilon spent survives restarts and acks
    "CREATE TABLE local_dp_releases (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model TEXT NOT NULL,
        update_id TEXT NOT NULL,
        noise_multiplier REAL NOT NULL,
        released_at REAL NOT NULL
    );",
];

/// The store. Cheap to share behind an `Arc`; one connection, serialised.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// Every part of an error chain, joined (what a log line shows).
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
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
        conn.pragma_update(None, "synchronous", "FULL")?;
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
                    update_base: "1",
                    local_dp_noise: None,
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
            .adopt_global("m", "1", 4, 9, b"global-head", "abc")
            .expect("adopt")
            .head_version;
        assert_eq!(
            v, 4,
            "local head versions continue after the three trained ones"
        );
        assert_eq!(
            s.active_head("m", "1").expect("active"),
            Some((4, b"global-head".to_vec()))
        );
        assert_eq!(
            s.latest_global("m")
                .expect("global")
                .map(|g| (g.version, g.epoch)),
            Some((4, 9))
        );
    }

    #[test]
    fn a_new_epoch_retires_the_old_line_and_drops_only_its_updates() {
        let tmp = tempfile::tempdir().expect("tmp");
        let s = Store::open_in(tmp.path()).expect("open");
        s.adopt_global("m", "1", 5, 9, b"g5", "x").expect("adopt");
        for (id, base) in [("old", "1+g5@e9"), ("legacy", "1+g4"), ("shipped", "1")] {
            let run = s.start_run("m", "cpu", 1).expect("run");
            let head = AcceptedHead {
                model: "m",
                base_version: "1",
                weights: b"w",
                update_id: id,
                update_base: base,
                local_dp_noise: Some(1.5),
                delta_payload: b"p",
                encoding: "f32",
                sample_count: 1,
                loss: 0.5,
                residual: Some(b"r"),
            };
            s.accept_head(run, &head, &serde_json::json!([]), 0.5, 0.6)
                .expect("accept");
        }
        // The same epoch again retires nothing.
        let same = s.adopt_global("m", "1", 6, 9, b"g6", "y").expect("adopt");
        assert!(same.rebased.is_empty());
        // A new epoch at version 1 wins over version 6 of the old one.
        let new = s.adopt_global("m", "1", 1, 10, b"n1", "z").expect("adopt");
        assert_eq!(new.rebased, ["old", "legacy"]);
        let left: Vec<String> = s
            .outbox(10)
            .expect("outbox")
            .into_iter()
            .map(|r| r.update_id)
            .collect();
        assert_eq!(
            left,
            ["shipped"],
            "an update on the shipped head stays valid"
        );
        let g = s.latest_global("m").expect("global").expect("some");
        assert_eq!((g.version, g.epoch, g.head.as_slice()), (1, 10, &b"n1"[..]));
        assert_eq!(s.residual("m").expect("residual"), None);
        // Each noised update is a release, kept whatever became of it.
        assert_eq!(s.local_dp_releases("m").expect("releases"), vec![1.5; 3]);
    }

    /// Every part of an error chain, outermost first, as a chain printer
    /// (`{:#}` of anyhow) shows them.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        std::iter::successors(Some(e), |e| e.source())
            .map(|e| e.to_string())
            .collect()
    }

    /// No part of the chain repeats another: no two parts are the same, and
    /// no part contains the one after it (a message that interpolates its
    /// own source does). rusqlite's own two parts (SQLite's message, then
    /// its result code with SQLite's text for the code) can share words.
    fn assert_each_part_once(parts: &[String]) {
        for (i, part) in parts.iter().enumerate() {
            assert!(!part.is_empty(), "empty part {i} in {parts:?}");
            assert_eq!(
                parts.iter().filter(|p| *p == part).count(),
                1,
                "part {i} repeated in {parts:?}"
            );
            if let Some(next) = parts.get(i + 1) {
                assert!(
                    !part.contains(next.as_str()),
                    "part {i} repeats its source in {parts:?}"
                );
            }
        }
    }

    #[test]
    fn a_corrupt_file_says_what_sqlite_said_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 13) as u8).collect();
        std::fs::write(dir.path().join("dai.sqlite"), garbage).expect("write");
        let err = Store::open_in(dir.path()).expect_err("corrupt file opened");
        assert!(matches!(err, StoreError::Sqlite(_)), "{err:?}");
        let parts = chain(&err);
        let joined = parts.join(": ");
        assert!(
            joined.contains("not a database") || joined.contains("malformed"),
            "{joined}"
        );
        assert_each_part_once(&parts);
    }

    #[test]
    fn a_data_dir_that_cannot_be_created_names_the_path_and_the_cause_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").expect("write");
        let err = Store::open_in(&file.join("data")).expect_err("dir under a file");
        let parts = chain(&err);
        assert_eq!(parts.len(), 2, "{parts:?}");
        assert!(parts[0].contains("plain-file"), "{parts:?}");
        assert_each_part_once(&parts);
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
