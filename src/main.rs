//! `dai`: the fleet demo (the README's main job) and the edge process it
//! starts.
//!
//! - `dai demo` (the default): aggregator + embedded broker in this
//!   process, N federated and N stand-alone edge daemons as child
//!   processes, a per-round table (see [`demo`]);
//! - `dai edge --config FILE`: one edge daemon, exactly what the `dai-edge`
//!   binary runs (`dai_edge::run_until_signal`); the demo's children.

mod demo;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "dai",
    version,
    about = "DAI: edge inference and federated fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a small federated fleet on loopback and print a per-round table (the default).
    Demo(DemoArgs),
    /// Run one edge daemon (the same program as `dai-edge run`).
    Edge {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Parser, Debug)]
struct DemoArgs {
    /// Federated devices (and as many devices trained alone, for comparison).
    #[arg(long, default_value_t = 5)]
    devices: usize,
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// How the training rows are split: iid | dirichlet:ALPHA | labels:N.
    #[arg(long, default_value = "dirichlet:0.3")]
    scheme: String,
    /// Encoding of uplinked deltas: int8 | topk8 | f16 | f32.
    #[arg(long, default_value = "int8")]
    encoding: String,
    /// Local epochs per round on each device.
    #[arg(long, default_value_t = 20)]
    epochs: u32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long, default_value = "models/data/digits.csv.gz")]
    data: PathBuf,
    /// The digits bundle (its backbone is kept, its head re-initialised).
    #[arg(long, default_value = "models/zoo/digits")]
    bundle: PathBuf,
    /// Keep configs, logs and SQLite files here (default: a temporary directory, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Aggregator status page (another free port if this one is taken).
    #[arg(long, default_value = "127.0.0.1:8090")]
    http: std::net::SocketAddr,
    /// Keep the fleet and its status pages running after the last round, until Ctrl-C.
    #[arg(long)]
    stay: bool,
    /// A round closes after this long even if some device sent nothing.
    #[arg(long, default_value_t = 5)]
    round_timeout_sec: u64,
    /// Also print the report as JSON at the end.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or_else(|| Command::Demo(DemoArgs::parse_from(["demo"])));
    match command {
        Command::Edge { config } => {
            let config = match dai_config::Config::load_with_env(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("dai edge: invalid configuration: {e}");
                    return ExitCode::from(64);
                }
            };
            init_tracing("info");
            if std::env::var_os("DAI_EXIT_WITH_PARENT").is_some() {
                exit_with_parent();
            }
            report(dai_edge::run_until_signal(config).map_err(anyhow::Error::from))
        }
        Command::Demo(args) => {
            init_tracing("warn,rumqttd=off");
            report(demo_main(args))
        }
    }
}

fn demo_main(a: DemoArgs) -> anyhow::Result<()> {
    let scheme = a.scheme.parse().map_err(|e| anyhow::anyhow!("--{e}"))?;
    if !["int8", "topk8", "f16", "f32"].contains(&a.encoding.as_str()) {
        anyhow::bail!(
            "--encoding {:?}: expected int8, topk8, f16 or f32",
            a.encoding
        );
    }
    let opts = demo::Options {
        devices: a.devices,
        rounds: a.rounds,
        scheme,
        encoding: a.encoding,
        epochs: a.epochs,
        seed: a.seed,
        data: a.data,
        bundle: a.bundle,
        dir: a.dir,
        http: a.http,
        stay: a.stay,
        round_timeout: std::time::Duration::from_secs(a.round_timeout_sec),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(async {
        let mut out = std::io::stdout();
        demo::run(opts, &mut out).await
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// The demo's children: the parent holds our stdin open and never writes;
/// end of file means it is gone (however it died, SIGKILL included), so
/// stop as if SIGTERMed (graceful drain). A pipe, unlike PR_SET_PDEATHSIG,
/// is not tied to the parent thread that spawned us.
fn exit_with_parent() {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        tracing::warn!("parent process gone (stdin closed); stopping");
        let me = rustix::process::getpid();
        if let Err(e) = rustix::process::kill_process(me, rustix::process::Signal::TERM) {
            tracing::error!(error = %e, "cannot signal myself; exiting");
            std::process::exit(1);
        }
    });
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dai: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DAI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
