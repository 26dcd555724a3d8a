//! Server-side validation (`--validation MODEL=FILE`): root data the
//! aggregator holds (as FLTrust's server does), on which every candidate
//! global is scored before it is published. A candidate whose accuracy
//! falls more than the margin below the current version's is not
//! published: its round is discarded (the updates' `seen` rows say so)
//! and the current global stays. This catches what passes every
//! per-update check: a coordinated shift that the robust combiner lets
//! through, or a fleet that drifted onto bad labels. It needs data the
//! aggregator may hold; devices' data never leaves them.
//!
//! The file is safetensors with `x` (f32, `[n, features]`: head inputs,
//! i.e. the backbone's output for each row) and `y` (integer class
//! labels, `[n]`), as `dai-models validation-set` writes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Largest validation file read (it is held in memory).
pub const MAX_FILE_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {size} bytes is over the limit of {MAX_FILE_BYTES}")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// One model's validation rows (the format is [`dai_head::rows`]).
pub type ValidationSet = dai_head::rows::Rows;

/// Read a validation file (bounded in size).
pub fn read(path: &Path) -> Result<ValidationSet, ValidationError> {
    let size = std::fs::metadata(path)
        .map_err(|source| ValidationError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(ValidationError::TooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    let bytes = std::fs::read(path).map_err(|source| ValidationError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    dai_head::rows::Rows::from_bytes(&bytes).map_err(|reason| ValidationError::Format {
        path: path.to_path_buf(),
        reason,
    })
}

/// The validation sets by model, and how much accuracy a new version may
/// lose against the current one.
#[derive(Debug, Clone)]
pub struct Validation {
    pub sets: HashMap<String, ValidationSet>,
    /// In accuracy (0.05 = five points).
    pub margin: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{base, base_file, settings, upd};
    use crate::state::{Settings, State, Strategy};
    use dai_head::Head;
    use safetensors::tensor::{Dtype, TensorView};

    fn write(path: &Path, x: &[f32], shape: Vec<usize>, y: &[i64]) {
        let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let yb: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            ("x", TensorView::new(Dtype::F32, shape, &xb).expect("x")),
            (
                "y",
                TensorView::new(Dtype::I64, vec![y.len()], &yb).expect("y"),
            ),
        ];
        safetensors::serialize_to_file(views, None, path).expect("write");
    }

    /// Rows the fixture head (2 -> 2) classifies as it does: the
    /// current head is right on all of them by construction.
    fn rows_for(head: &Head) -> (Vec<f32>, Vec<i64>) {
        let x: Vec<f32> = vec![1.0, 0.0, 0.0, 1.0, 2.0, -1.0, -1.0, 2.0];
        let out = dai_head::predict(head, &x, 4).expect("predict");
        let y = out
            .chunks(2)
            .map(|r| if r[0] >= r[1] { 0 } else { 1 })
            .collect();
        (x, y)
    }

    #[test]
    fn bad_files_are_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("v.safetensors");
        let e = read(&p).expect_err("missing");
        assert!(format!("{e}").contains("reading"), "{e}");
        std::fs::write(&p, b"junk").expect("junk");
        assert!(
            read(&p)
                .expect_err("junk")
                .to_string()
                .contains("not a safetensors")
        );
        write(&p, &[1.0, 2.0], vec![2], &[0, 1]);
        assert!(
            read(&p)
                .expect_err("1-d")
                .to_string()
                .contains("[rows, features]")
        );
        write(&p, &[1.0, 2.0, 3.0, 4.0], vec![2, 2], &[0]);
        assert!(
            read(&p)
                .expect_err("labels")
                .to_string()
                .contains("one label per row")
        );
        write(&p, &[1.0, 2.0, 3.0, 4.0], vec![2, 2], &[0, -1]);
        assert!(
            read(&p)
                .expect_err("negative")
                .to_string()
                .contains("row 1")
        );
        write(&p, &[1.0, f32::NAN, 3.0, 4.0], vec![2, 2], &[0, 1]);
        assert!(read(&p).expect_err("nan").to_string().contains("NaN"));
        write(&p, &[1.0, 2.0, 3.0, 4.0], vec![2, 2], &[0, 1]);
        let v = read(&p).expect("good");
        assert_eq!((v.features, v.labels.clone()), (2, vec![0, 1]));
    }

    #[test]
    fn a_round_that_would_lose_validation_accuracy_is_discarded() {
        let dir = tempfile::tempdir().expect("tmp");
        let (x, y) = rows_for(&base());
        let p = dir.path().join("v.safetensors");
        write(&p, &x, vec![4, 2], &y);
        let set = read(&p).expect("set");
        assert_eq!(set.accuracy(&base()).expect("acc"), 1.0);
        let cfg = Settings {
            strategy: Strategy::FedAvg { min_updates: 1 },
            validation: Some(std::sync::Arc::new(Validation {
                sets: [("m".to_string(), set)].into(),
                margin: 0.05,
            })),
            ..settings()
        };
        let mut s = State::open(&dir.path().join("agg.sqlite")).expect("open");
        s.register("m", &base_file()).expect("register");
        // A small step keeps every row right: published, scored.
        s.ingest(&upd("u1", "0", 1, 1e-4), &cfg, |b| b.parse().ok())
            .expect("ingest");
        let g = s.aggregate("m", &cfg, false, &mut None).expect("aggregate");
        let g = g.expect("published");
        assert_eq!(g.metrics["validation"]["after"], 1.0, "{}", g.metrics);
        // A poisoned step that negates the head (delta = -2 x current):
        // every row flips; the round is discarded and its update says so.
        let (current, _) = Head::from_bytes(&s.current("m").expect("current").1).expect("head");
        let mut bad = upd("u2", "1", 1, 0.0);
        for t in bad.tensors.iter_mut() {
            let named = dai_head::layout::named(&current.spec, &current.params);
            let cur = named.iter().find(|n| n.name() == t.name).expect("tensor");
            t.values = cur.values.iter().map(|v| -2.0 * v).collect();
        }
        s.ingest(&bad, &cfg, |b| b.parse().ok()).expect("ingest");
        assert!(
            s.aggregate("m", &cfg, false, &mut None)
                .expect("aggregate")
                .is_none()
        );
        assert_eq!(s.current("m").expect("current").0, 1, "version 1 stays");
        assert_eq!(s.pending_count("m").expect("pending"), 0);
        let reason: String = s
            .conn
            .query_row("SELECT reason FROM seen WHERE update_id = 'u2'", [], |r| {
                r.get(0)
            })
            .expect("seen");
        assert!(reason.contains("round discarded"), "{reason}");
    }
}
