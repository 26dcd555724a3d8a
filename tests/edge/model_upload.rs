//! `POST /v1/models`: bundle archives into a running daemon. A good one
//! is served at once and after a restart; a tampered file, a model tract
//! cannot load, a truncated archive, a body cut short, an entry escaping
//! the bundle, a missing or wrong token are each refused with the reason,
//! and the version that was serving keeps serving.

use crate::http_auth::{TOKEN, with_token};
use crate::support::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// `tar -C BUNDLE -czf OUT .` (or without -z), the way a user packs one.
fn pack(bundle: &Path, out: &Path, gzip: bool) -> Vec<u8> {
    let flags = if gzip { "-czf" } else { "-cf" };
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(bundle)
        .arg(flags)
        .arg(out)
        .arg(".")
        .status()
        .expect("tar runs");
    assert!(st.success(), "tar failed");
    std::fs::read(out).expect("archive")
}

async fn upload(d: &TestDaemon, body: Vec<u8>, token: Option<&str>) -> (u16, Value) {
    let mut req = d.client.post(d.url("/v1/models")).body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("upload answered");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn served_version(d: &TestDaemon) -> String {
    let r = d
        .client
        .get(d.url("/v1/models/digits"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("model detail");
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.expect("json");
    v["version"]
        .as_str()
        .or_else(|| v["manifest"]["version"].as_str())
        .unwrap_or_else(|| panic!("no version in {v}"))
        .to_string()
}

async fn classifies(d: &TestDaemon) {
    let r = d
        .client
        .post(d.url("/v1/models/digits/infer"))
        .bearer_auth(TOKEN)
        .json(&json!({"inputs": {"pixels": {"shape": [1, 64], "data": vec![4.0f32; 64]}}}))
        .send()
        .await
        .expect("infer");
    assert_eq!(r.status().as_u16(), 200, "digits keeps serving");
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn incoming_is_empty(data: &Path) -> bool {
    std::fs::read_dir(data.join("models/.incoming")).map_or(true, |mut d| d.next().is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_bundle_is_served_and_survives_a_restart() {
    ensure_zoo();
    let data = tempfile::tempdir().expect("tmp");
    let work = tempfile::tempdir().expect("tmp");
    let mut config = test_config(data.path());
    with_token(&mut config);
    let d = TestDaemon::start_with(config.clone(), tempfile::tempdir().expect("unused")).await;
    assert_eq!(served_version(&d).await, "1.0.0");

    let archive = pack(
        &digits_version(work.path(), "2.0.0", 0),
        &work.path().join("b.tgz"),
        true,
    );
    let (s, v) = upload(&d, archive.clone(), None).await;
    assert_eq!(s, 401, "no token: {v}");
    let (s, v) = upload(&d, archive.clone(), Some("wrong-token-0123456789")).await;
    assert_eq!(s, 401, "wrong token: {v}");
    assert_eq!(served_version(&d).await, "1.0.0");

    let (s, v) = upload(&d, archive, Some(TOKEN)).await;
    assert_eq!(s, 201, "installed: {v}");
    assert_eq!(v["name"], "digits");
    assert_eq!(v["version"], "2.0.0");
    assert_eq!(v["replaced"]["version"], "1.0.0");
    assert_eq!(served_version(&d).await, "2.0.0");
    classifies(&d).await;
    d.stop().await;

    // Persisted: the next start serves the installed version.
    let d = TestDaemon::start_with(config, tempfile::tempdir().expect("unused")).await;
    assert_eq!(
        served_version(&d).await,
        "2.0.0",
        "installed bundle survives a restart"
    );
    classifies(&d).await;
    // A plain tar (no gzip) of version 3 replaces it again.
    let work3 = tempfile::tempdir().expect("tmp");
    let plain = pack(
        &digits_version(work3.path(), "3.0.0", 0),
        &work3.path().join("b.tar"),
        false,
    );
    let (s, v) = upload(&d, plain, Some(TOKEN)).await;
    assert_eq!(s, 201, "plain tar: {v}");
    assert_eq!(served_version(&d).await, "3.0.0");
    d.stop().await;
    // Current and previous versions are kept, older ones deleted.
    let kept = std::fs::read_dir(data.path().join("models/.versions/digits"))
        .expect("versions")
        .count();
    assert_eq!(kept, 2, "current + previous version kept");
    assert!(incoming_is_empty(data.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bundles_are_refused_and_the_old_version_keeps_serving() {
    ensure_zoo();
    let data = tempfile::tempdir().expect("tmp");
    let mut config = test_config(data.path());
    with_token(&mut config);
    let d = TestDaemon::start_with(config, tempfile::tempdir().expect("unused")).await;

    // Without a configured token, uploads are off entirely.
    let open = TestDaemon::start(|c| {
        c.daemon.models = vec!["digits".into()];
        c.training.enabled = false;
    })
    .await;
    let w = tempfile::tempdir().expect("tmp");
    let good = pack(
        &digits_version(w.path(), "2.0.0", 0),
        &w.path().join("g.tar"),
        false,
    );
    let (s, v) = upload(&open, good.clone(), None).await;
    assert_eq!(s, 403, "{v}");
    assert!(message(&v).contains("auth_token_file"), "{v}");
    open.stop().await;

    // A tampered file: the head's bytes no longer match the manifest.
    let w = tempfile::tempdir().expect("tmp");
    let b = digits_version(w.path(), "2.0.0", 0);
    let head = b.join("head.safetensors");
    let mut bytes = std::fs::read(&head).expect("head");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::remove_file(&head).expect("unlink hard link");
    std::fs::write(&head, bytes).expect("tamper");
    let (s, v) = upload(&d, pack(&b, &w.path().join("t.tgz"), true), Some(TOKEN)).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "bad_bundle");
    assert!(
        message(&v).contains("head.safetensors") && message(&v).contains("sha256"),
        "names the tampered file: {v}"
    );

    // A model tract cannot load (checksum right, contents not ONNX).
    let w = tempfile::tempdir().expect("tmp");
    let b = digits_version(w.path(), "2.0.0", 0);
    let onnx = b.join("backbone.onnx");
    std::fs::remove_file(&onnx).expect("unlink");
    std::fs::write(&onnx, b"this is not an ONNX protobuf").expect("write");
    let sha = dai_infer::bundle::sha256_file(&onnx).expect("sha").0;
    let m = b.join("manifest.toml");
    let text = std::fs::read_to_string(&m).expect("manifest");
    let text = text.replace(
        "0eb85be23f00d20601205f1c83ef15dcb932ca080187e99b217f68609d25b4d5",
        &sha,
    );
    std::fs::write(&m, text).expect("manifest");
    let (s, v) = upload(&d, pack(&b, &w.path().join("u.tgz"), true), Some(TOKEN)).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        message(&v).contains("refused") && message(&v).contains("backbone.onnx"),
        "says the model does not load: {v}"
    );

    // A truncated archive (the first half of a plain tar).
    let half = good[..good.len() / 2].to_vec();
    let (s, v) = upload(&d, half, Some(TOKEN)).await;
    assert_eq!(s, 400, "{v}");
    assert!(message(&v).contains("bad bundle archive"), "{v}");

    // An entry that climbs out of the bundle.
    let mut evil = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_size(4);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    evil.append(&h, &b"evil"[..]).expect("append");
    let (s, v) = upload(&d, evil.into_inner().expect("tar"), Some(TOKEN)).await;
    assert_eq!(s, 400, "{v}");
    assert!(message(&v).contains(".."), "{v}");
    assert!(!data.path().join("models/escape").exists());
    assert!(!data.path().join("escape").exists());

    // A body cut short: Content-Length promises the whole archive, the
    // client sends half and hangs up.
    let addr = d.base.trim_start_matches("http://").to_string();
    let good_len = good.len();
    let half = good[..good_len / 2].to_vec();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        write!(
            s,
            "POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: {good_len}\r\n\r\n"
        )
        .expect("head");
        s.write_all(&half).expect("half");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .expect("client");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "a cut body is refused: {answer}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !incoming_is_empty(data.path()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        incoming_is_empty(data.path()),
        "nothing left of refused uploads"
    );

    assert_eq!(
        served_version(&d).await,
        "1.0.0",
        "old version still served"
    );
    classifies(&d).await;
    let models = std::fs::read_dir(data.path().join("models"))
        .expect("models dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .count();
    assert_eq!(models, 0, "no refused bundle installed");
    d.stop().await;
}

/// A refusal reaches a client still sending a large body: the daemon reads
/// and drops it (bounded) before answering, instead of closing the
/// connection under the client, which then saw a broken pipe, not the 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reaches_a_client_still_sending_its_body() {
    ensure_zoo();
    let data = tempfile::tempdir().expect("tmp");
    let mut config = test_config(data.path());
    with_token(&mut config);
    let d = TestDaemon::start_with(config, tempfile::tempdir().expect("unused")).await;
    // Larger than the loopback socket buffers, so the client is mid-write
    // when the answer comes.
    let body: Vec<u8> = (0..6usize << 20).map(|i| (i * 7 % 253) as u8).collect();
    for _ in 0..3 {
        let (s, v) = upload(&d, body.clone(), None).await;
        assert_eq!(s, 401, "no token: {v}");
        let (s, v) = upload(&d, body.clone(), Some("wrong-token-0123456789")).await;
        assert_eq!(s, 401, "wrong token: {v}");
    }
    d.stop().await;
    assert!(incoming_is_empty(data.path()));

    let open = TestDaemon::start(|c| {
        c.daemon.models = vec!["digits".into()];
        c.training.enabled = false;
    })
    .await;
    let (s, v) = upload(&open, body, None).await;
    assert_eq!(s, 403, "uploads off without a token: {v}");
    open.stop().await;
}
