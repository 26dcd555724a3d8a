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
        .args(["run", "--model", "digits=/nonexistent", "--key"])
        .arg(dir.path().join("aggregator.key"))
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("reading /nonexistent"));
}
