//! One training run, step by step: [`Training::run`].
//!
//! prepare (samples -> train and hold-out sets) -> pick a backend -> record
//! the run -> train (GPU, rerun on the CPU if the GPU fails) -> judge it
//! (diverged, failed, aborted, rejected: the head is kept and the run
//! closed with the reason) -> accept: the delta against the global base,
//! encoded with error feedback (`dai_protocol::feedback`), the new head
//! and the run outcome in one store transaction, then the swap.

use super::{Training, TrainingError};
use dai_infer::LoadedModel;
use dai_protocol::feedback::{PriorResidual, encode_with_feedback};
use dai_protocol::update::{Encoding, UpdateMeta};
use dai_train::{Dataset, Head, Optimizer, TrainConfig, TrainError, TrainReport};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What a run starts from.
struct Prepared {
    model: Arc<LoadedModel>,
    /// A copy of the head serving now: the run trains this.
    serving: Head,
    train_set: Dataset,
    holdout: Dataset,
    samples: usize,
    last_sample_id: i64,
}

/// How a run that produced no new head ended.
struct Unaccepted<'a> {
    outcome: &'static str,
    epochs: Value,
    before: f64,
    after: Option<f64>,
    reason: &'a str,
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

fn failed(e: impl std::fmt::Display) -> TrainingError {
    TrainingError::Failed(e.to_string())
}

impl Training {
    /// Run one training round for `model` now (blocking). Returns the run record.
    pub fn run(&self, model: &str) -> Result<Value, TrainingError> {
        /// Clears the "running" mark even if the run panics.
        struct Running<'a>(&'a Training, &'a str);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.live.running.lock().remove(self.1);
                self.0.set_state(self.1, "idle");
            }
        }
        if !self.live.running.lock().insert(model.to_string()) {
            return Err(TrainingError::Busy(model.to_string()));
        }
        let _running = Running(self, model);
        let result = self.run_steps(model);
        if let Err(e) = &result {
            // A run row left "running" by an error path is closed as failed.
            let reason = crate::error::chain(e).to_string();
            if let Err(se) = self.store.fail_running(model, &reason) {
                tracing::warn!(error = %crate::error::chain(&se), "cannot close the failed run");
            }
        }
        result
    }

    fn run_steps(&self, model: &str) -> Result<Value, TrainingError> {
        let prep = self.prepare(model)?;
        let tc = self.train_config(prep.samples as u64);
        let cfg = &self.config;
        let mut choice = dai_train::select_backend(
            cfg.gpu_enabled,
            cfg.gpu_memory_allocation,
            &prep.serving,
            cfg.batch_size,
        );
        *self.live.backend.lock() = Some((choice.backend.name(), choice.fallback_reason.clone()));
        let before = dai_train::accuracy(&prep.serving, &prep.holdout).map_err(failed)?;
        let run = self
            .store
            .start_run(model, &choice.backend.name(), prep.samples as i64)?;
        self.store.set_run_last_sample(run, prep.last_sample_id)?;
        self.set_state(model, "training");
        self.with_live(model, |m| m.running_epochs.clear());
        let (head, result) = self.train_with_fallback(model, &prep, &tc, choice.backend.as_mut());
        let report = match result {
            Ok(r) => r,
            Err(TrainError::Diverged { epoch, loss }) => {
                self.live.diverged.fetch_add(1, Ordering::Relaxed);
                self.inference.metrics.training_diverged.inc();
                let reason = format!("loss {loss} at epoch {epoch}; the previous head is kept");
                tracing::error!(%model, %reason, "training diverged");
                return self.close(model, run, Unaccepted::new("diverged", before, &reason));
            }
            Err(e) => {
                let reason = e.to_string();
                self.close(model, run, Unaccepted::new("failed", before, &reason))?;
                return Err(TrainingError::Failed(reason));
            }
        };
        if report.epochs.len() < tc.epochs {
            let reason = format!(
                "stopped after {} of {} epochs: inference had priority or the daemon is stopping",
                report.epochs.len(),
                tc.epochs
            );
            let mut end = Unaccepted::new("aborted", before, &reason);
            end.epochs = json!(report.epochs);
            return self.close(model, run, end);
        }
        let after = dai_train::accuracy(&head, &prep.holdout).map_err(failed)?;
        self.record_accuracy(model, before, after);
        if after < before {
            let reason = format!(
                "hold-out accuracy would fall from {before:.4} to {after:.4}; the current head is kept"
            );
            let mut end = Unaccepted::new("rejected", before, &reason);
            end.epochs = json!(report.epochs);
            end.after = Some(after);
            return self.close(model, run, end);
        }
        // The bundle's own rows: posted samples (hold-out included) cannot
        // shape them, so a run trained on flipped labels is caught here
        // even when it scores well on the flipped hold-out.
        if let Some(rows) = &prep.model.validation {
            let (b, a) = (
                rows.accuracy(&prep.serving).map_err(failed)?,
                rows.accuracy(&head).map_err(failed)?,
            );
            let max_drop = self.config.training.max_validation_drop;
            if a < b - max_drop {
                let reason = format!(
                    "the bundle's validation accuracy would fall from {b:.4} to {a:.4} (more than training.max_validation_drop = {max_drop}); the current head is kept"
                );
                tracing::warn!(%model, %reason, "training run rejected");
                let mut end = Unaccepted::new("rejected", before, &reason);
                end.epochs = json!(report.epochs);
                end.after = Some(after);
                return self.close(model, run, end);
            }
        }
        self.accept(&prep, run, head, &report, (before, after))
    }

    /// The serving head, the shipped head's presence, and the sample sets.
    fn prepare(&self, name: &str) -> Result<Prepared, TrainingError> {
        let model = self
            .inference
            .runtime
            .model(name)
            .map_err(TrainingError::Model)?;
        let no_head = || TrainingError::NoHead(name.to_string());
        let serving = model.head.as_ref().ok_or_else(no_head)?.load_full();
        // The delta base before any global: without it no update can be made.
        model.shipped_head.as_ref().ok_or_else(no_head)?;
        let spec = &serving.head.spec;
        let samples = self.store.samples(name, model.version())?;
        let train_set = dataset(&samples, false, spec.inputs(), spec.outputs());
        let holdout = dataset(&samples, true, spec.inputs(), spec.outputs());
        if train_set.is_empty() || holdout.is_empty() {
            return Err(TrainingError::BadInput(format!(
                "model {name} has {} training and {} hold-out samples of {} features for base {}; a run needs both \
                 (about 1 in {} samples is held out)",
                train_set.len(),
                holdout.len(),
                spec.inputs(),
                model.version(),
                self.config.training.holdout_every
            )));
        }
        Ok(Prepared {
            serving: serving.head.clone(),
            train_set,
            holdout,
            samples: samples.len(),
            last_sample_id: samples.iter().map(|s| s.id).max().unwrap_or(0),
            model,
        })
    }

    fn train_config(&self, seed: u64) -> TrainConfig {
        let cfg = &self.config;
        let t = &cfg.training;
        let optimizer = match t.optimizer {
            dai_config::OptimizerChoice::Adam => Optimizer::adam(t.learning_rate as f32),
            dai_config::OptimizerChoice::Sgd => {
                Optimizer::sgd(t.learning_rate as f32, t.momentum as f32)
            }
        };
        TrainConfig {
            optimizer,
            batch_size: cfg.batch_size,
            epochs: cfg.num_epochs as usize,
            seed,
        }
    }

    /// Train a copy of the serving head on `backend`; if the GPU fails,
    /// start over on the CPU. Returns the trained head and the outcome.
    fn train_with_fallback(
        &self,
        model: &str,
        prep: &Prepared,
        tc: &TrainConfig,
        backend: &mut dyn dai_train::Backend,
    ) -> (Head, Result<TrainReport, TrainError>) {
        let mut head = prep.serving.clone();
        let progress = |e: &dai_train::EpochReport| self.epoch_done(model, e);
        let result = dai_train::train(backend, &mut head, &prep.train_set, tc, progress);
        let reason = match &result {
            Err(TrainError::Gpu(reason) | TrainError::NoGpu(reason)) => reason.clone(),
            _ => return (head, result),
        };
        tracing::warn!(%reason, "GPU failed during training; rerunning on the CPU");
        *self.live.backend.lock() =
            Some(("cpu".into(), Some(format!("GPU failed mid-run: {reason}"))));
        let mut head = prep.serving.clone();
        self.with_live(model, |m| m.running_epochs.clear());
        let result = dai_train::train(
            &mut dai_train::cpu::CpuBackend::new(),
            &mut head,
            &prep.train_set,
            tc,
            progress,
        );
        (head, result)
    }

    /// After each epoch: live figures, then give way to inference. Returns
    /// whether to go on.
    fn epoch_done(&self, model: &str, e: &dai_train::EpochReport) -> bool {
        self.with_live(model, |m| {
            m.running_epochs
                .push(json!({"epoch": e.epoch, "loss": e.loss}))
        });
        self.inference
            .metrics
            .training_loss
            .get_or_create(&crate::metrics::ModelLabel {
                model: model.to_string(),
            })
            .set(e.loss as f64);
        // Inference has priority: wait (bounded) while requests are queued.
        let pool = self.inference.runtime.pool();
        let until = Instant::now() + Duration::from_secs(5);
        while pool.queue_depth() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        !self.shutdown.is_set() && pool.queue_depth() == 0
    }

    fn record_accuracy(&self, model: &str, before: f64, after: f64) {
        for (when, v) in [("before", before), ("after", after)] {
            self.inference
                .metrics
                .training_val_accuracy
                .get_or_create(&crate::metrics::ModelWhen {
                    model: model.to_string(),
                    when: when.to_string(),
                })
                .set(v);
        }
    }

    fn count_outcome(&self, model: &str, outcome: &str) {
        self.inference
            .metrics
            .training_runs
            .get_or_create(&crate::metrics::ModelOutcome {
                model: model.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Close a run that produced no new head; the serving head stays.
    fn close(&self, model: &str, run: i64, end: Unaccepted<'_>) -> Result<Value, TrainingError> {
        self.store.finish_run(
            run,
            end.outcome,
            &end.epochs,
            Some(end.before),
            end.after,
            Some(end.reason),
        )?;
        self.count_outcome(model, end.outcome);
        Ok(self.run_json(model, run))
    }

    /// Store the new head with its outbox update (one transaction), then
    /// swap it in and keep the outbox bounded.
    fn accept(
        &self,
        prep: &Prepared,
        run: i64,
        head: Head,
        report: &TrainReport,
        (before, after): (f64, f64),
    ) -> Result<Value, TrainingError> {
        let m = &prep.model;
        let model = m.name();
        let loss = report.final_loss().unwrap_or(f32::NAN);
        let update_id = self.update_id(model, run);
        let meta = UpdateMeta {
            device: self.device.clone(),
            model: model.to_string(),
            base_version: String::new(),
            update_id: update_id.clone(),
            sample_count: prep.train_set.len() as u64,
            loss,
            encoding: self.encoding(),
        };
        let (payload, residual, update_base) = self.delta_payload(m, &head, meta)?;
        let mut head_meta = HashMap::new();
        head_meta.insert("base_version".to_string(), m.version().to_string());
        head_meta.insert("run".to_string(), run.to_string());
        let weights = head.to_bytes(&head_meta).map_err(failed)?;
        let version = self.store.accept_head(
            run,
            &dai_store::AcceptedHead {
                model,
                base_version: m.version(),
                weights: &weights,
                update_id: &update_id,
                update_base: &update_base,
                local_dp_noise: (self.config.cloud.local_dp.noise_multiplier > 0.0)
                    .then_some(self.config.cloud.local_dp.noise_multiplier),
                delta_payload: &payload,
                encoding: self.encoding().as_str(),
                sample_count: prep.train_set.len() as i64,
                loss: loss as f64,
                residual: residual.as_deref(),
            },
            &json!(report.epochs),
            before,
            after,
        )?;
        // Head and outbox row committed; nothing published yet.
        dai_protocol::crashpoint::hit("edge-head-committed");
        // The store is the truth from here on; if the bundle was reloaded during
        // the run, the reload path restores the active head for its version.
        match self.inference.runtime.set_head_if_current(m, head, version) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%model, "bundle reloaded during the run; the new head is stored for base {}", m.version())
            }
            Err(e) => tracing::error!(%model, error = %e, "new head stored but not swapped in"),
        }
        self.count_outcome(model, "accepted");
        self.trim_outbox();
        tracing::info!(%model, head_version = version, update = %update_id, before, after, backend = %report.backend, "new head accepted");
        Ok(self.run_json(model, run))
    }

    /// Unique across the fleet and across restarts of this device (run ids
    /// restart from 1 with a fresh data dir): device, model, run, and the
    /// creation time in nanoseconds.
    fn update_id(&self, model: &str, run: i64) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}:{model}:{run}:{nanos:x}", self.device)
    }

    fn encoding(&self) -> Encoding {
        match self.config.cloud.update_encoding {
            dai_config::UpdateEncoding::F32 => Encoding::F32,
            dai_config::UpdateEncoding::F16 => Encoding::F16,
            dai_config::UpdateEncoding::Int8 => Encoding::Int8,
            dai_config::UpdateEncoding::Topk8 => Encoding::Topk8,
        }
    }

    /// The outbox payload (the wire form of `dai_protocol::update`, published
    /// as it is) of `head`'s delta against the global base this device last
    /// adopted (the shipped head until a global arrives), which is what the
    /// aggregator adds it to; with error feedback against the stored
    /// residual. Returns (wire payload, new residual (`None` when nothing
    /// was lost), the base label). `meta.base_version` is filled in here:
    /// the bundle version, and the global and its epoch
    /// ([`dai_protocol::base::label`]).
    fn delta_payload(
        &self,
        m: &LoadedModel,
        head: &Head,
        mut meta: UpdateMeta,
    ) -> Result<DeltaPayload, TrainingError> {
        let model = m.name();
        let (base_params, base_label) = match self.store.latest_global(model)? {
            Some(g) => match Head::from_bytes(&g.head) {
                Ok((h, _)) => {
                    let id = dai_protocol::base::GlobalId {
                        epoch: g.epoch,
                        version: g.version as u64,
                    };
                    (h.params, dai_protocol::base::label(m.version(), Some(id)))
                }
                Err(e) => {
                    return Err(TrainingError::Failed(format!(
                        "stored global {} unreadable: {e}",
                        g.version
                    )));
                }
            },
            None => match &m.shipped_head {
                Some(shipped) => (shipped.params.clone(), m.version().to_string()),
                None => return Err(TrainingError::NoHead(model.to_string())),
            },
        };
        meta.base_version = base_label.clone();
        let mut delta = head.params.minus(&base_params);
        let dp = &self.config.cloud.local_dp;
        if dp.noise_multiplier > 0.0 {
            privatize(&mut delta, dp.clip_norm, dp.noise_multiplier)?;
        }
        let tensors = dai_protocol::update::head_tensors(&head.spec, &delta);
        let prior = self.store.residual(model)?;
        let encoded = encode_with_feedback(meta, tensors, prior.as_deref()).map_err(failed)?;
        if let PriorResidual::Unreadable(e) = &encoded.prior {
            tracing::warn!(%model, error = %e, "stored residual unreadable; dropped");
        }
        Ok((encoded.wire, encoded.residual, base_label))
    }

    /// Offline for long: the outbox stays bounded, and what goes is counted.
    fn trim_outbox(&self) {
        match self
            .store
            .trim_outbox(self.config.cloud.max_outbox_rows as i64)
        {
            Ok(dropped) if !dropped.is_empty() => {
                self.inference
                    .metrics
                    .outbox_evicted
                    .inc_by(dropped.len() as u64);
                tracing::warn!(count = dropped.len(), updates = ?dropped, "outbox full: oldest updates dropped");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "cannot trim the outbox")
            }
        }
    }

    fn run_json(&self, model: &str, run: i64) -> Value {
        match self.store.runs(model, 20) {
            Ok(runs) => runs
                .into_iter()
                .find(|r| r.id == run)
                .map(|r| json!(r))
                .unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }
}

/// (wire payload, new residual (`None`: nothing lost), base label).
type DeltaPayload = (Vec<u8>, Option<Vec<u8>>, String);

/// Local DP on an uploaded delta: scaled down to L2 norm `clip`, then
/// Gaussian noise of standard deviation `noise x clip` on every value
/// ([`dai_protocol::dp::standard_normals`]).
fn privatize(delta: &mut dai_train::Params, clip: f64, noise: f64) -> Result<(), TrainingError> {
    let values = || delta.weights.iter().chain(&delta.biases).flatten();
    let norm = values()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    let count = values().count();
    let scale = if norm > clip { clip / norm } else { 1.0 };
    let normals = dai_protocol::dp::standard_normals(count)
        .map_err(|e| TrainingError::Failed(format!("no randomness for the local DP noise: {e}")))?;
    let std = noise * clip;
    let values = delta
        .weights
        .iter_mut()
        .chain(delta.biases.iter_mut())
        .flatten();
    for (v, g) in values.zip(normals) {
        *v = (f64::from(*v) * scale + std * g) as f32;
    }
    Ok(())
}

/// Local DP: (epsilon at `delta`, releases) over `noise` multipliers, each
/// a Gaussian mechanism on the device's data (the whole data set is the
/// unit: user-level).
pub(super) fn local_epsilon(noise: &[f64], delta: f64) -> f64 {
    let mut a = dai_protocol::dp::Accountant::default();
    for &z in noise {
        a.compose(1.0, z, 1);
    }
    a.epsilon(delta).0
}

impl<'a> Unaccepted<'a> {
    fn new(outcome: &'static str, before: f64, reason: &'a str) -> Unaccepted<'a> {
        Unaccepted {
            outcome,
            epochs: json!([]),
            before,
            after: None,
            reason,
        }
    }
}
