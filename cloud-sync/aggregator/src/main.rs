//! `dai-cloud` binary: keygen, run the aggregator (embedded broker by
//! default), list the version registry.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use dai_cloud::service::{BrokerAddr, ServiceConfig, run, start_embedded_broker};
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
    },
    /// The version registry.
    Models {
        #[arg(long, default_value = "dai-cloud.sqlite")]
        state: PathBuf,
    },
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
        Command::Models { state } => {
            let s = State::open(&state).with_context(|| format!("opening {}", state.display()))?;
            println!(
                "{:<16} {:>8} {:>8} {:>13}  contributors",
                "model", "version", "parent", "created_at"
            );
            for (model, version, parent, contributors, created) in s.versions()? {
                println!(
                    "{model:<16} {version:>8} {:>8} {created:>13.0}  {}",
                    parent.map_or("-".into(), |p| p.to_string()),
                    contributors.len()
                );
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
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let stats = rt.block_on(run(cfg, shutdown_signal()))?;
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
