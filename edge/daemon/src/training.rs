//! On-device fine-tuning: samples in, better heads out.
//!
//! - [`store_sample`] turns a labelled inference (its head input, the
//!   embedding) into a stored sample (train or hold-out split, bounded).
//! - The scheduler ([`scheduler_task`]) starts a run for a model when enough
//!   new samples exist, machine CPU is under `training.max_cpu_percent` and
//!   no inference is queued; [`run_training`] also serves
//!   `POST /v1/models/{name}/train`.
//! - A run trains a copy of the serving head on the train split (GPU when
//!   `gpu_enabled` and an adapter exists, else CPU; a GPU failure mid-run
//!   falls back to the CPU), pausing between epochs while inference is
//!   queued. It is accepted only if hold-out accuracy does not fall; then
//!   the new head, its delta against the global base (the shipped head
//!   until a global model arrives from the aggregator) in the
//!   outbox, and the run record are written in one SQLite transaction, and
//!   only after that commit is the head swapped into the runtime.

use crate::AppState;
use dai_train::{Dataset, Head, Optimizer, TrainConfig, TrainError};
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    #[error("store: {0}")]
    Store(#[from] dai_store::StoreError),
    #[error("{0}")]
    Failed(String),
}

/// Recent inference answers' head inputs, so feedback can reuse them.
/// Bounded by entries and by bytes, oldest out first.
#[derive(Debug, Default)]
pub struct FeedbackCache {
    map: HashMap<String, (String, String, Vec<f32>, usize)>,
    order: VecDeque<String>,
    floats: usize,
}

const FEEDBACK_KEEP: usize = 10_000;
/// 64 MiB of f32 features at most.
const FEEDBACK_MAX_FLOATS: usize = 16 << 20;

impl FeedbackCache {
    pub fn put(
        &mut self,
        id: String,
        model: String,
        base_version: String,
        features: Vec<f32>,
        rows: usize,
    ) {
        if features.len() > FEEDBACK_MAX_FLOATS {
            return;
        }
        self.floats += features.len();
        self.order.push_back(id.clone());
        self.map.insert(id, (model, base_version, features, rows));
        while self.order.len() > FEEDBACK_KEEP || self.floats > FEEDBACK_MAX_FLOATS {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(e) = self.map.remove(&old) {
                self.floats -= e.2.len();
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<&(String, String, Vec<f32>, usize)> {
        self.map.get(id)
    }

    /// Remove and return an entry (its id stays in `order` until it ages out).
    pub fn take(&mut self, id: &str) -> Option<(String, String, Vec<f32>, usize)> {
        let e = self.map.remove(id)?;
        self.floats -= e.2.len();
        Some(e)
    }
}

/// Live per-model training state for the status page.
#[derive(Debug, Default, Clone)]
pub struct ModelTraining {
    pub state: String,
    pub running_epochs: Vec<Value>,
}

/// Shared training state.
#[derive(Debug, Default)]
pub struct TrainingState {
    pub models: Mutex<BTreeMap<String, ModelTraining>>,
    pub running: Mutex<std::collections::HashSet<String>>,
    pub diverged: AtomicU64,
    pub backend: Mutex<Option<(String, Option<String>)>>,
    pub feedback: Mutex<FeedbackCache>,
}

/// Change the live training figures of `model` (status page).
fn with_live(state: &AppState, model: &str, f: impl FnOnce(&mut ModelTraining)) {
    f(state
        .training
        .models
        .lock()
        .entry(model.to_string())
        .or_default());
}

fn set_state(state: &AppState, model: &str, s: &str) {
    with_live(state, model, |m| m.state = s.to_string());
}

/// Store labelled rows of head inputs for `model`.
pub fn store_sample(
    state: &AppState,
    model: &str,
    features: &[f32],
    rows: usize,
    labels: &[i64],
    source: &str,
) -> Result<Vec<i64>, TrainingError> {
    let m = state.runtime.model(model).map_err(TrainingError::Model)?;
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
    let t = &state.config.training;
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
    let ids = state.store.insert_samples(
        &batch,
        t.holdout_every as i64,
        t.max_samples_per_model as i64,
    )?;
    state
        .metrics
        .samples
        .get_or_create(&crate::metrics::ModelSource {
            model: model.to_string(),
            source: source.to_string(),
        })
        .inc_by(rows as u64);
    Ok(ids)
}

/// Restore the active trained head of every head model from the store.
pub fn restore_heads(state: &AppState) {
    match state.store.close_interrupted_runs() {
        Ok(n) if n > 0 => tracing::warn!(
            runs = n,
            "training runs interrupted by the last stop were marked"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot close interrupted runs"),
    }
    for info in state.runtime.models() {
        let Some(m) = info.model else { continue };
        if m.head.is_none() {
            continue;
        }
        restore_head(state, m.name());
        set_state(state, m.name(), "idle");
    }
}

fn dataset(
    samples: &[dai_store::Sample],
    holdout: bool,
    features: usize,
    outputs: usize,
) -> Dataset {
    let mut d = Dataset {
        features,
        outputs,
        ..Default::default()
    };
    for s in samples
        .iter()
        .filter(|s| s.holdout == holdout && s.features.len() == features)
    {
        d.x.extend_from_slice(&s.features);
        d.classes.push(s.label);
    }
    d
}

/// The delta as protocol tensors (layout names the aggregator expects).
fn delta_tensors(
    delta: &dai_train::Params,
    spec: &dai_train::HeadSpec,
) -> Vec<dai_protocol::update::Tensor> {
    use dai_protocol::update::Tensor;
    let mut tensors = Vec::new();
    for (i, l) in spec.layers.iter().enumerate() {
        tensors.push(Tensor {
            name: format!("layers.{i}.weight"),
            shape: vec![l.outputs, l.inputs],
            values: delta.weights[i].clone(),
        });
        tensors.push(Tensor {
            name: format!("layers.{i}.bias"),
            shape: vec![l.outputs],
            values: delta.biases[i].clone(),
        });
    }
    tensors
}

/// The outbox payload (the wire form of `dai_protocol::update`, published
/// as it is) with error feedback: the residual a lossy encoding left
/// against an earlier base is added first, and what this encoding drops
/// becomes the new residual (an f32 update payload carrying this base,
/// stored with the outbox row). Returns (wire payload, new residual;
/// `None` when nothing was lost).
fn delta_payload(
    state: &AppState,
    meta: dai_protocol::update::UpdateMeta,
    delta: &dai_train::Params,
    spec: &dai_train::HeadSpec,
) -> Result<(Vec<u8>, Option<Vec<u8>>), TrainingError> {
    use dai_protocol::update::{Encoding, Update};
    let failed = |e: dai_protocol::ProtocolError| TrainingError::Failed(e.to_string());
    let mut tensors = delta_tensors(delta, spec);
    match state
        .store
        .residual(&meta.model)?
        .map(|r| Update::decode(&r))
    {
        // Against the same base, this delta is cumulative: it already holds
        // the previous run's unsent part (training continued from that
        // head). Only after a new global was adopted (the local head was
        // replaced) is the residual missing from the delta, so only then
        // is it added.
        Some(Ok(r)) if r.meta.base_version != meta.base_version => {
            dai_protocol::update::add_into(&mut tensors, &r.tensors)
        }
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            tracing::warn!(model = %meta.model, error = %e, "stored residual unreadable; dropped")
        }
        None => {}
    }
    let encoding = meta.encoding;
    let update = Update { meta, tensors };
    let wire = update.encode().map_err(failed)?;
    if encoding == Encoding::F32 {
        return Ok((wire, None));
    }
    let sent = Update::decode(&wire).map_err(failed)?;
    let lost = dai_protocol::update::residual(&update.tensors, &sent.tensors);
    let residual = Update {
        meta: dai_protocol::update::UpdateMeta {
            encoding: Encoding::F32,
            ..update.meta
        },
        tensors: lost,
    }
    .encode()
    .map_err(failed)?;
    Ok((wire, Some(residual)))
}

fn cfg_holdout(state: &AppState) -> u64 {
    state.config.training.holdout_every
}

/// Serve the store's active head for `name` (after start or a hot reload).
pub fn restore_head(state: &AppState, name: &str) {
    let Ok(m) = state.runtime.model(name) else {
        return;
    };
    if m.head.is_none() {
        return;
    }
    match state.store.active_head(m.name(), m.version()) {
        Ok(Some((version, bytes))) => match Head::from_bytes(&bytes) {
            Ok((head, _)) => match state.runtime.set_head_if_current(&m, head, version) {
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
        },
        Ok(None) => {}
        Err(e) => tracing::error!(model = %m.name(), error = %e, "cannot read stored heads"),
    }
}

/// Run one training round for `model` now (blocking). Returns the run record.
pub fn run_training(state: &Arc<AppState>, model: &str) -> Result<Value, TrainingError> {
    /// Clears the "running" mark even if the run panics.
    struct Running<'a>(&'a AppState, &'a str);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.training.running.lock().remove(self.1);
            set_state(self.0, self.1, "idle");
        }
    }
    if !state.training.running.lock().insert(model.to_string()) {
        return Err(TrainingError::Busy(model.to_string()));
    }
    let _running = Running(state, model);
    let result = run_inner(state, model);
    if let Err(e) = &result {
        // A run row left "running" by an error path is closed as failed.
        if let Err(se) = state.store.fail_running(model, &e.to_string()) {
            tracing::warn!(error = %se, "cannot close the failed run");
        }
    }
    result
}

fn run_inner(state: &Arc<AppState>, model: &str) -> Result<Value, TrainingError> {
    let m = state.runtime.model(model).map_err(TrainingError::Model)?;
    let slot = m
        .head
        .as_ref()
        .ok_or_else(|| TrainingError::NoHead(model.to_string()))?;
    let serving = slot.load_full();
    let shipped = m
        .shipped_head
        .clone()
        .ok_or_else(|| TrainingError::NoHead(model.to_string()))?;
    let spec = serving.head.spec.clone();
    let samples = state.store.samples(model, m.version())?;
    let train_set = dataset(&samples, false, spec.inputs(), spec.outputs());
    let holdout = dataset(&samples, true, spec.inputs(), spec.outputs());
    if train_set.is_empty() || holdout.is_empty() {
        return Err(TrainingError::BadInput(format!(
            "model {model} has {} training and {} hold-out samples of {} features for base {}; a run needs both \
             (about 1 in {} samples is held out)",
            train_set.len(),
            holdout.len(),
            spec.inputs(),
            m.version(),
            cfg_holdout(state)
        )));
    }
    let last_sample_id = samples.iter().map(|s| s.id).max().unwrap_or(0);
    let cfg = &state.config;
    let optimizer = match cfg.training.optimizer {
        dai_config::OptimizerChoice::Adam => Optimizer::adam(cfg.training.learning_rate as f32),
        dai_config::OptimizerChoice::Sgd => Optimizer::sgd(
            cfg.training.learning_rate as f32,
            cfg.training.momentum as f32,
        ),
    };
    let tc = TrainConfig {
        optimizer,
        batch_size: cfg.batch_size,
        epochs: cfg.num_epochs as usize,
        seed: samples.len() as u64,
    };
    let mut choice = dai_train::select_backend(
        cfg.gpu_enabled,
        cfg.gpu_memory_allocation,
        &serving.head,
        cfg.batch_size,
    );
    *state.training.backend.lock() = Some((choice.backend.name(), choice.fallback_reason.clone()));
    let before = dai_train::accuracy(&serving.head, &holdout)
        .map_err(|e| TrainingError::Failed(e.to_string()))?;
    let run = state
        .store
        .start_run(model, &choice.backend.name(), samples.len() as i64)?;
    state.store.set_run_last_sample(run, last_sample_id)?;
    set_state(state, model, "training");
    with_live(state, model, |m| m.running_epochs.clear());
    let mut head = serving.head.clone();
    let progress = |e: &dai_train::EpochReport| -> bool {
        with_live(state, model, |m| {
            m.running_epochs
                .push(json!({"epoch": e.epoch, "loss": e.loss}))
        });
        state
            .metrics
            .training_loss
            .get_or_create(&crate::metrics::ModelLabel {
                model: model.to_string(),
            })
            .set(e.loss as f64);
        // Inference has priority: wait (bounded) while requests are queued.
        let until = Instant::now() + Duration::from_secs(5);
        while state.runtime.pool().queue_depth() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        !state.shutting_down.load(Ordering::SeqCst) && state.runtime.pool().queue_depth() == 0
    };
    let mut result = dai_train::train(
        choice.backend.as_mut(),
        &mut head,
        &train_set,
        &tc,
        progress,
    );
    if let Err(TrainError::Gpu(reason) | TrainError::NoGpu(reason)) = &result {
        tracing::warn!(%reason, "GPU failed during training; rerunning on the CPU");
        *state.training.backend.lock() =
            Some(("cpu".into(), Some(format!("GPU failed mid-run: {reason}"))));
        head = serving.head.clone();
        with_live(state, model, |m| m.running_epochs.clear());
        result = dai_train::train(
            &mut dai_train::cpu::CpuBackend::new(),
            &mut head,
            &train_set,
            &tc,
            progress,
        );
    }
    let epochs_json = |r: &dai_train::TrainReport| json!(r.epochs);
    let outcome_metric = |outcome: &str| {
        state
            .metrics
            .training_runs
            .get_or_create(&crate::metrics::ModelOutcome {
                model: model.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    };
    let report = match result {
        Ok(r) => r,
        Err(TrainError::Diverged { epoch, loss }) => {
            state.training.diverged.fetch_add(1, Ordering::Relaxed);
            state.metrics.training_diverged.inc();
            let reason = format!("loss {loss} at epoch {epoch}; the previous head is kept");
            tracing::error!(%model, %reason, "training diverged");
            state.store.finish_run(
                run,
                "diverged",
                &json!([]),
                Some(before),
                None,
                Some(&reason),
            )?;
            outcome_metric("diverged");
            return Ok(run_json(state, model, run));
        }
        Err(e) => {
            let reason = e.to_string();
            state
                .store
                .finish_run(run, "failed", &json!([]), Some(before), None, Some(&reason))?;
            outcome_metric("failed");
            return Err(TrainingError::Failed(reason));
        }
    };
    if report.epochs.len() < tc.epochs {
        let reason = format!(
            "stopped after {} of {} epochs: inference had priority or the daemon is stopping",
            report.epochs.len(),
            tc.epochs
        );
        state.store.finish_run(
            run,
            "aborted",
            &epochs_json(&report),
            Some(before),
            None,
            Some(&reason),
        )?;
        outcome_metric("aborted");
        return Ok(run_json(state, model, run));
    }
    let after =
        dai_train::accuracy(&head, &holdout).map_err(|e| TrainingError::Failed(e.to_string()))?;
    let acc = |when: &str, v: f64| {
        state
            .metrics
            .training_val_accuracy
            .get_or_create(&crate::metrics::ModelWhen {
                model: model.to_string(),
                when: when.to_string(),
            })
            .set(v);
    };
    acc("before", before);
    acc("after", after);
    if after < before {
        let reason = format!(
            "hold-out accuracy would fall from {before:.4} to {after:.4}; the current head is kept"
        );
        state.store.finish_run(
            run,
            "rejected",
            &epochs_json(&report),
            Some(before),
            Some(after),
            Some(&reason),
        )?;
        outcome_metric("rejected");
        return Ok(run_json(state, model, run));
    }
    let loss = report.final_loss().unwrap_or(f32::NAN);
    // Unique across the fleet and across restarts of this device (run ids
    // restart from 1 with a fresh data dir): device, model, run, and the
    // creation time in nanoseconds.
    let device = if state.config.cloud.device_id.is_empty() {
        state.device.clone()
    } else {
        state.config.cloud.device_id.clone()
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let update_id = format!("{device}:{model}:{run}:{nanos:x}");
    // The delta is against the global base this device last adopted (the
    // shipped head until a global arrives), which is what the aggregator
    // adds it to.
    let (base_params, base_label) = match state.store.latest_global(model)? {
        Some((gv, bytes)) => match Head::from_bytes(&bytes) {
            Ok((g, _)) => (g.params, format!("{}+g{gv}", m.version())),
            Err(e) => {
                return Err(TrainingError::Failed(format!(
                    "stored global {gv} unreadable: {e}"
                )));
            }
        },
        None => (shipped.params.clone(), m.version().to_string()),
    };
    let delta = head.params.minus(&base_params);
    let meta = dai_protocol::update::UpdateMeta {
        device: device.clone(),
        model: model.to_string(),
        base_version: base_label,
        update_id: update_id.clone(),
        sample_count: train_set.len() as u64,
        loss,
        encoding: match state.config.cloud.update_encoding {
            dai_config::UpdateEncoding::F32 => dai_protocol::update::Encoding::F32,
            dai_config::UpdateEncoding::F16 => dai_protocol::update::Encoding::F16,
            dai_config::UpdateEncoding::Int8 => dai_protocol::update::Encoding::Int8,
            dai_config::UpdateEncoding::Topk8 => dai_protocol::update::Encoding::Topk8,
        },
    };
    let meta_encoding = meta.encoding.as_str();
    let (payload, residual) = delta_payload(state, meta, &delta, &spec)?;
    let mut meta = HashMap::new();
    meta.insert("base_version".to_string(), m.version().to_string());
    meta.insert("run".to_string(), run.to_string());
    let weights = head
        .to_bytes(&meta)
        .map_err(|e| TrainingError::Failed(e.to_string()))?;
    let version = state.store.accept_head(
        run,
        &dai_store::AcceptedHead {
            model,
            base_version: m.version(),
            weights: &weights,
            update_id: &update_id,
            delta_payload: &payload,
            encoding: meta_encoding,
            sample_count: train_set.len() as i64,
            loss: loss as f64,
            residual: residual.as_deref(),
        },
        &epochs_json(&report),
        before,
        after,
    )?;
    // The store is the truth from here on; if the bundle was reloaded during
    // the run, the reload path restores the active head for its version.
    match state.runtime.set_head_if_current(&m, head, version) {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(%model, "bundle reloaded during the run; the new head is stored for base {}", m.version())
        }
        Err(e) => tracing::error!(%model, error = %e, "new head stored but not swapped in"),
    }
    outcome_metric("accepted");
    // Offline for long: the outbox stays bounded, and what goes is counted.
    match state
        .store
        .trim_outbox(state.config.cloud.max_outbox_rows as i64)
    {
        Ok(dropped) if !dropped.is_empty() => {
            state.metrics.outbox_evicted.inc_by(dropped.len() as u64);
            tracing::warn!(count = dropped.len(), oldest = %dropped[0], "outbox full: oldest updates dropped");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot trim the outbox"),
    }
    tracing::info!(%model, head_version = version, before, after, backend = %report.backend, "new head accepted");
    Ok(run_json(state, model, run))
}

fn run_json(state: &AppState, model: &str, run: i64) -> Value {
    match state.store.runs(model, 20) {
        Ok(runs) => runs
            .into_iter()
            .find(|r| r.id == run)
            .map(|r| json!(r))
            .unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// The `training` section of `/v1/status`.
pub fn status(state: &AppState) -> Value {
    let t = &state.config.training;
    let mut models = Vec::new();
    for info in state.runtime.models() {
        let Some(m) = info.model else { continue };
        let Some(slot) = &m.head else { continue };
        let live = state
            .training
            .models
            .lock()
            .get(m.name())
            .cloned()
            .unwrap_or_default();
        let (train, holdout, _) = state.store.sample_counts(m.name()).unwrap_or((0, 0, 0));
        let runs = state.store.runs(m.name(), 1).unwrap_or_default();
        let consumed = state.store.last_consumed_sample(m.name()).unwrap_or(0);
        let new_since = state
            .store
            .samples_since(m.name(), m.version(), consumed)
            .unwrap_or(0);
        let mut last = runs.first().map(|r| json!(r)).unwrap_or(Value::Null);
        if live.state == "training"
            && let Some(obj) = last.as_object_mut()
        {
            obj.insert("outcome".into(), json!("running"));
            obj.insert("epochs".into(), json!(live.running_epochs));
        }
        models.push(json!({
            "model": m.name(),
            "head_version": slot.load().version,
            "base_version": m.version(),
            "state": if live.state.is_empty() { "idle".to_string() } else { live.state.clone() },
            "samples": {
                "train": train, "holdout": holdout,
                "new_since_last_run": new_since,
                "min_new_samples": t.min_new_samples,
            },
            "outbox_pending": state.store.outbox_count(m.name()).unwrap_or(0),
            "global_version": state.store.latest_global(m.name()).ok().flatten().map_or(0, |(v, _)| v),
            "last_run": last,
        }));
    }
    let backend = state.training.backend.lock().clone();
    json!({
        "enabled": t.enabled,
        "backend": backend.as_ref().map(|b| b.0.clone()).unwrap_or_else(|| if state.config.gpu_enabled { "gpu (selected at first run)".into() } else { "cpu".into() }),
        "fallback_reason": backend.and_then(|b| b.1),
        "diverged_total": state.training.diverged.load(Ordering::Relaxed),
        "models": models,
    })
}

/// Start runs when enough new samples exist and the device is not busy.
pub async fn scheduler_task(state: Arc<AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let t = state.config.training.clone();
    if !t.enabled {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(t.check_interval_sec)) => {}
            _ = stop.changed() => return,
        }
        for info in state.runtime.models() {
            let Some(m) = info.model else { continue };
            if m.head.is_none() {
                continue;
            }
            let name = m.name().to_string();
            // Store calls block: keep them off the async threads.
            let (st, n2, base) = (state.clone(), name.clone(), m.version().to_string());
            let new = tokio::task::spawn_blocking(move || {
                let consumed = st.store.last_consumed_sample(&n2)?;
                st.store.samples_since(&n2, &base, consumed)
            })
            .await;
            match new {
                Ok(Ok(n)) if n as u64 >= t.min_new_samples => {}
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => {
                    tracing::warn!(model = %name, error = %e, "cannot count new samples");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "sample count task failed");
                    continue;
                }
            }
            let cpu = state.sample.lock().cpu_percent.unwrap_or(0.0);
            if cpu > t.max_cpu_percent {
                set_state(
                    &state,
                    &name,
                    &format!(
                        "waiting: CPU {cpu:.0}% over max_cpu_percent {}",
                        t.max_cpu_percent
                    ),
                );
                continue;
            }
            if state.runtime.pool().queue_depth() > 0 {
                set_state(&state, &name, "waiting: inference queued");
                continue;
            }
            let st = state.clone();
            let result = tokio::task::spawn_blocking(move || run_training(&st, &name)).await;
            match result {
                Ok(Ok(run)) => tracing::info!(run = %run, "training run finished"),
                Ok(Err(e)) => tracing::warn!(error = %e, "training run not done"),
                Err(e) => tracing::error!(error = %e, "training task failed"),
            }
        }
    }
}
