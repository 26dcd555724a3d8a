//! Weights and biases of a head ([`Params`], also used for gradients and
//! deltas) and the [`Head`] itself: architecture + weights.

use crate::spec::HeadSpec;

/// Weights and biases, one entry per layer (also used for gradients).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub weights: Vec<Vec<f32>>,
    pub biases: Vec<Vec<f32>>,
}

impl Params {
    pub fn zeros_like(spec: &HeadSpec) -> Params {
        Params {
            weights: spec
                .layers
                .iter()
                .map(|l| vec![0.0; l.inputs * l.outputs])
                .collect(),
            biases: spec.layers.iter().map(|l| vec![0.0; l.outputs]).collect(),
        }
    }

    /// All values, layer by layer (weights then bias).
    pub fn flat(&self) -> Vec<f32> {
        let mut v = Vec::new();
        for (w, b) in self.weights.iter().zip(&self.biases) {
            v.extend_from_slice(w);
            v.extend_from_slice(b);
        }
        v
    }

    pub fn all_finite(&self) -> bool {
        self.weights
            .iter()
            .chain(&self.biases)
            .all(|v| v.iter().all(|x| x.is_finite()))
    }

    /// `self - other`, layer by layer.
    pub fn minus(&self, other: &Params) -> Params {
        let sub = |a: &Vec<Vec<f32>>, b: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            a.iter()
                .zip(b)
                .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p - q).collect())
                .collect()
        };
        Params {
            weights: sub(&self.weights, &other.weights),
            biases: sub(&self.biases, &other.biases),
        }
    }

    /// L2 norm over every value.
    pub fn norm(&self) -> f64 {
        self.weights
            .iter()
            .chain(&self.biases)
            .flat_map(|v| v.iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt()
    }
}

/// A head: architecture + weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub spec: HeadSpec,
    pub params: Params,
}
