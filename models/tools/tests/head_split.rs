//! `dai-models bundle --head TENSOR`: a model these tests make (a MatMul +
//! Relu backbone, then Gemm + Relu, MatMul + Add and Softmax) is cut at
//! the backbone's tensor; the bundle's backbone + head.safetensors must
//! answer what the whole model computes (the test computes it itself),
//! the head must be the file format devices train, and a cut whose tail is
//! not dense layers is refused naming the node.

use dai_onnx::pb;
use prost::Message;
use std::collections::HashMap;
use std::path::Path;

mod common;
use common::{cli, json_cli, ort_enabled};

fn value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(if d > 0 {
                                Value::DimValue(d)
                            } else {
                                Value::DimParam("batch".into())
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn vals(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.8)
        .collect()
}

/// x [batch, 8] -> MatMul Wb [8, 5] -> Relu = feat -> Gemm(W1 [4, 5], b1,
/// transB) -> Relu -> `tail` (MatMul W2 [4, 3] -> Add b2 -> Softmax) = probs.
fn make(path: &Path, tail_op: &str) {
    let t = dai_onnx::f32_tensor;
    let tail = vec![
        dai_onnx::node("MatMul", "fc2", &["h1", "w2"], &["z2"], vec![]),
        dai_onnx::node("Add", "fc2_bias", &["z2", "b2"], &["logits"], vec![]),
        dai_onnx::node(tail_op, "out", &["logits"], &["probs"], vec![]),
    ];
    let mut nodes = vec![
        dai_onnx::node("MatMul", "stem", &["x", "wb"], &["z0"], vec![]),
        dai_onnx::node("Relu", "stem_relu", &["z0"], &["feat"], vec![]),
        dai_onnx::node(
            "Gemm",
            "fc1",
            &["feat", "w1", "b1"],
            &["z1"],
            vec![dai_onnx::attr_int("transB", 1)],
        ),
        dai_onnx::node("Relu", "fc1_relu", &["z1"], &["h1"], vec![]),
    ];
    nodes.extend(tail);
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "byo".into(),
            node: nodes,
            initializer: vec![
                t("wb", &[8, 5], &vals(40, 0.1)),
                t("w1", &[4, 5], &vals(20, 0.7)),
                t("b1", &[4], &vals(4, 1.3)),
                t("w2", &[4, 3], &vals(12, 2.1)),
                t("b2", &[3], &vals(3, 2.9)),
            ],
            input: vec![value_info("x", &[-1, 8])],
            output: vec![value_info("probs", &[-1, 3])],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, model.encode_to_vec()).expect("write model");
}

/// The whole model, computed here.
fn expected(x: &[f32]) -> Vec<f32> {
    let (wb, w1, b1, w2, b2) = (
        vals(40, 0.1),
        vals(20, 0.7),
        vals(4, 1.3),
        vals(12, 2.1),
        vals(3, 2.9),
    );
    let feat: Vec<f32> = (0..5)
        .map(|j| (0..8).map(|i| x[i] * wb[i * 5 + j]).sum::<f32>().max(0.0))
        .collect();
    let h1: Vec<f32> = (0..4)
        .map(|o| ((0..5).map(|i| feat[i] * w1[o * 5 + i]).sum::<f32>() + b1[o]).max(0.0))
        .collect();
    let logits: Vec<f32> = (0..3)
        .map(|o| (0..4).map(|i| h1[i] * w2[i * 3 + o]).sum::<f32>() + b2[o])
        .collect();
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[test]
fn a_model_cut_at_a_tensor_serves_backbone_plus_a_trainable_head() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("byo.onnx");
    make(&model, "Softmax");
    let out = tmp.path().join("byo");
    let (m, o) = (model.to_str().expect("utf8"), out.to_str().expect("utf8"));
    let labels = tmp.path().join("labels.txt");
    std::fs::write(&labels, "cat\ndog\nfox\n").expect("labels");
    let l = labels.to_str().expect("utf8");
    let mut args = vec![
        "bundle", m, "-o", o, "--head", "feat", "--labels", l, "--json",
    ];
    if ort_enabled("bundle --head") {
        args.push("--check-ort");
    }
    let report = json_cli(&args);
    assert!(
        report["max_abs_diff_daemon"].as_f64().expect("diff") < 1e-5,
        "backbone + head answer what the model does: {report}"
    );

    let bundle = dai_infer::Bundle::open(&out).expect("opens");
    let h = bundle.manifest.head.clone().expect("a [head] section");
    assert_eq!((h.input.as_str(), h.output.as_str()), ("feat", "probs"));
    assert_eq!(h.transform, dai_infer::bundle::HeadTransform::Softmax);
    assert_eq!(bundle.manifest.labels, ["cat", "dog", "fox"]);
    let (head, meta) =
        dai_train::head::Head::load(&out.join("head.safetensors")).expect("head file");
    let sizes: Vec<usize> = std::iter::once(head.spec.inputs())
        .chain(head.spec.layers.iter().map(|l| l.outputs))
        .collect();
    assert_eq!(sizes, [5, 4, 3]);
    assert_eq!(head.spec.loss, dai_train::head::Loss::SoftmaxCrossEntropy);
    assert_eq!(meta.get("cut_at").map(String::as_str), Some("feat"));

    // The daemon's path on a request of two rows, against the test's maths.
    let lm = dai_infer::LoadedModel::load(bundle, 8).expect("loads");
    let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.21).cos()).collect();
    let t = dai_infer::TensorData::new(vec![2, 8], dai_infer::Data::F32(x.clone())).expect("t");
    let (prepared, rows) = lm
        .prepare(HashMap::from([("x".to_string(), t)]))
        .expect("prepare");
    let refs: Vec<_> = prepared.iter().collect();
    let outs = lm.run(&refs, rows).expect("run");
    let (probs, _) = lm.apply_head(&outs).expect("head").expect("has a head");
    let dai_infer::Data::F32(p) = probs.data else {
        panic!("f32")
    };
    for r in 0..2 {
        let want = expected(&x[r * 8..r * 8 + 8]);
        for (a, b) in p[r * 3..r * 3 + 3].iter().zip(&want) {
            assert!(
                (a - b).abs() < 1e-5,
                "row {r}: {:?} vs {want:?}",
                &p[r * 3..r * 3 + 3]
            );
        }
    }
}

#[test]
fn a_cut_whose_tail_is_not_dense_layers_is_refused_naming_the_node() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("odd.onnx");
    make(&model, "Sigmoid");
    let m = model.to_str().expect("utf8");
    let out = tmp.path().join("odd");
    let o = out.to_str().expect("utf8");
    let (ok, _, err) = cli(&["bundle", m, "-o", o, "--head", "feat"]);
    assert!(!ok);
    assert!(
        err.contains("node \"out\" (Sigmoid) after tensor \"feat\""),
        "{err}"
    );
    let (ok, _, err) = cli(&["bundle", m, "-o", o, "--head", "nope"]);
    assert!(!ok);
    assert!(err.contains("--head nope: no tensor of that name"), "{err}");
    assert!(!out.join("manifest.toml").exists());
}
