//! The `globals` table: signed global heads received from the aggregator.
//! Adopting one also makes it the active local head (a new `heads` row) in
//! the same transaction.

use crate::{Store, StoreError, now};
use rusqlite::{OptionalExtension, params};

impl Store {
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
}
