//! The daemon's start/serve error, and [`chain`] for printing any error.
//!
//! Every error type says its own part once: a variant that wraps a source
//! (`#[from]`/`#[source]`) does not repeat it in its message. Whoever
//! prints an error for a person (logs, API answers) prints the whole
//! chain, with [`chain`] here or `{:#}` on an `anyhow::Error` in the binary.

use std::fmt;
use std::path::PathBuf;

/// Errors that stop the daemon from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("opening the store")]
    Store(#[from] dai_store::StoreError),
    #[error("models_dir {path}")]
    ModelsDir {
        path: PathBuf,
        #[source]
        source: dai_infer::BundleError,
    },
    #[error("configured model {name:?} has no bundle in {dir}")]
    MissingBundle { name: String, dir: PathBuf },
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
    /// A non-loopback listener for an API without a token (the config
    /// refuses that too; this catches a listener bound elsewhere).
    #[error(
        "refusing to serve the HTTP API on {addr} without authentication: set \
         http.auth_token_file (or http.allow_unauthenticated: true)"
    )]
    Unauthenticated { addr: std::net::SocketAddr },
    #[error("binding {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// `error: source: source's source ...`, the way `{:#}` prints an
/// `anyhow::Error`.
pub fn chain<'a>(error: &'a (dyn std::error::Error + 'static)) -> Chain<'a> {
    Chain(error)
}

/// See [`chain`].
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_part_is_printed_once() {
        let e = DaemonError::Bind {
            addr: "127.0.0.1:1".parse().expect("addr"),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use"),
        };
        assert_eq!(e.to_string(), "binding 127.0.0.1:1");
        assert_eq!(chain(&e).to_string(), "binding 127.0.0.1:1: address in use");
        let printed = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(printed, "binding 127.0.0.1:1: address in use");
    }
}
