//! `dai-edge`: the edge daemon, as a library the binary and the tests share.
//!
//! Layout:
//! - [`Daemon::build`] validates nothing (the config is already typed), opens
//!   the SQLite store, fetches missing zoo models, loads every bundle into the
//!   [`dai_infer::Runtime`] (a broken bundle is recorded and skipped), and
//!   returns a daemon ready to serve;
//! - [`Daemon::serve`] runs the HTTP API ([`http`]) on a given listener until
//!   the shutdown future resolves, then drains in-flight requests for at most
//!   `shutdown_grace_sec`, and stops the background tasks: hot reload,
//!   resource manager ([`resources`]), profiling samples, store snapshots;
//! - [`metrics`] holds the Prometheus families and the rolling figures.
//!
//! Tests bind `127.0.0.1:0` and run the daemon in-process through these two calls.

pub mod http;
pub mod metrics;
pub mod resources;
pub mod sensors;
pub mod training;
pub mod uplink;

use dai_config::Config;
use dai_infer::{LoadEvent, Runtime};
use dai_store::Store;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Errors that stop the daemon from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("opening the store: {0}")]
    Store(#[from] dai_store::StoreError),
    #[error("models_dir {path}: {source}")]
    ModelsDir {
        path: PathBuf,
        #[source]
        source: dai_infer::BundleError,
    },
    #[error("configured model {name:?} has no bundle in {dir}")]
    MissingBundle { name: String, dir: PathBuf },
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The whole daemon process: build, bind `daemon.listen_addr`, serve until
/// SIGINT or SIGTERM, drain. The `dai-edge` binary is this call; the fleet
/// demo runs it in each of its edge processes.
pub fn run_until_signal(config: Config) -> Result<(), DaemonError> {
    // Inference runs on our own worker threads; the async side only parses
    // HTTP and waits, so it gets at most two threads within cpu_limit.
    let async_threads = (config.cpu_limit.floor() as usize).clamp(1, 2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(async_threads)
        .max_blocking_threads(4)
        .enable_all()
        .thread_name("dai-edge")
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(async move {
        let addr = config.daemon.listen_addr;
        let daemon = Daemon::build(config).await?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Bind { addr, source })?;
        tracing::info!(
            "dai-edge listening on http://{}",
            listener.local_addr().unwrap_or(addr)
        );
        daemon.serve(listener, shutdown_signal()).await?;
        tracing::info!("dai-edge stopped");
        Ok(())
    })
}

/// SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The latest profiling sample.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProfileSample {
    pub ts: Option<f64>,
    pub models: BTreeMap<String, BTreeMap<&'static str, f64>>,
}

/// Everything handlers and tasks share.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub runtime: Runtime,
    pub store: Store,
    pub metrics: metrics::Metrics,
    pub stats: metrics::ModelStats,
    pub decisions: resources::DecisionLog,
    pub sample: Mutex<resources::Sample>,
    pub alerts: Mutex<Vec<resources::Alert>>,
    pub profile: Mutex<ProfileSample>,
    pub started: Instant,
    pub shutting_down: AtomicBool,
    pub request_seq: AtomicU64,
    pub boot_id: u64,
    pub device: String,
    pub listen: Mutex<Option<std::net::SocketAddr>>,
    pub training: training::TrainingState,
    pub sensors: sensors::SensorsState,
}

/// A built daemon, ready to serve.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub state: Arc<AppState>,
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn bundle_dirs(config: &Config) -> Result<Vec<PathBuf>, DaemonError> {
    let dir = &config.daemon.models_dir;
    if config.daemon.models.is_empty() {
        return dai_infer::bundle::discover(dir).map_err(|source| DaemonError::ModelsDir {
            path: dir.clone(),
            source,
        });
    }
    config
        .daemon
        .models
        .iter()
        .map(|name| {
            let d = dir.join(name);
            if d.join("manifest.toml").is_file() {
                Ok(d)
            } else {
                Err(DaemonError::MissingBundle {
                    name: name.clone(),
                    dir: dir.clone(),
                })
            }
        })
        .collect()
}

impl Daemon {
    /// Open the store and load the models. Blocking work runs on tokio's
    /// blocking pool.
    pub async fn build(config: Config) -> Result<Daemon, DaemonError> {
        let store = Store::open_in(&config.daemon.data_dir)?;
        let dirs = bundle_dirs(&config)?;
        let runtime = Runtime::new(&config);
        let metrics = metrics::Metrics::new();
        metrics.max_workers.set(runtime.pool().max_workers() as i64);
        metrics
            .queue_capacity
            .set(runtime.pool().queue_capacity() as i64);
        let device = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "dai-edge".into());
        let state = Arc::new(AppState {
            runtime,
            store,
            metrics,
            stats: Default::default(),
            decisions: Default::default(),
            sample: Default::default(),
            alerts: Default::default(),
            profile: Default::default(),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            request_seq: AtomicU64::new(0),
            boot_id: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            device,
            listen: Mutex::new(None),
            training: Default::default(),
            sensors: Default::default(),
            config,
        });
        let st = state.clone();
        let load = tokio::task::spawn_blocking(move || {
            for dir in &dirs {
                if st.config.daemon.fetch_missing_models
                    && let Err(e) = dai_infer::fetch::ensure_model(
                        dir,
                        &dai_infer::fetch::default_wheel_cache(),
                    )
                {
                    tracing::error!(bundle = %dir.display(), error = %e, "cannot fetch model file");
                }
                let event = st.runtime.load_bundle(dir);
                record_load(&st, &event);
            }
        });
        if let Err(e) = load.await {
            tracing::error!(error = %e, "model loading task failed");
        }
        refresh_model_info(&state);
        let st = state.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || training::restore_heads(&st)).await {
            tracing::error!(error = %e, "restoring trained heads failed");
        }
        Ok(Daemon { state })
    }

    /// Serve on `listener` until `shutdown` resolves, then drain.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), DaemonError> {
        let state = self.state.clone();
        *state.listen.lock() = listener.local_addr().ok();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = vec![
            tokio::spawn(hot_reload_task(state.clone(), stop_rx.clone())),
            tokio::spawn(resource_task(state.clone(), stop_rx.clone())),
            tokio::spawn(snapshot_task(state.clone(), stop_rx.clone())),
            tokio::spawn(training::scheduler_task(state.clone(), stop_rx.clone())),
        ];
        tasks.extend(uplink::spawn(&state, stop_rx.clone()));
        tasks.extend(sensors::spawn(&state, stop_rx.clone()));
        let grace = Duration::from_secs(state.config.daemon.shutdown_grace_sec);
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let signal = async move {
            shutdown.await;
            st.shutting_down.store(true, Ordering::SeqCst);
            tracing::info!("shutting down: draining in-flight requests");
            let _ = drain_tx.send(());
        };
        let app = http::router(state.clone());
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(signal);
        let result = tokio::select! {
            r = server => r.map_err(DaemonError::Serve),
            _ = async {
                let _ = drain_rx.await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(grace_sec = grace.as_secs(), "grace period over; dropping remaining requests");
                Ok(())
            }
        };
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        if let Err(e) = state
            .store
            .insert_snapshot(&http::snapshot(&state), SNAPSHOTS_KEPT)
        {
            tracing::warn!(error = %e, "final metrics snapshot not stored");
        }
        result
    }
}

const SNAPSHOTS_KEPT: usize = 10_000;

fn record_load(state: &AppState, event: &LoadEvent) {
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
                state
                    .store
                    .record_model_loaded(name, version, sha256, &dir.display().to_string())
            {
                tracing::warn!(error = %e, "model load not recorded in the store");
            }
        }
        LoadEvent::Failed { name, dir, error } => {
            tracing::error!(model = %name, bundle = %dir.display(), %error, "model refused");
            if let Err(e) = state.store.record_model_failed(name, error) {
                tracing::warn!(error = %e, "model failure not recorded in the store");
            }
        }
    }
}

fn refresh_model_info(state: &AppState) {
    state.metrics.model_info.clear();
    for m in state.runtime.models() {
        let (version, st) = match &m.model {
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
        state
            .metrics
            .model_info
            .get_or_create(&metrics::ModelVersion {
                model: m.name.clone(),
                version,
                state: st.into(),
            })
            .set(1);
    }
}

async fn ticker(period: Duration, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => true,
        _ = stop.changed() => false,
    }
}

async fn hot_reload_task(state: Arc<AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let secs = state.config.daemon.hot_reload_interval_sec;
    if secs == 0 {
        return;
    }
    while ticker(Duration::from_secs(secs), &mut stop).await {
        let st = state.clone();
        let changed = tokio::task::spawn_blocking(move || {
            let events = st.runtime.reload_changed();
            for e in &events {
                record_load(&st, e);
                // A reloaded bundle starts from its shipped head: serve the
                // store's active trained head for that version again.
                if let LoadEvent::Loaded { name, .. } = e {
                    training::restore_head(&st, name);
                }
            }
            !events.is_empty()
        })
        .await
        .unwrap_or(false);
        if changed {
            refresh_model_info(&state);
        }
    }
}

async fn resource_task(state: Arc<AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut sampler = resources::Sampler::new();
    let period = Duration::from_secs(state.config.daemon.resource_interval_sec);
    let profile_period = Duration::from_secs(state.config.profiling_interval_sec);
    let mut last_profile = Instant::now();
    // First CPU reading needs a baseline.
    sampler.sample();
    loop {
        let s = sampler.sample();
        *state.sample.lock() = s;
        let m = &state.metrics;
        if let Some(v) = s.cpu_percent {
            m.cpu_percent.set(v);
        }
        if let Some(v) = s.process_cpu_percent {
            m.process_cpu_percent.set(v);
        }
        if let Some(v) = s.memory_used_mb {
            m.memory_used_bytes.set((v * 1048576.0) as i64);
        }
        if let Some(v) = s.memory_total_mb {
            m.memory_total_bytes.set((v * 1048576.0) as i64);
        }
        if let Some(v) = s.rss_mb {
            m.rss_bytes.set((v * 1048576.0) as i64);
        }
        let pool = state.runtime.pool();
        let obs = resources::Observation {
            sample: s,
            queue_depth: pool.queue_depth(),
            active_workers: pool.active(),
            max_workers: pool.max_workers(),
            batch_size: pool.batch_size(),
            max_batch_size: state.config.batch_size,
            p95_ms: state.stats.overall_p95(),
            latency_threshold_ms: state.config.latency_threshold_ms,
        };
        let plan = resources::decide(&obs);
        if let Some(n) = plan.workers {
            pool.set_active(n);
        }
        if let Some(n) = plan.batch_size {
            pool.set_batch_size(n);
        }
        for r in plan.reasons {
            state.decisions.push(r);
        }
        *state.alerts.lock() = http::alerts(&state);
        if state.config.profiling_enabled && last_profile.elapsed() >= profile_period {
            last_profile = Instant::now();
            let models = state.stats.take_stage_sample();
            for (model, stages) in &models {
                for (stage, ms) in stages {
                    m.profile_stage_seconds
                        .get_or_create(&metrics::ModelStage {
                            model: model.clone(),
                            stage: stage.to_string(),
                        })
                        .set(ms / 1e3);
                }
            }
            let mut p = state.profile.lock();
            p.ts = Some(unix_now());
            if !models.is_empty() {
                p.models = models;
            }
        }
        if !ticker(period.min(profile_period), &mut stop).await {
            break;
        }
    }
}

async fn snapshot_task(state: Arc<AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let period = Duration::from_secs(state.config.daemon.snapshot_interval_sec);
    while ticker(period, &mut stop).await {
        let st = state.clone();
        let r = tokio::task::spawn_blocking(move || {
            st.store
                .insert_snapshot(&http::snapshot(&st), SNAPSHOTS_KEPT)
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "metrics snapshot not stored");
        }
    }
}
