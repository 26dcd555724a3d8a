//! `GET /debug/pprof/profile` on a running daemon: behind the API token
//! (401 without it), a pprof protobuf of the daemon at work (the
//! inference path is in it while requests run), a flamegraph with
//! `format=svg`, one capture at a time (409 for a second), and a bad
//! query refused naming the parameter.

use crate::http_auth::{TOKEN, with_token};
use crate::support::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Inference requests in a loop until `until`.
async fn load(d: &TestDaemon, until: Instant) -> usize {
    let mut n = 0;
    while Instant::now() < until {
        let r = d
            .client
            .post(d.url("/v1/models/digits/infer"))
            .bearer_auth(TOKEN)
            .json(&json!({"inputs": {"pixels": {"shape": [8, 64], "data": (0..8 * 64).map(|i| (i % 17) as f32).collect::<Vec<_>>()}}}))
            .send()
            .await
            .expect("infer");
        let status = r.status().as_u16();
        assert_eq!(status, 200, "{}", r.text().await.unwrap_or_default());
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_profile_of_the_working_daemon_behind_the_token() {
    ensure_zoo();
    let data = tempfile::tempdir().expect("tmp");
    let mut config = test_config(data.path());
    with_token(&mut config);
    let d = TestDaemon::start_with(config, tempfile::tempdir().expect("unused")).await;
    let get = |q: &'static str, token: Option<&'static str>| {
        let mut r = d.client.get(d.url(&format!("/debug/pprof/profile{q}")));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let r = get("?seconds=1", None).await.expect("answered");
    assert_eq!(r.status().as_u16(), 401, "no token");
    let r = get("?seconds=0", Some(TOKEN)).await.expect("answered");
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("seconds=\"0\": expected whole seconds from 1 to 60")),
        "{v}"
    );

    // A 2 s capture while requests run, and a second one refused meanwhile.
    let until = Instant::now() + Duration::from_secs(3);
    let (profile, second, served) = tokio::join!(
        get("?seconds=2&frequency=250", Some(TOKEN)),
        async {
            // Once the first capture holds the slot (the daemon runs in
            // this process), not after a guessed delay.
            let t = Instant::now();
            while !dai_profile::running() && t.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            get("?seconds=1", Some(TOKEN)).await
        },
        load(&d, until),
    );
    assert!(served > 0);
    let second = second.expect("answered");
    assert_eq!(second.status().as_u16(), 409, "one capture at a time");
    let v: Value = second.json().await.expect("json");
    assert_eq!(v["error"]["code"], "busy", "{v}");
    let profile = profile.expect("answered");
    assert_eq!(profile.status().as_u16(), 200);
    assert_eq!(
        profile.headers()["content-type"],
        "application/octet-stream"
    );
    let p =
        dai_profile::proto::decode(&profile.bytes().await.expect("body")).expect("pprof protobuf");
    let names: Vec<&str> = p
        .function
        .iter()
        .filter_map(|f| p.string_table.get(f.name as usize).map(String::as_str))
        .collect();
    let samples: i64 = p
        .sample
        .iter()
        .map(|s| s.value.first().copied().unwrap_or(0))
        .sum();
    assert!(samples > 0, "the daemon was busy: {samples} samples");
    assert!(
        names
            .iter()
            .any(|n| n.contains("tract") || n.contains("dai_infer")),
        "the inference path is in the profile: {} functions, e.g. {:?}",
        names.len(),
        &names[..names.len().min(20)]
    );

    let until = Instant::now() + Duration::from_millis(1500);
    let (svg, _) = tokio::join!(get("?seconds=1&format=svg", Some(TOKEN)), load(&d, until));
    let svg = svg.expect("answered");
    assert_eq!(svg.status().as_u16(), 200);
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    let text = svg.text().await.expect("text");
    assert!(text.contains("<svg"), "{:.200}", text);
    d.stop().await;
}
