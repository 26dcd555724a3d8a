//! The model registry and the one entry point for inference.
//!
//! [`Runtime`] owns the loaded models (by manifest name), the result cache and
//! the worker pool. [`Runtime::infer`] validates a request against the model's
//! manifest, answers from the cache when it can, otherwise queues it on the
//! pool and awaits the worker. Models are swapped behind an `Arc`, so a hot
//! reload ([`Runtime::reload_changed`]) never disturbs requests in flight:
//! they finish on the version they started with.

use crate::bundle::{Bundle, Manifest};
use crate::cache::{CacheKey, CacheStats, ResultCache};
use crate::model::{LoadedModel, ModelError};
use crate::options::RuntimeOptions;
use crate::pool::{Job, Pool, PoolConfig, SubmitError};
use crate::tensor::TensorData;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("unknown model {name:?}; loaded models: {known:?}")]
    UnknownModel { name: String, known: Vec<String> },
    #[error("model {name:?} is not available: {reason}")]
    Unavailable { name: String, reason: String },
    #[error("{0}")]
    BadInput(String),
    #[error("overloaded: {0}")]
    Overloaded(SubmitError),
    #[error("{0}")]
    Failed(String),
}

/// A successful inference.
#[derive(Debug, Clone)]
pub struct InferOutcome {
    pub model: String,
    pub version: String,
    pub outputs: Arc<Vec<TensorData>>,
    pub cached: bool,
    pub worker: Option<usize>,
    /// Validation, preprocessing and cache lookup.
    pub prepare: Duration,
    pub queue: Duration,
    pub batching: Duration,
    pub infer: Duration,
    pub batch_rows: usize,
    pub batch_requests: usize,
    /// Output specs, in order.
    pub output_names: Vec<String>,
    /// For models with a head: the head's input rows (the embedding), kept
    /// so feedback can become a training sample without rerunning the backbone.
    pub head_input: Option<TensorData>,
    /// The serving head's version (0 = shipped), for models with a head.
    pub head_version: Option<i64>,
}

/// Cached or fresh results of a head model are `[head output, head input]`.
fn split_head(
    model: &LoadedModel,
    full: Arc<Vec<TensorData>>,
) -> (Arc<Vec<TensorData>>, Option<TensorData>) {
    if model.head.is_some() && full.len() == 2 {
        (Arc::new(vec![full[0].clone()]), Some(full[1].clone()))
    } else {
        (full, None)
    }
}

/// Identity of the files of a bundle, to notice changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<(PathBuf, Option<(SystemTime, u64)>)>);

impl Fingerprint {
    fn of(dir: &Path) -> Fingerprint {
        let manifest = Bundle::manifest_path(dir);
        let mut files = vec![manifest];
        if let Ok(m) = Bundle::read_manifest(dir) {
            files.push(dir.join(&m.model.file));
        }
        Fingerprint(
            files
                .into_iter()
                .map(|p| {
                    let meta = std::fs::metadata(&p)
                        .ok()
                        .and_then(|m| Some((m.modified().ok()?, m.len())));
                    (p, meta)
                })
                .collect(),
        )
    }
}

/// A bundle's state in the registry.
#[derive(Debug, Clone)]
pub enum SlotState {
    Ready(Arc<LoadedModel>),
    Failed(String),
}

#[derive(Debug, Clone)]
struct Slot {
    dir: PathBuf,
    state: SlotState,
    fingerprint: Fingerprint,
    loaded_at: SystemTime,
    /// Last reload that failed while an older version kept serving.
    reload_error: Option<String>,
}

/// What the status page and the store need to know about one model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub dir: PathBuf,
    pub model: Option<Arc<LoadedModel>>,
    pub error: Option<String>,
    pub loaded_at: SystemTime,
}

/// An event of the registry, for logs and the store.
#[derive(Debug, Clone)]
pub enum LoadEvent {
    Loaded {
        name: String,
        version: String,
        sha256: String,
        dir: PathBuf,
        load_ms: f64,
    },
    Failed {
        name: String,
        dir: PathBuf,
        error: String,
    },
}

/// Models, cache and workers.
#[derive(Debug)]
pub struct Runtime {
    slots: RwLock<BTreeMap<String, Slot>>,
    cache: Option<Mutex<ResultCache>>,
    pool: Pool,
    memory_limit_bytes: u64,
    max_batch: usize,
    /// Bundle variant to load when present (`daemon.prefer_model_variant`).
    prefer_variant: Option<String>,
}

impl Runtime {
    pub fn new(options: &RuntimeOptions) -> Runtime {
        let cache = options
            .cache
            .map(|c| Mutex::new(ResultCache::new(c.policy, c.capacity_bytes)));
        let pool = Pool::new(PoolConfig {
            workers: options.workers,
            queue_capacity: options.queue_capacity,
            strategy: options.load_balancing,
            max_batch: options.max_batch,
            max_batch_wait: options.max_batch_wait,
        });
        Runtime {
            slots: RwLock::new(BTreeMap::new()),
            cache,
            pool,
            memory_limit_bytes: options.memory_limit_bytes,
            prefer_variant: options.prefer_variant.clone().filter(|v| !v.is_empty()),
            max_batch: options.max_batch,
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(|c| c.lock().stats())
    }

    pub fn cache_policy(&self) -> Option<crate::options::EvictionPolicy> {
        self.cache.as_ref().map(|c| c.lock().policy())
    }

    pub fn memory_limit_bytes(&self) -> u64 {
        self.memory_limit_bytes
    }

    /// Estimated bytes of ready models, optionally excluding one name.
    pub fn memory_used_bytes(&self, except: Option<&str>) -> u64 {
        self.slots
            .read()
            .iter()
            .filter(|(n, _)| Some(n.as_str()) != except)
            .filter_map(|(_, s)| match &s.state {
                SlotState::Ready(m) => Some(m.estimated_bytes),
                SlotState::Failed(_) => None,
            })
            .sum()
    }

    /// Load (or replace) the bundle in `dir`. On failure the error is
    /// recorded in the registry; an older version of the same model keeps
    /// serving. Blocking: call from a blocking context.
    pub fn load_bundle(&self, dir: &Path) -> LoadEvent {
        let fingerprint = Fingerprint::of(dir);
        let started = Instant::now();
        let name_guess = Bundle::read_manifest(dir)
            .map(|m| m.name)
            .unwrap_or_else(|_| {
                dir.file_name().map_or_else(
                    || dir.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                )
            });
        let result = self.try_load(dir, &name_guess);
        let mut slots = self.slots.write();
        match result {
            Ok(model) => {
                let event = LoadEvent::Loaded {
                    name: model.name().to_string(),
                    version: model.version().to_string(),
                    sha256: model.bundle.model_sha256.clone(),
                    dir: dir.to_path_buf(),
                    load_ms: started.elapsed().as_secs_f64() * 1e3,
                };
                let name = model.name().to_string();
                slots.insert(
                    name.clone(),
                    Slot {
                        dir: dir.to_path_buf(),
                        state: SlotState::Ready(model),
                        fingerprint,
                        loaded_at: SystemTime::now(),
                        reload_error: None,
                    },
                );
                drop(slots);
                if let Some(c) = &self.cache {
                    c.lock().invalidate_model(&name);
                }
                event
            }
            Err(error) => {
                match slots.get_mut(&name_guess) {
                    Some(slot) if matches!(slot.state, SlotState::Ready(_)) => {
                        slot.fingerprint = fingerprint;
                        slot.reload_error = Some(error.clone());
                    }
                    _ => {
                        slots.insert(
                            name_guess.clone(),
                            Slot {
                                dir: dir.to_path_buf(),
                                state: SlotState::Failed(error.clone()),
                                fingerprint,
                                loaded_at: SystemTime::now(),
                                reload_error: None,
                            },
                        );
                    }
                }
                LoadEvent::Failed {
                    name: name_guess,
                    dir: dir.to_path_buf(),
                    error,
                }
            }
        }
    }

    /// Load the bundle in `dir` without touching the registry: what an
    /// install verifies (checksums, tract load, memory budget as if it
    /// replaced its namesake) before anything switches. Blocking.
    pub fn prepare(&self, dir: &Path) -> Result<Arc<LoadedModel>, String> {
        let name = Bundle::read_manifest(dir).map_err(|e| e.to_string())?.name;
        self.try_load(dir, &name)
    }

    /// Serve `model` (from [`Runtime::prepare`]) under its name, its bundle
    /// watched at `dir` (hot reload) from now on; replaces its namesake.
    pub fn install(&self, dir: &Path, model: Arc<LoadedModel>, load_ms: f64) -> LoadEvent {
        let name = model.name().to_string();
        let event = LoadEvent::Loaded {
            name: name.clone(),
            version: model.version().to_string(),
            sha256: model.bundle.model_sha256.clone(),
            dir: dir.to_path_buf(),
            load_ms,
        };
        self.slots.write().insert(
            name.clone(),
            Slot {
                dir: dir.to_path_buf(),
                state: SlotState::Ready(model),
                fingerprint: Fingerprint::of(dir),
                loaded_at: SystemTime::now(),
                reload_error: None,
            },
        );
        if let Some(c) = &self.cache {
            c.lock().invalidate_model(&name);
        }
        event
    }

    fn try_load(&self, dir: &Path, name: &str) -> Result<Arc<LoadedModel>, String> {
        let bundle =
            Bundle::open_variant(dir, self.prefer_variant.as_deref()).map_err(|e| e.to_string())?;
        let needed = LoadedModel::estimate_bytes(&bundle);
        let used = self.memory_used_bytes(Some(name));
        if used + needed > self.memory_limit_bytes {
            let mb = |b: u64| b.div_ceil(1024 * 1024);
            return Err(ModelError::OverMemory {
                model: bundle.manifest.name.clone(),
                needed_mb: mb(needed),
                available_mb: self.memory_limit_bytes.saturating_sub(used) / (1024 * 1024),
                limit_mb: mb(self.memory_limit_bytes),
            }
            .to_string());
        }
        let model = LoadedModel::load(bundle, self.max_batch).map_err(|e| e.to_string())?;
        Ok(Arc::new(model))
    }

    /// Reload every bundle whose files changed since it was loaded.
    pub fn reload_changed(&self) -> Vec<LoadEvent> {
        let dirs: Vec<PathBuf> = self
            .slots
            .read()
            .values()
            .filter(|s| Fingerprint::of(&s.dir) != s.fingerprint)
            .map(|s| s.dir.clone())
            .collect();
        dirs.iter().map(|d| self.load_bundle(d)).collect()
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        self.slots
            .read()
            .iter()
            .map(|(name, s)| ModelInfo {
                name: name.clone(),
                dir: s.dir.clone(),
                model: match &s.state {
                    SlotState::Ready(m) => Some(m.clone()),
                    SlotState::Failed(_) => None,
                },
                error: match &s.state {
                    SlotState::Failed(e) => Some(e.clone()),
                    SlotState::Ready(_) => s.reload_error.clone(),
                },
                loaded_at: s.loaded_at,
            })
            .collect()
    }

    pub fn model(&self, name: &str) -> Result<Arc<LoadedModel>, InferError> {
        let slots = self.slots.read();
        match slots.get(name) {
            Some(Slot {
                state: SlotState::Ready(m),
                ..
            }) => Ok(m.clone()),
            Some(Slot {
                state: SlotState::Failed(e),
                ..
            }) => Err(InferError::Unavailable {
                name: name.to_string(),
                reason: e.clone(),
            }),
            None => Err(InferError::UnknownModel {
                name: name.to_string(),
                known: slots.keys().cloned().collect(),
            }),
        }
    }

    /// Manifest of a ready model.
    pub fn manifest(&self, name: &str) -> Result<Manifest, InferError> {
        Ok(self.model(name)?.bundle.manifest.clone())
    }

    /// Run one request. `client` feeds ip_hash load balancing.
    pub async fn infer(
        &self,
        name: &str,
        inputs: HashMap<String, TensorData>,
        client: Option<IpAddr>,
    ) -> Result<InferOutcome, InferError> {
        let model = self.model(name)?;
        let t_prepare = Instant::now();
        let (prepared, rows) = model.prepare(inputs).map_err(|e| match e {
            ModelError::BadInput(m) => InferError::BadInput(m),
            other => InferError::Failed(other.to_string()),
        })?;
        let output_names: Vec<String> = match &model.bundle.manifest.head {
            Some(h) => vec![h.output.clone()],
            None => model
                .bundle
                .manifest
                .outputs
                .iter()
                .map(|s| s.name.clone())
                .collect(),
        };
        let answer_version = model.answer_version();
        let key = self.cache.as_ref().map(|_| {
            let named: Vec<(&str, &TensorData)> = model
                .bundle
                .manifest
                .inputs
                .iter()
                .map(|s| s.name.as_str())
                .zip(prepared.iter())
                .collect();
            CacheKey::new(model.name(), &answer_version, &named)
        });
        let hit = match (&self.cache, &key) {
            (Some(cache), Some(key)) => cache.lock().get(key),
            _ => None,
        };
        if let Some(cached) = hit {
            {
                let (outputs, head_input) = split_head(&model, cached);
                return Ok(InferOutcome {
                    head_version: model.head.as_ref().map(|h| h.load().version),
                    head_input,
                    prepare: t_prepare.elapsed(),
                    model: model.name().to_string(),
                    version: model.version().to_string(),
                    outputs,
                    cached: true,
                    worker: None,
                    queue: Duration::ZERO,
                    batching: Duration::ZERO,
                    infer: Duration::ZERO,
                    batch_rows: rows,
                    batch_requests: 1,
                    output_names,
                });
            }
        }
        let prepare = t_prepare.elapsed();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            model: model.clone(),
            inputs: prepared,
            rows,
            enqueued: Instant::now(),
            reply: tx,
        };
        self.pool
            .submit(job, client)
            .map_err(InferError::Overloaded)?;
        let out = rx
            .await
            .map_err(|_| {
                InferError::Failed("the inference worker stopped before answering".into())
            })?
            .map_err(|e| InferError::Failed(e.to_string()))?;
        let full = match model
            .apply_head(&out.outputs)
            .map_err(|e| InferError::Failed(e.to_string()))?
        {
            Some((head_out, emb)) => Arc::new(vec![head_out, emb]),
            None => Arc::new(out.outputs),
        };
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.lock().insert(key, full.clone());
        }
        let (outputs, head_input) = split_head(&model, full);
        Ok(InferOutcome {
            model: model.name().to_string(),
            version: model.version().to_string(),
            outputs,
            cached: false,
            worker: Some(out.worker),
            prepare,
            queue: out.queue,
            batching: out.batching,
            infer: out.infer,
            batch_rows: out.batch_rows,
            batch_requests: out.batch_requests,
            output_names,
            head_input,
            head_version: model.head.as_ref().map(|h| h.load().version),
        })
    }

    /// Like [`Runtime::set_head`], but only if `model` is still the loaded
    /// version of its name (a hot reload may have replaced it meanwhile).
    /// Returns whether the head was swapped in.
    pub fn set_head_if_current(
        &self,
        model: &Arc<LoadedModel>,
        head: dai_head::Head,
        version: i64,
    ) -> Result<bool, InferError> {
        let current = self.model(model.name())?;
        if !Arc::ptr_eq(&current, model) {
            return Ok(false);
        }
        self.set_head(model.name(), head, version)?;
        Ok(true)
    }

    /// Serve `head` as `version` for `name` from now on (atomic swap).
    pub fn set_head(
        &self,
        name: &str,
        head: dai_head::Head,
        version: i64,
    ) -> Result<(), InferError> {
        let model = self.model(name)?;
        let slot = model
            .head
            .as_ref()
            .ok_or_else(|| InferError::BadInput(format!("model {name} has no trainable head")))?;
        let current = slot.load();
        if current.head.spec != head.spec {
            return Err(InferError::BadInput(format!(
                "head for {name} has a different architecture"
            )));
        }
        slot.store(Arc::new(crate::model::HeadState { head, version }));
        if let Some(c) = &self.cache {
            c.lock().invalidate_model(name);
        }
        Ok(())
    }

    /// Stop the workers after they finish what is queued.
    pub fn shutdown(self) {
        self.pool.shutdown();
    }
}
