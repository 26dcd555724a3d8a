//! Every kind of bad input gets a precise 4xx (or a refused model) and the
//! daemon keeps serving.

use crate::support::*;
use serde_json::{Value, json};

async fn post_raw(d: &TestDaemon, model: &str, ctype: &str, body: Vec<u8>) -> (u16, Value) {
    let r = d
        .client
        .post(d.url(&format!("/v1/models/{model}/infer")))
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .expect("post");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_are_precise() {
    let d = TestDaemon::start(|c| c.daemon.max_body_mb = 1).await;

    let (s, b) = post_raw(
        &d,
        "pp-ocr-cls",
        "application/json",
        b"{\"inputs\": {".to_vec(),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        message(&b).contains("malformed JSON body") && message(&b).contains("line 1"),
        "{b}"
    );

    let (s, b) = d
        .infer(
            "pp-ocr-cls",
            &json!({"inputs": {"x": {"shape": [1, 3, 48, 100], "data": vec![0.0; 3 * 48 * 100]}}}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        message(&b).contains("shape [1, 3, 48, 100] but the model expects [N, 3, 48, 192]"),
        "{b}"
    );

    let (s, b) = d
        .infer(
            "pp-ocr-cls",
            &json!({"inputs": {"x": {"shape": [1, 3, 48, 192], "data": vec![0.0; 10]}}}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(message(&b).contains("needs 27648 elements, got 10"), "{b}");

    let (s, b) = d
        .infer("minilm-l3", &json!({"inputs": {"input_ids": {"dtype": "f32", "shape": [1, 128], "data": vec![1.0; 128]}, "attention_mask": {"shape": [1, 128], "data": vec![1; 128]}}}))
        .await;
    assert_eq!(s, 400);
    assert!(
        message(&b).contains("input \"input_ids\": dtype f32 but the model expects i64"),
        "{b}"
    );

    let (s, b) = d
        .infer(
            "minilm-l3",
            &json!({"inputs": {"input_ids": {"shape": [1, 128], "data": vec![0.5; 128]}}}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        message(&b).contains("inputs.input_ids.data[0]: expected an integer"),
        "{b}"
    );

    let (s, b) = d
        .infer(
            "minilm-l3",
            &json!({"inputs": {"input_ids": {"shape": [1, 128], "data": vec![1; 128]}}}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        message(&b).contains("missing input \"attention_mask\""),
        "{b}"
    );

    let (s, b) = d
        .infer(
            "pp-ocr-cls",
            &json!({"inputs": {"image": {"shape": [1], "data": [0.0]}}}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(message(&b).contains("unknown input \"image\""), "{b}");

    let (s, b) = d.infer("no-such-model", &json!({"inputs": {}})).await;
    assert_eq!(s, 404);
    assert_eq!(b["error"]["code"], "unknown_model");
    assert!(
        message(&b).contains("\"no-such-model\"") && message(&b).contains("pp-ocr-cls"),
        "{b}"
    );

    let (s, b) = post_raw(
        &d,
        "pp-ocr-cls",
        "application/octet-stream",
        vec![0u8; 2 * 1024 * 1024],
    )
    .await;
    assert_eq!(s, 413, "{b}");
    assert!(message(&b).contains("max_body_mb = 1"), "{b}");

    // One row of x is 3*48*192*4 = 110592 bytes; cut the last 3 bytes.
    let (s, b) = post_raw(
        &d,
        "pp-ocr-cls",
        "application/octet-stream",
        vec![0u8; 110_592 - 3],
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        message(&b).contains("110589 bytes is not a whole number of rows of 110592 bytes"),
        "{b}"
    );

    let (s, b) = post_raw(&d, "pp-ocr-cls", "text/plain", b"hello".to_vec()).await;
    assert_eq!(s, 415, "{b}");

    // Still serving after all that.
    let (s, b) = d.infer("silero-vad", &silero_request(5)).await;
    assert_eq!(s, 200, "{b}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_bundles_are_refused_and_the_rest_serve() {
    let models = tempfile::tempdir().expect("tmp");
    copy_bundle("pp-ocr-cls", models.path());

    // A manifest whose checksum does not match its file.
    let bad_sum = copy_bundle("silero-vad", models.path());
    let m = std::fs::read_to_string(bad_sum.join("manifest.toml")).expect("manifest");
    let m = m.replace(
        "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
        &"0".repeat(64),
    );
    std::fs::write(bad_sum.join("manifest.toml"), m).expect("write");

    // A "model" that is not ONNX, with a manifest that matches its bytes.
    let corrupt = models.path().join("corrupt");
    std::fs::create_dir_all(&corrupt).expect("mkdir");
    let junk = b"this is not an onnx protobuf at all".repeat(10);
    std::fs::write(corrupt.join("model.onnx"), &junk).expect("junk");
    let sum = dai_infer::bundle::sha256_file(&corrupt.join("model.onnx"))
        .expect("sum")
        .0;
    std::fs::write(
        corrupt.join("manifest.toml"),
        format!(
            "name = \"corrupt\"\nversion = \"1\"\n[model]\nfile = \"model.onnx\"\nsha256 = \"{sum}\"\n\
             [[inputs]]\nname = \"x\"\ndtype = \"f32\"\nshape = [1, 4]\n[[outputs]]\nname = \"y\"\ndtype = \"f32\"\nshape = [1, 4]\n"
        ),
    )
    .expect("manifest");

    // A manifest that does not parse.
    let bad_manifest = models.path().join("bad-manifest");
    std::fs::create_dir_all(&bad_manifest).expect("mkdir");
    std::fs::write(
        bad_manifest.join("manifest.toml"),
        "name = \"bad-manifest\"\nversion = 3\n",
    )
    .expect("manifest");

    let dir = models.path().to_path_buf();
    let d = TestDaemon::start(move |c| c.daemon.models_dir = dir).await;
    let list = d.get_json("/v1/models").await;
    let by_name = |n: &str| {
        list["models"]
            .as_array()
            .expect("models")
            .iter()
            .find(|m| m["name"] == n)
            .cloned()
            .unwrap_or(Value::Null)
    };

    let s = by_name("silero-vad");
    assert_eq!(s["state"], "failed");
    assert!(
        s["error"]
            .as_str()
            .expect("error")
            .contains("sha256 mismatch"),
        "{s}"
    );
    let c = by_name("corrupt");
    assert_eq!(c["state"], "failed");
    assert!(
        c["error"]
            .as_str()
            .expect("error")
            .contains("tract cannot load"),
        "{c}"
    );
    let b = by_name("bad-manifest");
    assert_eq!(b["state"], "failed");
    assert!(
        b["error"]
            .as_str()
            .expect("error")
            .contains("invalid manifest"),
        "{b}"
    );

    let (st, body) = d.infer("silero-vad", &silero_request(1)).await;
    assert_eq!(st, 503);
    assert_eq!(body["error"]["code"], "model_unavailable");

    let fx = fixture("pp-ocr-cls");
    let (st, _) = d.infer("pp-ocr-cls", &fx.request()).await;
    assert_eq!(st, 200, "the good model still serves");
    let ready = d.client.get(d.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);

    // Failures are recorded in the store.
    let events = d.state.store.model_events(20).expect("events");
    assert!(
        events.iter().any(|(_, n, k, detail)| n == "silero-vad"
            && k == "failed"
            && detail.contains("sha256"))
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_refuses_a_model_that_does_not_fit() {
    // MiniLM is 69 MB on disk; 100 MiB cannot hold its two copies.
    let d = TestDaemon::start(|c| c.memory_limit_mb = 100).await;
    let m = d.get_json("/v1/models/minilm-l3").await;
    assert_eq!(m["state"], "failed");
    let err = m["error"].as_str().expect("error");
    assert!(err.contains("memory_limit_mb=100"), "{err}");
    let (st, _) = d.infer("silero-vad", &silero_request(2)).await;
    assert_eq!(st, 200);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_answer_503_with_retry_after() {
    let d = TestDaemon::start(|c| {
        c.max_parallel_agents = 1;
        c.daemon.queue_capacity = 1;
        c.caching_enabled = false;
        c.retry_delay_sec = 3;
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let client = d.client.clone();
        let url = d.url("/v1/models/minilm-l3/infer");
        let ids: Vec<i64> = (0..128)
            .map(|j| if j < 20 { 1000 + i * 7 + j } else { 0 })
            .collect();
        let mask: Vec<i64> = (0..128).map(|j| i64::from(j < 20)).collect();
        let body = json!({"inputs": {"input_ids": {"shape": [1, 128], "data": ids}, "attention_mask": {"shape": [1, 128], "data": mask}}});
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.expect("post");
            (
                r.status().as_u16(),
                r.headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap_or("").to_string()),
            )
        }));
    }
    let mut ok = 0;
    let mut overloaded = 0;
    for t in tasks {
        match t.await.expect("task") {
            (200, _) => ok += 1,
            (503, retry) => {
                assert_eq!(retry.as_deref(), Some("3"));
                overloaded += 1;
            }
            (s, _) => panic!("unexpected status {s}"),
        }
    }
    assert!(
        ok >= 1 && overloaded >= 1,
        "ok {ok}, overloaded {overloaded}"
    );
    d.stop().await;
}
