//! Bearer tokens on the HTTP API (`http.auth_token_file`,
//! `http.metrics_token_file`): refused requests get 401 and store nothing;
//! an open API is refused beyond loopback, by the config and by `serve`.

use crate::support::*;
use dai_config::{BearerToken, Config};
use dai_edge::{Daemon, DaemonError};
use serde_json::{Value, json};

pub const TOKEN: &str = "edge-test-token-0123456789";
const METRICS_TOKEN: &str = "metrics-test-token-98765";

fn token(s: &str) -> Option<BearerToken> {
    Some(BearerToken::new(s).expect("a valid token"))
}

/// The digits model only, no scheduled training, the API behind TOKEN.
pub fn with_token(c: &mut Config) {
    c.daemon.models = vec!["digits".into()];
    c.training.enabled = false;
    c.http.tokens.api = token(TOKEN);
}

fn pixels(rows: usize) -> Value {
    json!({"pixels": {"shape": [rows, 64], "data": vec![0.25f32; rows * 64]}})
}

/// (method, path, body) of every endpoint that needs the token.
fn protected() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        (
            "POST",
            "/v1/models/digits/samples",
            Some(json!({"inputs": pixels(2), "labels": [1, 2]})),
        ),
        (
            "POST",
            "/v1/models/digits/infer",
            Some(json!({"inputs": pixels(1)})),
        ),
        (
            "POST",
            "/v1/feedback",
            Some(json!({"id": "0-0", "label": 1})),
        ),
        ("POST", "/v1/models/digits/train", Some(json!({}))),
        ("GET", "/v1/status", None),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/digits", None),
    ]
}

async fn send(
    d: &TestDaemon,
    method: &str,
    path: &str,
    body: Option<&Value>,
    auth: Option<&str>,
) -> reqwest::Response {
    let mut req = match method {
        "POST" => d.client.post(d.url(path)),
        _ => d.client.get(d.url(path)),
    };
    if let Some(b) = body {
        req = req.json(b);
    }
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_requests_without_it_get_401_and_nothing_is_stored() {
    let d = TestDaemon::start(with_token).await;
    let wrong = format!("Bearer {TOKEN}x");
    let basic = "Basic ZGFpOmRhaQ==".to_string();
    for (method, path, body) in protected() {
        for auth in [None, Some(wrong.as_str()), Some(basic.as_str())] {
            let r = send(&d, method, path, body.as_ref(), auth).await;
            assert_eq!(r.status(), 401, "{method} {path} with {auth:?}");
            let challenge = r.headers()["www-authenticate"].to_str().expect("ascii");
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            let v: Value = r.json().await.expect("a JSON error");
            assert_eq!(v["error"]["code"], "unauthorized", "{v}");
            let message = v["error"]["message"].as_str().expect("message");
            assert!(!message.contains(TOKEN), "{message}");
        }
    }
    // Nothing got through: no sample, no training run, no answer.
    assert_eq!(
        d.state.store.sample_counts("digits").expect("counts"),
        (0, 0, 0)
    );
    assert!(d.state.store.runs("digits", 10).expect("runs").is_empty());
    assert!(d.state.store.outbox(10).expect("outbox").is_empty());

    // Open without a token: the page, the probes and metrics.
    for path in ["/", "/healthz", "/readyz", "/metrics"] {
        let r = send(&d, "GET", path, None, None).await;
        assert_eq!(r.status(), 200, "{path}");
    }
    let metrics = d.get_text("/metrics").await;
    let answered: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("dai_edge_requests_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(
        answered.is_empty(),
        "a refused request was served: {answered:?}"
    );

    // With the token (the scheme in any case) everything works.
    let (_, _, body) = protected().remove(0);
    let r = send(
        &d,
        "POST",
        "/v1/models/digits/samples",
        body.as_ref(),
        Some(&format!("bearer {TOKEN}")),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let (train, holdout, _) = d.state.store.sample_counts("digits").expect("counts");
    assert_eq!(train + holdout, 2, "the samples with the token are stored");
    let auth = format!("Bearer {TOKEN}");
    let r = send(
        &d,
        "POST",
        "/v1/models/digits/infer",
        Some(&json!({"inputs": pixels(1)})),
        Some(&auth),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = send(&d, "GET", "/v1/status", None, Some(&auth)).await;
    assert_eq!(r.status(), 200);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_token_guards_metrics_and_nothing_else() {
    let d = TestDaemon::start(|c| {
        with_token(c);
        c.http.tokens.metrics = token(METRICS_TOKEN);
    })
    .await;
    let bearer = |t: &str| format!("Bearer {t}");
    let metrics = |auth: Option<String>| {
        let d = &d;
        async move { send(d, "GET", "/metrics", None, auth.as_deref()).await }
    };
    assert_eq!(metrics(None).await.status(), 401);
    assert_eq!(metrics(Some(bearer(METRICS_TOKEN))).await.status(), 200);
    assert_eq!(metrics(Some(bearer(TOKEN))).await.status(), 200);
    let r = send(&d, "GET", "/v1/status", None, Some(&bearer(METRICS_TOKEN))).await;
    assert_eq!(r.status(), 401, "the metrics token is no API token");
    for path in ["/", "/healthz", "/readyz"] {
        assert_eq!(
            send(&d, "GET", path, None, None).await.status(),
            200,
            "{path}"
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_an_open_api_on_a_non_loopback_listener() {
    ensure_zoo();
    let data = tempfile::tempdir().expect("tmp");
    let mut config = test_config(data.path());
    config.daemon.models = vec!["digits".into()];
    let daemon = Daemon::build(config).await.expect("builds");
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let err = daemon
        .serve(listener, std::future::pending())
        .await
        .expect_err("an open API on 0.0.0.0 is refused");
    assert!(
        matches!(err, DaemonError::Unauthenticated { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("http.auth_token_file"), "{err}");
}

#[test]
fn dai_edge_off_loopback_without_a_token_exits_64() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dai"))
        .arg("edge")
        .env("DAI_LISTEN_ADDR", "0.0.0.0:0")
        .env("DAI_DATA_DIR", dir.path())
        .output()
        .expect("run dai edge");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("http.auth_token_file") && err.contains("0.0.0.0:0"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(dir.path()).expect("ls").next().is_none(),
        "nothing may start: the store was created"
    );
}
