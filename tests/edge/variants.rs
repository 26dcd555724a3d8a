//! Optimised bundles in the daemon: a quantized variant listed by
//! `dai-models quantize` is loaded when `daemon.prefer_model_variant` asks
//! for it (and only then), served through the same HTTP API; and a bundle
//! exported to one ONNX file gives the daemon's answers.

use crate::support::{TestDaemon, floats, repo, zoo};
use dai_models::{calib, proto, quantize, runner, variants};
use serde_json::json;
use std::path::Path;

/// A models dir holding a copy of the digits bundle with an int8 variant.
fn digits_with_int8(dir: &Path) {
    let b = dir.join("digits");
    std::fs::create_dir_all(&b).expect("mkdir");
    for f in [
        "backbone.onnx",
        "head.safetensors",
        "manifest.toml",
        "validation.safetensors",
    ] {
        std::fs::copy(zoo().join("digits").join(f), b.join(f)).expect("copy");
    }
    let model = proto::load(&b.join("backbone.onnx")).expect("load");
    let shapes = [("pixels".to_string(), vec![1, 64])].into_iter().collect();
    let (specs, _) = runner::input_specs(&model, &shapes).expect("specs");
    let set = calib::load(
        repo()
            .join("models/data/digits.csv.gz")
            .to_str()
            .expect("utf8"),
        &specs,
    )
    .expect("digits")
    .take(300);
    let opts = quantize::QuantizeOptions {
        mode: quantize::Mode::Int8,
        calibration: quantize::Calibration::MinMax,
        per_channel: true,
        tolerance: Some(0.5),
        min_int8_params: 0,
        keep_names: false,
        smooth: 0.0,
        head: None,
        max_accuracy_drop: 100.0,
        exclude: vec![],
        check_outputs: vec![],
        bench_runs: 0,
        ignore_value_info: true,
    };
    let (report, q) = quantize::quantize(&model, &specs, &set, &set, &opts).expect("quantize");
    let q = q.unwrap_or_else(|| panic!("refused: {:?}", report.refusal));
    assert!(
        report.rewritten.contains_key("Gemm int8 compute"),
        "{:?}",
        report.rewritten
    );
    proto::save(&q, &b.join("backbone.int8.onnx")).expect("save");
    variants::record(&b, "int8", "backbone.int8.onnx", &report, false).expect("record");
    // Recording the same kind again is refused without force.
    let again = variants::record(&b, "int8", "backbone.int8.onnx", &report, false);
    assert!(again.is_err_and(|e| e.to_string().contains("already lists")));
}

async fn probs(d: &TestDaemon, rows: &[([f32; 64], u32)]) -> Vec<f32> {
    let mut out = Vec::new();
    for chunk in rows.chunks(8) {
        let px: Vec<f32> = chunk.iter().flat_map(|r| r.0).collect();
        let (s, b) = d
            .infer(
                "digits",
                &json!({"inputs": {"pixels": {"shape": [chunk.len(), 64], "data": px}}}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        out.extend(floats(&b["outputs"]["probs"]["data"]));
    }
    out
}

fn argmaxes(p: &[f32]) -> Vec<usize> {
    p.chunks(10)
        .map(|r| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(k, _)| k)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_loads_the_preferred_quantized_variant() {
    let models = tempfile::tempdir().expect("tmp");
    digits_with_int8(models.path());
    let rows: Vec<([f32; 64], u32)> =
        dai_models::digits::load(&repo().join("models/data/digits.csv.gz"))
            .expect("digits")
            .into_iter()
            .skip(1000)
            .take(200)
            .collect();
    let dir = models.path().to_path_buf();
    let int8 = TestDaemon::start(|c| {
        c.daemon.models_dir = dir.clone();
        c.daemon.prefer_model_variant = "int8".into();
    })
    .await;
    let m = int8.get_json("/v1/models/digits").await;
    assert_eq!(m["variant"], "int8", "{m}");
    assert_eq!(m["model_file"], "backbone.int8.onnx", "{m}");
    let q = probs(&int8, &rows).await;
    int8.stop().await;

    let dir = models.path().to_path_buf();
    let plain = TestDaemon::start(|c| c.daemon.models_dir = dir.clone()).await;
    let m = plain.get_json("/v1/models/digits").await;
    assert!(m["variant"].is_null(), "{m}");
    assert_eq!(m["model_file"], "backbone.onnx");
    let f = probs(&plain, &rows).await;
    plain.stop().await;

    let (qa, fa) = (argmaxes(&q), argmaxes(&f));
    let agree = qa.iter().zip(&fa).filter(|(a, b)| a == b).count();
    let right_q = qa
        .iter()
        .zip(&rows)
        .filter(|(a, r)| **a == r.1 as usize)
        .count();
    let right_f = fa
        .iter()
        .zip(&rows)
        .filter(|(a, r)| **a == r.1 as usize)
        .count();
    assert!(agree >= 196, "int8 and f32 agree on {agree}/200");
    assert!(
        right_q + 2 >= right_f,
        "accuracy {right_q} vs {right_f} of 200"
    );
    let worst = q
        .iter()
        .zip(&f)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst > 0.0,
        "the int8 variant gave bit-identical outputs: was it loaded?"
    );

    // A variant kind the bundle does not list: the f32 file, no error.
    let dir = models.path().to_path_buf();
    let other = TestDaemon::start(|c| {
        c.daemon.models_dir = dir.clone();
        c.daemon.prefer_model_variant = "f16".into();
    })
    .await;
    let m = other.get_json("/v1/models/digits").await;
    assert!(m["variant"].is_null() && m["state"] == "ready", "{m}");
    other.stop().await;

    // A corrupt variant file is refused with its checksum error.
    std::fs::write(models.path().join("digits/backbone.int8.onnx"), b"garbage").expect("corrupt");
    let dir = models.path().to_path_buf();
    let broken = TestDaemon::start(|c| {
        c.daemon.models_dir = dir.clone();
        c.daemon.prefer_model_variant = "int8".into();
    })
    .await;
    let m = broken.get_json("/v1/models/digits").await;
    assert_eq!(m["state"], "failed", "{m}");
    let err = m["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("backbone.int8.onnx") && err.contains("sha256"),
        "{err}"
    );
    broken.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_onnx_gives_the_daemons_answers() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("digits.onnx");
    let report = dai_models::export::export(
        &zoo().join("digits"),
        &out,
        &dai_models::export::ExportOptions {
            head: None,
            samples: 4,
            tolerance: 1e-4,
            python: Some("off".into()),
        },
    )
    .expect("export");
    assert!(report.max_abs_diff_tract < 1e-5);

    let d = TestDaemon::start(|c| c.daemon.models = vec!["digits".into()]).await;
    let rows: Vec<([f32; 64], u32)> =
        dai_models::digits::load(&repo().join("models/data/digits.csv.gz"))
            .expect("digits")
            .into_iter()
            .take(40)
            .collect();
    let daemon = probs(&d, &rows).await;
    d.stop().await;

    let model = proto::load(&out).expect("load");
    let shapes = [("pixels".to_string(), vec![1, 64])].into_iter().collect();
    let (specs, _) = runner::input_specs(&model, &shapes).expect("specs");
    let r = runner::Runner::new(&model, &specs, false, None).expect("tract loads the export");
    let mut worst = 0.0f32;
    for (i, row) in rows.iter().enumerate() {
        let t = runner::Tensor::from_shape(&[1, 64], &row.0).expect("tensor");
        let o = runner::values_f32(&r.run(&[t]).expect("run")[0]).expect("f32");
        for (a, b) in o.iter().zip(&daemon[i * 10..(i + 1) * 10]) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(worst < 1e-5, "exported vs daemon over HTTP: {worst}");
}
