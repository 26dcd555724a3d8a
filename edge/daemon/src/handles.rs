//! The small shared handles the daemon's parts are built from.
//!
//! Each part gets only the handles it uses (see the crate doc for who gets
//! which): [`Inference`] (the runtime and what serving it records),
//! [`StoreHandle`] (the SQLite store) and [`ShutdownFlag`]. All are cheap
//! to clone; clones share the same state.

use crate::metrics::{self, Metrics, ModelStats};
use dai_infer::{LoadEvent, Runtime};
use dai_store::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The model runtime, the Prometheus families and the rolling per-model
/// figures: what every path that runs a model needs.
#[derive(Debug, Clone)]
pub struct Inference {
    pub runtime: Arc<Runtime>,
    pub metrics: Arc<Metrics>,
    pub stats: Arc<ModelStats>,
}

impl Inference {
    pub fn new(runtime: Runtime) -> Inference {
        let metrics = Metrics::new();
        metrics.max_workers.set(runtime.pool().max_workers() as i64);
        metrics
            .queue_capacity
            .set(runtime.pool().queue_capacity() as i64);
        Inference {
            runtime: Arc::new(runtime),
            metrics: Arc::new(metrics),
            stats: Arc::default(),
        }
    }

    /// Rewrite `dai_edge_model_info` from the registry (after loads).
    pub fn refresh_model_info(&self) {
        self.metrics.model_info.clear();
        for m in self.runtime.models() {
            let (version, state) = match &m.model {
                Some(lm) => (
                    lm.version().to_string(),
                    if m.error.is_some() {
                        "reload_failed"
                    } else {
                        "ready"
                    },
                ),
                None => (String::new(), "failed"),
            };
            self.metrics
                .model_info
                .get_or_create(&metrics::ModelVersion {
                    model: m.name.clone(),
                    version,
                    state: state.into(),
                })
                .set(1);
        }
    }
}

/// The SQLite store, shared; dereferences to [`Store`].
#[derive(Debug, Clone)]
pub struct StoreHandle(Arc<Store>);

impl StoreHandle {
    pub fn new(store: Store) -> StoreHandle {
        StoreHandle(Arc::new(store))
    }

    /// Record a bundle load or refusal (`models`, `model_events`).
    pub fn record_load(&self, event: &LoadEvent) {
        match event {
            LoadEvent::Loaded {
                name,
                version,
                sha256,
                dir,
                load_ms,
            } => {
                tracing::info!(model = %name, %version, load_ms = format!("{load_ms:.0}"), "model loaded");
                if let Err(e) =
                    self.record_model_loaded(name, version, sha256, &dir.display().to_string())
                {
                    tracing::warn!(error = %crate::error::chain(&e), "model load not recorded in the store");
                }
            }
            LoadEvent::Failed { name, dir, error } => {
                tracing::error!(model = %name, bundle = %dir.display(), %error, "model refused");
                if let Err(e) = self.record_model_failed(name, error) {
                    tracing::warn!(error = %crate::error::chain(&e), "model failure not recorded in the store");
                }
            }
        }
    }
}

impl std::ops::Deref for StoreHandle {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.0
    }
}

/// Set once shutdown starts, before in-flight requests drain: readiness
/// turns 503 and a training run stops at its next epoch.
#[derive(Debug, Clone, Default)]
pub struct ShutdownFlag(Arc<AtomicBool>);

impl ShutdownFlag {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
