//! The `metric_snapshots` table: periodic JSON snapshots of the daemon's
//! figures, bounded to the newest few so the file does not grow forever.

use crate::{Store, StoreError, now};
use rusqlite::{OptionalExtension, params};

impl Store {
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
