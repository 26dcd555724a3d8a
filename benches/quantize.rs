//! Model optimisation benchmark: `dai-models quantize` forms vs f32, in our
//! runtime (tract) and in onnxruntime, on the same files and inputs.
//!
//! For each zoo model with an ONNX file (the digits and imu-anomaly bundles
//! exported as one file, pp-ocr-cls, minilm-l3, silero-vad):
//! - size of f32, int8, int8-weights and f16 files;
//! - latency (median of rounds of median-of-runs, 1 thread) in tract and in
//!   onnxruntime (Python, intra_op_num_threads=1) for the same files;
//! - accuracy on labelled samples (digits: the UCI set; imu: simulated
//!   windows not used in training) or max |quantized - f32| on fresh inputs;
//! - for pp-ocr-cls and minilm-l3, the files onnxruntime's own quantization
//!   tools make (quantize_dynamic, quantize_static QDQ) timed the same way:
//!   the forms tract runs slowly, which is why ours differ.
//!
//! `cargo bench --bench quantize` writes its section of docs/benchmarks.md.
//! DAI_BENCH_ROUNDS (default 3), DAI_BENCH_RUNS (timed runs per round, 30).

mod common;
use common::{env_usize, median, repo};

use dai_models::calib::SampleSet;
use dai_models::quantize::{self, Calibration, Mode, QuantizeOptions};
use dai_models::{calib, proto, runner};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Case {
    name: &'static str,
    file: PathBuf,
    shapes: HashMap<String, Vec<usize>>,
    ignore_value_info: bool,
    calibration: String,
    /// Labelled samples for accuracy, or None: deviation on random inputs.
    labelled: Option<SampleSet>,
    check: Vec<String>,
}

struct Row {
    form: String,
    file: PathBuf,
    bytes: u64,
    tract_ms: f64,
    ort_ms: Option<f64>,
    quality: String,
    accepted: Option<bool>,
}

fn zoo(name: &str) -> PathBuf {
    let dir = repo().join("models/zoo").join(name);
    dai_infer::fetch::ensure_model(&dir, &dai_infer::fetch::default_wheel_cache())
        .unwrap_or_else(|e| panic!("fetching {name}: {e}"));
    dir
}

fn export(bundle: &str, out: &Path) -> PathBuf {
    dai_models::export::export(
        &repo().join("models/zoo").join(bundle),
        out,
        &dai_models::export::ExportOptions {
            head: None,
            samples: 4,
            tolerance: 1e-4,
            python: Some("off".into()),
        },
    )
    .unwrap_or_else(|e| panic!("export {bundle}: {e}"));
    out.to_path_buf()
}

fn imu_samples(specs: &[runner::InputSpec]) -> SampleSet {
    let rows = dai_models::train_imu::labelled_windows(100, 90_000_000);
    SampleSet {
        source: "simulated IMU windows (300, unseen seeds)".into(),
        samples: rows
            .iter()
            .map(|(f, _)| vec![runner::Tensor::from_shape(&specs[0].shape, f).expect("tensor")])
            .collect(),
        labels: Some(rows.iter().map(|(_, l)| *l as i64).collect()),
    }
}

fn tract_latency(
    file: &Path,
    case: &Case,
    specs: &[runner::InputSpec],
    rounds: usize,
    runs: usize,
) -> f64 {
    let m = proto::load(file).expect("load");
    let r = runner::Runner::new(&m, specs, case.ignore_value_info, None).expect("tract");
    let inputs = runner::synthetic_inputs(specs, 3).expect("inputs");
    median(
        (0..rounds)
            .map(|_| r.latency_ms(&inputs, runs).expect("run"))
            .collect(),
    )
}

/// Median ms per file in onnxruntime, 1 thread; None where it cannot run.
fn ort_latency(
    files: &[PathBuf],
    specs: &[runner::InputSpec],
    rounds: usize,
    runs: usize,
) -> Vec<Option<f64>> {
    let script = r#"
import json, sys, time, statistics
try:
    import numpy as np, onnxruntime as ort
except ImportError as e:
    print(json.dumps({"error": str(e)})); sys.exit(0)
job = json.loads(sys.stdin.read())
rng = np.random.default_rng(3)
out = []
for f in job["files"]:
    try:
        o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
        s = ort.InferenceSession(f, o, providers=["CPUExecutionProvider"])
        feed = {}
        for i in job["inputs"]:
            if i["dtype"] == "i64":
                feed[i["name"]] = np.ones(i["shape"], dtype=np.int64)
            else:
                feed[i["name"]] = rng.uniform(-1, 1, i["shape"]).astype(np.float32)
        for _ in range(3): s.run(None, feed)
        meds = []
        for _ in range(job["rounds"]):
            t = []
            for _ in range(job["runs"]):
                a = time.perf_counter(); s.run(None, feed); t.append((time.perf_counter() - a) * 1e3)
            meds.append(statistics.median(t))
        out.append(statistics.median(meds))
    except Exception as e:
        print(f"{f}: {e}", file=sys.stderr); out.append(None)
print(json.dumps({"ms": out, "version": ort.__version__}))
"#;
    let job = serde_json::json!({
        "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "inputs": specs.iter().map(|s| serde_json::json!({"name": s.name, "dtype": s.dtype, "shape": s.shape})).collect::<Vec<_>>(),
        "rounds": rounds, "runs": runs,
    });
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(job.to_string().as_bytes())
        .expect("write job");
    let out = child.wait_with_output().expect("python3");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    match v["ms"].as_array() {
        Some(a) => a.iter().map(|x| x.as_f64()).collect(),
        None => {
            eprintln!("onnxruntime timing unavailable: {v}");
            vec![None; files.len()]
        }
    }
}

/// onnxruntime's own quantization tools on the same model (Python): the
/// peer forms, for the comparison in tract. Empty when unavailable.
fn ort_tool_forms(case: &Case, dir: &Path) -> Vec<(String, PathBuf)> {
    let script = r#"
import sys, json
import numpy as np
from onnxruntime.quantization import quantize_dynamic, quantize_static, QuantFormat, QuantType, CalibrationDataReader
from onnxruntime.quantization.shape_inference import quant_pre_process
src, out, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pre = out + ".pre.onnx"
quant_pre_process(src, pre, skip_symbolic_shape=True)
rng = np.random.default_rng(0)
def feeds():
    for _ in range(8):
        yield {s["name"]: (np.ones(s["shape"], np.int64) if s["dtype"] == "i64" else rng.uniform(-1, 1, s["shape"]).astype(np.float32)) for s in spec}
class R(CalibrationDataReader):
    def __init__(self): self.it = feeds()
    def get_next(self): return next(self.it, None)
quantize_dynamic(pre, out + ".dynamic.onnx", weight_type=QuantType.QInt8)
quantize_static(pre, out + ".qdq.onnx", R(), quant_format=QuantFormat.QDQ, per_channel=False)
print("ok")
"#;
    let (specs, _) =
        runner::input_specs(&proto::load(&case.file).expect("load"), &case.shapes).expect("specs");
    let spec = serde_json::Value::Array(
        specs
            .iter()
            .map(|s| serde_json::json!({"name": s.name, "dtype": s.dtype, "shape": s.shape}))
            .collect(),
    );
    let base = dir.join(format!("{}.ort", case.name));
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&case.file)
        .arg(&base)
        .arg(spec.to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => vec![
            (
                "ORT quantize_dynamic (int8)".into(),
                base.with_extension("ort.dynamic.onnx"),
            ),
            (
                "ORT quantize_static QDQ (int8)".into(),
                base.with_extension("ort.qdq.onnx"),
            ),
        ],
        Ok(o) => {
            eprintln!(
                "{}: onnxruntime quantization tools failed: {}",
                case.name,
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            vec![]
        }
        Err(e) => {
            eprintln!("python3: {e}");
            vec![]
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let rounds = env_usize("DAI_BENCH_ROUNDS", 3);
    let runs = env_usize("DAI_BENCH_RUNS", 30);
    let dir = repo().join("target/bench-quantize");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let digits_csv = repo().join("models/data/digits.csv.gz");
    let one = |k: &str, s: &[usize]| -> HashMap<String, Vec<usize>> {
        [(k.to_string(), s.to_vec())].into_iter().collect()
    };

    let digits = export("digits", &dir.join("digits.onnx"));
    let imu = export("imu-anomaly", &dir.join("imu-anomaly.onnx"));
    let mut cases = [
        Case {
            name: "digits",
            shapes: one("pixels", &[1, 64]),
            ignore_value_info: false,
            calibration: digits_csv.display().to_string(),
            labelled: None,
            check: vec![],
            file: digits,
        },
        Case {
            name: "imu-anomaly",
            shapes: one("features", &[1, 42]),
            ignore_value_info: false,
            calibration: String::new(),
            labelled: None,
            check: vec![],
            file: imu,
        },
        Case {
            name: "pp-ocr-cls",
            file: zoo("pp-ocr-cls").join("model.onnx"),
            shapes: one("x", &[1, 3, 48, 192]),
            ignore_value_info: true,
            calibration: "random:32".into(),
            labelled: None,
            check: vec!["save_infer_model/scale_0.tmp_1".into()],
        },
        Case {
            name: "minilm-l3",
            file: zoo("minilm-l3").join("model.onnx"),
            shapes: [
                ("input_ids".to_string(), vec![1, 128]),
                ("attention_mask".to_string(), vec![1, 128]),
            ]
            .into_iter()
            .collect(),
            ignore_value_info: true,
            calibration: "random:32".into(),
            labelled: None,
            check: vec!["461".into()],
        },
        Case {
            name: "silero-vad",
            file: zoo("silero-vad").join("model.onnx"),
            shapes: [
                ("input".to_string(), vec![1, 576]),
                ("state".to_string(), vec![2, 1, 128]),
            ]
            .into_iter()
            .collect(),
            ignore_value_info: true,
            calibration: "random:32".into(),
            labelled: None,
            check: vec!["output".into()],
        },
    ];
    let mut md = String::from(
        "## Model optimisation: dai-models quantize in tract vs onnxruntime\n\n\
         Command: `cargo bench --bench quantize` (2 cores, 1 thread per runtime; latency = median of \
         rounds of the median of timed runs, batch 1; files in target/bench-quantize). Targets: int8 \
         >= 1.5x faster than f32 in tract, <= 1 point accuracy loss (or <= 1e-2 output deviation), \
         >= 3.5x smaller.\n\n",
    );
    let mut summary = Vec::new();
    for case in cases.iter_mut() {
        let model = proto::load(&case.file).expect("load");
        let (specs, _) = runner::input_specs(&model, &case.shapes).expect("specs");
        let calibration = match case.name {
            "imu-anomaly" => imu_samples(&specs),
            _ => calib::load(&case.calibration, &specs)
                .expect("calibration")
                .take(200),
        };
        if case.name == "imu-anomaly" || case.name == "digits" {
            case.labelled = Some(calibration.take(2000));
        }
        let eval = match &case.labelled {
            Some(l) => l.take(2000),
            None => calib::load("random:8:777", &specs).expect("eval"),
        };
        let f32_bytes = std::fs::metadata(&case.file).expect("size").len();
        let mut rows = vec![Row {
            form: "f32".into(),
            file: case.file.clone(),
            bytes: f32_bytes,
            tract_ms: 0.0,
            ort_ms: None,
            quality: String::new(),
            accepted: None,
        }];
        for mode in [Mode::Int8, Mode::Int8Weights, Mode::F16] {
            let opts = QuantizeOptions {
                mode,
                calibration: Calibration::MinMax,
                per_channel: true,
                // Measure, do not refuse: the table shows what the default check decides.
                tolerance: Some(f32::INFINITY),
                min_int8_params: 16384,
                keep_names: false,
                smooth: 0.0,
                head: None,
                max_accuracy_drop: 100.0,
                exclude: vec![],
                check_outputs: case.check.clone(),
                bench_runs: 0,
                ignore_value_info: case.ignore_value_info,
            };
            let (report, q) = match quantize::quantize(&model, &specs, &calibration, &eval, &opts) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{} {}: {e}", case.name, mode.suffix());
                    continue;
                }
            };
            let Some(q) = q else { continue };
            let file = dir.join(format!("{}.{}.onnx", case.name, mode.suffix()));
            let bytes = proto::save(&q, &file).expect("save");
            let dev = report
                .outputs
                .iter()
                .map(|o| o.max_abs_diff)
                .fold(0.0f32, f32::max);
            let quality = match (report.accuracy_f32, report.accuracy_quantized) {
                (Some(a), Some(b)) => format!(
                    "acc {:.2}% -> {:.2}% ({:+.2} pt)",
                    a * 100.0,
                    b * 100.0,
                    (b - a) * 100.0
                ),
                _ => format!("max abs diff {dev:.1e}"),
            };
            let within = match (report.accuracy_f32, report.accuracy_quantized) {
                (Some(a), Some(b)) => (a - b) * 100.0 <= 1.0,
                _ => dev <= 0.05,
            };
            rows.push(Row {
                form: mode.suffix().to_string(),
                file,
                bytes,
                tract_ms: 0.0,
                ort_ms: None,
                quality,
                accepted: Some(within),
            });
        }
        if case.name == "pp-ocr-cls" || case.name == "minilm-l3" {
            for (form, file) in ort_tool_forms(case, &dir) {
                if let Ok(meta) = std::fs::metadata(&file) {
                    rows.push(Row {
                        form,
                        bytes: meta.len(),
                        file,
                        tract_ms: 0.0,
                        ort_ms: None,
                        quality: "(peer tool's file)".into(),
                        accepted: None,
                    });
                }
            }
        }
        for r in rows.iter_mut() {
            r.tract_ms = tract_latency(&r.file, case, &specs, rounds, runs);
        }
        let files: Vec<PathBuf> = rows.iter().map(|r| r.file.clone()).collect();
        for (r, ms) in rows
            .iter_mut()
            .zip(ort_latency(&files, &specs, rounds, runs))
        {
            r.ort_ms = ms;
        }
        let base_tract = rows[0].tract_ms;
        let base_ort = rows[0].ort_ms;
        md.push_str(&format!("### {}\n\n", case.name));
        md.push_str("| form | size | smaller | tract ms | tract speed-up | onnxruntime ms | ORT speed-up | quality |\n|---|---|---|---|---|---|---|---|\n");
        for r in &rows {
            let ort = r.ort_ms.map_or("n/a".into(), |m| format!("{m:.3}"));
            let ort_x = match (r.ort_ms, base_ort) {
                (Some(m), Some(b)) => format!("{:.2}x", b / m),
                _ => "n/a".into(),
            };
            md.push_str(&format!(
                "| {} | {} | {:.2}x | {:.3} | {:.2}x | {} | {} | {} |\n",
                r.form,
                dai_models::inspect::human_bytes(r.bytes),
                f32_bytes as f64 / r.bytes as f64,
                r.tract_ms,
                base_tract / r.tract_ms,
                ort,
                ort_x,
                if r.quality.is_empty() {
                    "reference".to_string()
                } else {
                    r.quality.clone()
                }
            ));
        }
        md.push('\n');
        if let Some(r) = rows.iter().find(|r| r.form == "int8") {
            let speed = base_tract / r.tract_ms;
            let size = f32_bytes as f64 / r.bytes as f64;
            summary.push(format!(
                "| {} | {:.2}x {} | {:.2}x {} | {} {} |",
                case.name,
                speed,
                if speed >= 1.5 { "met" } else { "NOT met" },
                size,
                if size >= 3.5 { "met" } else { "NOT met" },
                r.quality,
                if r.accepted == Some(true) {
                    ""
                } else {
                    "(check)"
                }
            ));
        }
    }
    md.push_str("### int8 against the targets\n\n| model | tract speed-up (>= 1.5x) | size (>= 3.5x) | quality |\n|---|---|---|---|\n");
    for s in summary {
        md.push_str(&s);
        md.push('\n');
    }
    md.push('\n');
    print!("{md}");
    common::write_section("quantize", &md);
}
