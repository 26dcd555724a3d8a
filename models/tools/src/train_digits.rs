//! `dai-models train digits`: the project's own model, end to end.

use crate::{ToolError, digits};
use dai_infer::DType;
use dai_infer::bundle::{HeadRef, HeadTransform, Manifest, ModelFile, TensorSpec};
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

/// `manifest` as `manifest.toml` text, after `comment` as `#` lines: the
/// provenance is for people reading the file, the parser skips it.
pub(crate) fn manifest_text(comment: &str, manifest: &Manifest) -> Result<String, ToolError> {
    let body = toml::to_string(manifest)
        .map_err(|e| ToolError::Io(format!("manifest.toml: cannot serialise: {e}")))?;
    let mut text: String = comment.lines().map(|l| format!("# {l}\n")).collect();
    text.push_str(&body);
    Ok(text)
}

/// `v` rounded the way `{:.4}` prints it: manifests carry their figures
/// with 4 decimals, for people reading them, not as full-precision data.
pub(crate) fn four_decimals(v: f64) -> f64 {
    format!("{v:.4}").parse().unwrap_or(v)
}

/// What differs between the two trained bundles' manifests.
pub(crate) struct TrainedBundle<'a> {
    pub(crate) name: &'a str,
    pub(crate) version: &'a str,
    pub(crate) description: String,
    pub(crate) labels: Vec<String>,
    /// The backbone's input and its width.
    pub(crate) input: (&'a str, usize),
    /// Width of the backbone's `embedding`, which the head reads.
    pub(crate) embedding: usize,
    pub(crate) metrics: Vec<(&'a str, f64)>,
}

/// The manifest of a trained bundle: `backbone.onnx` (input -> `embedding`)
/// then `head.safetensors` (softmax `probs`).
pub(crate) fn trained_manifest(
    b: TrainedBundle<'_>,
    onnx_sha256: String,
    head_sha256: String,
) -> Manifest {
    Manifest {
        name: b.name.into(),
        version: b.version.into(),
        description: b.description,
        labels: b.labels,
        batching: true,
        dynamic_batching: true,
        license: None,
        origin: None,
        model: ModelFile {
            file: "backbone.onnx".into(),
            sha256: onnx_sha256,
            ignore_value_info: true,
        },
        source: None,
        preprocess: None,
        head: Some(HeadRef {
            file: "head.safetensors".into(),
            sha256: head_sha256,
            input: "embedding".into(),
            output: "probs".into(),
            transform: HeadTransform::Softmax,
            validation: None,
        }),
        metrics: b
            .metrics
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        inputs: vec![row_spec(b.input.0, b.input.1)],
        outputs: vec![row_spec("embedding", b.embedding)],
        variants: Vec::new(),
    }
}

/// A per-request f32 tensor of `[1, width]`.
pub(crate) fn row_spec(name: &str, width: usize) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        onnx_name: None,
        dtype: DType::F32,
        shape: vec![1, width],
        dynamic: Vec::new(),
    }
}

const DIGITS_COMMENT: &str = "\
UCI hand-written digits (8x8, pixel values 0..16), made by
`dai-models train digits` from models/data/digits.csv.gz (CC BY 4.0,
see models/data/README.md). backbone.onnx = Mul(1/16) -> Gemm -> Relu;
head.safetensors = the trainable layers fine-tuned on devices.";

/// The figures of a digits run the manifest records.
struct DigitsMetrics {
    test_accuracy: f64,
    train_samples: usize,
    test_samples: usize,
    epochs: usize,
}

/// The digits bundle's manifest: backbone `pixels` -> `embedding` of
/// `embed` values, then the head.
fn digits_manifest(
    m: &DigitsMetrics,
    embed: usize,
    onnx_sha256: String,
    head_sha256: String,
) -> Manifest {
    trained_manifest(
        TrainedBundle {
            name: "digits",
            version: VERSION,
            description: "MLP 64-64-32-10 on UCI digits; backbone ONNX + trainable head".into(),
            labels: (0..10).map(|d| d.to_string()).collect(),
            input: ("pixels", digits::FEATURES),
            embedding: embed,
            metrics: vec![
                ("test_accuracy", four_decimals(m.test_accuracy)),
                ("train_samples", m.train_samples as f64),
                ("test_samples", m.test_samples as f64),
                ("epochs", m.epochs as f64),
            ],
        },
        onnx_sha256,
        head_sha256,
    )
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
    let manifest = digits_manifest(
        &DigitsMetrics {
            test_accuracy,
            train_samples: train_idx.len(),
            test_samples: test_idx.len(),
            epochs: report.epochs.len(),
        },
        embed,
        sha256(&onnx),
        sha256(&head_bytes),
    );
    let manifest = manifest_text(DIGITS_COMMENT, &manifest)?;
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dai_infer::bundle::parse_manifest;

    pub(crate) fn shipped(bundle: &str) -> (String, Manifest) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../zoo")
            .join(bundle)
            .join("manifest.toml");
        let text = std::fs::read_to_string(&path).expect("shipped manifest");
        let manifest = parse_manifest(&text).expect("shipped manifest parses");
        (text, manifest)
    }

    pub(crate) fn sum(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    #[test]
    fn digits_manifest_round_trips_through_the_parser() {
        let metrics = DigitsMetrics {
            test_accuracy: 349.0 / 359.0,
            train_samples: 1438,
            test_samples: 359,
            epochs: 40,
        };
        let m = digits_manifest(&metrics, 64, sum('a'), sum('b'));
        let text = manifest_text(DIGITS_COMMENT, &m).expect("serialises");
        assert!(text.starts_with("# UCI hand-written digits"), "{text}");
        assert!(text.contains("test_accuracy = 0.9721\n"), "{text}");
        let parsed = parse_manifest(&text).expect("parses");
        assert_eq!(parsed, m);
        assert_eq!(parsed.metrics["test_accuracy"], 0.9721);
        assert_eq!(
            parsed.head.as_ref().map(|h| h.transform),
            Some(HeadTransform::Softmax)
        );
        assert_eq!(parsed.outputs[0].shape, [1, 64]);
    }

    /// The manifest the digits maker writes for the shipped bundle's figures
    /// is the one shipped (made by the earlier text template).
    #[test]
    fn digits_manifest_matches_the_shipped_bundle() {
        let (_, zoo) = shipped("digits");
        let head = zoo.head.as_ref().expect("head");
        let metrics = DigitsMetrics {
            test_accuracy: zoo.metrics["test_accuracy"],
            train_samples: zoo.metrics["train_samples"] as usize,
            test_samples: zoo.metrics["test_samples"] as usize,
            epochs: zoo.metrics["epochs"] as usize,
        };
        let m = digits_manifest(
            &metrics,
            zoo.outputs[0].shape[1],
            zoo.model.sha256.clone(),
            head.sha256.clone(),
        );
        let text = manifest_text(DIGITS_COMMENT, &m).expect("serialises");
        // `[head.validation]` is added afterwards by `dai-models
        // validation-set --into-bundle` (README, Model tools).
        let mut shipped = zoo.clone();
        if let Some(h) = shipped.head.as_mut() {
            h.validation = None;
        }
        assert_eq!(parse_manifest(&text).expect("parses"), shipped);
    }
}
