//! `dai-edge` binary: parse flags, load and validate the config (exit 64 on
//! a bad one) before binding anything, start tracing, build the daemon, serve
//! until SIGINT/SIGTERM. Errors are printed with their whole chain.

use anyhow::Context;
use clap::{Parser, Subcommand};
use dai_config::Config;
use dai_edge::DaemonError;
use dai_edge::error::chain;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status for a configuration error (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "dai-edge",
    version,
    about = "DAI edge daemon: local ONNX inference with a status page and metrics"
)]
struct Cli {
    /// Configuration file (YAML); the embedded default when omitted.
    #[arg(long, short, global = true, env = "DAI_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate a configuration file and print the effective values.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the embedded default configuration (documented YAML).
    PrintDefaultConfig,
    /// Fetch and verify every bundle's model file from its pinned source.
    FetchModels,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintDefaultConfig => {
            print!("{}", dai_config::DEFAULT_CONFIG_YAML);
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match Config::from_file(&file) {
            Ok(c) => {
                match serde_yaml_ng::to_string(&c) {
                    Ok(y) => print!("# {}: valid; effective values:\n{y}", file.display()),
                    Err(_) => println!("{}: valid", file.display()),
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dai-edge: invalid configuration: {}", chain(&e));
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::FetchModels => {
            init_tracing();
            let config = match Config::load_with_env(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("dai-edge: invalid configuration: {}", chain(&e));
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            report(fetch(&config))
        }
        Command::Run => {
            let config = match Config::load_with_env(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("dai-edge: invalid configuration: {}", chain(&e));
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_tracing();
            match dai_edge::run_until_signal(config) {
                Err(e @ DaemonError::Unauthenticated { .. }) => {
                    eprintln!("dai-edge: invalid configuration: {}", chain(&e));
                    ExitCode::from(EXIT_CONFIG)
                }
                r => report(r.map_err(anyhow::Error::from)),
            }
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dai-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DAI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn fetch(config: &Config) -> anyhow::Result<()> {
    let cache = dai_infer::fetch::default_wheel_cache();
    let dirs = dai_infer::bundle::discover(&config.daemon.models_dir)
        .with_context(|| format!("listing bundles in {}", config.daemon.models_dir.display()))?;
    let mut failed = 0;
    for dir in dirs {
        match dai_infer::fetch::ensure_model(&dir, &cache) {
            Ok(outcome) => println!("{}: {outcome:?}", dir.display()),
            Err(dai_infer::fetch::FetchError::NoSource(name)) => {
                println!("{}: {name} has no [source]; skipped", dir.display())
            }
            Err(e) => {
                failed += 1;
                eprintln!("{}: {}", dir.display(), chain(&e));
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} bundle(s) could not be fetched");
    Ok(())
}
