//! The `dai-edge` binary as a user runs it: config commands, exit codes, and
//! a real start / infer / SIGTERM cycle on a loopback port.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dai-edge"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn print_default_config_round_trips_through_check_config() {
    let out = bin().arg("print-default-config").output().expect("run");
    assert!(out.status.success());
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, &out.stdout).expect("write");
    let check = bin().arg("check-config").arg(&file).output().expect("run");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("valid") && text.contains("load_balancing_strategy: round_robin"),
        "{text}"
    );
}

#[test]
fn bad_config_exits_64_naming_key_and_value() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "cache_eviction_policy: MRU\n").expect("write");
    for args in [
        vec!["check-config".to_string(), file.display().to_string()],
        vec!["--config".into(), file.display().to_string(), "run".into()],
    ] {
        let out = bin().args(&args).output().expect("run");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cache_eviction_policy") && err.contains("MRU") && err.contains("LRU"),
            "{err}"
        );
    }
    let out = bin()
        .arg("run")
        .env("DAI_BATCH_SIZE", "0")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("batch_size") && err.contains("DAI_BATCH_SIZE=0"),
        "{err}"
    );
}

#[test]
fn daemon_serves_and_stops_gracefully_on_sigterm() {
    let data = tempfile::tempdir().expect("tmp");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut child = bin()
        .current_dir(repo())
        .env("DAI_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("DAI_DATA_DIR", data.path())
        .env("DAI_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut log = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let done = line.contains("listening on");
                log.push(line);
                if done {
                    break;
                }
            }
            Err(_) if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("daemon did not start:\n{}", log.join("\n"));
            }
            Err(_) => {}
        }
    }
    let client = reqwest::blocking::Client::new();
    let body = serde_json::json!({"inputs": {
        "input": {"shape": [1, 576], "data": vec![0.01f32; 576]},
        "state": {"shape": [2, 1, 128], "data": vec![0.0f32; 256]},
    }});
    let r = client
        .post(format!(
            "http://127.0.0.1:{port}/v1/models/silero-vad/infer"
        ))
        .json(&body)
        .send()
        .expect("infer");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().expect("json");
    let p = v["outputs"]["output"]["data"][0]
        .as_f64()
        .expect("probability");
    assert!((0.0..=1.0).contains(&p), "speech probability {p}");

    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status}");
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        log.push(line);
    }
    assert!(
        log.iter().any(|l| l.contains("dai-edge stopped")),
        "{}",
        log.join("\n")
    );
}
