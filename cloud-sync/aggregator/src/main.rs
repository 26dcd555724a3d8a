//! `dai-cloud` binary: parse flags, start tracing, run the subcommand
//! ([`cli`]: keygen, run the aggregator, the version registry, fleet
//! identity), print the error chain on failure: exit 64 on a usage error,
//! 1 on any other.

mod cli;

use clap::Parser;
use std::process::ExitCode;

/// Usage errors (flags clap refuses, a [`cli::UsageError`]), as sysexits' EX_USAGE.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_tracing();
    match cli::dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<cli::UsageError>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_tracing() {
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
}
