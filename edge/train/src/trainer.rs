//! The training loop and backend selection.

use crate::cpu::CpuBackend;
use crate::head::{Head, Rng};
use crate::optim::Optimizer;
use crate::{Backend, Loss, Targets, TrainError};

/// In-memory samples: `n x features` inputs and their targets.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub x: Vec<f32>,
    pub features: usize,
    /// Class labels (cross-entropy heads).
    pub classes: Vec<u32>,
    /// Target values, `n x outputs` (MSE heads).
    pub values: Vec<f32>,
    pub outputs: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.x.len().checked_div(self.features).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `idx` as a contiguous batch.
    pub fn gather(&self, idx: &[usize]) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
        let f = self.features;
        let mut x = Vec::with_capacity(idx.len() * f);
        let mut c = Vec::new();
        let mut v = Vec::new();
        for &i in idx {
            x.extend_from_slice(&self.x[i * f..(i + 1) * f]);
            if !self.classes.is_empty() {
                c.push(self.classes[i]);
            }
            if !self.values.is_empty() {
                v.extend_from_slice(&self.values[i * self.outputs..(i + 1) * self.outputs]);
            }
        }
        (x, c, v)
    }
}

fn targets<'a>(loss: Loss, c: &'a [u32], v: &'a [f32]) -> Targets<'a> {
    match loss {
        Loss::SoftmaxCrossEntropy => Targets::Classes(c),
        Loss::Mse => Targets::Values(v),
    }
}

/// Loop settings.
#[derive(Debug, Clone, Copy)]
pub struct TrainConfig {
    pub optimizer: Optimizer,
    pub batch_size: usize,
    pub epochs: usize,
    pub seed: u64,
}

/// One epoch's figures.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub loss: f32,
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub backend: String,
    pub epochs: Vec<EpochReport>,
    pub samples_seen: usize,
    pub seconds: f64,
}

impl TrainReport {
    pub fn final_loss(&self) -> Option<f32> {
        self.epochs.last().map(|e| e.loss)
    }
}

/// Train `head` in place on `data`. `progress` is called after each epoch;
/// returning `false` stops early (e.g. inference needs the CPU). A NaN or
/// infinite epoch loss aborts with [`TrainError::Diverged`] and leaves
/// `head` as it was.
pub fn train(
    backend: &mut dyn Backend,
    head: &mut Head,
    data: &Dataset,
    cfg: &TrainConfig,
    mut progress: impl FnMut(&EpochReport) -> bool,
) -> Result<TrainReport, TrainError> {
    let n = data.len();
    if n == 0 {
        return Err(TrainError::Data("no samples".into()));
    }
    if data.features != head.spec.inputs() {
        return Err(TrainError::Data(format!(
            "samples have {} features, the head takes {}",
            data.features,
            head.spec.inputs()
        )));
    }
    let started = std::time::Instant::now();
    backend.load(head, &cfg.optimizer)?;
    let mut rng = Rng::new(cfg.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let bs = cfg.batch_size.max(1);
    let mut epochs = Vec::new();
    let mut seen = 0;
    for epoch in 1..=cfg.epochs {
        rng.shuffle(&mut order);
        let mut sum = 0.0f64;
        for chunk in order.chunks(bs) {
            let (x, c, v) = data.gather(chunk);
            let loss = backend.step(&x, targets(head.spec.loss, &c, &v), chunk.len())?;
            sum += loss as f64 * chunk.len() as f64;
            seen += chunk.len();
        }
        let loss = (sum / n as f64) as f32;
        if !loss.is_finite() {
            return Err(TrainError::Diverged { epoch, loss });
        }
        let report = EpochReport { epoch, loss };
        epochs.push(report);
        if !progress(&report) {
            break;
        }
    }
    let params = backend.params()?;
    if !params.all_finite() {
        return Err(TrainError::Diverged {
            epoch: epochs.len(),
            loss: f32::NAN,
        });
    }
    head.params = params;
    Ok(TrainReport {
        backend: backend.name(),
        epochs,
        samples_seen: seen,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Fraction of rows whose arg-max output equals the class label.
pub fn accuracy(head: &Head, data: &Dataset) -> Result<f64, TrainError> {
    Ok(dai_head::rows::top1_accuracy(
        head,
        &data.x,
        data.len(),
        &data.classes,
    )?)
}

/// Which backend training runs on, and why.
#[derive(Debug)]
pub struct BackendChoice {
    pub backend: Box<dyn Backend>,
    /// Why the CPU was chosen although a GPU was asked for.
    pub fallback_reason: Option<String>,
}

/// `gpu_enabled` -> the wgpu backend when an adapter with compute exists and
/// the head fits `gpu_memory_fraction` of its buffer limits; otherwise the
/// CPU backend and the reason.
pub fn select_backend(
    gpu_enabled: bool,
    gpu_memory_fraction: f64,
    head: &Head,
    max_batch: usize,
) -> BackendChoice {
    if !gpu_enabled {
        return BackendChoice {
            backend: Box::new(CpuBackend::new()),
            fallback_reason: None,
        };
    }
    #[cfg(feature = "gpu")]
    {
        match crate::gpu::GpuBackend::new(gpu_memory_fraction, &head.spec, max_batch) {
            Ok(g) => BackendChoice {
                backend: Box::new(g),
                fallback_reason: None,
            },
            Err(e) => {
                tracing::warn!(reason = %e, "GPU requested but not usable; training on the CPU");
                BackendChoice {
                    backend: Box::new(CpuBackend::new()),
                    fallback_reason: Some(e.to_string()),
                }
            }
        }
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = (gpu_memory_fraction, head, max_batch);
        let reason = "built without the `gpu` feature".to_string();
        tracing::warn!(%reason, "GPU requested; training on the CPU");
        BackendChoice {
            backend: Box::new(CpuBackend::new()),
            fallback_reason: Some(reason),
        }
    }
}

impl std::fmt::Debug for dyn Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}
