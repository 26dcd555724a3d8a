//! The `dai-cloud` command line: clap definitions and one handler per
//! subcommand. `main.rs` parses, starts tracing and calls [`dispatch`];
//! handlers return `anyhow` errors with context, which `main` prints as a
//! chain.
//!
//! - `keygen`: a new ed25519 key pair for signing globals;
//! - `run`: flags -> [`ServiceConfig`] (every flag checked before anything
//!   binds), then the status page and [`run_monitored`] until SIGINT/SIGTERM;
//! - `models list|promote|rollback`: the version registry of a state file
//!   (a running aggregator on the same file publishes a new version within
//!   a second);
//! - `fleet init|broker-cert|crl`, `devices add|list|revoke`: fleet
//!   identity ([`dai_trust`]): the fleet CA, the aggregator's key and
//!   certificate, broker certificates, device bundles, the registry
//!   (`devices.json`), revocations (`revocations.json`) and the CRL
//!   (`crl.pem`) in a fleet directory.
//!
//! A [`UsageError`] (a bad name, a missing `--fleet-dir`) exits 64 like a
//! flag clap refuses; any other error exits 1.

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use dai_cloud::auth::DeviceAuth;
use dai_cloud::monitor::Monitor;
use dai_cloud::secure::SecureFleet;
use dai_cloud::service::{
    BrokerAddr, ServiceConfig, run_monitored, start_embedded_broker, start_secure_broker,
};
use dai_cloud::state::{Settings, State, Strategy};
use dai_cloud::{Aggregation, FedAdam, Robust};
use dai_trust::fs::FleetDir;
use dai_trust::{DeviceName, FleetName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A command line that cannot work as given (exit 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

#[derive(Parser, Debug)]
#[command(name = "dai-cloud", version, about = "DAI federated aggregator")]
pub struct Cli {
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
    Run(RunArgs),
    /// The version registry: list, promote a version, roll back.
    Models {
        #[arg(long, default_value = "dai-cloud.sqlite", global = true)]
        state: PathBuf,
        #[command(subcommand)]
        action: Option<ModelsAction>,
    },
    /// Fleet identity: create the fleet CA and the aggregator's identity.
    Fleet {
        #[command(subcommand)]
        action: FleetAction,
    },
    /// Enrolled devices: add one (writes its bundle), list, revoke.
    Devices {
        /// The fleet directory `dai-cloud fleet init` made.
        #[arg(long, env = "DAI_FLEET_DIR", global = true)]
        fleet_dir: Option<PathBuf>,
        #[command(subcommand)]
        action: DevicesAction,
    },
}

#[derive(Subcommand, Debug)]
enum FleetAction {
    /// Create DIR: ca.pem + ca.key.pem (the fleet CA), aggregator.key +
    /// aggregator.pub (`run --key`, the edges' aggregator key),
    /// aggregator.pem (its certificate), devices.json, revocations.json,
    /// crl.pem (the CA's revocation list, for Mosquitto).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The fleet name (the `{fleet}` of every topic).
        #[arg(long)]
        fleet: String,
        /// Replace an existing fleet (its device certificates stop verifying).
        #[arg(long)]
        force: bool,
        /// Names the embedded broker's TLS certificate (broker.pem) is
        /// valid for: the host names or IP addresses devices dial.
        #[arg(long = "broker-host", default_values_t = [String::from("localhost"), String::from("127.0.0.1")])]
        broker_hosts: Vec<String>,
    },
    /// Issue a broker TLS certificate (broker.pem, broker.key.pem) into
    /// OUT, for a broker we do not run (Mosquitto) or a new host name.
    BrokerCert {
        #[arg(long)]
        dir: PathBuf,
        /// A host name or IP address clients dial (repeat for several).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// (Re)write crl.pem in DIR, the CA's revocation list for Mosquitto's
    /// `crlfile` (for a fleet made before `fleet init` wrote one, or one
    /// about to expire: it is valid for a year).
    Crl {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum DevicesAction {
    /// Enrol NAME: a new key and certificate, written as a device bundle
    /// to OUT (device.pem, device.key.pem, ca.pem, aggregator.pub,
    /// bundle.json) and recorded in devices.json.
    Add {
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 5 * 365)]
        days: u32,
    },
    /// Every enrolled device.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Mark NAME revoked (devices.json and revocations.json).
    Revoke { name: String },
}

#[derive(Args, Debug)]
struct RunArgs {
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
    /// The fleet directory (`dai-cloud fleet init`): the CA devices must
    /// chain to, the aggregator's key and certificate, the embedded
    /// broker's certificate, and the registry of enrolled devices (re-read
    /// every second: enrolments and revocations apply at once).
    #[arg(long, env = "DAI_FLEET_DIR")]
    fleet_dir: Option<PathBuf>,
    /// Plain TCP MQTT and updates taken unsigned, as their topic names
    /// them: anyone who reaches the broker can join. Only for tests and
    /// closed networks; logs a warning.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Secret key file (`dai-cloud keygen`, or the fleet directory's
    /// aggregator.key, the default with --fleet-dir).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The MQTT client id; default `dai-cloud-` and a random suffix, unique
    /// per process.
    #[arg(long)]
    client_id: Option<String>,
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
    /// Require `Authorization: Bearer TOKEN` on /api/* with the token in
    /// this file (16+ characters); needed for a non-loopback --http.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// Serve /api/* on a non-loopback --http without a token (warned).
    #[arg(long)]
    allow_unauthenticated_http: bool,
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

/// Run the parsed command.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { dir } => keygen(&dir),
        Command::Models { state, action } => {
            models(&state, action.unwrap_or(ModelsAction::List { json: false }))
        }
        Command::Run(args) => run(args),
        Command::Fleet {
            action:
                FleetAction::Init {
                    dir,
                    fleet,
                    force,
                    broker_hosts,
                },
        } => fleet_init(&dir, &fleet, force, &broker_hosts),
        Command::Fleet {
            action: FleetAction::BrokerCert { dir, hosts, out },
        } => broker_cert(&FleetDir::new(dir), &hosts, &out),
        Command::Fleet {
            action: FleetAction::Crl { dir },
        } => fleet_crl(&FleetDir::new(dir)),
        Command::Devices { fleet_dir, action } => {
            let Some(dir) = fleet_dir else {
                return Err(usage("--fleet-dir (or DAI_FLEET_DIR) is required").into());
            };
            devices(&FleetDir::new(dir), action)
        }
    }
}

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

fn fleet_init(dir: &Path, fleet: &str, force: bool, hosts: &[String]) -> anyhow::Result<()> {
    let fleet = FleetName::parse(fleet).map_err(|e| usage(format!("--fleet: {e}")))?;
    check_hosts(hosts)?;
    let fd = FleetDir::new(dir);
    let made = match fd.init(fleet, SystemTime::now(), force) {
        Err(dai_trust::TrustError::Exists { path }) => bail!(
            "{} already holds a fleet ({} exists); pass --force to replace it \
             (certificates of its devices stop verifying)",
            dir.display(),
            path.display()
        ),
        r => r.with_context(|| format!("creating the fleet in {}", dir.display()))?,
    };
    FleetDir::issue_broker(&made.ca, hosts, SystemTime::now(), dir)
        .context("issuing the embedded broker's certificate")?;
    println!(
        "fleet {} in {}: CA ca.pem (key ca.key.pem, secret), aggregator.key (secret, \
         `dai-cloud run --key`), aggregator.pub, aggregator.pem, broker.pem (for {}; \
         key broker.key.pem, secret)",
        made.ca.fleet(),
        dir.display(),
        hosts.join(", ")
    );
    println!(
        "next: dai-cloud devices add NAME --fleet-dir {} --out DIR",
        dir.display()
    );
    Ok(())
}

/// Every broker host must be a DNS name or an IP address (exit 64).
fn check_hosts(hosts: &[String]) -> Result<(), UsageError> {
    for h in hosts {
        let dns = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !dns && h.parse::<std::net::IpAddr>().is_err() {
            return Err(usage(format!(
                "broker host {h:?}: expected a DNS name or an IP address"
            )));
        }
    }
    Ok(())
}

fn broker_cert(fd: &FleetDir, hosts: &[String], out: &Path) -> anyhow::Result<()> {
    check_hosts(hosts)?;
    let fleet = fd
        .load()
        .with_context(|| format!("reading the fleet in {}", fd.root().display()))?;
    let issued = FleetDir::issue_broker(&fleet.ca, hosts, SystemTime::now(), out)?;
    println!(
        "broker certificate for {} (fleet {}, serial {}, valid until {}): {}/broker.pem, \
         key broker.key.pem",
        hosts.join(", "),
        fleet.ca.fleet(),
        issued.serial,
        dai_trust::utc(issued.not_after),
        out.display()
    );
    Ok(())
}

fn fleet_crl(fd: &FleetDir) -> anyhow::Result<()> {
    let _lock = fd.lock()?;
    let fleet = fd
        .load()
        .with_context(|| format!("reading the fleet in {}", fd.root().display()))?;
    fd.write_crl(&fleet.ca, &fleet.registry, SystemTime::now())?;
    println!(
        "{} lists {} revoked certificate(s), valid for {} days; a running Mosquitto \
         reads it again on SIGHUP (`systemctl reload mosquitto`, or `kill -HUP` its pid)",
        fd.path(dai_trust::fs::FLEET_CRL).display(),
        fleet.registry.revocations().revoked.len(),
        dai_trust::crl::CRL_DAYS
    );
    Ok(())
}

fn devices(fd: &FleetDir, action: DevicesAction) -> anyhow::Result<()> {
    if !fd.path(dai_trust::fs::FLEET_CA_CERT).is_file() {
        bail!(
            "{}: no fleet here (no {}; make one with `dai-cloud fleet init --dir {0}`)",
            fd.root().display(),
            dai_trust::fs::FLEET_CA_CERT
        );
    }
    let load = |fd: &FleetDir| {
        fd.load().with_context(|| {
            format!(
                "reading the fleet in {} (made by `dai-cloud fleet init`)",
                fd.root().display()
            )
        })
    };
    match action {
        DevicesAction::Add { name, out, days } => {
            let name = DeviceName::parse(&name).map_err(|e| usage(e.to_string()))?;
            if dai_trust::ca::RESERVED_NAMES.contains(&name.as_str()) {
                return Err(usage(
                    dai_trust::TrustError::ReservedName {
                        name: name.to_string(),
                    }
                    .to_string(),
                )
                .into());
            }
            if days == 0 {
                return Err(usage("--days must be at least 1").into());
            }
            let issued = fd
                .enroll(&name, &out, days, SystemTime::now())
                .with_context(|| format!("enrolling {name}"))?;
            let fleet = load(fd)?;
            println!(
                "enrolled {name} in fleet {} (serial {}, valid until {}); bundle in {}",
                fleet.ca.fleet(),
                issued.serial,
                dai_trust::utc(issued.not_after),
                out.display()
            );
        }
        DevicesAction::List { json } => {
            let fleet = load(fd)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fleet.registry.devices)?);
            } else {
                println!(
                    "{:<24} {:<32} {:<20} {:<20}  status",
                    "device", "serial", "created (UTC)", "expires (UTC)"
                );
                for d in &fleet.registry.devices {
                    let status = d.revoked_at.map_or("active".into(), |t| {
                        format!("revoked {}", dai_trust::utc(t))
                    });
                    println!(
                        "{:<24} {:<32} {:<20} {:<20}  {status}",
                        d.name,
                        d.serial,
                        dai_trust::utc(d.created_at),
                        dai_trust::utc(d.not_after),
                    );
                }
            }
        }
        DevicesAction::Revoke { name } => {
            let _lock = fd.lock()?;
            let mut fleet = load(fd)?;
            let now = dai_trust::unix_secs(SystemTime::now());
            if fleet.registry.revoke(&name, now)? {
                fd.save_registry(&fleet.registry)?;
                fd.write_crl(&fleet.ca, &fleet.registry, SystemTime::now())?;
                println!(
                    "revoked {name}; {} and {} list {} certificate(s); a Mosquitto \
                     broker refuses it once it has the new crl.pem and reloads it \
                     (`systemctl reload mosquitto`, or `kill -HUP` its pid)",
                    fd.path(dai_trust::fs::FLEET_REVOCATIONS).display(),
                    fd.path(dai_trust::fs::FLEET_CRL).display(),
                    fleet.registry.revocations().revoked.len()
                );
            } else {
                println!("{name} was already revoked");
            }
        }
    }
    Ok(())
}

fn keygen(dir: &Path) -> anyhow::Result<()> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
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

fn models(state: &Path, action: ModelsAction) -> anyhow::Result<()> {
    if !state.is_file() {
        bail!(
            "{}: no such state file (pass --state, the file `dai-cloud run` writes)",
            state.display()
        );
    }
    let mut s = State::open(state).with_context(|| format!("opening {}", state.display()))?;
    match action {
        ModelsAction::List { json: true } => {
            println!("{}", serde_json::to_string_pretty(&s.versions()?)?);
        }
        ModelsAction::List { json: false } => print_versions(&s)?,
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

/// The registry as a table.
fn print_versions(s: &State) -> anyhow::Result<()> {
    println!(
        "{:<16} {:>8} {:>8} {:>20} {:>8} {:>8} {:>9}  note",
        "model", "version", "parent", "created (UTC)", "updates", "samples", "loss"
    );
    for v in s.versions()? {
        let m = &v.metrics;
        let note = match m.get("promoted_from") {
            Some(from) => format!("weights of v{from}: {}", m["reason"].as_str().unwrap_or("")),
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
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let listen: SocketAddr = args
        .http
        .parse()
        .map_err(|_| usage(format!("--http {:?}: expected ip:port", args.http)))?;
    let access = dai_cloud::http::Access::for_listener(
        listen,
        args.auth_token_file.as_deref(),
        args.allow_unauthenticated_http,
    )
    .map_err(|e| usage(e.to_string()))?;
    let (mut cfg, http, embedded) = service_config(args)?;
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
        start_broker(embedded, &mut cfg).await?;
        let app = dai_cloud::http::router_with(
            monitor.clone(),
            cfg.state_path.clone(),
            cfg.fleet.clone(),
            access,
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

/// The embedded broker to start (inside the runtime: its gate is a task).
enum Embedded {
    /// `--broker`: an external one.
    No,
    /// `--insecure-plaintext`: rumqttd alone on `--listen`.
    Plain(SocketAddr),
    /// rumqttd on loopback behind the mutual-TLS gate on `--listen`.
    Secure {
        listen: SocketAddr,
        ca_pem: String,
        tls: std::sync::Arc<dai_trust::tls::ServerConfig>,
    },
}

/// Start what `embedded` says; a secure broker's aggregator connection goes
/// to rumqttd's loopback side directly (same process).
async fn start_broker(embedded: Embedded, cfg: &mut ServiceConfig) -> anyhow::Result<()> {
    match embedded {
        Embedded::No => {}
        Embedded::Plain(addr) => {
            start_embedded_broker(addr)?;
            tracing::warn!(%addr, "embedded MQTT broker on plain TCP (--insecure-plaintext): anyone who reaches it can join");
        }
        Embedded::Secure {
            listen,
            ca_pem,
            tls,
        } => {
            let revocations = match &cfg.fleet_dir {
                Some(w) => w.revocations.clone(),
                None => bail!("a secure broker needs the fleet directory"),
            };
            let (upstream, _) =
                start_secure_broker(listen, &cfg.fleet, ca_pem, tls, revocations).await?;
            tracing::info!(%listen, "embedded MQTT broker started (mutual TLS, fleet CA, topic ACL)");
            cfg.broker = BrokerAddr {
                host: upstream.ip().to_string(),
                port: upstream.port(),
            };
            cfg.tls = None;
        }
    }
    Ok(())
}

fn open_fleet(dir: &Path, fleet_flag: &str) -> anyhow::Result<SecureFleet> {
    let secure = SecureFleet::open(dir).with_context(|| {
        format!(
            "--fleet-dir {}: reading the fleet (made by `dai-cloud fleet init`)",
            dir.display()
        )
    })?;
    if secure.fleet_name() != fleet_flag {
        return Err(usage(format!(
            "--fleet {fleet_flag:?} differs from the fleet directory's fleet {:?}",
            secure.fleet_name()
        ))
        .into());
    }
    Ok(secure)
}

/// A client id unique to this process.
fn unique_client_id() -> anyhow::Result<String> {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(format!(
        "{}-{}",
        dai_trust::ca::AGGREGATOR_NAME,
        hex::encode(b)
    ))
}

/// Every `run` flag checked and turned into the service's configuration,
/// the status page address and the broker to start.
fn service_config(a: RunArgs) -> anyhow::Result<(ServiceConfig, SocketAddr, Embedded)> {
    let secure = match (&a.fleet_dir, a.insecure_plaintext) {
        (Some(_), true) => {
            return Err(usage("--fleet-dir and --insecure-plaintext exclude each other").into());
        }
        (None, false) => {
            return Err(usage(
                "--fleet-dir (or DAI_FLEET_DIR) is required: `dai-cloud fleet init` makes one; \
                 --insecure-plaintext runs without identities",
            )
            .into());
        }
        (Some(dir), false) => Some(open_fleet(dir, &a.fleet)?),
        (None, true) => None,
    };
    let signing_key = match (&a.key, &secure) {
        (Some(path), _) => {
            let secret = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            dai_protocol::global::signing_key_from_hex(&secret).context("the key file")?
        }
        (None, Some(s)) => s.identity.aggregator.signing_key().clone(),
        (None, None) => return Err(usage("--key is required with --insecure-plaintext").into()),
    };
    if let Some(s) = &secure
        && signing_key.verifying_key() != s.identity.aggregator.public()
    {
        return Err(usage(
            "--key is not the fleet's aggregator key: edges verify globals and acks with \
             aggregator.pub",
        )
        .into());
    }
    let client_id = match a.client_id.clone() {
        Some(id) => id,
        None => unique_client_id()?,
    };
    let heads = read_models(&a.models)?;
    let strategy = match a.strategy.as_str() {
        "fedavg" => Strategy::FedAvg {
            min_updates: a.min_updates,
        },
        "fedbuff" => Strategy::FedBuff { k: a.min_updates },
        other => bail!("--strategy {other:?}: expected fedavg or fedbuff"),
    };
    let robust = parse_robust(&a.robust)?;
    let server_optimizer = parse_server_opt(&a.server_opt, a.server_lr, a.server_tau)?;
    let http: SocketAddr = a.http.parse().context("--http: expected ip:port")?;
    let (host, port, embedded) = match &a.broker {
        Some(b) => {
            let (h, p) = b.rsplit_once(':').context("--broker: expected host:port")?;
            (
                h.to_string(),
                p.parse::<u16>().context("--broker port")?,
                Embedded::No,
            )
        }
        None => {
            let addr: SocketAddr = a.listen.parse().context("--listen: expected ip:port")?;
            let embedded = match &secure {
                None => Embedded::Plain(addr),
                Some(s) => Embedded::Secure {
                    listen: addr,
                    ca_pem: s.identity.ca_pem.clone(),
                    tls: std::sync::Arc::new(s.broker_tls().with_context(|| {
                        format!(
                            "the embedded broker's certificate in {} (`dai-cloud fleet \
                             broker-cert` makes a new one)",
                            s.watch.dir.root().display()
                        )
                    })?),
                },
            };
            (addr.ip().to_string(), addr.port(), embedded)
        }
    };
    if a.insecure_plaintext {
        tracing::warn!(
            "--insecure-plaintext: plain TCP MQTT, unsigned updates accepted; anyone who reaches the broker can join the fleet"
        );
    }
    let tls = match &secure {
        Some(s) => Some(std::sync::Arc::new(
            s.client_tls().context("the aggregator's TLS identity")?,
        )),
        None => None,
    };
    let mut cfg = ServiceConfig {
        fleet: a.fleet,
        broker: BrokerAddr { host, port },
        client_id,
        state_path: a.state,
        models: heads,
        settings: Settings {
            strategy,
            aggregation: Aggregation {
                clip_norm: a.clip_norm,
                robust,
            },
            max_staleness: a.max_staleness,
            reject_norm: a.reject_norm,
        },
        round_timeout: Duration::from_secs(a.round_timeout_sec),
        signing_key: signing_key.clone(),
        server_optimizer,
        devices: DeviceAuth::Unchecked,
        fleet_dir: None,
        tls,
    };
    if let Some(s) = secure {
        s.apply(&mut cfg);
        // --key, when given, was checked to be the fleet's.
        cfg.signing_key = signing_key;
    }
    Ok((cfg, http, embedded))
}

/// `--model NAME=PATH` entries: each file read and checked to be a head.
fn read_models(models: &[String]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut heads = Vec::new();
    for m in models {
        let Some((name, path)) = m.split_once('=') else {
            bail!("--model {m:?}: expected NAME=PATH")
        };
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        dai_head::Head::from_bytes(&bytes).with_context(|| format!("{path} is not a head file"))?;
        heads.push((name.to_string(), bytes));
    }
    Ok(heads)
}

fn parse_robust(s: &str) -> anyhow::Result<Robust> {
    Ok(match s {
        "mean" => Robust::Mean,
        "median" => Robust::Median,
        t => match t
            .strip_prefix("trimmed:")
            .and_then(|f| f.parse::<f64>().ok())
        {
            Some(fraction) if (0.0..0.5).contains(&fraction) => Robust::TrimmedMean { fraction },
            _ => bail!(
                "--robust {t:?}: expected mean, median or trimmed:FRACTION with FRACTION in [0, 0.5)"
            ),
        },
    })
}

fn parse_server_opt(s: &str, lr: f32, tau: f32) -> anyhow::Result<Option<FedAdam>> {
    match s {
        "none" => Ok(None),
        "fedadam" => {
            let positive = |x: f32| x.is_finite() && x > 0.0;
            if !positive(lr) || !positive(tau) {
                bail!("--server-lr and --server-tau must be positive");
            }
            Ok(Some(FedAdam::new(lr, 0.9, 0.99, tau)))
        }
        other => bail!("--server-opt {other:?}: expected none or fedadam"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_unix_seconds() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00");
        assert_eq!(utc(1_798_345_680.0), "2026-12-27 04:28:00");
        assert_eq!(utc(-5.0), "1970-01-01 00:00:00");
    }

    #[test]
    fn flags_are_refused_with_their_name() {
        let err = |r: anyhow::Result<Robust>| format!("{:#}", r.expect_err("refused"));
        assert!(err(parse_robust("trimmed:0.5")).contains("--robust \"trimmed:0.5\""));
        assert!(err(parse_robust("avg")).contains("--robust"));
        assert_eq!(
            parse_robust("trimmed:0.2").expect("ok"),
            Robust::TrimmedMean { fraction: 0.2 }
        );
        assert!(parse_server_opt("none", 0.0, 0.0).expect("none").is_none());
        assert!(
            parse_server_opt("fedadam", 0.01, 1e-3)
                .expect("adam")
                .is_some()
        );
        let e = parse_server_opt("fedadam", -1.0, 1e-3).expect_err("negative lr");
        assert!(e.to_string().contains("must be positive"), "{e:#}");
        assert!(parse_server_opt("sgd", 0.1, 0.1).is_err());
        let e = read_models(&["digits".into()]).expect_err("no path");
        assert!(e.to_string().contains("expected NAME=PATH"), "{e:#}");
    }
}
