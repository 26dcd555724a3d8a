//! The registry of global versions: the base head registered as version
//! 0, the current version, the listing, and promote / rollback. Versions
//! only move forward — edges ignore a global that is not newer than
//! theirs — so promoting old weights writes a new version carrying them.

use super::{CURRENT_SQL, NewGlobal, State, StateError, VersionRow, now};
use dai_head::Head;
use rusqlite::{OptionalExtension, params};

impl State {
    /// Register a model's base head as version 0 (idempotent).
    pub fn register(&self, model: &str, base_head: &[u8]) -> Result<(), StateError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO versions (model, version, parent, head, contributors, created_at)
             VALUES (?1, 0, NULL, ?2, '[]', ?3)",
            params![model, base_head, now()],
        )?;
        Ok(())
    }

    /// Newest global version of `model` and its head file.
    pub fn current(&self, model: &str) -> Result<(u64, Vec<u8>), StateError> {
        self.conn
            .query_row(CURRENT_SQL, params![model], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })
            .optional()?
            .ok_or_else(|| StateError::UnknownModel(model.to_string()))
    }

    /// Every global version, by model then version.
    pub fn versions(&self) -> Result<Vec<VersionRow>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT model, version, parent, contributors, created_at, metrics FROM versions ORDER BY model, version")?;
        let rows = stmt.query_map([], super::version_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Registered model names.
    pub fn models(&self) -> Result<Vec<String>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT DISTINCT model FROM versions ORDER BY model")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Make the weights of `version` the served global again. Versions only
    /// move forward (edges ignore a global that is not newer than theirs),
    /// so this writes a NEW version `current + 1` carrying those weights,
    /// with `metrics.promoted_from` saying where they came from.
    pub fn promote(
        &mut self,
        model: &str,
        version: u64,
        reason: &str,
    ) -> Result<NewGlobal, StateError> {
        self.promote_in(model, Some(version), reason)
    }

    /// Undo the newest version: promote its parent's weights.
    pub fn rollback(&mut self, model: &str) -> Result<NewGlobal, StateError> {
        self.promote_in(model, None, "")
    }

    /// `version` None: the parent of the current version (a rollback). The
    /// current version is read inside the writing transaction, so a
    /// concurrent aggregation cannot make it roll back the wrong one.
    fn promote_in(
        &mut self,
        model: &str,
        version: Option<u64>,
        reason: &str,
    ) -> Result<NewGlobal, StateError> {
        // IMMEDIATE: take the write lock first (waiting busy_timeout), so a
        // running aggregator and this CLI never fail with SQLITE_BUSY on a
        // read-to-write upgrade.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (current, parent): (u64, Option<i64>) = tx
            .query_row(
                "SELECT version, parent FROM versions WHERE model = ?1 ORDER BY version DESC LIMIT 1",
                params![model],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| StateError::UnknownModel(model.to_string()))?;
        let (version, reason) = match version {
            Some(v) => (v, reason.to_string()),
            None => (
                parent.ok_or_else(|| StateError::NoParent {
                    model: model.to_string(),
                    version: current,
                })? as u64,
                format!("rollback of version {current}"),
            ),
        };
        let source: Vec<u8> = tx
            .query_row(
                "SELECT head FROM versions WHERE model = ?1 AND version = ?2",
                params![model, version as i64],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StateError::UnknownVersion {
                model: model.to_string(),
                version,
                current,
            })?;
        if source.is_empty() {
            return Err(StateError::Pruned {
                model: model.to_string(),
                version,
                kept: super::retention::KEEP_HEADS as u64,
            });
        }
        if version == current {
            return Err(StateError::AlreadyCurrent {
                model: model.to_string(),
                version,
            });
        }
        let (head, _) = Head::from_bytes(&source).map_err(|e| StateError::Head(e.to_string()))?;
        let new_version = current + 1;
        let file = stamped_head(&head, model, new_version, current)?;
        let metrics = serde_json::json!({"promoted_from": version, "reason": reason});
        tx.execute(
            "INSERT INTO versions (model, version, parent, head, contributors, created_at, metrics) VALUES (?1, ?2, ?3, ?4, '[]', ?5, ?6)",
            params![model, new_version as i64, current as i64, file, now(), metrics.to_string()],
        )?;
        tx.commit()?;
        Ok(NewGlobal {
            model: model.to_string(),
            version: new_version,
            parent: current,
            head_file: file,
            contributors: Vec::new(),
            metrics,
        })
    }
}

/// A head file stamped with its global version (edges read the version
/// from `__metadata__`).
/// The head file of `version` as it is signed: versions the aggregator
/// made carry their model and version already; the registered base
/// (version 0, published when edges of a retired epoch must learn the new
/// one) is stamped here, its stored bytes left as they are.
pub fn signable_head(head_file: &[u8], model: &str, version: u64) -> Result<Vec<u8>, StateError> {
    if version > 0 {
        return Ok(head_file.to_vec());
    }
    let (head, _) = Head::from_bytes(head_file).map_err(|e| StateError::Head(e.to_string()))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("model".to_string(), model.to_string());
    meta.insert("version".to_string(), "0".to_string());
    head.to_bytes(&meta)
        .map_err(|e| StateError::Head(e.to_string()))
}

pub(super) fn stamped_head(
    head: &Head,
    model: &str,
    version: u64,
    parent: u64,
) -> Result<Vec<u8>, StateError> {
    let mut meta = std::collections::HashMap::new();
    meta.insert("model".to_string(), model.to_string());
    meta.insert("version".to_string(), version.to_string());
    meta.insert("parent".to_string(), parent.to_string());
    meta.insert("created_at".to_string(), now().to_string());
    head.to_bytes(&meta)
        .map_err(|e| StateError::Head(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{base, base_file};
    use super::*;

    #[test]
    fn promote_and_rollback_write_new_versions_and_refuse_nonsense() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base_file()).expect("register");
        s.register("m", b"not read again").expect("idempotent");
        assert!(matches!(
            s.rollback("m"),
            Err(StateError::NoParent { version: 0, .. })
        ));
        assert!(matches!(
            s.promote("m", 0, "x"),
            Err(StateError::AlreadyCurrent { version: 0, .. })
        ));
        let err = s.promote("m", 4, "x").expect_err("no version 4");
        assert_eq!(
            err.to_string(),
            "model \"m\" has no version 4 (the newest is 0)"
        );
        assert!(matches!(
            s.promote("zz", 0, "x"),
            Err(StateError::UnknownModel(_))
        ));

        // Give the base a child by hand-stamping, then promote and roll back.
        let child = stamped_head(&base(), "m", 1, 0).expect("stamp");
        s.conn
            .execute(
                "INSERT INTO versions (model, version, parent, head, contributors, created_at) VALUES ('m', 1, 0, ?1, '[]', 0)",
                params![child],
            )
            .expect("v1");
        let v2 = s.promote("m", 0, "v1 misbehaves").expect("promote");
        assert_eq!((v2.version, v2.parent), (2, 1));
        assert_eq!(v2.metrics["promoted_from"], 0);
        assert_eq!(v2.metrics["reason"], "v1 misbehaves");
        let (_, md) = Head::from_bytes(&v2.head_file).expect("head");
        assert_eq!((md["version"].as_str(), md["parent"].as_str()), ("2", "1"));
        let v3 = s.rollback("m").expect("rollback");
        assert_eq!((v3.version, v3.parent), (3, 2));
        assert_eq!(v3.metrics["promoted_from"], 1);
        assert_eq!(v3.metrics["reason"], "rollback of version 2");
        let listed: Vec<(u64, Option<u64>)> = s
            .versions()
            .expect("list")
            .iter()
            .map(|v| (v.version, v.parent))
            .collect();
        assert_eq!(
            listed,
            vec![(0, None), (1, Some(0)), (2, Some(1)), (3, Some(2))]
        );
        assert_eq!(s.current("m").expect("current").0, 3);
        assert_eq!(s.models().expect("models"), vec!["m".to_string()]);
    }
}
