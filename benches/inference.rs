//! Inference benchmark: dai-edge's runtime vs onnxruntime, side by side.
//!
//! For each zoo model, on the same single-row inputs (from the reference
//! fixtures), in alternating rounds:
//! - `tract plan`: the optimised tract plan our runtime runs (1 thread);
//! - `runtime`: `Runtime::infer` (validation, queue hop to a worker thread,
//!   conversion) with the cache off: what a request pays minus HTTP;
//! - `onnxruntime`: `bench/ort_latency.py` (PyPI onnxruntime, 1 intra-op
//!   thread, same outputs fetched);
//!
//! then end-to-end HTTP throughput against the in-process daemon at a fixed
//! concurrency. Medians over rounds; ratios ours / ORT. Writes its section of
//! `docs/benchmarks.md`.
//!
//! Run: `cargo bench --bench inference` (env: DAI_BENCH_ROUNDS, DAI_BENCH_ITERS,
//! DAI_BENCH_HTTP_SEC, DAI_PYTHON).

mod common;
use common::fixtures::{inputs, write_inputs};
use common::{env_usize, median, repo};

use dai_config::Config;
use dai_infer::tensor::{Data, TensorData};
use dai_infer::{Bundle, LoadedModel, Runtime};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MODELS: &[&str] = &["pp-ocr-cls", "silero-vad", "minilm-l3"];
const BATCH: usize = 8;

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[derive(Default)]
struct Row {
    tract_p50: Vec<f64>,
    tract_p95: Vec<f64>,
    runtime_p50: Vec<f64>,
    runtime_p95: Vec<f64>,
    ort_p50: Vec<f64>,
    ort_p95: Vec<f64>,
    ort_version: String,
    /// Per-row p50 at batch 8 (batching models only).
    tract_b8_row: Vec<f64>,
    ort_b8_row: Vec<f64>,
}

fn time_tract(
    model: &LoadedModel,
    inputs: &[(String, TensorData)],
    warmup: usize,
    iters: usize,
) -> (f64, f64) {
    let refs: Vec<&TensorData> = inputs.iter().map(|(_, t)| t).collect();
    let rows = match inputs.first() {
        Some((_, t)) if model.batching() => t.rows(),
        _ => 1,
    };
    for _ in 0..warmup {
        model.run(&refs, rows).expect("run");
    }
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        model.run(&refs, rows).expect("run");
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (percentile(&mut ms, 0.5), percentile(&mut ms, 0.95))
}

async fn time_runtime(
    rt: &Runtime,
    name: &str,
    inputs: &[(String, TensorData)],
    warmup: usize,
    iters: usize,
) -> (f64, f64) {
    let map = || {
        inputs
            .iter()
            .cloned()
            .collect::<HashMap<String, TensorData>>()
    };
    for _ in 0..warmup {
        rt.infer(name, map(), None).await.expect("infer");
    }
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let m = map();
        let t = Instant::now();
        rt.infer(name, m, None).await.expect("infer");
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (percentile(&mut ms, 0.5), percentile(&mut ms, 0.95))
}

fn time_ort(
    model_path: &Path,
    inputs_path: &Path,
    outputs: &str,
    warmup: usize,
    iters: usize,
) -> (f64, f64, String) {
    let python = std::env::var("DAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .arg(repo().join("bench/ort_latency.py"))
        .arg("--model")
        .arg(model_path)
        .arg("--inputs")
        .arg(inputs_path)
        .args([
            "--outputs",
            outputs,
            "--warmup",
            &warmup.to_string(),
            "--iters",
            &iters.to_string(),
            "--threads",
            "1",
        ])
        .output()
        .expect("run bench/ort_latency.py (pip install onnxruntime numpy safetensors)");
    assert!(
        out.status.success(),
        "ort_latency.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ort json");
    (
        v["p50_ms"].as_f64().expect("p50"),
        v["p95_ms"].as_f64().expect("p95"),
        v["ort_version"].as_str().unwrap_or("?").to_string(),
    )
}

struct Http {
    rps: f64,
    p50: f64,
    p95: f64,
    requests: usize,
    batch_mean: f64,
}

async fn http_throughput(
    model: &str,
    body: serde_json::Value,
    concurrency: usize,
    secs: u64,
) -> Http {
    let data = tempfile::tempdir().expect("tmp");
    let mut c = Config::default();
    c.daemon.data_dir = data.path().to_path_buf();
    c.daemon.models_dir = repo().join("models/zoo");
    c.daemon.models = vec![model.to_string()];
    c.caching_enabled = false;
    c.profiling_enabled = false;
    c.daemon.queue_capacity = 1024;
    let daemon = dai_edge::Daemon::build(c).await.expect("daemon");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/v1/models/{model}/infer",
        listener.local_addr().expect("addr")
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(daemon.serve(listener, async move {
        let _ = stop_rx.await;
    }));
    let body = std::sync::Arc::new(serde_json::to_vec(&body).expect("json"));
    let client = reqwest::Client::new();
    // Warm up (lazy batch plans).
    for _ in 0..concurrency * 2 {
        let _ = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await;
    }
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut rows = Vec::new();
            while Instant::now() < until && lat.len() < 100_000 {
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_vec())
                    .send()
                    .await
                    .expect("post");
                assert_eq!(r.status(), 200);
                let v: serde_json::Value = r.json().await.expect("json");
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                rows.push(v["batch"]["requests"].as_f64().unwrap_or(1.0));
            }
            (lat, rows)
        }));
    }
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut rows = Vec::new();
    for t in tasks {
        let (l, r) = t.await.expect("task");
        lat.extend(l);
        rows.extend(r);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let _ = server.await;
    let n = lat.len();
    Http {
        rps: n as f64 / elapsed,
        p50: percentile(&mut lat, 0.5),
        p95: percentile(&mut lat, 0.95),
        requests: n,
        batch_mean: rows.iter().sum::<f64>() / rows.len().max(1) as f64,
    }
}

fn json_body(inputs: &[(String, TensorData)]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (n, t) in inputs {
        let data: serde_json::Value = match &t.data {
            Data::F32(v) => serde_json::json!(v),
            Data::I64(v) => serde_json::json!(v),
            Data::I32(v) => serde_json::json!(v),
            Data::U8(v) => serde_json::json!(v),
            Data::I8(v) => serde_json::json!(v),
        };
        m.insert(
            n.clone(),
            serde_json::json!({"dtype": t.dtype(), "shape": t.shape, "data": data}),
        );
    }
    serde_json::json!({ "inputs": m })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds = env_usize("DAI_BENCH_ROUNDS", 5);
    let iters = env_usize("DAI_BENCH_ITERS", 200);
    let http_secs = env_usize("DAI_BENCH_HTTP_SEC", 5) as u64;
    let concurrency = 8;
    let warmup = 20;
    let zoo = repo().join("models/zoo");
    let cache = dai_infer::fetch::default_wheel_cache();
    let tmp = tempfile::tempdir().expect("tmp");
    let rt_async = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let mut cfg = Config {
        max_parallel_agents: 1,
        caching_enabled: false,
        ..Default::default()
    };
    cfg.daemon.max_batch_wait_ms = 0;
    let runtime = Runtime::new(&cfg.runtime_options());

    let mut rows: BTreeMap<&str, Row> = BTreeMap::new();
    let mut loaded = Vec::new();
    for name in MODELS {
        let dir = zoo.join(name);
        dai_infer::fetch::ensure_model(&dir, &cache).expect("fetch zoo model");
        let bundle = Bundle::open(&dir).expect("bundle");
        let ins = inputs(name, &bundle);
        let path = tmp.path().join(format!("{name}.safetensors"));
        write_inputs(&path, &ins);
        let outputs: Vec<&str> = bundle
            .manifest
            .outputs
            .iter()
            .map(|s| s.onnx_name())
            .collect();
        let outputs = outputs.join(",");
        let model_path = bundle.model_path();
        let batching = bundle.manifest.batching;
        let model = LoadedModel::load(bundle, BATCH).expect("load");
        let _ = runtime.load_bundle(&dir);
        let b8 = batching.then(|| {
            let ins8: Vec<(String, TensorData)> = ins
                .iter()
                .map(|(n, t)| {
                    (
                        n.clone(),
                        TensorData::concat_rows(&[t; BATCH], BATCH).expect("batch"),
                    )
                })
                .collect();
            let p8 = tmp.path().join(format!("{name}-b{BATCH}.safetensors"));
            write_inputs(&p8, &ins8);
            (ins8, p8)
        });
        loaded.push((*name, model, ins, path, outputs, model_path, b8));
    }
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (name, model, ins, path, outputs, model_path, b8) in &loaded {
            let row = rows.entry(name).or_default();
            let (p50, p95) = time_tract(model, ins, warmup, iters);
            row.tract_p50.push(p50);
            row.tract_p95.push(p95);
            let (p50, p95) = rt_async.block_on(time_runtime(&runtime, name, ins, warmup, iters));
            row.runtime_p50.push(p50);
            row.runtime_p95.push(p95);
            let (p50, p95, v) = time_ort(model_path, path, outputs, warmup, iters);
            row.ort_p50.push(p50);
            row.ort_p95.push(p95);
            row.ort_version = v;
            if let Some((ins8, p8)) = b8 {
                let (t50, _) = time_tract(model, ins8, warmup / 4, iters / 4);
                let (o50, _, _) = time_ort(model_path, p8, outputs, warmup / 4, iters / 4);
                row.tract_b8_row.push(t50 / BATCH as f64);
                row.ort_b8_row.push(o50 / BATCH as f64);
            }
        }
    }
    let mut http = Vec::new();
    for (name, _, ins, ..) in &loaded {
        eprintln!("HTTP {name}: {concurrency} clients for {http_secs} s");
        http.push((
            *name,
            rt_async.block_on(http_throughput(
                name,
                json_body(ins),
                concurrency,
                http_secs,
            )),
        ));
    }

    let mut md = String::new();
    md.push_str("## Inference latency: dai-edge runtime vs onnxruntime\n\n");
    md.push_str(&format!(
        "Command: `cargo bench --bench inference` (rounds {rounds}, {iters} timed runs each after {warmup} warm-up, 1 thread, single-row inputs from `tests/fixtures`). \
         Machine: 2 cores, shared and noisy; figures are medians over rounds of each round's p50/p95, in ms. onnxruntime {} from PyPI via `bench/ort_latency.py`. \
         `tract plan` = the optimised plan alone; `runtime` = `Runtime::infer` (validation, worker-thread hop, conversions; cache off).\n\n",
        rows.values().next().map(|r| r.ort_version.as_str()).unwrap_or("?")
    ));
    md.push_str("| model | tract plan p50 | runtime p50 | runtime p95 | onnxruntime p50 | onnxruntime p95 | ratio tract/ORT (p50) | ratio runtime/ORT (p50) |\n|---|---|---|---|---|---|---|---|\n");
    for name in MODELS {
        let r = &rows[name];
        let (t50, r50, r95, o50, o95) = (
            median(r.tract_p50.clone()),
            median(r.runtime_p50.clone()),
            median(r.runtime_p95.clone()),
            median(r.ort_p50.clone()),
            median(r.ort_p95.clone()),
        );
        md.push_str(&format!(
            "| {name} | {t50:.3} | {r50:.3} | {r95:.3} | {o50:.3} | {o95:.3} | {:.2} | {:.2} |\n",
            t50 / o50,
            r50 / o50
        ));
    }
    md.push_str(&format!(
        "\n### Batching: per-row latency at batch {BATCH}\n\nSame row repeated {BATCH} times, one run, time divided by {BATCH} (p50, ms per row).\n\n\
         | model | tract per row @{BATCH} | ORT per row @{BATCH} | ratio | tract speed-up vs batch 1 |\n|---|---|---|---|---|\n"
    ));
    for name in MODELS {
        let r = &rows[name];
        if r.tract_b8_row.is_empty() {
            md.push_str(&format!("| {name} | no batch axis (stateful) | | | |\n"));
            continue;
        }
        let (t, o) = (median(r.tract_b8_row.clone()), median(r.ort_b8_row.clone()));
        md.push_str(&format!(
            "| {name} | {t:.3} | {o:.3} | {:.2} | {:.2}x |\n",
            t / o,
            median(r.tract_p50.clone()) / t
        ));
    }
    md.push_str(&format!(
        "\n### End-to-end HTTP throughput\n\n{concurrency} concurrent keep-alive clients for {http_secs} s per model, JSON bodies, cache off, dynamic batching as each manifest says (off for pp-ocr-cls), batch_size 8, 2 workers, client and daemon on the same 2 cores.\n\n\
         | model | requests | throughput (req/s) | client p50 ms | client p95 ms | mean requests per batch |\n|---|---|---|---|---|---|\n"
    ));
    for (name, h) in &http {
        md.push_str(&format!(
            "| {name} | {} | {:.1} | {:.2} | {:.2} | {:.2} |\n",
            h.requests, h.rps, h.p50, h.p95, h.batch_mean
        ));
    }
    println!("{md}");
    common::write_section("inference", &md);
    drop(runtime);
}
