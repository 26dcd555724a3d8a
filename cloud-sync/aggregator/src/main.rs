//! `dai-cloud` binary: keygen, run the aggregator (embedded broker by
//! default), list the version registry.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use dai_cloud::monitor::Monitor;
use dai_cloud::service::{BrokerAddr, ServiceConfig, run_monitored, start_embedded_broker};
use dai_cloud::state::{Settings, State, Strategy};
use dai_cloud::{Aggregation, Robust};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "dai-cloud", version, about = "DAI federated aggregator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Write a new ed25519 key pair: DIR/aggregator.key (secret, hex) and DIR/aggregator.pub.
    Keygen {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Run the aggregator.
    Run {
        #[arg(long, default_value = "default")]
        fleet: String,
        /// Start an embedded MQTT broker listening here (unless --broker is given).
        #[arg(long, default_value = "127.0.0.1:1883")]
        listen: String,
        /// Use an external broker (host:port) instead of the embedded one.
        #[arg(long)]
        broker: Option<String>,
        #[arg(long, default_value = "dai-cloud.sqlite")]
        state: PathBuf,
        /// Secret key file written by `dai-cloud keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Models to aggregate: NAME=PATH/head.safetensors (the base, version 0).
        #[arg(long = "model", required = true)]
        models: Vec<String>,
        /// fedavg (synchronous rounds) or fedbuff (buffered asynchronous).
        #[arg(long, default_value = "fedavg")]
        strategy: String,
        /// FedAvg: updates per round; FedBuff: K.
        #[arg(long, default_value_t = 3)]
        min_updates: usize,
        #[arg(long, default_value_t = 60)]
        round_timeout_sec: u64,
        #[arg(long, default_value_t = 5)]
        max_staleness: u64,
        /// Reject updates whose L2 norm exceeds this.
        #[arg(long, default_value_t = 100.0)]
        reject_norm: f64,
        /// Clip each update to this L2 norm before averaging.
        #[arg(long)]
        clip_norm: Option<f64>,
        /// mean | median | trimmed:FRACTION
        #[arg(long, default_value = "mean")]
        robust: String,
        /// Server optimiser: none (add the aggregated delta) or fedadam.
        #[arg(long, default_value = "none")]
        server_opt: String,
        /// FedAdam server learning rate.
        #[arg(long, default_value_t = 0.01)]
        server_lr: f32,
        /// FedAdam adaptivity (tau).
        #[arg(long, default_value_t = 1e-3)]
        server_tau: f32,
        /// Serve the status page, /api/status and /metrics here.
        #[arg(long, default_value = "127.0.0.1:8090")]
        http: String,
    },
    /// The version registry: list, promote a version, roll back.
    Models {
        #[arg(long, default_value = "dai-cloud.sqlite", global = true)]
        state: PathBuf,
        #[command(subcommand)]
        action: Option<ModelsAction>,
    },
}

#[derive(Subcommand, Debug)]
enum ModelsAction {
    /// Every version of every model (the default).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the weights of VERSION again, as a new version (a running
    /// aggregator on the same state file publishes it within a second).
    Promote {
        model: String,
        version: u64,
        #[arg(long, default_value = "promoted by an operator")]
        reason: String,
    },
    /// Undo the newest version of MODEL: serve its parent's weights again.
    Rollback { model: String },
}

fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    // rumqttd logs every connect and disconnect at info: keep it to warnings.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DAI_LOG")
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Keygen { dir } => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let key = ed25519_dalek::SigningKey::from_bytes(&secret);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let sk = dir.join("aggregator.key");
            std::fs::write(&sk, hex::encode(key.to_bytes()))
                .with_context(|| format!("writing {}", sk.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&sk, std::fs::Permissions::from_mode(0o600))?;
            }
            let pk = dir.join("aggregator.pub");
            std::fs::write(&pk, hex::encode(key.verifying_key().to_bytes()))?;
            println!(
                "wrote {} (secret) and {} (give this to the edges)",
                sk.display(),
                pk.display()
            );
            Ok(())
        }
        Command::Models { state, action } => {
            if !state.is_file() {
                bail!(
                    "{}: no such state file (pass --state, the file `dai-cloud run` writes)",
                    state.display()
                );
            }
            let mut s =
                State::open(&state).with_context(|| format!("opening {}", state.display()))?;
            match action.unwrap_or(ModelsAction::List { json: false }) {
                ModelsAction::List { json: true } => {
                    println!("{}", serde_json::to_string_pretty(&s.versions()?)?);
                }
                ModelsAction::List { json: false } => {
                    println!(
                        "{:<16} {:>8} {:>8} {:>20} {:>8} {:>8} {:>9}  note",
                        "model", "version", "parent", "created (UTC)", "updates", "samples", "loss"
                    );
                    for v in s.versions()? {
                        let m = &v.metrics;
                        let note = match m.get("promoted_from") {
                            Some(from) => format!(
                                "weights of v{from}: {}",
                                m["reason"].as_str().unwrap_or("")
                            ),
                            None if v.parent.is_none() => "base".into(),
                            None => String::new(),
                        };
                        println!(
                            "{:<16} {:>8} {:>8} {:>20} {:>8} {:>8} {:>9}  {note}",
                            v.model,
                            v.version,
                            v.parent.map_or("-".into(), |p| p.to_string()),
                            utc(v.created_at),
                            v.contributors.len(),
                            m.get("samples").map_or("-".into(), |x| x.to_string()),
                            m.get("mean_loss")
                                .and_then(|x| x.as_f64())
                                .map_or("-".into(), |x| format!("{x:.4}")),
                        );
                    }
                }
                ModelsAction::Promote {
                    model,
                    version,
                    reason,
                } => {
                    let g = s.promote(&model, version, &reason)?;
                    println!(
                        "{model}: version {} now carries the weights of version {version} (parent {})",
                        g.version, g.parent
                    );
                }
                ModelsAction::Rollback { model } => {
                    let g = s.rollback(&model)?;
                    println!(
                        "{model}: rolled back; version {} carries the weights of version {}",
                        g.version, g.metrics["promoted_from"]
                    );
                }
            }
            Ok(())
        }
        Command::Run {
            fleet,
            listen,
            broker,
            state,
            key,
            models,
            strategy,
            min_updates,
            round_timeout_sec,
            max_staleness,
            reject_norm,
            clip_norm,
            robust,
            server_opt,
            server_lr,
            server_tau,
            http,
        } => {
            let secret = std::fs::read_to_string(&key)
                .with_context(|| format!("reading {}", key.display()))?;
            let signing_key =
                dai_protocol::global::signing_key_from_hex(&secret).context("the key file")?;
            let mut heads = Vec::new();
            for m in &models {
                let Some((name, path)) = m.split_once('=') else {
                    bail!("--model {m:?}: expected NAME=PATH")
                };
                let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
                dai_train::Head::from_bytes(&bytes)
                    .with_context(|| format!("{path} is not a head file"))?;
                heads.push((name.to_string(), bytes));
            }
            let strategy = match strategy.as_str() {
                "fedavg" => Strategy::FedAvg { min_updates },
                "fedbuff" => Strategy::FedBuff { k: min_updates },
                other => bail!("--strategy {other:?}: expected fedavg or fedbuff"),
            };
            let robust = match robust.as_str() {
                "mean" => Robust::Mean,
                "median" => Robust::Median,
                t => match t
                    .strip_prefix("trimmed:")
                    .and_then(|f| f.parse::<f64>().ok())
                {
                    Some(fraction) if (0.0..0.5).contains(&fraction) => {
                        Robust::TrimmedMean { fraction }
                    }
                    _ => bail!(
                        "--robust {t:?}: expected mean, median or trimmed:FRACTION with FRACTION in [0, 0.5)"
                    ),
                },
            };
            let server_optimizer = match server_opt.as_str() {
                "none" => None,
                "fedadam" => {
                    let positive = |x: f32| x.is_finite() && x > 0.0;
                    if !positive(server_lr) || !positive(server_tau) {
                        bail!("--server-lr and --server-tau must be positive");
                    }
                    Some(dai_cloud::FedAdam::new(server_lr, 0.9, 0.99, server_tau))
                }
                other => bail!("--server-opt {other:?}: expected none or fedadam"),
            };
            let http: std::net::SocketAddr = http.parse().context("--http: expected ip:port")?;
            let (host, port) = match &broker {
                Some(b) => {
                    let (h, p) = b.rsplit_once(':').context("--broker: expected host:port")?;
                    (h.to_string(), p.parse::<u16>().context("--broker port")?)
                }
                None => {
                    let addr: std::net::SocketAddr =
                        listen.parse().context("--listen: expected ip:port")?;
                    start_embedded_broker(addr)?;
                    tracing::info!(%addr, "embedded MQTT broker started");
                    (addr.ip().to_string(), addr.port())
                }
            };
            let cfg = ServiceConfig {
                fleet,
                broker: BrokerAddr { host, port },
                client_id: "dai-cloud".into(),
                state_path: state,
                models: heads,
                settings: Settings {
                    strategy,
                    aggregation: Aggregation { clip_norm, robust },
                    max_staleness,
                    reject_norm,
                },
                round_timeout: Duration::from_secs(round_timeout_sec),
                signing_key,
                server_optimizer,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let stats = rt.block_on(async move {
                let monitor = std::sync::Arc::new(Monitor::new());
                let listener = tokio::net::TcpListener::bind(http)
                    .await
                    .with_context(|| format!("--http: binding {http}"))?;
                tracing::info!(
                    "status page on http://{}",
                    listener.local_addr().unwrap_or(http)
                );
                let app = dai_cloud::http::router(
                    monitor.clone(),
                    cfg.state_path.clone(),
                    cfg.fleet.clone(),
                );
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "HTTP server stopped");
                    }
                });
                anyhow::Ok(run_monitored(cfg, monitor, shutdown_signal()).await?)
            })?;
            tracing::info!(?stats, "dai-cloud stopped");
            Ok(())
        }
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `2026-11-27 04:28:00` from Unix seconds (UTC, no time-zone database).
fn utc(ts: f64) -> String {
    let secs = ts.max(0.0) as i64;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
