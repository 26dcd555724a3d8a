//! Helpers the `dai-models` CLI tests share: the repository root, running
//! the real binary, and the DAI_ORT_TESTS gate.
#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Run the CLI; returns (exit ok, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dai-models"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run dai-models");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

pub fn json_cli(args: &[&str]) -> Value {
    let (ok, out, err) = cli(args);
    assert!(ok, "dai-models {args:?} failed:\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

pub fn ort_enabled(what: &str) -> bool {
    let on = std::env::var("DAI_ORT_TESTS").is_ok_and(|v| v == "1");
    if !on {
        eprintln!(
            "SKIPPED (onnxruntime half of {what}): set DAI_ORT_TESTS=1 with python3 + onnxruntime"
        );
    }
    on
}
