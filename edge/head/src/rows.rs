//! Labelled head-input rows in a file (`validation.safetensors`): `x`
//! (f32, `[rows, features]`: what the head takes, i.e. the backbone's
//! output for each example) and `y` (integer class labels, `[rows]`). A
//! bundle may ship such rows for the edge's acceptance check of a local
//! run, and the aggregator scores candidate globals on them
//! (`--validation`); [`accuracy`] is the score both use.

use crate::{Head, predict};

/// Labelled rows of head inputs.
#[derive(Clone, PartialEq)]
pub struct Rows {
    pub x: Vec<f32>,
    pub features: usize,
    pub labels: Vec<u32>,
}

impl std::fmt::Debug for Rows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rows")
            .field("rows", &self.labels.len())
            .field("features", &self.features)
            .finish()
    }
}

impl Rows {
    /// Parse the file's bytes; the error says what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Rows, String> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| format!("not a safetensors file: {e}"))?;
        let x = st
            .tensor("x")
            .map_err(|_| "no tensor `x` (f32 [rows, features])".to_string())?;
        let y = st
            .tensor("y")
            .map_err(|_| "no tensor `y` (integer labels [rows])".to_string())?;
        let [rows, features] = x.shape() else {
            return Err(format!(
                "`x` has shape {:?}, expected [rows, features]",
                x.shape()
            ));
        };
        let (rows, features) = (*rows, *features);
        if rows == 0 || features == 0 {
            return Err("`x` is empty".into());
        }
        if x.dtype() != safetensors::Dtype::F32 {
            return Err(format!("`x` is {:?}, expected F32", x.dtype()));
        }
        if y.shape() != [rows] {
            return Err(format!(
                "`y` has shape {:?}, expected [{rows}] (one label per row of `x`)",
                y.shape()
            ));
        }
        let xs: Vec<f32> = x
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if xs.iter().any(|v| !v.is_finite()) {
            return Err("`x` holds a NaN or infinite value".into());
        }
        let labels: Vec<i64> = match y.dtype() {
            safetensors::Dtype::I64 => y
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            safetensors::Dtype::I32 => y
                .data()
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            safetensors::Dtype::U32 => y
                .data()
                .chunks_exact(4)
                .map(|c| i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            other => return Err(format!("`y` is {other:?}, expected I64, I32 or U32")),
        };
        let labels = labels
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                u32::try_from(l).map_err(|_| format!("`y` row {i}: label {l} is negative"))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        Ok(Rows {
            x: xs,
            features,
            labels,
        })
    }

    /// The file's bytes (`y` as I64).
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        use safetensors::tensor::{Dtype, TensorView};
        let xb: Vec<u8> = self.x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let yb: Vec<u8> = self
            .labels
            .iter()
            .flat_map(|&l| i64::from(l).to_le_bytes())
            .collect();
        let n = self.labels.len();
        let views = vec![
            (
                "x",
                TensorView::new(Dtype::F32, vec![n, self.features], &xb)
                    .map_err(|e| e.to_string())?,
            ),
            (
                "y",
                TensorView::new(Dtype::I64, vec![n], &yb).map_err(|e| e.to_string())?,
            ),
        ];
        safetensors::serialize(views, None).map_err(|e| e.to_string())
    }

    /// Top-1 accuracy of `head` on these rows.
    pub fn accuracy(&self, head: &Head) -> Result<f64, String> {
        if head.spec.inputs() != self.features {
            return Err(format!(
                "the rows have {} features, the head takes {}",
                self.features,
                head.spec.inputs()
            ));
        }
        top1_accuracy(head, &self.x, self.labels.len(), &self.labels).map_err(|e| e.to_string())
    }
}

/// The fraction of the `n` rows of `x` whose arg-max output is their label
/// (a row without a label counts as wrong); 0 for no rows. The one
/// accuracy every part reports.
pub fn top1_accuracy(
    head: &Head,
    x: &[f32],
    n: usize,
    labels: &[u32],
) -> Result<f64, crate::HeadError> {
    if n == 0 {
        return Ok(0.0);
    }
    let out = predict(head, x, n)?;
    let k = head.spec.outputs();
    let correct = (0..n)
        .filter(|&r| {
            let row = &out[r * k..(r + 1) * k];
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            labels.get(r).is_some_and(|&c| c as usize == best)
        })
        .count();
    Ok(correct as f64 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_bad_files_say_what_is_wrong() {
        let r = Rows {
            x: vec![1.0, 2.0, 3.0, 4.0],
            features: 2,
            labels: vec![0, 1],
        };
        assert_eq!(
            Rows::from_bytes(&r.to_bytes().expect("bytes")).expect("rows"),
            r
        );
        assert!(
            Rows::from_bytes(b"junk")
                .expect_err("junk")
                .contains("not a safetensors")
        );
        let bad = Rows {
            x: vec![1.0, f32::NAN],
            features: 2,
            labels: vec![0],
        };
        assert!(
            Rows::from_bytes(&bad.to_bytes().expect("bytes"))
                .expect_err("nan")
                .contains("NaN")
        );
    }
}
