//! The `dai-edge` binary and HTTP authentication: an open API beyond
//! loopback, or a token file that is no token, exits 64 before anything
//! starts; a daemon with a token refuses writes without it and never logs
//! the token, not even when the page is opened as `/?token=`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "process-test-token-0123456789abcdef";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dai-edge"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    path
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn off_loopback_without_a_token_refuses_to_start_with_exit_64() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let port = free_port();
    let config = write(
        dir.path(),
        "open.yaml",
        &format!(
            "daemon:\n  listen_addr: 0.0.0.0:{port}\n  data_dir: {}\n",
            data.display()
        ),
    );
    for args in [
        vec!["check-config".to_string(), config.display().to_string()],
        vec![
            "--config".into(),
            config.display().to_string(),
            "run".into(),
        ],
    ] {
        let out = bin().args(&args).output().expect("run");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("http.auth_token_file")
                && err.contains(&format!("0.0.0.0:{port}"))
                && err.contains("allow_unauthenticated"),
            "{err}"
        );
    }
    assert!(!data.exists(), "the daemon started (its data_dir exists)");
    // The same through the environment.
    let out = bin()
        .arg("run")
        .env("DAI_LISTEN_ADDR", format!("0.0.0.0:{port}"))
        .env("DAI_DATA_DIR", &data)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(!data.exists());
}

#[test]
fn a_token_file_that_is_no_token_exits_64_naming_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    for (text, why) in [("", "is empty"), ("too-short\n", "fewer than 16")] {
        let token = write(dir.path(), "token", text);
        let out = bin()
            .arg("run")
            .env("DAI_HTTP_AUTH_TOKEN_FILE", &token)
            .env("DAI_DATA_DIR", dir.path().join("data"))
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(64), "{why}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("http.auth_token_file")
                && err.contains(&token.display().to_string())
                && err.contains(why),
            "{err}"
        );
    }
    let missing = dir.path().join("missing-token");
    let out = bin()
        .arg("check-config")
        .arg(write(
            dir.path(),
            "c.yaml",
            &format!("http:\n  auth_token_file: {}\n", missing.display()),
        ))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be opened"));
}

#[test]
fn a_daemon_with_a_token_refuses_writes_without_it_and_never_logs_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let token = write(dir.path(), "token", &format!("{TOKEN}\n"));
    let port = free_port();
    let config = write(
        dir.path(),
        "edge.yaml",
        &format!(
            "training:\n  enabled: false\n\
             daemon:\n  listen_addr: 127.0.0.1:{port}\n  data_dir: {}\n  models_dir: {}\n  \
             models: [digits]\n  fetch_missing_models: false\n\
             http:\n  auth_token_file: {}\n",
            dir.path().join("data").display(),
            repo().join("models/zoo").display(),
            token.display()
        ),
    );
    let mut child = bin()
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("DAI_LOG", "debug")
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
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !log.iter().any(|l: &String| l.contains("listening on")) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => log.push(line),
            Err(_) if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("daemon did not start:\n{}", log.join("\n"));
            }
            Err(_) => {}
        }
    }
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::new();
    let sample = serde_json::json!({
        "inputs": {"pixels": {"shape": [1, 64], "data": vec![0.5f32; 64]}},
        "label": 3,
    });
    let r = client
        .post(format!("{base}/v1/models/digits/samples"))
        .json(&sample)
        .send()
        .expect("samples");
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .expect("ascii")
            .starts_with("Bearer")
    );
    // The page with the token handoff, then the API with the token.
    let page = client
        .get(format!("{base}/?token={TOKEN}"))
        .send()
        .expect("page");
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    let status = |auth: Option<&str>| {
        let mut req = client.get(format!("{base}/v1/status"));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        req.send().expect("status").status().as_u16()
    };
    assert_eq!(status(None), 401);
    assert_eq!(status(Some("process-test-token-0123456789abcdeX")), 401);
    assert_eq!(status(Some(TOKEN)), 200);
    let r = client
        .post(format!("{base}/v1/models/digits/samples"))
        .bearer_auth(TOKEN)
        .json(&sample)
        .send()
        .expect("samples");
    assert_eq!(r.status(), 200, "{}", r.text().unwrap_or_default());
    let models: serde_json::Value = client
        .get(format!("{base}/v1/models/digits"))
        .bearer_auth(TOKEN)
        .send()
        .expect("model")
        .json()
        .expect("json");
    assert!(models.is_object(), "{models}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit}");
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        log.push(line);
    }
    let log = log.join("\n");
    assert!(log.contains("requires a bearer token"), "{log}");
    assert!(
        log.contains("request refused"),
        "refusals are logged:\n{log}"
    );
    assert!(!log.contains(TOKEN), "the token was logged:\n{log}");
    assert!(!log.contains("token="), "a query string was logged:\n{log}");
}
