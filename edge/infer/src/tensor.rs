//! The daemon's own tensor value: a dtype, a shape and typed data.
//!
//! It is what the HTTP layer decodes requests into and encodes answers from;
//! conversion to and from tract happens only inside [`crate::model`].

use serde::{Deserialize, Serialize};

/// Element types the API accepts (a subset of ONNX's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    I64,
    I32,
    U8,
    I8,
}

impl DType {
    pub fn size_of(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
            DType::U8 | DType::I8 => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::I8 => "i8",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "f32" | "float32" => DType::F32,
            "i64" | "int64" => DType::I64,
            "i32" | "int32" => DType::I32,
            "u8" | "uint8" => DType::U8,
            "i8" | "int8" => DType::I8,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Typed element storage.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    U8(Vec<u8>),
    I8(Vec<i8>),
}

/// A dense row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub shape: Vec<usize>,
    pub data: Data,
}

/// A tensor whose element count does not match its shape, or bytes that do
/// not divide into elements.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct TensorError(pub String);

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::U8(v) => v.len(),
            Data::I8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::I64(_) => DType::I64,
            Data::I32(_) => DType::I32,
            Data::U8(_) => DType::U8,
            Data::I8(_) => DType::I8,
        }
    }

    /// Decode little-endian bytes of `dtype`.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Result<Data, TensorError> {
        if !bytes.len().is_multiple_of(dtype.size_of()) {
            return Err(TensorError(format!(
                "{} bytes is not a whole number of {dtype} elements ({} bytes each)",
                bytes.len(),
                dtype.size_of()
            )));
        }
        Ok(match dtype {
            DType::F32 => Data::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::I32 => Data::I32(
                bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::I64 => Data::I64(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            DType::U8 => Data::U8(bytes.to_vec()),
            DType::I8 => Data::I8(bytes.iter().map(|&b| b as i8).collect()),
        })
    }

    /// Little-endian bytes, the raw wire form and the cache key material.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::U8(v) => v.clone(),
            Data::I8(v) => v.iter().map(|&x| x as u8).collect(),
        }
    }

    /// Feed the little-endian bytes to `f` without allocating a copy.
    pub fn for_each_le_chunk(&self, mut f: impl FnMut(&[u8])) {
        match self {
            Data::F32(v) => v.iter().for_each(|x| f(&x.to_le_bytes())),
            Data::I64(v) => v.iter().for_each(|x| f(&x.to_le_bytes())),
            Data::I32(v) => v.iter().for_each(|x| f(&x.to_le_bytes())),
            Data::U8(v) => f(v),
            Data::I8(v) => v.iter().for_each(|&x| f(&[x as u8])),
        }
    }

    fn slice(&self, start: usize, end: usize) -> Data {
        match self {
            Data::F32(v) => Data::F32(v[start..end].to_vec()),
            Data::I64(v) => Data::I64(v[start..end].to_vec()),
            Data::I32(v) => Data::I32(v[start..end].to_vec()),
            Data::U8(v) => Data::U8(v[start..end].to_vec()),
            Data::I8(v) => Data::I8(v[start..end].to_vec()),
        }
    }

    fn zeros(dtype: DType, n: usize) -> Data {
        match dtype {
            DType::F32 => Data::F32(vec![0.0; n]),
            DType::I64 => Data::I64(vec![0; n]),
            DType::I32 => Data::I32(vec![0; n]),
            DType::U8 => Data::U8(vec![0; n]),
            DType::I8 => Data::I8(vec![0; n]),
        }
    }

    fn extend(&mut self, other: &Data) -> Result<(), TensorError> {
        match (self, other) {
            (Data::F32(a), Data::F32(b)) => a.extend_from_slice(b),
            (Data::I64(a), Data::I64(b)) => a.extend_from_slice(b),
            (Data::I32(a), Data::I32(b)) => a.extend_from_slice(b),
            (Data::U8(a), Data::U8(b)) => a.extend_from_slice(b),
            (Data::I8(a), Data::I8(b)) => a.extend_from_slice(b),
            (a, b) => {
                return Err(TensorError(format!(
                    "cannot concatenate {} with {}",
                    a.dtype(),
                    b.dtype()
                )));
            }
        }
        Ok(())
    }
}

impl TensorData {
    pub fn new(shape: Vec<usize>, data: Data) -> Result<TensorData, TensorError> {
        let expected = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= u32::MAX as usize)
            .ok_or_else(|| TensorError(format!("shape {shape:?} is too large")))?;
        if expected != data.len() {
            return Err(TensorError(format!(
                "shape {shape:?} needs {expected} elements, got {}",
                data.len()
            )));
        }
        Ok(TensorData { shape, data })
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn byte_len(&self) -> usize {
        self.data.len() * self.dtype().size_of()
    }

    /// Rows along axis 0 (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Concatenate along axis 0, then pad with zero rows up to `total_rows`.
    pub fn concat_rows(
        parts: &[&TensorData],
        total_rows: usize,
    ) -> Result<TensorData, TensorError> {
        let first = parts
            .first()
            .ok_or_else(|| TensorError("nothing to concatenate".into()))?;
        let mut data = first.data.clone();
        let mut rows = first.rows();
        for p in &parts[1..] {
            if p.shape[1..] != first.shape[1..] {
                return Err(TensorError(format!(
                    "cannot batch shapes {:?} and {:?}",
                    first.shape, p.shape
                )));
            }
            data.extend(&p.data)?;
            rows += p.rows();
        }
        if total_rows > rows {
            data.extend(&Data::zeros(
                first.dtype(),
                (total_rows - rows) * first.row_len(),
            ))?;
            rows = total_rows;
        }
        let mut shape = first.shape.clone();
        if shape.is_empty() {
            return Err(TensorError("cannot batch a scalar".into()));
        }
        shape[0] = rows;
        TensorData::new(shape, data)
    }

    /// Rows `start..start + n` along axis 0.
    pub fn slice_rows(&self, start: usize, n: usize) -> Result<TensorData, TensorError> {
        if start + n > self.rows() {
            return Err(TensorError(format!(
                "rows {start}..{} out of {}",
                start + n,
                self.rows()
            )));
        }
        let rl = self.row_len();
        let mut shape = self.shape.clone();
        if let Some(s) = shape.first_mut() {
            *s = n;
        }
        TensorData::new(shape, self.data.slice(start * rl, (start + n) * rl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_truncation() {
        let d = Data::F32(vec![1.0, -2.5, 3.25]);
        let bytes = d.to_le_bytes();
        assert_eq!(Data::from_le_bytes(DType::F32, &bytes).expect("ok"), d);
        let err = Data::from_le_bytes(DType::F32, &bytes[..11]).expect_err("truncated");
        assert!(err.0.contains("11 bytes"), "{err}");
    }

    #[test]
    fn concat_pad_and_slice() {
        let a = TensorData::new(vec![1, 2], Data::I64(vec![1, 2])).expect("a");
        let b = TensorData::new(vec![2, 2], Data::I64(vec![3, 4, 5, 6])).expect("b");
        let c = TensorData::concat_rows(&[&a, &b], 4).expect("concat");
        assert_eq!(c.shape, vec![4, 2]);
        assert_eq!(c.data, Data::I64(vec![1, 2, 3, 4, 5, 6, 0, 0]));
        assert_eq!(c.slice_rows(1, 2).expect("slice"), b);
        let bad = TensorData::new(vec![1, 3], Data::I64(vec![1, 2, 3])).expect("bad");
        assert!(TensorData::concat_rows(&[&a, &bad], 2).is_err());
    }
}
