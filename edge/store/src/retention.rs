//! Retention: what grows with every run, load and global is pruned to a
//! fixed number of rows per model, so a device that runs for years keeps a
//! store of bounded size ([`Retention`] documents each bound; the 30-day
//! test in tests/edge/retention.rs measures the file). What stays is what
//! is read: the active head and the newest others (rollback), the newest
//! globals (the newest is the served one), the newest runs (the newest
//! sample each consumed is a `MAX` over them, which keeping the newest
//! preserves) and the newest model events (the status page's list).
//! Samples, snapshots and the outbox have their own bounds elsewhere.

use crate::{Store, StoreError};
use rusqlite::params;

/// Rows kept; the defaults bound the store to a few MiB beyond samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Head versions per model besides the active one.
    pub heads: usize,
    /// Global versions per model.
    pub globals: usize,
    /// Training runs per model.
    pub runs: usize,
    /// Model load / failure events, all models.
    pub model_events: usize,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            heads: 8,
            globals: 4,
            runs: 500,
            model_events: 1000,
        }
    }
}

/// Rows deleted by one [`Store::prune`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub heads: usize,
    pub globals: usize,
    pub runs: usize,
    pub model_events: usize,
}

impl Pruned {
    pub fn total(&self) -> usize {
        self.heads + self.globals + self.runs + self.model_events
    }
}

impl Store {
    /// Delete what [`Retention`] does not keep, in one transaction.
    pub fn prune(&self, keep: &Retention) -> Result<Pruned, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let heads = tx.execute(
            "DELETE FROM heads WHERE active = 0 AND (model, version) NOT IN (
                 SELECT model, version FROM (
                     SELECT model, version, ROW_NUMBER() OVER (PARTITION BY model ORDER BY version DESC) AS n
                     FROM heads WHERE active = 0)
                 WHERE n <= ?1)",
            params![keep.heads as i64],
        )?;
        let globals = tx.execute(
            "DELETE FROM globals WHERE (model, version, epoch) NOT IN (
                 SELECT model, version, epoch FROM (
                     SELECT model, version, epoch, ROW_NUMBER() OVER (PARTITION BY model ORDER BY epoch DESC, version DESC) AS n
                     FROM globals)
                 WHERE n <= ?1)",
            params![keep.globals as i64],
        )?;
        // The completed run that consumed the newest sample is kept too,
        // whatever its age: it is what "samples since the last run" counts
        // from ([`Store::last_consumed_sample`]).
        let runs = tx.execute(
            "DELETE FROM training_runs WHERE id NOT IN (
                 SELECT id FROM (
                     SELECT id, ROW_NUMBER() OVER (PARTITION BY model ORDER BY id DESC) AS n
                     FROM training_runs)
                 WHERE n <= ?1)
             AND id NOT IN (
                 SELECT MAX(id) FROM training_runs t
                 WHERE outcome IN ('accepted', 'rejected', 'diverged')
                   AND last_sample_id = (
                       SELECT MAX(last_sample_id) FROM training_runs u
                       WHERE u.model = t.model AND u.outcome IN ('accepted', 'rejected', 'diverged'))
                 GROUP BY model)",
            params![keep.runs as i64],
        )?;
        let model_events = tx.execute(
            "DELETE FROM model_events WHERE id <= (SELECT id FROM model_events ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            params![keep.model_events as i64],
        )?;
        tx.commit()?;
        Ok(Pruned {
            heads,
            globals,
            runs,
            model_events,
        })
    }

    /// The store's size on disk: pages in use times the page size (the
    /// main file; the WAL is checkpointed back into it).
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        let conn = self.conn();
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(((pages - free).max(0) * size) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AcceptedHead;

    fn train(s: &Store, model: &str, i: usize) {
        let run = s.start_run(model, "cpu", 10).expect("run");
        let id = format!("{model}-u{i}");
        s.accept_head(
            run,
            &AcceptedHead {
                model,
                base_version: "1",
                weights: &[1u8; 256],
                update_id: &id,
                update_base: "1",
                local_dp_noise: None,
                delta_payload: b"p",
                encoding: "f32",
                sample_count: 10,
                loss: 0.5,
                residual: None,
            },
            &serde_json::json!([]),
            0.5,
            0.6,
        )
        .expect("accept");
        s.delete_outbox(&id).expect("acked");
    }

    #[test]
    fn pruning_keeps_the_active_head_and_the_newest_rows() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open_in(dir.path()).expect("open");
        let keep = Retention {
            heads: 2,
            globals: 2,
            runs: 3,
            model_events: 4,
        };
        for i in 0..10 {
            train(&s, "a", i);
            train(&s, "b", i);
            s.adopt_global("a", "1", i as i64 + 1, 7, b"g", "x")
                .expect("adopt");
            s.record_model_failed("a", "x").expect("event");
        }
        // The newest head of `a` is the adopted global (active); of `b`, the
        // last trained one.
        let active_a = s.active_head("a", "1").expect("q");
        let active_b = s.active_head("b", "1").expect("q");
        let p = s.prune(&keep).expect("prune");
        assert!(p.total() > 0);
        assert_eq!(s.active_head("a", "1").expect("q"), active_a);
        assert_eq!(s.active_head("b", "1").expect("q"), active_b);
        let count =
            |sql: &str| -> i64 { s.conn().query_row(sql, [], |r| r.get(0)).expect("count") };
        assert_eq!(
            count("SELECT COUNT(*) FROM heads WHERE model = 'a' AND active = 0"),
            2
        );
        assert_eq!(
            count("SELECT COUNT(*) FROM heads WHERE model = 'b' AND active = 0"),
            2
        );
        assert_eq!(count("SELECT COUNT(*) FROM globals WHERE model = 'a'"), 2);
        assert_eq!(
            s.latest_global("a").expect("q").map(|g| g.version),
            Some(10)
        );
        assert_eq!(
            count("SELECT COUNT(*) FROM training_runs WHERE model = 'b'"),
            3
        );
        assert_eq!(count("SELECT COUNT(*) FROM model_events"), 4);
        // New versions continue after the pruned ones.
        let before: i64 = count("SELECT MAX(version) FROM heads WHERE model = 'b'");
        train(&s, "b", 99);
        assert_eq!(
            count("SELECT MAX(version) FROM heads WHERE model = 'b'"),
            before + 1
        );
        // A second prune right after finds only the one new run to drop.
        let again = s.prune(&keep).expect("prune");
        assert_eq!(again.runs, 1, "{again:?}");
    }

    /// 30 days of a busy device, accelerated: a training run, an acked
    /// update and an adopted global every 30 minutes (1440 of each), a
    /// model reload a day, a status snapshot a minute (the daemon keeps
    /// 1440) and retention every 30 snapshots. Payloads are small (1 KiB
    /// heads, 512-byte snapshots) to keep the test quick; what is bounded
    /// is the row count of each table, so the file must level off instead
    /// of growing each day (the bound at real sizes: docs/reliability.md).
    #[test]
    fn thirty_days_of_a_busy_device_stay_under_the_bound() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open_in(dir.path()).expect("open");
        // Durability is not what this measures; without fsyncs it runs in
        // seconds.
        s.conn()
            .pragma_update(None, "synchronous", "OFF")
            .expect("synchronous");
        let head = vec![7u8; 1 << 10];
        let snapshot = serde_json::json!({ "pad": "x".repeat(512) });
        let keep = Retention::default();
        let mut sizes = Vec::new();
        for i in 0..1440usize {
            let run = s.start_run("digits", "cpu", 16).expect("run");
            let id = format!("u{i}");
            s.accept_head(
                run,
                &AcceptedHead {
                    model: "digits",
                    base_version: "1.0.0",
                    weights: &head,
                    update_id: &id,
                    update_base: "1.0.0",
                    local_dp_noise: None,
                    delta_payload: &head,
                    encoding: "int8",
                    sample_count: 16,
                    loss: 0.5,
                    residual: None,
                },
                &serde_json::json!([]),
                0.9,
                0.91,
            )
            .expect("accept");
            s.delete_outbox(&id).expect("acked");
            s.adopt_global("digits", "1.0.0", i as i64 + 1, 9, &head, "sha")
                .expect("adopt");
            if i % 48 == 0 {
                s.record_model_loaded("digits", "1.0.0", &format!("{i}"), "/m")
                    .expect("load");
            }
            for _ in 0..30 {
                s.insert_snapshot(&snapshot, 1440).expect("snapshot");
            }
            s.prune(&keep).expect("prune");
            if i % 48 == 47 {
                s.conn()
                    .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                    .expect("checkpoint");
                sizes.push(s.size_bytes().expect("size"));
            }
        }
        let day10 = sizes[9];
        let day30 = *sizes.last().expect("30 days");
        // 1440 snapshots, 9 heads and 4 globals, 500 runs and 1000 events
        // at these sizes: about 1.1 MiB, whatever the number of days.
        assert!(day30 < 2 << 20, "{day30} bytes after 30 days");
        assert!(
            day30 <= day10 + day10 / 10,
            "still growing: {day10} bytes on day 10, {day30} on day 30"
        );
        let pages: i64 = s
            .conn()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("pages");
        eprintln!(
            "edge store after 30 simulated days: {} KiB in use ({pages} pages in the file), day 10: {} KiB",
            day30 >> 10,
            day10 >> 10
        );
    }
}
