//! The status page in real headless Chromium (Playwright), gated by
//! DAI_BROWSER_TESTS=1 because it needs Debian's chromium and the npm
//! packages in tests/browser (both installed by .ci/run).

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_live_figures_in_chromium() {
    if std::env::var("DAI_BROWSER_TESTS").ok().as_deref() != Some("1") {
        eprintln!(
            "SKIPPED status_page_renders_live_figures_in_chromium: set DAI_BROWSER_TESTS=1 (needs chromium and `npm ci --prefix tests/browser`; .ci/run does both)"
        );
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    for model in ZOO {
        let (s, _) = d.infer(model, &fixture(model).request()).await;
        assert_eq!(s, 200);
    }
    let artifacts = repo().join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let shot = artifacts.join("status-page.png");
    let url = d.url("/");
    let script = repo().join("tests/browser/status_page.mjs");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .args([
                "--url",
                &url,
                "--expect-models",
                &ZOO.join(","),
                "--screenshot",
            ])
            .arg(&shot)
            .output()
    })
    .await
    .expect("join")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status page check failed:\n{stdout}\n{stderr}"
    );
    assert!(
        artifacts
            .join("status-page.png")
            .metadata()
            .expect("screenshot")
            .len()
            > 10_000
    );
    d.stop().await;
}

/// With `http.auth_token_file`, the page works in a browser: opened once as
/// `/?token=TOKEN` (the address bar then no longer shows it), or after a
/// refused poll through its login field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_works_with_a_token_in_chromium() {
    use crate::http_auth::{TOKEN, with_token};
    let d = TestDaemon::start(with_token).await;
    let r = d
        .client
        .post(d.url("/v1/models/digits/infer"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"inputs": {"pixels": {"shape": [1, 64], "data": vec![0.5f32; 64]}}}))
        .send()
        .await
        .expect("infer");
    assert_eq!(r.status(), 200);
    let base = vec![
        "--url".to_string(),
        d.url("/"),
        "--expect-models".into(),
        "digits".into(),
        "--token".into(),
        TOKEN.into(),
    ];
    if browser_check(
        "status_page_works_with_a_token_in_chromium",
        "status_page.mjs",
        base.clone(),
        "status-page-token.png",
    )
    .await
    {
        let mut login = base;
        login.push("--login".into());
        browser_check(
            "status_page_works_with_a_token_in_chromium (login field)",
            "status_page.mjs",
            login,
            "status-page-login.png",
        )
        .await;
    }
    d.stop().await;
}
