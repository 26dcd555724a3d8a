//! `dai-store`: the edge daemon's SQLite store (one file in the data dir).
//!
//! Opened in WAL mode with `synchronous=NORMAL` (a power cut loses at most
//! the last transaction, never corrupts) and a busy timeout. The schema is
//! versioned with `PRAGMA user_version`; [`MIGRATIONS`] run in order inside
//! one transaction each, so an interrupted upgrade leaves the old version.
//!
//! Tables today: `models` (every version ever loaded, with its checksum and
//! load result), `model_events` (load / reload / failure history) and
//! `metric_snapshots` (periodic JSON snapshots of the daemon's figures).
//! Samples and the update outbox join in later migrations.

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
];

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
