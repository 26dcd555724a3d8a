//! Bundles on offer to the fleet (`dai-cloud models publish`) and what
//! each device reported about them. The CLI adds a bundle (its offer and
//! its chunks, one transaction); the running aggregator on the same file
//! signs and publishes the newest offer of each model name, serves chunks
//! from `bundle_chunks`, and records the devices' reports.

use super::{State, StateError, now};
use dai_protocol::bundle::{Offer, Report};
use rusqlite::{OptionalExtension, params};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bundles (
    sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    offer TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bundle_chunks (
    sha256 TEXT NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (sha256, idx)
);
CREATE TABLE IF NOT EXISTS bundle_reports (
    sha256 TEXT NOT NULL,
    device TEXT NOT NULL,
    state TEXT NOT NULL,
    received INTEGER NOT NULL,
    total INTEGER NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (sha256, device)
);";

/// One device's last report on one bundle.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BundleReportRow {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub device: String,
    pub state: String,
    pub received: u32,
    pub total: u32,
    pub detail: String,
    pub at: f64,
}

impl State {
    /// Offer `archive` as `offer` (from [`Offer::describe`]); the newest
    /// offer of a name replaces the older one on the fleet's topic.
    pub fn add_bundle(&mut self, offer: &Offer, archive: &[u8]) -> Result<(), StateError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let json = serde_json::to_string(offer).map_err(|e| StateError::Corrupt(e.to_string()))?;
        tx.execute(
            "INSERT OR REPLACE INTO bundles (sha256, name, version, offer, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![offer.sha256, offer.name, offer.version, json, now()],
        )?;
        tx.execute(
            "DELETE FROM bundle_chunks WHERE sha256 = ?1",
            params![offer.sha256],
        )?;
        tx.execute(
            "DELETE FROM bundle_reports WHERE sha256 = ?1",
            params![offer.sha256],
        )?;
        for (i, c) in archive
            .chunks(offer.chunk_bytes.max(1) as usize)
            .enumerate()
        {
            tx.execute(
                "INSERT INTO bundle_chunks (sha256, idx, data) VALUES (?1, ?2, ?3)",
                params![offer.sha256, i as i64, c],
            )?;
        }
        // Older offers of the name are no longer served: their chunks go.
        tx.execute(
            "DELETE FROM bundle_chunks WHERE sha256 IN
               (SELECT sha256 FROM bundles WHERE name = ?1 AND sha256 <> ?2)",
            params![offer.name, offer.sha256],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The newest offer of each model name.
    pub fn offers(&self) -> Result<Vec<Offer>, StateError> {
        let mut stmt = self.conn.prepare(
            "SELECT b.offer FROM bundles b WHERE b.rowid = (SELECT b2.rowid FROM bundles b2
               WHERE b2.name = b.name ORDER BY b2.created_at DESC, b2.rowid DESC LIMIT 1)
             ORDER BY b.name",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for json in rows {
            let json = json?;
            out.push(
                serde_json::from_str(&json)
                    .map_err(|e| StateError::Corrupt(format!("a stored bundle offer: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Chunk `idx` of the archive `sha256`, if it is on offer.
    pub fn bundle_chunk(&self, sha256: &str, idx: u32) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self
            .conn
            .query_row(
                "SELECT data FROM bundle_chunks WHERE sha256 = ?1 AND idx = ?2",
                params![sha256, i64::from(idx)],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Record `device`'s report (its last one per bundle is kept). A report
    /// on a bundle never offered is ignored (false).
    pub fn record_bundle_report(&self, device: &str, r: &Report) -> Result<bool, StateError> {
        let n = self.conn.execute(
            "INSERT OR REPLACE INTO bundle_reports (sha256, device, state, received, total, detail, at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE EXISTS (SELECT 1 FROM bundles WHERE sha256 = ?1)",
            params![
                r.sha256,
                device,
                r.state.as_str(),
                i64::from(r.received),
                i64::from(r.total),
                r.detail,
                now()
            ],
        )?;
        Ok(n > 0)
    }

    /// Every device's last report, by bundle name, then device.
    pub fn bundle_reports(&self) -> Result<Vec<BundleReportRow>, StateError> {
        let mut stmt = self.conn.prepare(
            "SELECT b.name, b.version, r.sha256, r.device, r.state, r.received, r.total, r.detail, r.at
             FROM bundle_reports r JOIN bundles b ON b.sha256 = r.sha256
             ORDER BY b.name, b.created_at, r.device",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(BundleReportRow {
                name: r.get(0)?,
                version: r.get(1)?,
                sha256: r.get(2)?,
                device: r.get(3)?,
                state: r.get(4)?,
                received: r.get::<_, i64>(5)? as u32,
                total: r.get::<_, i64>(6)? as u32,
                detail: r.get(7)?,
                at: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dai_protocol::bundle::{CHUNK_BYTES, ReportState, Targets};

    #[test]
    fn the_newest_offer_of_a_name_is_served_with_its_chunks() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("a.sqlite")).expect("open");
        let a1: Vec<u8> = vec![1; CHUNK_BYTES + 5];
        let o1 = Offer::describe("m", "1", &a1, Targets::default(), 1.0);
        s.add_bundle(&o1, &a1).expect("add");
        assert_eq!(s.offers().expect("offers"), vec![o1.clone()]);
        assert_eq!(
            s.bundle_chunk(&o1.sha256, 1).expect("chunk"),
            Some(vec![1; 5])
        );
        assert_eq!(s.bundle_chunk(&o1.sha256, 2).expect("none"), None);
        let a2: Vec<u8> = vec![2; 10];
        let o2 = Offer::describe("m", "2", &a2, Targets::default(), 2.0);
        s.add_bundle(&o2, &a2).expect("add 2");
        assert_eq!(s.offers().expect("offers"), vec![o2.clone()]);
        assert_eq!(
            s.bundle_chunk(&o1.sha256, 0).expect("gone"),
            None,
            "old chunks deleted"
        );
        let r = Report {
            name: "m".into(),
            version: "2".into(),
            sha256: o2.sha256.clone(),
            state: ReportState::Loaded,
            received: 1,
            total: 1,
            detail: String::new(),
        };
        assert!(s.record_bundle_report("d1", &r).expect("report"));
        let stray = Report {
            sha256: "00".repeat(32),
            ..r
        };
        assert!(!s.record_bundle_report("d1", &stray).expect("stray"));
        let rows = s.bundle_reports().expect("rows");
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].device.as_str(), rows[0].state.as_str()),
            ("d1", "loaded")
        );
    }
}
