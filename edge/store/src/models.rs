//! The `models` and `model_events` tables: every model version the runtime
//! has loaded (with its checksum and which one is active) and the history of
//! loads and failures shown to the operator.

use crate::{Store, StoreError, now};
use rusqlite::params;

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

impl Store {
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
}
