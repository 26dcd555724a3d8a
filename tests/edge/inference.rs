//! Real zoo models through HTTP match onnxruntime's reference outputs.

use crate::support::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zoo_outputs_match_onnxruntime_within_1e4() {
    let d = TestDaemon::start(|_| {}).await;
    for model in ZOO {
        let fx = fixture(model);
        let (status, body) = d.infer(model, &fx.request()).await;
        assert_eq!(status, 200, "{model}: {body}");
        assert_eq!(body["model"], *model);
        for (name, (shape, want)) in &fx.outputs {
            let out = &body["outputs"][name];
            let got_shape: Vec<usize> = out["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|x| x.as_u64().expect("dim") as usize)
                .collect();
            assert_eq!(&got_shape, shape, "{model}.{name} shape");
            let diff = max_abs_diff(&floats(&out["data"]), want);
            assert!(
                diff <= 1e-4,
                "{model}.{name}: max |ours - onnxruntime| = {diff}"
            );
        }
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_binary_body_gives_the_same_answer() {
    let d = TestDaemon::start(|c| c.caching_enabled = false).await;
    let fx = fixture("pp-ocr-cls");
    let (shape, data, _) = &fx.inputs["x"];
    let bytes: Vec<u8> = floats(data).iter().flat_map(|x| x.to_le_bytes()).collect();
    let r = d
        .client
        .post(d.url("/v1/models/pp-ocr-cls/infer"))
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["outputs"]["probs"]["shape"], json!([shape[0], 2]));
    let diff = max_abs_diff(
        &floats(&body["outputs"]["probs"]["data"]),
        &fx.outputs["probs"].1,
    );
    assert!(diff <= 1e-4, "raw body diff {diff}");
    // Raw answer too.
    let r = d
        .client
        .post(d.url("/v1/models/pp-ocr-cls/infer"))
        .header("content-type", "application/octet-stream")
        .header("accept", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-dai-output-shapes"], "probs:f32:2x2");
    let raw = r.bytes().await.expect("bytes");
    let got: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(max_abs_diff(&got, &fx.outputs["probs"].1) <= 1e-4);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u8_pixels_are_normalised_by_the_manifest() {
    let d = TestDaemon::start(|c| c.caching_enabled = false).await;
    let px: Vec<u8> = (0..3 * 48 * 192).map(|i| ((i * 31) % 256) as u8).collect();
    let as_f32: Vec<f32> = px.iter().map(|&p| (p as f32 / 255.0 - 0.5) / 0.5).collect();
    let (s1, a) = d
        .infer(
            "pp-ocr-cls",
            &json!({"inputs": {"x": {"dtype": "u8", "shape": [1, 3, 48, 192], "data": px}}}),
        )
        .await;
    let (s2, b) = d
        .infer(
            "pp-ocr-cls",
            &json!({"inputs": {"x": {"shape": [1, 3, 48, 192], "data": as_f32}}}),
        )
        .await;
    assert_eq!((s1, s2), (200, 200), "{a} {b}");
    let diff = max_abs_diff(
        &floats(&a["outputs"]["probs"]["data"]),
        &floats(&b["outputs"]["probs"]["data"]),
    );
    assert!(diff <= 1e-5, "u8 path differs from f32 path by {diff}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_split_correctly() {
    // One worker: while it runs the first MiniLM request (tens of ms), the
    // others queue and are then run together as one batch.
    let d = TestDaemon::start(|c| {
        c.max_parallel_agents = 1;
        c.caching_enabled = false;
        c.daemon.max_batch_wait_ms = 20;
        c.latency_threshold_ms = 1e6;
    })
    .await;
    let fx = fixture("minilm-l3");
    let row_of = |name: &str, r: usize| -> serde_json::Value {
        let (_, data, _) = &fx.inputs[name];
        let all = data.as_array().expect("ids");
        json!(all[r * 128..(r + 1) * 128].to_vec())
    };
    let want = &fx.outputs["embedding"].1;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let r = i % 2;
        let body = json!({"inputs": {
            "input_ids": {"shape": [1, 128], "data": row_of("input_ids", r)},
            "attention_mask": {"shape": [1, 128], "data": row_of("attention_mask", r)},
        }});
        let client = d.client.clone();
        let url = d.url("/v1/models/minilm-l3/infer");
        tasks.push(tokio::spawn(async move {
            let resp = client.post(url).json(&body).send().await.expect("post");
            (r, resp.json::<serde_json::Value>().await.expect("json"))
        }));
    }
    let mut largest = 0;
    for t in tasks {
        let (r, body) = t.await.expect("task");
        let got = floats(&body["outputs"]["embedding"]["data"]);
        let diff = max_abs_diff(&got, &want[r * 384..(r + 1) * 384]);
        assert!(
            diff <= 1e-4,
            "row {r} wrong after batching (diff {diff}): batch {}",
            body["batch"]
        );
        largest = largest.max(body["batch"]["requests"].as_u64().expect("batch requests"));
    }
    assert!(largest >= 2, "six concurrent requests never shared a batch");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_request_does_not_fail_the_batch_it_joined() {
    // Token id 999999 is outside MiniLM's vocabulary: tract fails on it.
    let d = TestDaemon::start(|c| {
        c.max_parallel_agents = 1;
        c.caching_enabled = false;
        c.daemon.max_batch_wait_ms = 20;
        c.latency_threshold_ms = 1e6;
        c.daemon.models = vec!["minilm-l3".into()];
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..6i64 {
        let ids: Vec<i64> = if i == 3 {
            vec![999_999; 128]
        } else {
            (0..128)
                .map(|j| if j < 10 { 1000 + i + j } else { 0 })
                .collect()
        };
        let mask: Vec<i64> = (0..128).map(|j| i64::from(j < 10)).collect();
        let body = json!({"inputs": {"input_ids": {"shape": [1, 128], "data": ids}, "attention_mask": {"shape": [1, 128], "data": mask}}});
        let client = d.client.clone();
        let url = d.url("/v1/models/minilm-l3/infer");
        tasks.push(tokio::spawn(async move {
            (
                i,
                client
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .expect("post")
                    .status()
                    .as_u16(),
            )
        }));
    }
    for t in tasks {
        let (i, status) = t.await.expect("task");
        assert_eq!(status, if i == 3 { 500 } else { 200 }, "request {i}");
    }
    d.stop().await;
}
