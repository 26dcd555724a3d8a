//! The UCI hand-written digits (8x8, values 0..16), `models/data/digits.csv.gz`.

use crate::ToolError;
use dai_train::{Dataset, Rng};
use std::io::Read;
use std::path::Path;

/// Pixels per image.
pub const FEATURES: usize = 64;
/// Pixel values run 0..=16; the model scales them by this.
pub const PIXEL_SCALE: f32 = 1.0 / 16.0;

/// Raw rows: (64 pixel values 0..16, label 0..9).
pub fn load(path: &Path) -> Result<Vec<([f32; FEATURES], u32)>, ToolError> {
    let err = |message: String| ToolError::Data {
        path: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| err(format!("not gzip text: {e}")))?;
    let mut rows = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .map_err(|e| err(format!("line {}: {e}", n + 1)))?;
        if vals.len() != FEATURES + 1 {
            return Err(err(format!(
                "line {}: {} columns, expected 65",
                n + 1,
                vals.len()
            )));
        }
        let label = vals[FEATURES];
        if !(0.0..=9.0).contains(&label) || label.fract() != 0.0 {
            return Err(err(format!("line {}: label {label} not in 0..9", n + 1)));
        }
        let mut px = [0.0; FEATURES];
        px.copy_from_slice(&vals[..FEATURES]);
        if px.iter().any(|v| !(0.0..=16.0).contains(v)) {
            return Err(err(format!("line {}: pixel outside 0..16", n + 1)));
        }
        rows.push((px, label as u32));
    }
    if rows.is_empty() {
        return Err(err("no rows".into()));
    }
    Ok(rows)
}

/// A seeded shuffle split into (train, test); `test_fraction` of each class
/// goes to test so both keep the class balance.
pub fn split(
    rows: &[([f32; FEATURES], u32)],
    test_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let labels: Vec<u32> = rows.iter().map(|r| r.1).collect();
    split_labels(&labels, test_fraction, seed)
}

/// [`split`] over any labels: (train, test) indices, `test_fraction` of
/// each class in test, classes taken in order and shuffled with `seed`.
pub fn split_labels(labels: &[u32], test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let mut train = Vec::new();
    let mut test = Vec::new();
    let classes = labels.iter().max().map_or(0, |m| m + 1);
    for class in 0..classes.max(10) {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        rng.shuffle(&mut idx);
        let n_test = (idx.len() as f64 * test_fraction).round() as usize;
        test.extend_from_slice(&idx[..n_test]);
        train.extend_from_slice(&idx[n_test..]);
    }
    rng.shuffle(&mut train);
    rng.shuffle(&mut test);
    (train, test)
}

/// Rows `idx` scaled to 0..1 as a classification data set.
pub fn dataset(rows: &[([f32; FEATURES], u32)], idx: &[usize]) -> Dataset {
    let mut x = Vec::with_capacity(idx.len() * FEATURES);
    let mut classes = Vec::with_capacity(idx.len());
    for &i in idx {
        x.extend(rows[i].0.iter().map(|v| v * PIXEL_SCALE));
        classes.push(rows[i].1);
    }
    Dataset {
        x,
        features: FEATURES,
        classes,
        values: Vec::new(),
        outputs: 10,
    }
}
