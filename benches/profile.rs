//! Where each zoo model's time goes, in tract and in onnxruntime, side by
//! side on the same single-row inputs (the reference fixtures), 1 thread:
//!
//! - tract: `dai-models inspect --profile`'s timer (`dai_models::profile`:
//!   every node of the optimised plan timed through tract's
//!   `run_plan_with_eval` hook), grouped by tract's operator;
//! - onnxruntime: its own profiler (`bench/ort_latency.py --profile`),
//!   kernel time grouped by ORT's kernel op (after its fusions).
//!
//! Both runtimes fuse and rename differently, so the tables name each
//! one's own operators; the point is which kernels hold the time. Medians
//! over rounds of each round's per-operator means. Writes its section of
//! `docs/benchmarks.md`.
//!
//! Run: `cargo bench --bench profile` (env: DAI_BENCH_ROUNDS, default 3;
//! DAI_BENCH_PROFILE_RUNS, default 50; DAI_PYTHON).

mod common;
use common::fixtures::{inputs as fixture_inputs, write_inputs};
use common::{env_usize, median, repo, write_section};

use dai_infer::tensor::{Data, TensorData};
use dai_models::runner::{self, Runner};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::Path;
use std::process::Command;
use tract_onnx::prelude::Tensor;

const MODELS: &[&str] = &["pp-ocr-cls", "silero-vad", "minilm-l3"];
/// Operators listed per runtime and model.
const ROWS: usize = 8;

fn tract_tensor(t: &TensorData) -> Tensor {
    let r = match &t.data {
        Data::F32(v) => Tensor::from_shape(&t.shape, v),
        Data::I64(v) => Tensor::from_shape(&t.shape, v),
        Data::I32(v) => Tensor::from_shape(&t.shape, v),
        Data::U8(v) => Tensor::from_shape(&t.shape, v),
        Data::I8(v) => Tensor::from_shape(&t.shape, v),
    };
    r.expect("tract tensor")
}

/// Per-operator mean ms per run, node counts, and the run time.
#[derive(Default)]
struct Side {
    ops: BTreeMap<String, (usize, Vec<f64>)>,
    nodes_ms: Vec<f64>,
    run_ms: Vec<f64>,
}

impl Side {
    fn add(&mut self, op: &str, nodes: usize, ms: f64) {
        let e = self.ops.entry(op.to_string()).or_default();
        e.0 = nodes;
        e.1.push(ms);
    }

    /// (op, nodes, median ms, share of the median node sum), slowest first.
    fn rows(&self) -> Vec<(String, usize, f64, f64)> {
        let total = median(self.nodes_ms.clone());
        let mut rows: Vec<_> = self
            .ops
            .iter()
            .map(|(op, (n, ms))| {
                let m = median(ms.clone());
                (op.clone(), *n, m, m / total)
            })
            .collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        rows
    }
}

fn ort_profile(
    model: &Path,
    inputs: &Path,
    outputs: &str,
    runs: usize,
) -> (serde_json::Value, String) {
    let python = std::env::var("DAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .arg(repo().join("bench/ort_latency.py"))
        .arg("--model")
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .args([
            "--outputs",
            outputs,
            "--warmup",
            "5",
            "--iters",
            &runs.to_string(),
        ])
        .args(["--threads", "1", "--profile"])
        .output()
        .expect("run bench/ort_latency.py (pip install onnxruntime numpy safetensors)");
    assert!(
        out.status.success(),
        "ort_latency.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ort json");
    let version = v["ort_version"].as_str().unwrap_or("?").to_string();
    (v["profile"].clone(), version)
}

fn main() {
    let rounds = env_usize("DAI_BENCH_ROUNDS", 3).max(1);
    let runs = env_usize("DAI_BENCH_PROFILE_RUNS", 50).max(1);
    let tmp = tempfile::tempdir().expect("tmp");
    let mut md = String::new();
    let mut summary = String::new();
    let mut ort_version = String::new();
    for &name in MODELS {
        let dir = repo().join("models/zoo").join(name);
        dai_infer::fetch::ensure_model(&dir, &dai_infer::fetch::default_wheel_cache())
            .unwrap_or_else(|e| panic!("fetching {name}: {e}"));
        let bundle = dai_infer::Bundle::open(&dir).expect("bundle");
        let r = dai_models::bundle_io::resolve_ref(&dir, vec![]).expect("resolve");
        let proto = dai_models::proto::load(&r.file).expect("model");
        // Keyed by ONNX name: what tract's runner and onnxruntime take.
        let inputs: Vec<(String, TensorData)> = fixture_inputs(name, &bundle)
            .into_iter()
            .zip(&bundle.manifest.inputs)
            .map(|((_, t), spec)| {
                (
                    spec.onnx_name.clone().unwrap_or_else(|| spec.name.clone()),
                    t,
                )
            })
            .collect();
        let shapes: HashMap<String, Vec<usize>> = inputs
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect();
        let (specs, _) = runner::input_specs(&proto, &shapes).expect("input specs");
        let outputs: Vec<String> = bundle
            .manifest
            .outputs
            .iter()
            .map(|o| o.onnx_name.clone().unwrap_or_else(|| o.name.clone()))
            .collect();
        let runner =
            Runner::new(&proto, &specs, r.ignore_value_info, Some(&outputs)).expect("plan");
        let tensors: Vec<Tensor> = specs
            .iter()
            .map(|s| {
                let (_, t) = inputs
                    .iter()
                    .find(|(n, _)| *n == s.name)
                    .expect("fixture for input");
                tract_tensor(t)
            })
            .collect();
        let inputs_file = tmp.path().join(format!("{name}.safetensors"));
        write_inputs(&inputs_file, &inputs);
        let (mut tract, mut ort) = (Side::default(), Side::default());
        for round in 0..rounds {
            eprintln!("{name}: round {}/{rounds}", round + 1);
            let p = runner.profile(&tensors, runs).expect("tract profile");
            for o in &p.by_op {
                tract.add(&o.op, o.nodes, o.ms);
            }
            tract.nodes_ms.push(p.nodes_ms);
            tract.run_ms.push(p.run_ms);
            let (v, version) = ort_profile(&r.file, &inputs_file, &outputs.join(","), runs);
            ort_version = version;
            for o in v["by_op"].as_array().expect("by_op") {
                ort.add(
                    o["op"].as_str().unwrap_or("?"),
                    o["nodes"].as_u64().unwrap_or(0) as usize,
                    o["ms"].as_f64().unwrap_or(0.0),
                );
            }
            ort.nodes_ms.push(v["nodes_ms"].as_f64().expect("nodes_ms"));
            ort.run_ms.push(v["run_ms"].as_f64().expect("run_ms"));
        }
        let (t, o) = (median(tract.nodes_ms.clone()), median(ort.nodes_ms.clone()));
        let _ = writeln!(
            summary,
            "| {name} | {t:.3} | {o:.3} | {:.2} | {:.3} | {:.3} |",
            t / o,
            median(tract.run_ms.clone()),
            median(ort.run_ms.clone()),
        );
        let _ = writeln!(md, "\n### {name}\n");
        let _ = writeln!(
            md,
            "| # | tract operator | nodes | ms | share | onnxruntime kernel | nodes | ms | share |\n|---|---|---|---|---|---|---|---|---|"
        );
        let (tr, or) = (tract.rows(), ort.rows());
        for i in 0..ROWS.min(tr.len().max(or.len())) {
            let cell = |r: Option<&(String, usize, f64, f64)>| {
                r.map_or(" | | | ".to_string(), |(op, n, ms, share)| {
                    format!("`{op}` | {n} | {ms:.3} | {:.1}%", share * 100.0)
                })
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                i + 1,
                cell(tr.get(i)),
                cell(or.get(i))
            );
        }
    }
    let mut doc = String::new();
    let _ = writeln!(
        doc,
        "## Inference: where each model's time goes (tract vs onnxruntime, per operator)\n\n\
         Command: `cargo bench --bench profile` ({rounds} rounds of {runs} profiled runs after warm-up, 1 thread, single-row inputs from `tests/fixtures`). \
         tract: every node of the optimised plan timed through tract's own evaluation hook (what `dai-models inspect --profile N` prints); \
         onnxruntime {ort_version}: its profiler's kernel times (`bench/ort_latency.py --profile`). Each runtime fuses and renames operators its own way, \
         so each column names its own; ms are per run, medians over rounds. Machine: 2 cores, shared.\n\n\
         | model | tract, sum of nodes (ms) | onnxruntime, sum of kernels (ms) | ratio | tract run with the hook (ms) | onnxruntime run with its profiler (ms) |\n|---|---|---|---|---|---|"
    );
    doc.push_str(&summary);
    doc.push_str(&md);
    write_section("profile", &doc);
    print!("{doc}");
}
