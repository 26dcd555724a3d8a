//! The `samples` table: labelled head inputs for on-device training, each
//! assigned to the train or hold-out split when stored, bounded per model.
//! Features are stored as little-endian f32 blobs.

use crate::{Store, StoreError, now};
use rusqlite::params;

/// A stored training sample (the head's input vector and its label).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: i64,
    pub features: Vec<f32>,
    pub label: u32,
    pub holdout: bool,
}

/// A sample to store.
#[derive(Debug, Clone, Copy)]
pub struct NewSample<'a> {
    pub model: &'a str,
    pub base_version: &'a str,
    pub features: &'a [f32],
    pub label: u32,
    /// `api`, `feedback` or `sensor`.
    pub source: &'a str,
}

/// splitmix64 of a row id: spreads the hold-out choice evenly.
fn holdout_hash(id: i64) -> u64 {
    let mut z = (id as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn f32_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn blob_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl Store {
    /// Store labelled samples in ONE transaction (all or none). About one
    /// in `holdout_every` is kept for validation, chosen by a hash of the
    /// row id so that every model gets its share however requests of
    /// different models interleave. Keeps at most `max_per_model` samples
    /// per model, deleting the oldest. Returns the sample ids.
    pub fn insert_samples(
        &self,
        samples: &[NewSample<'_>],
        holdout_every: i64,
        max_per_model: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut ids = Vec::with_capacity(samples.len());
        let ts = now();
        for sample in samples {
            let next: i64 =
                tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM samples", [], |r| {
                    r.get(0)
                })?;
            let split =
                if holdout_every > 0 && holdout_hash(next).is_multiple_of(holdout_every as u64) {
                    "holdout"
                } else {
                    "train"
                };
            tx.execute(
                "INSERT INTO samples (id, model, base_version, features, label, split, source, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    next,
                    sample.model,
                    sample.base_version,
                    f32_blob(sample.features),
                    sample.label,
                    split,
                    sample.source,
                    ts
                ],
            )?;
            ids.push(next);
        }
        let mut models: Vec<&str> = samples.iter().map(|s| s.model).collect();
        models.dedup();
        for model in models {
            tx.execute(
                "DELETE FROM samples WHERE model = ?1 AND id <= (
                    SELECT id FROM samples WHERE model = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![model, max_per_model],
            )?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Samples of `model`/`base_version` newer than sample id `after`.
    pub fn samples_since(
        &self,
        model: &str,
        base_version: &str,
        after: i64,
    ) -> Result<i64, StoreError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM samples WHERE model = ?1 AND base_version = ?2 AND id > ?3",
            params![model, base_version, after],
            |r| r.get(0),
        )?)
    }

    /// Samples of `model` taken with `base_version`, oldest first.
    pub fn samples(&self, model: &str, base_version: &str) -> Result<Vec<Sample>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, features, label, split FROM samples WHERE model = ?1 AND base_version = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![model, base_version], |r| {
            Ok(Sample {
                id: r.get(0)?,
                features: blob_f32(&r.get::<_, Vec<u8>>(1)?),
                label: r.get(2)?,
                holdout: r.get::<_, String>(3)? == "holdout",
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// (train, holdout, newest id) counts of a model's samples.
    pub fn sample_counts(&self, model: &str) -> Result<(i64, i64, i64), StoreError> {
        Ok(self.conn().query_row(
            "SELECT COALESCE(SUM(split = 'train'), 0), COALESCE(SUM(split = 'holdout'), 0), COALESCE(MAX(id), 0)
             FROM samples WHERE model = ?1",
            params![model],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?)
    }
}
