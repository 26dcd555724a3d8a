//! `dai-train`: on-device training of a small dense head, on CPU or GPU.
//!
//! Layout:
//! - the head itself ([`HeadSpec`], [`Params`], [`Head`], its file and
//!   layout) is the `dai-head` crate, re-exported here as [`head`];
//! - [`Backend`]: the one small trait both backends implement — load a head
//!   and optimiser, `forward`, `gradients`, `step`, read `params` back;
//! - [`cpu`]: always built; blocked SIMD sgemm from `matrixmultiply`;
//! - [`gpu`] (feature `gpu`): wgpu with WGSL kernels for forward, backward
//!   and the optimiser step, parameters resident on the device;
//! - [`trainer`]: the epoch loop over shuffled mini-batches, evaluation,
//!   divergence detection, and [`select_backend`] (`gpu_enabled` -> GPU if
//!   an adapter exists, else CPU with the reason).
//!
//! Both backends follow the same formulas (see [`optim`]), so one parity
//! suite checks them against each other and against finite differences.

pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod optim;
pub mod trainer;

pub use dai_head::{
    self as head, Activation, Head, HeadError, HeadSpec, LayerSpec, Loss, Params, Rng, predict,
};
pub use optim::{Optimizer, OptimizerKind};
pub use trainer::{
    BackendChoice, Dataset, EpochReport, TrainConfig, TrainReport, accuracy, select_backend, train,
};

/// Training errors callers can branch on.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("bad training data: {0}")]
    Data(String),
    #[error("no GPU: {0}")]
    NoGpu(String),
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("training diverged at epoch {epoch}: loss {loss}")]
    Diverged { epoch: usize, loss: f32 },
    #[error("no head loaded into the backend")]
    NotLoaded,
}

/// Targets of a mini-batch: class indices (cross-entropy) or values (MSE).
#[derive(Debug, Clone, Copy)]
pub enum Targets<'a> {
    Classes(&'a [u32]),
    Values(&'a [f32]),
}

/// A training backend: parameters and optimiser state live inside it
/// (on the device for the GPU) between calls.
pub trait Backend: Send {
    /// e.g. "cpu" or "wgpu (llvmpipe, Vulkan)".
    fn name(&self) -> String;
    /// Take a head and an optimiser; resets optimiser state.
    fn load(&mut self, head: &Head, optimizer: &Optimizer) -> Result<(), TrainError>;
    /// Final-layer outputs (logits for cross-entropy), `n x outputs`.
    fn forward(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>, TrainError>;
    /// Mean loss and its gradients for one mini-batch (no update).
    fn gradients(
        &mut self,
        x: &[f32],
        y: Targets<'_>,
        n: usize,
    ) -> Result<(f32, Params), TrainError>;
    /// Forward, backward and one optimiser update; returns the batch's mean loss.
    fn step(&mut self, x: &[f32], y: Targets<'_>, n: usize) -> Result<f32, TrainError>;
    /// The current weights.
    fn params(&mut self) -> Result<Params, TrainError>;
}

/// Check a mini-batch against a head before it reaches a backend.
pub fn check_batch(spec: &HeadSpec, x: &[f32], y: Targets<'_>, n: usize) -> Result<(), TrainError> {
    if x.len() != n * spec.inputs() {
        return Err(TrainError::Data(format!(
            "{} input values for {n} rows of {} features",
            x.len(),
            spec.inputs()
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(TrainError::Data(format!("input value {i} is {}", x[i])));
    }
    match (spec.loss, y) {
        (Loss::SoftmaxCrossEntropy, Targets::Classes(c)) => {
            if c.len() != n {
                return Err(TrainError::Data(format!("{} labels for {n} rows", c.len())));
            }
            if let Some(bad) = c.iter().find(|&&c| c as usize >= spec.outputs()) {
                return Err(TrainError::Data(format!(
                    "label {bad} out of range 0..{}",
                    spec.outputs()
                )));
            }
        }
        (Loss::Mse, Targets::Values(v)) => {
            if v.len() != n * spec.outputs() {
                return Err(TrainError::Data(format!(
                    "{} target values for {n} rows of {} outputs",
                    v.len(),
                    spec.outputs()
                )));
            }
            if v.iter().any(|t| !t.is_finite()) {
                return Err(TrainError::Data(
                    "target values contain NaN or infinity".into(),
                ));
            }
        }
        (loss, _) => {
            return Err(TrainError::Data(format!(
                "loss {} needs {} targets",
                loss.as_str(),
                if loss == Loss::Mse { "value" } else { "class" }
            )));
        }
    }
    Ok(())
}
