//! On-device fine-tuning: samples in, better heads out.
//!
//! Everything goes through the [`Training`] handle (the runtime and
//! metrics, the store, the training settings, the feedback cache, the
//! shutdown flag); the HTTP layer, the sensor pipelines and the background
//! tasks each hold a clone.
//! - [`Training::store_sample`] turns a labelled inference (its head input,
//!   the embedding) into a stored sample (train or hold-out split, bounded);
//!   [`feedback`] remembers recent answers' head inputs so a later label
//!   needs no rerun.
//! - [`scheduler`] starts a run for a model when enough new samples exist,
//!   machine CPU is under `training.max_cpu_percent` and no inference is
//!   queued; [`Training::run`] also serves `POST /v1/models/{name}/train`.
//! - [`run`]: a run trains a copy of the serving head on the train split
//!   (GPU when `gpu_enabled` and an adapter exists, else CPU; a GPU failure
//!   mid-run falls back to the CPU), pausing between epochs while inference
//!   is queued. It is accepted only if hold-out accuracy does not fall; then
//!   the new head, its delta against the global base (the shipped head
//!   until a global model arrives from the aggregator) in the outbox, and
//!   the run record are written in one SQLite transaction, and only after
//!   that commit is the head swapped into the runtime.

pub mod feedback;
pub mod run;
pub mod scheduler;

use crate::handles::{Inference, ShutdownFlag, StoreHandle};
use dai_config::Config;
use dai_train::Head;
use feedback::{Answer, FeedbackCache};
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a sample or a run was refused.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Model(dai_infer::InferError),
    #[error("model {0} has no trainable head")]
    NoHead(String),
    #[error("a training run for {0} is already in progress")]
    Busy(String),
    #[error("store")]
    Store(#[from] dai_store::StoreError),
    #[error("{0}")]
    Failed(String),
}

/// Live per-model training state for the status page.
#[derive(Debug, Default, Clone)]
pub struct ModelTraining {
    pub state: String,
    pub running_epochs: Vec<Value>,
}

/// What runs share while they happen (the status page reads it).
#[derive(Debug, Default)]
pub struct LiveTraining {
    pub models: Mutex<BTreeMap<String, ModelTraining>>,
    pub running: Mutex<HashSet<String>>,
    pub diverged: AtomicU64,
    /// The backend of the latest run and why it is not the GPU, if so.
    pub backend: Mutex<Option<(String, Option<String>)>>,
}

/// The training side of the daemon. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Training {
    config: Arc<Config>,
    inference: Inference,
    store: StoreHandle,
    /// The device name in update ids (`cloud.device_id`, else the host's).
    device: String,
    shutdown: ShutdownFlag,
    live: Arc<LiveTraining>,
    feedback: Arc<Mutex<FeedbackCache>>,
}

impl Training {
    pub fn new(
        config: Arc<Config>,
        inference: Inference,
        store: StoreHandle,
        device: String,
        shutdown: ShutdownFlag,
    ) -> Training {
        Training {
            config,
            inference,
            store,
            device,
            shutdown,
            live: Arc::default(),
            feedback: Arc::default(),
        }
    }

    /// Remember an answer's head input under its id (for feedback).
    pub fn remember(&self, id: String, answer: Answer) {
        self.feedback.lock().put(id, answer);
    }

    /// Take a remembered answer out: an answer can be labelled once.
    pub fn take_answer(&self, id: &str) -> Option<Answer> {
        self.feedback.lock().take(id)
    }

    /// Change the live training figures of `model` (status page).
    fn with_live(&self, model: &str, f: impl FnOnce(&mut ModelTraining)) {
        f(self
            .live
            .models
            .lock()
            .entry(model.to_string())
            .or_default());
    }

    fn set_state(&self, model: &str, s: &str) {
        self.with_live(model, |m| m.state = s.to_string());
    }

    /// Store labelled rows of head inputs for `model`.
    pub fn store_sample(
        &self,
        model: &str,
        features: &[f32],
        rows: usize,
        labels: &[i64],
        source: &str,
    ) -> Result<Vec<i64>, TrainingError> {
        let m = self
            .inference
            .runtime
            .model(model)
            .map_err(TrainingError::Model)?;
        let head = m
            .head
            .as_ref()
            .ok_or_else(|| TrainingError::NoHead(model.to_string()))?
            .load();
        let k = head.head.spec.outputs() as i64;
        if labels.len() != rows {
            return Err(TrainingError::BadInput(format!(
                "{} labels for {rows} input rows",
                labels.len()
            )));
        }
        if let Some(bad) = labels.iter().find(|&&l| !(0..k).contains(&l)) {
            return Err(TrainingError::BadInput(format!(
                "label {bad} out of range 0..{k} for model {model}"
            )));
        }
        if features.iter().any(|v| !v.is_finite()) {
            return Err(TrainingError::BadInput(
                "the input produced non-finite features (NaN or infinity)".into(),
            ));
        }
        let f = features.len() / rows.max(1);
        if f * rows != features.len() || f != head.head.spec.inputs() {
            return Err(TrainingError::BadInput(format!(
                "{} feature values for {rows} rows; the head takes {} per row",
                features.len(),
                head.head.spec.inputs()
            )));
        }
        let t = &self.config.training;
        let batch: Vec<dai_store::NewSample<'_>> = labels
            .iter()
            .enumerate()
            .map(|(r, &label)| dai_store::NewSample {
                model,
                base_version: m.version(),
                features: &features[r * f..(r + 1) * f],
                label: label as u32,
                source,
            })
            .collect();
        let ids = self.store.insert_samples(
            &batch,
            t.holdout_every as i64,
            t.max_samples_per_model as i64,
        )?;
        self.inference
            .metrics
            .samples
            .get_or_create(&crate::metrics::ModelSource {
                model: model.to_string(),
                source: source.to_string(),
            })
            .inc_by(rows as u64);
        Ok(ids)
    }

    /// Close runs an earlier stop interrupted, and serve the active trained
    /// head of every head model from the store (at start).
    pub fn restore_heads(&self) {
        match self.store.close_interrupted_runs() {
            Ok(n) if n > 0 => tracing::warn!(
                runs = n,
                "training runs interrupted by the last stop were marked"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "cannot close interrupted runs")
            }
        }
        for info in self.inference.runtime.models() {
            let Some(m) = info.model else { continue };
            if m.head.is_none() {
                continue;
            }
            self.restore_head(m.name());
            self.set_state(m.name(), "idle");
        }
    }

    /// Serve the store's active head for `name` (after start or a hot reload).
    pub fn restore_head(&self, name: &str) {
        let runtime = &self.inference.runtime;
        let Ok(m) = runtime.model(name) else {
            return;
        };
        if m.head.is_none() {
            return;
        }
        let (version, bytes) = match self.store.active_head(m.name(), m.version()) {
            Ok(Some(active)) => active,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(model = %m.name(), error = %crate::error::chain(&e), "cannot read stored heads");
                return;
            }
        };
        match Head::from_bytes(&bytes) {
            Ok((head, _)) => match runtime.set_head_if_current(&m, head, version) {
                Ok(_) => {
                    tracing::info!(model = %m.name(), head_version = version, "trained head restored")
                }
                Err(e) => {
                    tracing::error!(model = %m.name(), error = %e, "stored head does not fit; serving the shipped head")
                }
            },
            Err(e) => {
                tracing::error!(model = %m.name(), error = %e, "stored head unreadable; serving the shipped head")
            }
        }
    }

    /// The `training` section of `/v1/status` (reads the store: call it off
    /// the async threads).
    pub fn status(&self) -> Value {
        let t = &self.config.training;
        let models: Vec<Value> = self
            .inference
            .runtime
            .models()
            .into_iter()
            .filter_map(|info| info.model)
            .filter_map(|m| self.model_status(&m))
            .collect();
        let backend = self.live.backend.lock().clone();
        json!({
            "enabled": t.enabled,
            "backend": backend.as_ref().map(|b| b.0.clone()).unwrap_or_else(|| if self.config.gpu_enabled { "gpu (selected at first run)".into() } else { "cpu".into() }),
            "fallback_reason": backend.and_then(|b| b.1),
            "diverged_total": self.live.diverged.load(Ordering::Relaxed),
            "models": models,
        })
    }

    /// One model's entry of [`Training::status`]; `None` without a head.
    fn model_status(&self, m: &dai_infer::LoadedModel) -> Option<Value> {
        let slot = m.head.as_ref()?;
        let store = &self.store;
        let live = self
            .live
            .models
            .lock()
            .get(m.name())
            .cloned()
            .unwrap_or_default();
        let (train, holdout, _) = store.sample_counts(m.name()).unwrap_or((0, 0, 0));
        let runs = store.runs(m.name(), 1).unwrap_or_default();
        let consumed = store.last_consumed_sample(m.name()).unwrap_or(0);
        let new_since = store
            .samples_since(m.name(), m.version(), consumed)
            .unwrap_or(0);
        let mut last = runs.first().map(|r| json!(r)).unwrap_or(Value::Null);
        if live.state == "training"
            && let Some(obj) = last.as_object_mut()
        {
            obj.insert("outcome".into(), json!("running"));
            obj.insert("epochs".into(), json!(live.running_epochs));
        }
        let global = store.latest_global(m.name()).ok().flatten();
        let dp = &self.config.cloud.local_dp;
        let releases = store.local_dp_releases(m.name()).unwrap_or_default();
        let local_dp = if dp.noise_multiplier > 0.0 || !releases.is_empty() {
            let epsilon = run::local_epsilon(&releases, dp.delta);
            self.inference
                .metrics
                .local_dp_epsilon
                .get_or_create(&crate::metrics::ModelLabel {
                    model: m.name().to_string(),
                })
                .set(epsilon);
            json!({
                "noise_multiplier": dp.noise_multiplier,
                "clip_norm": dp.clip_norm,
                "delta": dp.delta,
                "releases": releases.len(),
                "epsilon": epsilon,
            })
        } else {
            Value::Null
        };
        Some(json!({
            "model": m.name(),
            "head_version": slot.load().version,
            "base_version": m.version(),
            "state": if live.state.is_empty() { "idle".to_string() } else { live.state.clone() },
            "samples": {
                "train": train, "holdout": holdout,
                "new_since_last_run": new_since,
                "min_new_samples": self.config.training.min_new_samples,
            },
            "outbox_pending": store.outbox_count(m.name()).unwrap_or(0),
            "global_version": global.as_ref().map_or(0, |g| g.version),
            "global_epoch": global.as_ref().map_or(0, |g| g.epoch),
            "local_dp": local_dp,
            "last_run": last,
        }))
    }
}
