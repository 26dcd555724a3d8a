//! A store file SQLite calls corrupt is moved aside, not fatal: the daemon
//! renames it (and its `-wal`/`-shm`) to `dai.sqlite.corrupt-<unix ms>`,
//! starts on a fresh file and says so, instead of exiting at every start
//! (a crash loop that would also stop inference). Only corruption is
//! quarantined: a file of a newer schema, or one that cannot be read for
//! another reason (permissions, I/O), still fails the start, because
//! moving it aside would hide data this build cannot read.

use crate::{Store, StoreError};
use std::path::{Path, PathBuf};

/// Quarantined files kept in the data dir; older ones are deleted.
pub const KEEP_QUARANTINED: usize = 3;

/// A file moved aside at open.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantine {
    /// Where the corrupt file is now.
    pub file: PathBuf,
    /// What SQLite said.
    pub reason: String,
    /// Unix seconds.
    pub at: f64,
}

/// Does this error mean the file itself is damaged?
pub fn is_corruption(e: &StoreError) -> bool {
    match e {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => matches!(
            f.code,
            rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
        ),
        StoreError::Corrupt(_) => true,
        _ => false,
    }
}

impl Store {
    /// [`Store::open_in`], checking the file with `PRAGMA quick_check`;
    /// a corrupt file is quarantined and a fresh store opened in its place.
    pub fn open_or_quarantine(data_dir: &Path) -> Result<(Store, Option<Quarantine>), StoreError> {
        let first = Store::open_in(data_dir).and_then(|s| s.quick_check().map(|()| s));
        let err = match first {
            Ok(store) => return Ok((store, None)),
            Err(e) if is_corruption(&e) => e,
            Err(e) => return Err(e),
        };
        let reason = crate::chain_text(&err);
        let at = crate::now();
        let path = data_dir.join("dai.sqlite");
        let file = data_dir.join(format!("dai.sqlite.corrupt-{}", (at * 1000.0) as u64));
        for suffix in ["", "-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{suffix}", path.display()));
            let to = PathBuf::from(format!("{}{suffix}", file.display()));
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StoreError::DataDir { path: from, source });
                }
            }
        }
        tracing::error!(file = %file.display(), %reason, "the store file is corrupt: moved aside, starting with a fresh store");
        prune(data_dir);
        let store = Store::open_in(data_dir)?;
        Ok((store, Some(Quarantine { file, reason, at })))
    }

    /// `PRAGMA quick_check`: `Err(Corrupt)` with SQLite's first findings
    /// unless the file is sound.
    pub fn quick_check(&self) -> Result<(), StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("PRAGMA quick_check(5)")?;
        let found: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if found.len() == 1 && found[0] == "ok" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(found.join("; ")))
        }
    }
}

/// Quarantined files in `data_dir`, oldest first.
pub fn quarantined(data_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.strip_prefix("dai.sqlite.corrupt-")
                    .is_some_and(|ts| ts.chars().all(|c| c.is_ascii_digit()))
            })
        })
        .collect();
    files.sort();
    files
}

fn prune(data_dir: &Path) {
    let files = quarantined(data_dir);
    for old in files
        .iter()
        .take(files.len().saturating_sub(KEEP_QUARANTINED))
    {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", old.display()));
        }
        tracing::warn!(file = %old.display(), "deleted an old quarantined store file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_garbage_file_is_moved_aside_and_a_fresh_store_opens() {
        let dir = tempfile::tempdir().expect("tmp");
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 13) as u8).collect();
        std::fs::write(dir.path().join("dai.sqlite"), &garbage).expect("write");
        let (store, q) = Store::open_or_quarantine(dir.path()).expect("opens");
        let q = q.expect("quarantined");
        assert!(q.reason.contains("not a database"), "{}", q.reason);
        assert_eq!(std::fs::read(&q.file).expect("kept"), garbage);
        assert_eq!(quarantined(dir.path()), vec![q.file.clone()]);
        store
            .record_model_failed("m", "x")
            .expect("the fresh store works");
        drop(store);
        // The next start finds a sound file and quarantines nothing.
        let (_, again) = Store::open_or_quarantine(dir.path()).expect("opens");
        assert_eq!(again, None);
    }

    #[test]
    fn a_damaged_page_is_found_by_the_check() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("dai.sqlite");
        {
            let s = Store::open_in(dir.path()).expect("open");
            for i in 0..400 {
                s.record_model_failed(&format!("model-{i}"), &"x".repeat(200))
                    .expect("fill");
            }
            let c = s.conn();
            c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .expect("checkpoint");
        }
        // Overwrite the middle of the file (table pages), not the header.
        let mut bytes = std::fs::read(&path).expect("read");
        assert!(bytes.len() > 16 * 4096, "{} bytes", bytes.len());
        for b in &mut bytes[8 * 4096..12 * 4096] {
            *b = 0xA5;
        }
        std::fs::write(&path, &bytes).expect("damage");
        let (_, q) = Store::open_or_quarantine(dir.path()).expect("opens");
        assert!(q.is_some(), "the damage was not found");
    }

    #[test]
    fn only_the_newest_quarantined_files_are_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        for i in 0..5 {
            std::fs::write(
                dir.path().join(format!("dai.sqlite.corrupt-{}", 100 + i)),
                b"x",
            )
            .expect("write");
        }
        std::fs::write(dir.path().join("dai.sqlite"), b"garbage garbage garbage").expect("write");
        let (_, q) = Store::open_or_quarantine(dir.path()).expect("opens");
        let left = quarantined(dir.path());
        assert_eq!(left.len(), KEEP_QUARANTINED);
        assert_eq!(left.last(), q.map(|q| q.file).as_ref());
    }

    #[test]
    fn a_newer_schema_is_not_quarantined() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let c = rusqlite::Connection::open(dir.path().join("dai.sqlite")).expect("c");
            c.pragma_update(None, "user_version", 99).expect("v");
        }
        assert!(matches!(
            Store::open_or_quarantine(dir.path()),
            Err(StoreError::TooNew { .. })
        ));
        assert!(quarantined(dir.path()).is_empty());
    }
}
