//! `dai-edge`: the edge daemon, as a library the binary and the tests share.
//!
//! Layout: the daemon is a few handles, each given only to the parts that
//! use it, so no part reaches into another through a shared god object.
//! - [`handles`]: the shared pieces: [`Inference`](handles::Inference)
//!   (the model runtime, Prometheus families, rolling figures),
//!   [`StoreHandle`](handles::StoreHandle) (SQLite),
//!   [`ShutdownFlag`](handles::ShutdownFlag);
//! - [`training`]: [`Training`](training::Training) (Inference, store,
//!   shutdown flag, feedback cache): samples, runs, the scheduler;
//! - [`sensors`]: [`Sensors`](sensors::Sensors) (Inference, Training, the
//!   live views, the uplink's [`EventQueue`](sensors::EventQueue));
//! - [`uplink`]: [`Uplink`](uplink::Uplink) (Inference, store, event
//!   queue, cloud settings), the daemon side of `dai_sync`;
//! - [`resources`]: the resource manager's rules (pure functions) and
//!   [`Machine`](resources::Machine), what it last saw and did;
//! - [`http`]: the API and status page; its [`App`](http::App) composes
//!   all of the above; [`http::codec`] holds the tensor body codec;
//! - [`tasks`]: every background task (hot reload, resource manager,
//!   profiling, snapshots, training scheduler, sensors, uplink);
//! - [`metrics`]: the Prometheus families and the rolling figures;
//!   [`error`]: [`DaemonError`] and the error chain printer.
//!
//! [`Daemon::build`] validates nothing (the config is already typed), opens
//! the store, fetches missing zoo models, loads every bundle into the
//! runtime (a broken bundle is recorded and skipped), restores trained
//! heads, and returns a daemon ready to serve. [`Daemon::serve`] starts
//! [`tasks`], runs the HTTP API on a given listener until the shutdown
//! future resolves, drains in-flight requests for at most
//! `shutdown_grace_sec`, stops the tasks and stores a last snapshot.
//! [`run_until_signal`] is the whole process around those two calls.
//! `serve` refuses a non-loopback listener when the API has no token and
//! `http.allow_unauthenticated` is off (see [`http::auth`]).
//!
//! Tests bind `127.0.0.1:0` and run the daemon in-process through
//! `build` and `serve`.

pub mod error;
pub mod handles;
pub mod http;
pub mod install;
pub mod metrics;
pub mod resources;
pub mod sensors;
pub mod tasks;
pub mod training;
pub mod uplink;

pub use error::DaemonError;
pub use resources::ProfileSample;

use dai_config::Config;
use dai_infer::Runtime;
use dai_store::Store;
use handles::{Inference, ShutdownFlag, StoreHandle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// A built daemon, ready to serve.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Everything the handlers share; tests read the store through it.
    pub app: Arc<http::App>,
    uplink: uplink::Uplink,
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "dai-edge".into())
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
        // A corrupt store file is moved aside and a fresh one started, so
        // inference keeps serving; the status page and /metrics say so.
        let (store, store_quarantine) = Store::open_or_quarantine(&config.daemon.data_dir)?;
        let store = StoreHandle::new(store);
        let dirs = bundle_dirs(&config)?;
        let inference = Inference::new(Runtime::new(&config.runtime_options()));
        let host = host_name();
        // The device's name towards the aggregator: topics and update ids.
        // A bundle's certificate names it; otherwise `cloud.device_id` or
        // the host name.
        let device = if !config.cloud.device_id.is_empty() {
            config.cloud.device_id.clone()
        } else if let Some(name) = uplink::bundle_device(&config) {
            name
        } else {
            host.clone()
        };
        let boot_id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let config = Arc::new(config);
        let shutdown = ShutdownFlag::default();
        let training = training::Training::new(
            config.clone(),
            inference.clone(),
            store.clone(),
            device.clone(),
            shutdown.clone(),
        );
        let sensors = sensors::Sensors::new(
            config.sensors.clone(),
            config.cloud.enabled,
            boot_id,
            inference.clone(),
            training.clone(),
        );
        let installer = Arc::new(install::Installer::new(
            &config.daemon.data_dir,
            config.daemon.max_upload_mb * 1024 * 1024,
        ));
        installer.clean_incoming();
        let downloads = install::download::Downloads::new(
            installer.clone(),
            inference.clone(),
            store.clone(),
            training.clone(),
        );
        let uplink = uplink::Uplink::new(
            config.clone(),
            host.clone(),
            device,
            inference.clone(),
            store.clone(),
            sensors.events(),
            downloads,
        );
        // Installed bundles load after the shipped ones, so an installed
        // version replaces its namesake.
        let mut dirs = dirs;
        dirs.extend(installer.bundle_dirs());
        load_bundles(&config, dirs, &inference, &store).await;
        inference.refresh_model_info();
        let tr = training.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || tr.restore_heads()).await {
            tracing::error!(error = %e, "restoring trained heads failed");
        }
        let heavy = Arc::new(tokio::sync::Semaphore::new(
            config.daemon.max_concurrent_bodies,
        ));
        inference
            .metrics
            .store_quarantined_files
            .set(dai_store::quarantine::quarantined(&config.daemon.data_dir).len() as i64);
        let app = Arc::new(http::App {
            heavy,
            installer,
            store_quarantine,
            config,
            inference,
            store,
            training,
            sensors,
            machine: Arc::default(),
            shutdown,
            device: host,
            boot_id,
            started: std::time::Instant::now(),
            listen: parking_lot::Mutex::new(None),
            request_seq: Default::default(),
        });
        Ok(Daemon { app, uplink })
    }

    /// Serve on `listener` until `shutdown` resolves, then drain.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), DaemonError> {
        let app = self.app;
        let addr = listener.local_addr().ok();
        if let Some(addr) = addr
            && http::auth::refused(&app.config.http, addr)
        {
            return Err(DaemonError::Unauthenticated { addr });
        }
        http::auth::log_at_start(&app.config.http, addr);
        *app.listen.lock() = addr;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let tasks = tasks::spawn_all(&app, self.uplink, &stop_rx);
        let grace = Duration::from_secs(app.config.daemon.shutdown_grace_sec);
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
        let flag = app.shutdown.clone();
        let signal = async move {
            shutdown.await;
            flag.set();
            tracing::info!("shutting down: draining in-flight requests");
            let _ = drain_tx.send(());
        };
        let server = axum::serve(
            listener,
            http::router(app.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>(),
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
        if let Err(e) = tasks::store_snapshot(&app) {
            tracing::warn!(error = %error::chain(&e), "final metrics snapshot not stored");
        }
        result
    }
}

/// Fetch (when configured) and load every bundle; a failure is recorded
/// in the store and the daemon goes on without that model.
async fn load_bundles(
    config: &Config,
    dirs: Vec<PathBuf>,
    inference: &Inference,
    store: &StoreHandle,
) {
    let fetch = config.daemon.fetch_missing_models;
    let (inference, store) = (inference.clone(), store.clone());
    let load = tokio::task::spawn_blocking(move || {
        for dir in &dirs {
            if fetch
                && let Err(e) =
                    dai_infer::fetch::ensure_model(dir, &dai_infer::fetch::default_wheel_cache())
            {
                tracing::error!(bundle = %dir.display(), error = %error::chain(&e), "cannot fetch model file");
            }
            store.record_load(&inference.runtime.load_bundle(dir));
        }
    });
    if let Err(e) = load.await {
        tracing::error!(error = %e, "model loading task failed");
    }
}
