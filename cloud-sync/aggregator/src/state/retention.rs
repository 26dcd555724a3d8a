//! Retention: the state file stays bounded over months.
//! - `seen`: an update id must be remembered only while a redelivery of it
//!   could still be accepted. An update is accepted only if its base is at
//!   most `max_staleness` versions behind the current one, and its base is
//!   at most the version current when it arrived; so an id received before
//!   version `current - max_staleness` was made can never be accepted
//!   again (it would be stale), and its row goes. Ids of pending updates
//!   stay whatever their age.
//! - `versions`: every version keeps its row (contributors: the audit of
//!   what was counted; metrics: what the DP accountant composes), but only
//!   the newest [`KEEP_HEADS`] of each model (and version 0, the base)
//!   keep their head file; promoting an older one is refused as pruned.
//! - counts for the status page come from `meta` counters written in the
//!   ingest transaction, not from a scan of `seen`.

use super::{State, StateError, VersionRow};
use rusqlite::params;

/// Versions per model that keep their head file (what promote and
/// rollback can go back to).
pub const KEEP_HEADS: i64 = 64;

/// Rows removed by one [`State::prune`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub seen: usize,
    pub heads: usize,
}

impl State {
    /// Apply the retention rules above to `model`, in one transaction.
    pub fn prune(&mut self, model: &str, max_staleness: u64) -> Result<Pruned, StateError> {
        let tx = self.conn.transaction()?;
        let current: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM versions WHERE model = ?1",
            params![model],
            |r| r.get(0),
        )?;
        let horizon = current - max_staleness as i64;
        let seen = if horizon >= 1 {
            tx.execute(
                "DELETE FROM seen WHERE model = ?1
                   AND received_at < (SELECT created_at FROM versions WHERE model = ?1 AND version = ?2)
                   AND update_id NOT IN (SELECT update_id FROM pending)",
                params![model, horizon],
            )?
        } else {
            0
        };
        let heads = tx.execute(
            "UPDATE versions SET head = x'' WHERE model = ?1 AND version > 0 AND version <= ?2 AND length(head) > 0",
            params![model, current - KEEP_HEADS],
        )?;
        tx.commit()?;
        Ok(Pruned { seen, heads })
    }

    /// Accepted and refused (rejected or rebase) acks ever sent, from the
    /// counters the ingest transaction keeps (no scan of `seen`).
    pub fn seen_counts(&self) -> Result<(u64, u64), StateError> {
        let get = |key: &str| -> Result<u64, StateError> {
            let v: Option<String> = self
                .conn
                .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                    r.get(0)
                })
                .ok();
            Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
        };
        Ok((get("accepted_total")?, get("refused_total")?))
    }

    /// The newest `per_model` versions of every model, by model then version.
    pub fn recent_versions(&self, per_model: usize) -> Result<Vec<VersionRow>, StateError> {
        let mut stmt = self.conn.prepare(
            "SELECT model, version, parent, contributors, created_at, metrics FROM (
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY model ORDER BY version DESC) AS n FROM versions)
             WHERE n <= ?1 ORDER BY model, version",
        )?;
        let rows = stmt.query_map(params![per_model as i64], super::version_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Count one ack in the `meta` counters (inside the ingest transaction).
pub(super) fn count_ack(
    tx: &rusqlite::Transaction<'_>,
    accepted: bool,
) -> Result<(), rusqlite::Error> {
    let key = if accepted {
        "accepted_total"
    } else {
        "refused_total"
    };
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, '1')
         ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
        params![key],
    )?;
    Ok(())
}

/// Counters for a state file written before they existed: one scan, once.
pub(super) fn init_counts(conn: &rusqlite::Connection) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value)
         SELECT 'accepted_total', COUNT(*) FROM seen WHERE status IN ('accepted', 'superseded', 'discarded')",
        [],
    )?;
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value)
         SELECT 'refused_total', COUNT(*) FROM seen WHERE status IN ('rejected', 'rebase')",
        [],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{base_file, settings, upd};
    use super::*;

    fn count(s: &State, sql: &str) -> i64 {
        s.conn.query_row(sql, [], |r| r.get(0)).expect("count")
    }

    #[test]
    fn pruning_forgets_only_ids_that_could_never_be_accepted_again() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("s.sqlite")).expect("open");
        s.register("m", &base_file()).expect("register");
        let cfg = super::super::Settings {
            strategy: super::super::Strategy::FedAvg { min_updates: 1 },
            max_staleness: 2,
            ..settings()
        };
        let base_of = crate::intake::base_of;
        // Ten rounds of one update each, every update on the newest base.
        let mut ids = Vec::new();
        for i in 0..10u64 {
            let base = if i == 0 {
                "1.0.0".to_string()
            } else {
                format!("1.0.0+g{i}@e{}", s.epoch().expect("epoch"))
            };
            let u = upd(&format!("u{i}"), &base, 1, 0.1);
            let acks = s.ingest_batch(&[&u], &cfg, base_of).expect("ingest");
            assert_eq!(
                acks[0].status,
                dai_protocol::messages::AckStatus::Accepted,
                "{acks:?}"
            );
            s.aggregate("m", &cfg, true, &mut None)
                .expect("aggregate")
                .expect("a version");
            ids.push(u.meta.update_id.clone());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(count(&s, "SELECT COUNT(*) FROM seen"), 10);
        let p = s.prune("m", 2).expect("prune");
        // Current is 10: ids received before version 8 was made have bases
        // of at most 7, three behind: stale for good.
        assert_eq!(p.seen, 8, "{p:?}");
        let left: Vec<String> = s
            .conn
            .prepare("SELECT update_id FROM seen ORDER BY update_id")
            .expect("q")
            .query_map([], |r| r.get(0))
            .expect("q")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(left, ["u8", "u9"]);
        // A redelivery of a pruned id is refused as stale, not counted again.
        let again = upd("u0", "1.0.0", 1, 0.1);
        let acks = s.ingest_batch(&[&again], &cfg, base_of).expect("ingest");
        assert_eq!(
            acks[0].status,
            dai_protocol::messages::AckStatus::Rejected,
            "{acks:?}"
        );
        // The counters saw every ack, pruned or not.
        assert_eq!(s.seen_counts().expect("counts"), (10, 1));
    }
}
