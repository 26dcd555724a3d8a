//! `dai-models train digits` end to end: a real training run, the bundle
//! through the daemon's runtime, and the exported ONNX in onnxruntime.

use dai_models::train_digits::{DigitsOptions, run};
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn trains_exports_and_agrees_with_onnxruntime() {
    let out = tempfile::tempdir().expect("tmp");
    let opts = DigitsOptions {
        data: repo().join("models/data/digits.csv.gz"),
        out: out.path().to_path_buf(),
        epochs: 40,
        batch_size: 32,
        lr: 0.003,
        gpu: false,
        seed: 7,
    };
    let mut losses = Vec::new();
    let report = run(&opts, |_, l| losses.push(l)).expect("train digits");
    assert!(
        report.test_accuracy >= 0.95,
        "test accuracy {}",
        report.test_accuracy
    );
    assert!(
        losses.last().expect("loss") < &(losses[0] * 0.1),
        "loss {losses:?}"
    );
    assert_eq!(report.bundle_test_accuracy, report.test_accuracy);
    let manifest = std::fs::read_to_string(out.path().join("manifest.toml")).expect("manifest");
    assert!(manifest.contains(&format!("test_accuracy = {:.4}", report.test_accuracy)));

    // Backbone outputs from tract for real digits, then onnxruntime on the same file.
    let bundle = dai_infer::Bundle::open(out.path()).expect("bundle");
    let model = dai_infer::LoadedModel::load(bundle, 32).expect("load");
    let rows = dai_models::digits::load(&opts.data).expect("data");
    let n = 32;
    let px: Vec<f32> = rows[..n].iter().flat_map(|r| r.0).collect();
    let input =
        dai_infer::TensorData::new(vec![n, 64], dai_infer::Data::F32(px.clone())).expect("t");
    let outs = model.run(&[&input], n).expect("run");
    let dai_infer::Data::F32(emb) = &outs[0].data else {
        panic!("f32")
    };
    let data = out.path().join("check.safetensors");
    let px_b: Vec<u8> = px.iter().flat_map(|v| v.to_le_bytes()).collect();
    let emb_b: Vec<u8> = emb.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "in.pixels".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, 64], &px_b)
                .expect("v"),
        ),
        (
            "out.embedding".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, 64], &emb_b)
                .expect("v"),
        ),
    ];
    safetensors::serialize_to_file(views, None, &data).expect("write");
    if std::env::var("DAI_ORT_TESTS").ok().as_deref() != Some("1") {
        eprintln!(
            "SKIPPED onnxruntime half of trains_exports_and_agrees_with_onnxruntime: set DAI_ORT_TESTS=1 (needs `pip install onnxruntime numpy safetensors`; .ci/run does it)"
        );
        return;
    }
    let status = std::process::Command::new("python3")
        .arg(repo().join("models/tools/verify_onnx.py"))
        .arg("--model")
        .arg(out.path().join("backbone.onnx"))
        .arg("--data")
        .arg(&data)
        .args(["--tol", "1e-5"])
        .output()
        .expect("python3");
    assert!(
        status.status.success(),
        "onnxruntime disagrees: {}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
}
