//! The `outbox` table: head updates waiting for the cloud aggregator's ack.
//! Rows are written by [`Store::accept_head`], read oldest first by the
//! uplink, deleted on ack, and bounded while offline.

use crate::{Store, StoreError};
use rusqlite::params;

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

impl Store {
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

    /// Rows waiting, all models (a count: no payload is read).
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    pub fn outbox_count(&self, model: &str) -> Result<i64, StoreError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM outbox WHERE model = ?1",
            params![model],
            |r| r.get(0),
        )?)
    }
}
