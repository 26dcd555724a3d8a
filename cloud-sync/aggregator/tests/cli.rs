//! `dai-cloud` as an operator runs it: keygen, run (embedded broker), SIGTERM, models.

use dai_testkit::{free_port, wait_for_port};
use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dai-cloud"))
}

#[test]
fn keygen_run_stop_and_list() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = bin()
        .args(["keygen", "--dir"])
        .arg(dir.path())
        .output()
        .expect("keygen");
    assert!(out.status.success());
    let public = std::fs::read_to_string(dir.path().join("aggregator.pub")).expect("pub");
    assert!(dai_protocol::global::verifying_key_from_hex(&public).is_ok());

    let head = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/zoo/digits/head.safetensors"
    );
    let port = free_port();
    let state = dir.path().join("s.sqlite");
    let mut child = bin()
        .args([
            "run",
            "--fleet",
            "lab",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--model",
            &format!("digits={head}"),
            "--insecure-plaintext",
        ])
        .arg("--key")
        .arg(dir.path().join("aggregator.key"))
        .arg("--state")
        .arg(&state)
        .spawn()
        .expect("run");
    // The embedded broker accepts connections once it is up.
    wait_for_port(port, Duration::from_secs(20), "broker");
    std::thread::sleep(Duration::from_millis(500));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "dai-cloud ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let out = bin()
        .arg("models")
        .arg("--state")
        .arg(&state)
        .output()
        .expect("models");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("digits") && l.split_whitespace().nth(1) == Some("0")),
        "{text}"
    );

    let bad = bin()
        .args([
            "run",
            "--insecure-plaintext",
            "--model",
            "digits=/nonexistent",
            "--key",
        ])
        .arg(dir.path().join("aggregator.key"))
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("reading /nonexistent"));
}

/// `--http` beyond loopback without `--auth-token-file` is refused before
/// anything starts (no broker, no state file), exit 64.
#[test]
fn run_refuses_an_open_http_beyond_loopback_with_exit_64() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("s.sqlite");
    let broker = free_port();
    let out = bin()
        .args([
            "run",
            "--model",
            "digits=/nonexistent",
            "--http",
            "0.0.0.0:0",
        ])
        .args(["--listen", &format!("127.0.0.1:{broker}")])
        .arg("--state")
        .arg(&state)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--http 0.0.0.0:0 is not a loopback address")
            && err.contains("--auth-token-file")
            && err.contains("--allow-unauthenticated-http"),
        "{err}"
    );
    assert!(!state.exists(), "the aggregator started");
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef-cloud\n").expect("write");
    let out = bin()
        .args([
            "run",
            "--model",
            "digits=/nonexistent",
            "--http",
            "127.0.0.1:0",
        ])
        .arg("--auth-token-file")
        .arg(&token)
        .arg("--allow-unauthenticated-http")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("contradict"));
}

#[test]
fn an_auth_token_file_that_is_no_token_exits_64_naming_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let token = dir.path().join("token");
    for (text, why) in [("\n", "is empty"), ("short", "fewer than 16")] {
        std::fs::write(&token, text).expect("write");
        let out = bin()
            .args([
                "run",
                "--model",
                "digits=/nonexistent",
                "--http",
                "0.0.0.0:0",
            ])
            .arg("--auth-token-file")
            .arg(&token)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(64), "{why}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&token.display().to_string()) && err.contains(why),
            "{err}"
        );
    }
}

/// `models publish` on a state file: a bundle directory is checked and
/// offered, a tampered one and a bad device name are refused with the
/// reason, `models bundles` lists the (still empty) reports.
#[test]
fn models_publish_checks_the_bundle_and_offers_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("s.sqlite");
    dai_cloud::state::State::open(&state).expect("state file");
    let zoo = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/zoo/digits");
    let bundle = dir.path().join("digits");
    std::fs::create_dir(&bundle).expect("mkdir");
    for f in [
        "manifest.toml",
        "head.safetensors",
        "validation.safetensors",
    ] {
        std::fs::copy(format!("{zoo}/{f}"), bundle.join(f)).expect("copy");
    }
    let Ok(onnx) = std::fs::read(format!("{zoo}/backbone.onnx")) else {
        panic!("models/zoo/digits/backbone.onnx missing (it is committed)");
    };
    std::fs::write(bundle.join("backbone.onnx"), &onnx).expect("onnx");
    let publish = |extra: &[&str]| {
        bin()
            .args(["models", "--state"])
            .arg(&state)
            .arg("publish")
            .arg(&bundle)
            .args(extra)
            .output()
            .expect("publish")
    };
    let out = publish(&["--devices", "edge-0,edge-1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("digits 1.0.0") && text.contains("offered to edge-0, edge-1"),
        "{text}"
    );
    let s = dai_cloud::state::State::open(&state).expect("state");
    let offers = s.offers().expect("offers");
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].targets.devices, ["edge-0", "edge-1"]);

    let out = publish(&["--devices", "a/b"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "a bad device name is a usage error"
    );

    let mut bytes = onnx.clone();
    bytes[10] ^= 1;
    std::fs::write(bundle.join("backbone.onnx"), bytes).expect("tamper");
    let out = publish(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("backbone.onnx") && err.contains("sha256"),
        "{err}"
    );

    let out = bin()
        .args(["models", "--state"])
        .arg(&state)
        .args(["bundles", "--json"])
        .output()
        .expect("bundles");
    assert!(out.status.success());
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rows, serde_json::json!([]), "no device reported yet");
}
