//! `dai-models train digits`: the project's own model, end to end.

use crate::{ToolError, digits};
use dai_train::{
    Activation, Head, HeadSpec, Loss, Optimizer, Params, TrainConfig, accuracy, predict,
    select_backend, train,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Settings of a digits training run.
#[derive(Debug, Clone)]
pub struct DigitsOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub gpu: bool,
    pub seed: u64,
}

/// What was produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DigitsReport {
    pub backend: String,
    pub fallback_reason: Option<String>,
    pub train_samples: usize,
    pub test_samples: usize,
    pub final_loss: f32,
    pub test_accuracy: f64,
    /// Accuracy of the written bundle run through the daemon's runtime.
    pub bundle_test_accuracy: f64,
    pub max_abs_diff_vs_trainer: f32,
    pub seconds: f64,
}

/// The bundle version this tool writes.
pub const VERSION: &str = "1.0.0";
/// Layers kept in the ONNX backbone; the rest form the trainable head.
pub const BACKBONE_LAYERS: usize = 1;

pub(crate) fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) fn sub_head(
    head: &Head,
    range: std::ops::Range<usize>,
    loss: Loss,
) -> Result<Head, ToolError> {
    let layers = &head.spec.layers[range.clone()];
    let mut sizes = vec![layers[0].inputs];
    sizes.extend(layers.iter().map(|l| l.outputs));
    let acts: Vec<Activation> = layers.iter().map(|l| l.activation).collect();
    Ok(Head {
        spec: HeadSpec::new(&sizes, &acts, loss)?,
        params: Params {
            weights: head.params.weights[range.clone()].to_vec(),
            biases: head.params.biases[range].to_vec(),
        },
    })
}

/// A written bundle loaded through the daemon's runtime (tract backbone +
/// head), to verify an export the way devices will run it.
pub(crate) struct BundleProbe(dai_infer::LoadedModel);

impl BundleProbe {
    pub(crate) fn open(dir: &Path) -> Result<BundleProbe, ToolError> {
        let bundle = dai_infer::Bundle::open(dir).map_err(|e| ToolError::Verify(e.to_string()))?;
        dai_infer::LoadedModel::load(bundle, 1)
            .map(BundleProbe)
            .map_err(|e| ToolError::Verify(e.to_string()))
    }

    /// The head's probabilities for one input row.
    pub(crate) fn probs(&self, row: Vec<f32>) -> Result<Vec<f32>, ToolError> {
        let n = row.len();
        let x = dai_infer::TensorData::new(vec![1, n], dai_infer::Data::F32(row))
            .map_err(|e| ToolError::Verify(e.0))?;
        let outs = self
            .0
            .run(&[&x], 1)
            .map_err(|e| ToolError::Verify(e.to_string()))?;
        let (probs, _) = self
            .0
            .apply_head(&outs)
            .map_err(|e| ToolError::Verify(e.to_string()))?
            .ok_or_else(|| ToolError::Verify("bundle has no head".into()))?;
        match probs.data {
            dai_infer::Data::F32(p) => Ok(p),
            _ => Err(ToolError::Verify("probs not f32".into())),
        }
    }
}

/// Index of the largest value.
pub fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(k, _)| k)
}

pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), ToolError> {
    std::fs::write(path, bytes).map_err(|e| ToolError::Io(format!("{}: {e}", path.display())))
}

/// Train, export, verify, write the bundle.
pub fn run(
    opts: &DigitsOptions,
    mut progress: impl FnMut(usize, f32),
) -> Result<DigitsReport, ToolError> {
    let rows = digits::load(&opts.data)?;
    let (train_idx, test_idx) = digits::split(&rows, 0.2, opts.seed);
    let train_set = digits::dataset(&rows, &train_idx);
    let test_set = digits::dataset(&rows, &test_idx);
    let spec = HeadSpec::new(
        &[digits::FEATURES, 64, 32, 10],
        &[Activation::Relu, Activation::Relu, Activation::None],
        Loss::SoftmaxCrossEntropy,
    )?;
    let mut model = Head::init(spec, opts.seed);
    let mut choice = select_backend(opts.gpu, 1.0, &model, opts.batch_size);
    let cfg = TrainConfig {
        optimizer: Optimizer::adam(opts.lr),
        batch_size: opts.batch_size,
        epochs: opts.epochs,
        seed: opts.seed,
    };
    let report = train(choice.backend.as_mut(), &mut model, &train_set, &cfg, |e| {
        progress(e.epoch, e.loss);
        true
    })?;
    let test_accuracy = accuracy(&model, &test_set)?;

    let backbone = sub_head(&model, 0..BACKBONE_LAYERS, Loss::Mse)?;
    let head = sub_head(
        &model,
        BACKBONE_LAYERS..model.spec.layers.len(),
        Loss::SoftmaxCrossEntropy,
    )?;
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| ToolError::Io(format!("{}: {e}", opts.out.display())))?;
    let onnx = crate::onnx::dense_model(&backbone, "pixels", "embedding", digits::PIXEL_SCALE)?;
    write(&opts.out.join("backbone.onnx"), &onnx)?;
    let mut meta = HashMap::new();
    meta.insert("base_version".to_string(), VERSION.to_string());
    meta.insert(
        "producer".to_string(),
        "dai-models train digits".to_string(),
    );
    let head_bytes = head.to_bytes(&meta)?;
    write(&opts.out.join("head.safetensors"), &head_bytes)?;
    let embed = model.spec.layers[BACKBONE_LAYERS - 1].outputs;
    let manifest = format!(
        r#"# UCI hand-written digits (8x8, pixel values 0..16), made by
# `dai-models train digits` from models/data/digits.csv.gz (CC BY 4.0,
# see models/data/README.md). backbone.onnx = Mul(1/16) -> Gemm -> Relu;
# head.safetensors = the trainable layers fine-tuned on devices.
name = "digits"
version = "{VERSION}"
description = "MLP {sizes} on UCI digits; backbone ONNX + trainable head"
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
batching = true

[metrics]
test_accuracy = {test_accuracy:.4}
train_samples = {train_n}
test_samples = {test_n}
epochs = {epochs}

[model]
file = "backbone.onnx"
sha256 = "{onnx_sum}"

[head]
file = "head.safetensors"
sha256 = "{head_sum}"
input = "embedding"
output = "probs"
transform = "softmax"

[[inputs]]
name = "pixels"
dtype = "f32"
shape = [1, 64]

[[outputs]]
name = "embedding"
dtype = "f32"
shape = [1, {embed}]
"#,
        sizes = "64-64-32-10",
        train_n = train_idx.len(),
        test_n = test_idx.len(),
        epochs = report.epochs.len(),
        onnx_sum = sha256(&onnx),
        head_sum = sha256(&head_bytes),
    );
    write(&opts.out.join("manifest.toml"), manifest.as_bytes())?;

    // Verify through the daemon's own runtime: tract backbone + head.
    let probe = BundleProbe::open(&opts.out)?;
    let mut correct = 0usize;
    let mut max_diff = 0.0f32;
    for (r, &i) in test_idx.iter().enumerate() {
        let p = probe.probs(rows[i].0.to_vec())?;
        let logits = predict(
            &model,
            &test_set.x[r * digits::FEATURES..(r + 1) * digits::FEATURES],
            1,
        )?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = logits.iter().map(|v| (v - max).exp()).sum();
        for (a, l) in p.iter().zip(&logits) {
            max_diff = max_diff.max((a - (l - max).exp() / z).abs());
        }
        if argmax(&p) as u32 == rows[i].1 {
            correct += 1;
        }
    }
    let bundle_test_accuracy = correct as f64 / test_idx.len() as f64;
    if max_diff > 1e-4 || (bundle_test_accuracy - test_accuracy).abs() > 0.006 {
        return Err(ToolError::Verify(format!(
            "bundle disagrees with the trained model: max |dp| {max_diff}, accuracy {bundle_test_accuracy} vs {test_accuracy}"
        )));
    }
    Ok(DigitsReport {
        backend: report.backend.clone(),
        fallback_reason: choice.fallback_reason.take(),
        train_samples: train_idx.len(),
        test_samples: test_idx.len(),
        final_loss: report.final_loss().unwrap_or(f32::NAN),
        test_accuracy,
        bundle_test_accuracy,
        max_abs_diff_vs_trainer: max_diff,
        seconds: report.seconds,
    })
}
