//! The demo's cloud side, in this process: a fleet CA in the working
//! directory (`fleet/`, as `dai-cloud fleet init` makes it) with every
//! federated device enrolled (its bundle in `{name}/bundle`), the embedded
//! MQTT broker behind its mutual-TLS gate, the aggregator service (FedAvg
//! over every federated device, signed updates only) and its status page;
//! and the fresh bundle the fleet starts from.

use super::{Options, any_port, free_port};
use anyhow::{Context, bail};
use dai_cloud::Aggregation;
use dai_cloud::auth::DeviceAuth;
use dai_cloud::monitor::Monitor;
use dai_cloud::secure::SecureFleet;
use dai_cloud::service::{ServiceConfig, run_monitored};
use dai_cloud::state::{Settings, Strategy};
use dai_trust::fs::FleetDir;
use dai_trust::{DeviceName, FleetName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The running aggregator and what the driver reads from it.
pub(super) struct Cloud {
    /// The gate of the embedded broker (mutual TLS) on loopback.
    pub(super) broker_port: u16,
    /// The fleet directory (CA, aggregator identity, registry).
    pub(super) fleet_dir: std::path::PathBuf,
    pub(super) monitor: Arc<Monitor>,
    /// Its status page URL.
    pub(super) page: String,
    http_task: tokio::task::JoinHandle<()>,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    aggregator: tokio::task::JoinHandle<
        Result<dai_cloud::service::ServiceStats, dai_cloud::service::ServiceError>,
    >,
}

impl Cloud {
    /// `devices`: the federated device names to enrol; each bundle goes to
    /// `dir/{name}/bundle`.
    pub(super) async fn start(
        opts: &Options,
        dir: &Path,
        base: Vec<u8>,
        devices: &[String],
    ) -> anyhow::Result<Cloud> {
        let fleet_dir = dir.join("fleet");
        let secure = enrol(&fleet_dir, dir, devices)?;
        let broker_port = any_port()?;
        let (upstream, _) = secure
            .start_broker(SocketAddr::from(([127, 0, 0, 1], broker_port)))
            .await
            .context("starting the embedded broker")?;
        let monitor = Arc::new(Monitor::new());
        let state_path = dir.join("dai-cloud.sqlite");
        let listener = free_port(opts.http)?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let page = format!("http://{}/", listener.local_addr()?);
        let app = dai_cloud::http::router(monitor.clone(), state_path.clone(), "demo".into());
        let http_task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut config = ServiceConfig {
            fleet: "demo".into(),
            broker: upstream,
            // Unique per process, as `dai-cloud run` makes it.
            client_id: format!("dai-cloud-demo-{}", std::process::id()),
            state_path,
            models: vec![("digits".into(), base)],
            settings: Settings {
                strategy: Strategy::FedAvg {
                    min_updates: opts.devices,
                },
                // The robust defaults `dai-cloud run` has.
                aggregation: Aggregation::default(),
                max_staleness: 3,
                reject_norm: 1e4,
                sample_cap: dai_cloud::state::SampleCap::Equal,
                max_updates_per_minute: dai_cloud::state::DEFAULT_MAX_UPDATES_PER_MINUTE,
                dp: None,
                validation: None,
            },
            round_timeout: opts.round_timeout,
            signing_key: secure.identity.aggregator.signing_key().clone(),
            server_optimizer: None,
            devices: DeviceAuth::Unchecked,
            fleet_dir: None,
            tls: None,
            tiers: Vec::new(),
            upstream: None,
            share_group: None,
        };
        // Signed updates from enrolled devices only; the registry is followed.
        secure.apply(&mut config);
        let aggregator = tokio::spawn(run_monitored(config, monitor.clone(), async move {
            let _ = stop_rx.await;
        }));
        Ok(Cloud {
            broker_port,
            fleet_dir,
            monitor,
            page,
            http_task,
            stop_tx,
            aggregator,
        })
    }

    pub(super) async fn stop(self) {
        let _ = self.stop_tx.send(());
        match tokio::time::timeout(Duration::from_secs(5), self.aggregator).await {
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %dai_cloud::error_chain(&e), "aggregator stopped with an error")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "aggregator task failed"),
            _ => {}
        }
        self.http_task.abort();
    }
}

/// A new fleet `demo` in `fleet_dir` (replacing an old one: a rerun in the
/// same directory starts over), a broker certificate for loopback, and a
/// bundle for each device in `dir/{name}/bundle`.
fn enrol(fleet_dir: &Path, dir: &Path, devices: &[String]) -> anyhow::Result<SecureFleet> {
    let now = std::time::SystemTime::now();
    let fd = FleetDir::new(fleet_dir);
    let fleet = fd
        .init(FleetName::parse("demo")?, now, true)
        .with_context(|| format!("creating the demo fleet in {}", fleet_dir.display()))?;
    let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
    FleetDir::issue_broker(&fleet.ca, &hosts, now, fleet_dir)?;
    for name in devices {
        let out = dir.join(name).join("bundle");
        if out.exists() {
            std::fs::remove_dir_all(&out)
                .with_context(|| format!("removing the old bundle {}", out.display()))?;
        }
        fd.enroll(&DeviceName::parse(name)?, &out, 30, now)
            .with_context(|| format!("enrolling {name}"))?;
    }
    Ok(SecureFleet::open(fleet_dir)?)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Copy the digits bundle into `dir/models/digits` with a freshly
/// initialised head; returns that head file (the aggregator's version 0).
pub(super) fn fresh_bundle(bundle: &Path, dir: &Path, seed: u64) -> anyhow::Result<Vec<u8>> {
    let out = dir.join("models/digits");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let manifest_path = bundle.join("manifest.toml");
    let manifest = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let shipped_path = bundle.join("head.safetensors");
    let shipped = std::fs::read(&shipped_path)
        .with_context(|| format!("reading {}", shipped_path.display()))?;
    let (head, meta) = dai_train::Head::from_bytes(&shipped)
        .with_context(|| format!("{} is not a head file", shipped_path.display()))?;
    let fresh = dai_train::Head::init(head.spec.clone(), seed);
    let bytes = fresh.to_bytes(&meta)?;
    let old = sha256_hex(&shipped);
    if !manifest.contains(&old) {
        bail!(
            "{}: the [head] sha256 does not match head.safetensors",
            manifest_path.display()
        );
    }
    std::fs::write(
        out.join("manifest.toml"),
        manifest.replace(&old, &sha256_hex(&bytes)),
    )?;
    std::fs::write(out.join("head.safetensors"), &bytes)?;
    std::fs::copy(bundle.join("backbone.onnx"), out.join("backbone.onnx"))
        .context("copying backbone.onnx")?;
    // The bundle's validation rows ([head.validation]) travel with it.
    let rows = bundle.join("validation.safetensors");
    if rows.exists() {
        std::fs::copy(&rows, out.join("validation.safetensors"))
            .context("copying validation.safetensors")?;
    }
    Ok(bytes)
}
