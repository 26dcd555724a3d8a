//! Retention: the state file stays bounded over months.
//! - `seen`: an update id must be remembered only while a redelivery of it
//!   could still be accepted. An update is accepted only if its base is at
//!   most `max_staleness` versions behind the current one, and its base is
//!   at most the version current when it arrived; so an id received before
//!   version `current - max_staleness` was made can never be accepted
//!   again (it would be stale), and its row goes. Ids of pending updates
//!   stay whatever their age.
//! - `versions`: only the newest [`KEEP_HEADS`] of each model (and version
//!   0, the base) keep their head file; promoting an older one is refused
//!   as pruned. Contributor lists (40 bytes an update: with thousands of
//!   devices the largest part of a row) are kept for the newest
//!   `max(KEEP_HEADS, max_staleness + 1)` versions: beyond them no update
//!   can be accepted again, and `seen` (not this list) is what refuses a
//!   second count; an emptied list is marked `contributors_pruned` in the
//!   metrics, whose `updates` keeps the count. Rows themselves are kept for
//!   the newest `max(KEEP_ROWS, max_staleness + 1)`; an older row is
//!   folded into the model's DP summary (`meta` `dp_folded/{model}`: rounds
//!   per noise multiplier, and whether any round had none) before it goes,
//!   so the accountant composes exactly what it did before.
//! - counts for the status page come from `meta` counters written in the
//!   ingest transaction, not from a scan of `seen`.

use super::{State, StateError, VersionRow};
use rusqlite::params;

/// Versions per model that keep their head file (what promote and
/// rollback can go back to).
pub const KEEP_HEADS: i64 = 64;
/// Versions per model that keep their row (the registry's history).
pub const KEEP_ROWS: i64 = 4096;

/// Rows removed by one [`State::prune`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub seen: usize,
    pub heads: usize,
    /// Versions whose contributor list was emptied.
    pub contributors: usize,
    /// Version rows folded into the DP summary and deleted.
    pub rows: usize,
}

/// The DP record of deleted version rows: what [`super::privacy`]
/// composes for them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpFolded {
    /// (noise multiplier, rounds) of rounds that had updates.
    pub noised: Vec<(f64, u64)>,
    /// A round with updates and no noise was folded.
    pub unprotected: bool,
}

fn folded_key(model: &str) -> String {
    format!("dp_folded/{model}")
}

/// The DP summary of `model`'s deleted rows (empty if none were).
pub(super) fn dp_folded(conn: &rusqlite::Connection, model: &str) -> Result<DpFolded, StateError> {
    let v: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            params![folded_key(model)],
            |r| r.get(0),
        )
        .ok();
    Ok(v.and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default())
}

/// Whether a version's round counted updates (its list, or its metrics
/// once the list was pruned).
pub(super) fn contributed(contributors: &str, metrics: &serde_json::Value) -> bool {
    let listed = serde_json::from_str::<Vec<String>>(contributors)
        .map(|c| !c.is_empty())
        .unwrap_or(true);
    listed || metrics["updates"].as_u64().is_some_and(|n| n > 0)
}

/// A tier's DP round (a partial aggregate it released, noised): composed
/// into the same summary as deleted version rows, since a tier writes no
/// version rows of its own (`tier`). In the caller's transaction.
pub(super) fn add_dp_round(
    tx: &rusqlite::Transaction<'_>,
    model: &str,
    z: f64,
) -> Result<(), StateError> {
    let mut folded = dp_folded(tx, model)?;
    match folded.noised.iter_mut().find(|(f, _)| *f == z) {
        Some((_, n)) => *n += 1,
        None => folded.noised.push((z, 1)),
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![
            folded_key(model),
            serde_json::to_string(&folded).unwrap_or_default()
        ],
    )?;
    Ok(())
}

impl State {
    /// Apply the retention rules above to `model`, in one transaction.
    pub fn prune(&mut self, model: &str, max_staleness: u64) -> Result<Pruned, StateError> {
        self.prune_keeping(model, max_staleness, KEEP_ROWS)
    }

    /// [`State::prune`] keeping `keep_rows` version rows (tests reach the
    /// window in fewer rounds).
    pub(crate) fn prune_keeping(
        &mut self,
        model: &str,
        max_staleness: u64,
        keep_rows: i64,
    ) -> Result<Pruned, StateError> {
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
        let window = max_staleness.min(i64::MAX as u64 - 1) as i64 + 1;
        let contributors = tx.execute(
            "UPDATE versions SET contributors = '[]',
                 metrics = json_set(CASE WHEN json_valid(metrics) THEN metrics ELSE '{}' END, '$.contributors_pruned', json('true'))
             WHERE model = ?1 AND version > 0 AND version <= ?2 AND contributors != '[]'",
            params![model, current.saturating_sub(KEEP_HEADS.max(window))],
        )?;
        // Rows beyond the history window: folded into the DP summary, then
        // deleted (version 0, the base, stays).
        let oldest_kept = current.saturating_sub(keep_rows.max(window));
        let old: Vec<(String, String)> = tx
            .prepare("SELECT contributors, metrics FROM versions WHERE model = ?1 AND version > 0 AND version <= ?2")?
            .query_map(params![model, oldest_kept], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let rows = old.len();
        if rows > 0 {
            let mut folded = dp_folded(&tx, model)?;
            for (contributors, metrics) in &old {
                let m: serde_json::Value = serde_json::from_str(metrics).unwrap_or_default();
                if !contributed(contributors, &m) {
                    continue;
                }
                match m["dp"]["noise_multiplier"].as_f64() {
                    Some(z) => match folded.noised.iter_mut().find(|(f, _)| *f == z) {
                        Some((_, n)) => *n += 1,
                        None => folded.noised.push((z, 1)),
                    },
                    None => folded.unprotected = true,
                }
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![
                    folded_key(model),
                    serde_json::to_string(&folded).unwrap_or_default()
                ],
            )?;
            tx.execute(
                "DELETE FROM versions WHERE model = ?1 AND version > 0 AND version <= ?2",
                params![model, oldest_kept],
            )?;
        }
        tx.commit()?;
        Ok(Pruned {
            seen,
            heads,
            contributors,
            rows,
        })
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

    #[test]
    fn thirty_days_of_rounds_keep_the_file_flat_and_the_dp_spend_exact() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.sqlite");
        let mut s = State::open(&path).expect("open");
        s.register("m", &base_file()).expect("register");
        let cfg = super::super::Settings {
            strategy: super::super::Strategy::FedAvg { min_updates: 4 },
            max_staleness: 3,
            dp: Some(super::super::DpSettings {
                noise_multiplier: 1.1,
                clip_norm: 1.0,
                delta: 1e-5,
                target_epsilon: None,
            }),
            ..settings()
        };
        let base_of = crate::intake::base_of;
        const KEEP: i64 = 100;
        const DAYS: usize = 30;
        const ROUNDS_A_DAY: usize = 24;
        let size = |s: &State| -> u64 {
            s.conn
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .expect("checkpoint");
            std::fs::metadata(&path).expect("size").len()
        };
        let mut sizes = Vec::new();
        let mut round = 0u64;
        for _day in 0..DAYS {
            for _ in 0..ROUNDS_A_DAY {
                let base = if round == 0 {
                    "1.0.0".to_string()
                } else {
                    format!("1.0.0+g{round}@e{}", s.epoch().expect("epoch"))
                };
                let ups: Vec<_> = (0..4)
                    .map(|d| upd(&format!("r{round}-d{d}"), &base, 10, 0.01))
                    .collect();
                let refs: Vec<_> = ups.iter().collect();
                let acks = s.ingest_batch(&refs, &cfg, base_of).expect("ingest");
                assert!(
                    acks.iter()
                        .all(|a| a.status == dai_protocol::messages::AckStatus::Accepted),
                    "{acks:?}"
                );
                s.aggregate("m", &cfg, true, &mut None)
                    .expect("aggregate")
                    .expect("a version");
                round += 1;
                // The accountant composes exactly what it did before.
                let before = s.privacy_spent("m").expect("spent");
                s.prune_keeping("m", cfg.max_staleness, KEEP)
                    .expect("prune");
                let after = s.privacy_spent("m").expect("spent");
                assert_eq!(after.rounds, before.rounds);
                assert_eq!(after.unprotected, before.unprotected);
                let (e0, e1) = (
                    before.accountant.epsilon(1e-5).0,
                    after.accountant.epsilon(1e-5).0,
                );
                assert!((e0 - e1).abs() <= 1e-9 * e0.abs().max(1.0), "{e0} vs {e1}");
            }
            sizes.push(size(&s));
        }
        let spent = s.privacy_spent("m").expect("spent");
        assert_eq!(spent.rounds, round, "every round is still composed");
        let rows = count(&s, "SELECT COUNT(*) FROM versions");
        assert!(rows <= KEEP + 2, "{rows} version rows");
        let listed = count(
            &s,
            "SELECT COUNT(*) FROM versions WHERE contributors != '[]'",
        );
        assert!(listed <= KEEP_HEADS + 1, "{listed} contributor lists");
        let kib = |b: u64| b >> 10;
        println!(
            "aggregator, {DAYS} days of {ROUNDS_A_DAY} rounds: {} KiB on day 10, {} KiB on day 30",
            kib(sizes[9]),
            kib(sizes[DAYS - 1])
        );
        assert!(
            sizes[DAYS - 1] <= sizes[9] + sizes[9] / 10 + (64 << 10),
            "the file kept growing: {sizes:?}"
        );
    }
}
