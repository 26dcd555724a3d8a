//! Optimisers, with the exact update rules both backends implement.
//!
//! SGD with momentum (PyTorch's form): `v = mu * v + g; w -= lr * v`.
//! Adam: `m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
//! w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.

/// Which optimiser.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd { momentum: f32 },
    Adam { beta1: f32, beta2: f32, eps: f32 },
}

/// Optimiser and learning rate.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub lr: f32,
}

impl Optimizer {
    pub fn sgd(lr: f32, momentum: f32) -> Optimizer {
        Optimizer {
            kind: OptimizerKind::Sgd { momentum },
            lr,
        }
    }

    pub fn adam(lr: f32) -> Optimizer {
        Optimizer {
            kind: OptimizerKind::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            lr,
        }
    }
}

/// CPU reference of one update of `w` with gradient `g` at step `t` (1-based).
pub fn update(opt: &Optimizer, t: u32, w: &mut [f32], g: &[f32], s1: &mut [f32], s2: &mut [f32]) {
    match opt.kind {
        OptimizerKind::Sgd { momentum } => {
            for i in 0..w.len() {
                s1[i] = momentum * s1[i] + g[i];
                w[i] -= opt.lr * s1[i];
            }
        }
        OptimizerKind::Adam { beta1, beta2, eps } => {
            let c1 = 1.0 - beta1.powi(t as i32);
            let c2 = 1.0 - beta2.powi(t as i32);
            for i in 0..w.len() {
                s1[i] = beta1 * s1[i] + (1.0 - beta1) * g[i];
                s2[i] = beta2 * s2[i] + (1.0 - beta2) * g[i] * g[i];
                let mh = s1[i] / c1;
                let vh = s2[i] / c2;
                w[i] -= opt.lr * mh / (vh.sqrt() + eps);
            }
        }
    }
}
