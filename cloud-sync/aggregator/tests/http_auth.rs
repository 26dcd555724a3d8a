//! The aggregator's HTTP side with `--auth-token-file`: `/api/*` and the
//! CPU profile (`/debug/pprof/profile`) need the bearer token (401 with `WWW-Authenticate: Bearer` otherwise); the page,
//! `/healthz`, `/readyz` and `/metrics` stay open.

use dai_cloud::http::{Access, router_with};
use dai_cloud::monitor::Monitor;
use std::sync::Arc;

const TOKEN: &str = "cloud-test-token-0123456789";

#[tokio::test]
async fn api_needs_the_token_and_the_page_stays_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).expect("write");
    let access = Access::for_listener("0.0.0.0:8090".parse().expect("addr"), Some(&file), false)
        .expect("a token allows any address");
    assert!(
        !format!("{access:?}").contains(TOKEN),
        "Debug shows the token"
    );
    let state = dir.path().join("state.sqlite");
    dai_cloud::state::State::open(&state).expect("state");
    let app = router_with(Arc::new(Monitor::new()), state, "lab".into(), access);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    for path in [
        "/api/status",
        "/api/models",
        "/debug/pprof/profile?seconds=1",
    ] {
        for auth in [
            None,
            Some("Bearer cloud-test-token-0123456788"),
            Some("Basic eDp5"),
        ] {
            let mut req = client.get(format!("{base}{path}"));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.expect("GET");
            assert_eq!(r.status(), 401, "{path} with {auth:?}");
            assert!(
                r.headers()["www-authenticate"]
                    .to_str()
                    .expect("ascii")
                    .starts_with("Bearer")
            );
            let body: serde_json::Value = r.json().await.expect("json");
            assert!(
                body["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("unauthorized")),
                "{body}"
            );
        }
        let r = client
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "{path}");
    }
    let status: serde_json::Value = client
        .get(format!("{base}/api/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(status["fleet"], "lab");
    // The profile is pprof protobuf (decodes, has the CPU sample type);
    // a bad duration is refused naming the parameter.
    let r = client
        .get(format!("{base}/debug/pprof/profile?seconds=1"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let p = dai_profile::proto::decode(&r.bytes().await.expect("body")).expect("pprof protobuf");
    let cpu = p.period_type.as_ref().expect("period type");
    assert_eq!(
        (
            p.string_table[cpu.r#type as usize].as_str(),
            p.string_table[cpu.unit as usize].as_str()
        ),
        ("cpu", "nanoseconds")
    );
    let r = client
        .get(format!("{base}/debug/pprof/profile?seconds=600"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("seconds=\"600\"")),
        "{body}"
    );
    for path in ["/", "/?token=x", "/healthz", "/readyz", "/metrics"] {
        let r = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "{path}");
    }
    let page = client.get(format!("{base}/")).send().await.expect("GET");
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
}

#[test]
fn loopback_may_stay_open_and_anything_else_needs_a_word() {
    let open = |addr: &str, allow| Access::for_listener(addr.parse().expect("addr"), None, allow);
    assert!(matches!(open("127.0.0.1:8090", false), Ok(Access::Open)));
    assert!(matches!(open("[::1]:8090", false), Ok(Access::Open)));
    assert!(open("0.0.0.0:8090", false).is_err());
    assert!(open("10.1.2.3:8090", false).is_err());
    assert!(matches!(open("0.0.0.0:8090", true), Ok(Access::Open)));
}
