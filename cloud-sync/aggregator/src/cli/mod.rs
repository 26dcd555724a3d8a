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
//!   a second); `models publish|bundles` (`publish`): bundles offered to
//!   the fleet through the same file, and the devices' reports;
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
use dai_cloud::state::{SampleCap, Settings, State, Strategy};
use dai_cloud::{Aggregation, FedAdam, Robust};
use dai_trust::fs::FleetDir;
use dai_trust::{DeviceName, FleetName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

mod fleet;
mod models;
mod publish;
mod run;
mod tier;

use fleet::{broker_cert, devices, fleet_crl, fleet_init};
use models::{keygen, models};
use run::run;

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
    /// The most one update's claimed sample count weighs in a round:
    /// equal (one device, one vote: claims are not weighed), auto (2x the
    /// round's median claim), off (FedAvg's weights as claimed), or a
    /// number of samples.
    #[arg(long, default_value = "equal")]
    max_sample_weight: String,
    /// Clip each update before combining: auto (to the round's median
    /// update norm), auto:MULTIPLE, off, or a fixed L2 norm.
    #[arg(long, default_value = "auto")]
    clip_norm: String,
    /// How a round is combined: trimmed:FRACTION (drop that share of the
    /// weight at each end of every coordinate, then the weighted mean of
    /// the rest), mean (plain FedAvg) or median.
    #[arg(long, default_value = "trimmed:0.3")]
    robust: String,
    /// Updates one device may send a minute (a burst of as many passes);
    /// more are not recorded nor acked, and the edge sends them later.
    /// 0: no limit.
    #[arg(long, default_value_t = dai_cloud::state::DEFAULT_MAX_UPDATES_PER_MINUTE)]
    max_updates_per_minute: u32,
    /// An enrolled name (`dai-cloud devices add NAME`) whose signed partial
    /// aggregates this aggregator counts: an intermediate aggregator (a
    /// site or intake tier) folding its devices' updates. Repeat for each;
    /// a partial from any other name is refused.
    #[arg(long, value_name = "NAME")]
    tier: Vec<String>,
    /// root (makes and signs the globals), site (a site gateway's
    /// aggregator: folds its devices' updates into signed partial
    /// aggregates for --upstream and serves the root's globals on its own
    /// broker) or intake (a replica on the root's broker doing the same
    /// without forwarding globals).
    #[arg(long, value_enum, default_value = "root")]
    role: tier::Role,
    /// A tier's upstream: the root's broker, host:port (mutual TLS with
    /// --identity).
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Option<String>,
    /// A tier's identity: its device bundle from `dai-cloud devices add
    /// NAME --out DIR` on the root's fleet (the root lists NAME with
    /// --tier).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// Take updates through the MQTT shared subscription
    /// `$share/GROUP/dai/v1/{fleet}/dev/+/update`, so the broker gives each
    /// update to one member of GROUP: the root and its `--role intake`
    /// replicas all name the same group. Needs an external broker that has
    /// shared subscriptions (Mosquitto, EMQX; not the embedded one).
    #[arg(long, value_name = "GROUP")]
    share_group: Option<String>,
    /// A tier's MQTT client id upstream; default its identity's name (what
    /// the embedded broker's gate requires). Replicas sharing one identity
    /// on Mosquitto each need their own (e.g. the pod name).
    #[arg(long, value_name = "ID")]
    upstream_client_id: Option<String>,
    /// Central differential privacy: the noise multiplier z. Each update is
    /// clipped to --dp-clip, the round averaged with equal weights and
    /// Gaussian noise of std z x clip / updates added (replaces --robust
    /// and --clip-norm). Off unless given.
    #[arg(long)]
    dp_noise: Option<f64>,
    /// Central DP: the L2 norm every update is clipped to (needed with
    /// --dp-noise).
    #[arg(long)]
    dp_clip: Option<f64>,
    /// Central DP: the delta epsilon is reported at.
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// Central DP: publish no version that would take epsilon past this.
    #[arg(long)]
    dp_target_epsilon: Option<f64>,
    /// MODEL=FILE: score every candidate global of MODEL on this
    /// validation set (safetensors: `x` f32 [rows, head inputs], `y`
    /// labels) and discard a round that would lose more than
    /// --validation-margin accuracy. Repeatable.
    #[arg(long)]
    validation: Vec<String>,
    /// The accuracy a new version may lose on the validation set.
    #[arg(long, default_value_t = 0.05)]
    validation_margin: f64,
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
    /// Send a model bundle (a directory, or its tar / tar.gz archive) to
    /// the fleet, or to some devices: a running aggregator on the same
    /// state file signs the offer and serves the chunks.
    Publish {
        bundle: PathBuf,
        /// Only these devices (comma-separated names).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
        /// Only the devices configured into this group (`cloud.groups`).
        #[arg(long)]
        group: Option<String>,
        /// Wait up to this many seconds for every listed device (with
        /// --devices) to report loaded or failed; exit 1 if one failed or
        /// did not report.
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// What each device reported about the bundles on offer.
    Bundles {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
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
