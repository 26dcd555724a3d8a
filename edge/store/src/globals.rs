//! The `globals` table: signed global heads received from the aggregator.
//! Adopting one also makes it the active local head (a new `heads` row) in
//! the same transaction. A global of a new aggregator epoch (a new version
//! line: the aggregator started from an empty state) retires the old
//! line in that transaction too: its globals, the error-feedback residual,
//! and the outbox rows computed against its globals, which no aggregator
//! of the new line can count (returned, for the caller to log and count;
//! rows against the shipped head stay, they are valid in every epoch).

use crate::{Store, StoreError, now};
use rusqlite::{OptionalExtension, params};

/// A stored global head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGlobal {
    pub version: i64,
    /// The aggregator epoch it was signed in (0: stored before epochs).
    pub epoch: u64,
    pub head: Vec<u8>,
}

/// What adopting a global did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The new local head version.
    pub head_version: i64,
    /// Outbox update ids dropped because the global started a new epoch.
    pub rebased: Vec<String>,
}

impl Store {
    /// Adopt a verified global head of aggregator `epoch`: store it and
    /// make it the active head (a new local head version, no outbox row),
    /// in one transaction; a new epoch first retires the old one (module
    /// doc).
    pub fn adopt_global(
        &self,
        model: &str,
        base_version: &str,
        global_version: i64,
        epoch: u64,
        head: &[u8],
        sha256: &str,
    ) -> Result<Adopted, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ts = now();
        let other_epoch: bool = tx
            .query_row(
                "SELECT 1 FROM globals WHERE model = ?1 AND epoch != ?2 LIMIT 1",
                params![model, epoch as i64],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        let mut rebased = Vec::new();
        if other_epoch {
            // Labels are `{bundle}+g{N}@e{epoch}` (dai_protocol::base);
            // without `@e`, from before epochs: of the old line too.
            let suffix = format!("@e{epoch}");
            let mut stmt = tx.prepare(
                "SELECT update_id, base_version FROM outbox WHERE model = ?1 AND instr(base_version, '+g') > 0 ORDER BY id",
            )?;
            let rows: Vec<(String, String)> = stmt
                .query_map(params![model], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            drop(stmt);
            for (id, _) in rows.into_iter().filter(|(_, b)| !b.ends_with(&suffix)) {
                tx.execute("DELETE FROM outbox WHERE update_id = ?1", params![id])?;
                rebased.push(id);
            }
            tx.execute(
                "DELETE FROM globals WHERE model = ?1 AND epoch != ?2",
                params![model, epoch as i64],
            )?;
            tx.execute("DELETE FROM residuals WHERE model = ?1", params![model])?;
        }
        tx.execute(
            "INSERT OR IGNORE INTO globals (model, version, head, sha256, received_at, epoch) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![model, global_version, head, sha256, ts, epoch as i64],
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
        Ok(Adopted {
            head_version: version,
            rebased,
        })
    }

    /// The global served for `model`: the newest of the newest epoch.
    pub fn latest_global(&self, model: &str) -> Result<Option<StoredGlobal>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT version, epoch, head FROM globals WHERE model = ?1 ORDER BY epoch DESC, version DESC LIMIT 1",
                params![model],
                |r| {
                    Ok(StoredGlobal {
                        version: r.get(0)?,
                        epoch: r.get::<_, i64>(1)? as u64,
                        head: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }
}
