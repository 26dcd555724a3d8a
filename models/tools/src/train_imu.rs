//! `dai-models train imu`: the zoo's sensor model. A small classifier of
//! simulated MPU-6050 windows (normal / imbalance / impact), trained on the
//! same window features the daemon computes (`dai_sensors::features`), so
//! the sensor path runs end to end on a machine without the hardware.
//!
//! Features are standardised for training; the standardisation is then
//! folded into the first layer (`W' = W / sd`, `b' = b - W (mu / sd)`), so
//! the exported backbone takes raw features. The bundle is verified through
//! the daemon's runtime before it is considered written.

use crate::ToolError;
use crate::train_digits::{
    BundleProbe, TrainedBundle, argmax, four_decimals, manifest_text, sha256, sub_head,
    trained_manifest, write,
};
use dai_infer::bundle::Manifest;
use dai_sensors::features::{PER_CHANNEL, window_features};
use dai_sensors::sim::{CLASSES, Scenario, SimImu};
use dai_train::{
    Activation, Dataset, Head, HeadSpec, Loss, Optimizer, TrainConfig, accuracy, select_backend,
    train,
};
use std::collections::HashMap;
use std::path::PathBuf;

/// Samples per window and per hop the bundle is trained for.
pub const WINDOW: usize = 256;
/// Sample rate the bundle is trained for, Hz.
pub const RATE_HZ: f64 = 1000.0;
/// Motion channels used (ax, ay, az, gx, gy, gz).
pub const CHANNELS: [usize; 6] = [0, 1, 2, 3, 4, 5];
/// Feature count.
pub const FEATURES: usize = CHANNELS.len() * PER_CHANNEL;

#[derive(Debug, Clone)]
pub struct ImuOptions {
    pub out: PathBuf,
    pub windows_per_class: usize,
    pub epochs: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImuReport {
    pub train_windows: usize,
    pub test_windows: usize,
    pub test_accuracy: f64,
    pub bundle_test_accuracy: f64,
    pub seconds: f64,
}

/// One class's windows from seeds `seeds`, each at a seeded offset.
fn windows(scenario: Scenario, seeds: std::ops::Range<u64>) -> Vec<Vec<f32>> {
    seeds
        .map(|seed| {
            let mut imu = SimImu::new(seed, RATE_HZ, scenario);
            let start = (seed * 7919) % 5000;
            let w: Vec<Vec<f32>> = (start..start + WINDOW as u64)
                .map(|i| imu.sample(i))
                .collect();
            window_features(&w, &CHANNELS, RATE_HZ)
        })
        .collect()
}

/// Labelled feature rows of every class, seeds `first..first + per_class`
/// (the bundle was trained on seeds below 1000 * classes; benchmarks and
/// calibration use others).
pub fn labelled_windows(per_class: u64, first: u64) -> Vec<(Vec<f32>, u32)> {
    [Scenario::Normal, Scenario::Imbalance, Scenario::Impact]
        .iter()
        .enumerate()
        .flat_map(|(label, s)| {
            windows(
                *s,
                first + label as u64 * 100_000..first + label as u64 * 100_000 + per_class,
            )
            .into_iter()
            .map(move |f| (f, label as u32))
        })
        .collect()
}

fn dataset(x: &[(Vec<f32>, u32)], mu: &[f32], sd: &[f32]) -> Dataset {
    Dataset {
        x: x.iter()
            .flat_map(|(f, _)| f.iter().zip(mu).zip(sd).map(|((v, m), s)| (v - m) / s))
            .collect(),
        features: FEATURES,
        classes: x.iter().map(|(_, l)| *l).collect(),
        values: vec![],
        outputs: CLASSES.len(),
    }
}

fn imu_comment() -> String {
    format!(
        "\
Vibration classifier for an MPU-6050 on a rotating machine, made by
`dai-models train imu` from simulated windows (dai_sensors::sim::SimImu,
seeded; no third-party data). Input: dai_sensors::features of a window of
{WINDOW} samples at {RATE_HZ} Hz over ax, ay, az, gx, gy, gz (mean, std,
RMS and 4 log band energies per channel). backbone.onnx = Mul(1) -> Gemm
-> Relu (standardisation folded in); head.safetensors is trainable."
    )
}

/// The figures of an IMU run the manifest records.
struct ImuMetrics {
    test_accuracy: f64,
    train_windows: usize,
    test_windows: usize,
}

/// Width of the backbone's output (its first layer).
const EMBEDDING: usize = 32;

/// The `imu-anomaly` bundle's manifest: backbone `features` ->
/// `embedding`, then the head.
fn imu_manifest(m: &ImuMetrics, onnx_sha256: String, head_sha256: String) -> Manifest {
    trained_manifest(
        TrainedBundle {
            name: "imu-anomaly",
            version: "1.0.0",
            description: format!(
                "MLP {FEATURES}-{EMBEDDING}-16-3 on IMU window features: normal / imbalance / impact"
            ),
            labels: CLASSES.iter().map(|c| c.to_string()).collect(),
            input: ("features", FEATURES),
            embedding: EMBEDDING,
            metrics: vec![
                ("test_accuracy", four_decimals(m.test_accuracy)),
                ("train_windows", m.train_windows as f64),
                ("test_windows", m.test_windows as f64),
                ("window", WINDOW as f64),
                ("rate_hz", RATE_HZ),
            ],
        },
        onnx_sha256,
        head_sha256,
    )
}

pub fn run(opts: &ImuOptions) -> Result<ImuReport, ToolError> {
    let started = std::time::Instant::now();
    let n = opts.windows_per_class as u64;
    let scenarios = [Scenario::Normal, Scenario::Imbalance, Scenario::Impact];
    let mut train_rows = Vec::new();
    let mut test_rows = Vec::new();
    for (label, s) in scenarios.iter().enumerate() {
        let base = opts.seed * 1_000_000 + label as u64 * 100_000;
        for f in windows(*s, base..base + n) {
            train_rows.push((f, label as u32));
        }
        for f in windows(*s, base + 50_000..base + 50_000 + n / 4) {
            test_rows.push((f, label as u32));
        }
    }
    // Standardisation from the training rows.
    let mut mu = vec![0.0f32; FEATURES];
    let mut sd = vec![0.0f32; FEATURES];
    for (f, _) in &train_rows {
        for (m, v) in mu.iter_mut().zip(f) {
            *m += v / train_rows.len() as f32;
        }
    }
    for (f, _) in &train_rows {
        for ((s, v), m) in sd.iter_mut().zip(f).zip(&mu) {
            *s += (v - m) * (v - m) / train_rows.len() as f32;
        }
    }
    for s in sd.iter_mut() {
        *s = s.sqrt().max(1e-6);
    }
    let train_set = dataset(&train_rows, &mu, &sd);
    let test_set = dataset(&test_rows, &mu, &sd);
    let spec = HeadSpec::new(
        &[FEATURES, EMBEDDING, 16, CLASSES.len()],
        &[Activation::Relu, Activation::Relu, Activation::None],
        Loss::SoftmaxCrossEntropy,
    )?;
    let mut model = Head::init(spec, opts.seed);
    let mut choice = select_backend(false, 1.0, &model, 32);
    train(
        choice.backend.as_mut(),
        &mut model,
        &train_set,
        &TrainConfig {
            optimizer: Optimizer::adam(0.003),
            batch_size: 32,
            epochs: opts.epochs,
            seed: opts.seed,
        },
        |_| true,
    )?;
    let test_accuracy = accuracy(&model, &test_set)?;

    // Fold the standardisation into layer 0.
    let mut folded = model.clone();
    let inputs = FEATURES;
    for o in 0..folded.spec.layers[0].outputs {
        let mut shift = 0.0f32;
        for i in 0..inputs {
            let w = model.params.weights[0][o * inputs + i];
            folded.params.weights[0][o * inputs + i] = w / sd[i];
            shift += w * mu[i] / sd[i];
        }
        folded.params.biases[0][o] -= shift;
    }
    let backbone = sub_head(&folded, 0..1, Loss::Mse)?;
    let head = sub_head(
        &folded,
        1..folded.spec.layers.len(),
        Loss::SoftmaxCrossEntropy,
    )?;
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| ToolError::Io(format!("{}: {e}", opts.out.display())))?;
    let onnx = crate::onnx::dense_model(&backbone, "features", "embedding", 1.0)?;
    write(&opts.out.join("backbone.onnx"), &onnx)?;
    let mut meta = HashMap::new();
    meta.insert("base_version".to_string(), "1.0.0".to_string());
    meta.insert("producer".to_string(), "dai-models train imu".to_string());
    let head_bytes = head.to_bytes(&meta)?;
    write(&opts.out.join("head.safetensors"), &head_bytes)?;
    let manifest = imu_manifest(
        &ImuMetrics {
            test_accuracy,
            train_windows: train_rows.len(),
            test_windows: test_rows.len(),
        },
        sha256(&onnx),
        sha256(&head_bytes),
    );
    let manifest = manifest_text(&imu_comment(), &manifest)?;
    write(&opts.out.join("manifest.toml"), manifest.as_bytes())?;

    // Verify through the daemon's runtime on raw (unstandardised) features.
    let probe = BundleProbe::open(&opts.out)?;
    let mut correct = 0usize;
    for (f, label) in &test_rows {
        correct += usize::from(argmax(&probe.probs(f.clone())?) as u32 == *label);
    }
    let bundle_test_accuracy = correct as f64 / test_rows.len() as f64;
    if (bundle_test_accuracy - test_accuracy).abs() > 0.02 {
        return Err(ToolError::Verify(format!(
            "bundle accuracy {bundle_test_accuracy} differs from the trained model's {test_accuracy}"
        )));
    }
    Ok(ImuReport {
        train_windows: train_rows.len(),
        test_windows: test_rows.len(),
        test_accuracy,
        bundle_test_accuracy,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train_digits::tests::{shipped, sum};
    use dai_infer::bundle::{HeadTransform, parse_manifest};

    #[test]
    fn imu_manifest_round_trips_through_the_parser() {
        let metrics = ImuMetrics {
            test_accuracy: 287.0 / 300.0,
            train_windows: 1200,
            test_windows: 300,
        };
        let m = imu_manifest(&metrics, sum('c'), sum('d'));
        let text = manifest_text(&imu_comment(), &m).expect("serialises");
        assert!(text.starts_with("# Vibration classifier"), "{text}");
        assert!(text.contains("# 256 samples at 1000 Hz"), "{text}");
        let parsed = parse_manifest(&text).expect("parses");
        assert_eq!(parsed, m);
        assert_eq!(parsed.metrics["test_accuracy"], 0.9567);
        assert_eq!(parsed.labels, ["normal", "imbalance", "impact"]);
        assert_eq!(
            parsed.head.as_ref().map(|h| h.transform),
            Some(HeadTransform::Softmax)
        );
        assert_eq!(parsed.inputs[0].shape, [1, FEATURES]);
    }

    /// The manifest the IMU maker writes for the shipped bundle's figures is
    /// the one shipped (made by the earlier text template).
    #[test]
    fn imu_manifest_matches_the_shipped_bundle() {
        let (_, zoo) = shipped("imu-anomaly");
        let head = zoo.head.as_ref().expect("head");
        let metrics = ImuMetrics {
            test_accuracy: zoo.metrics["test_accuracy"],
            train_windows: zoo.metrics["train_windows"] as usize,
            test_windows: zoo.metrics["test_windows"] as usize,
        };
        let m = imu_manifest(&metrics, zoo.model.sha256.clone(), head.sha256.clone());
        let text = manifest_text(&imu_comment(), &m).expect("serialises");
        assert_eq!(parse_manifest(&text).expect("parses"), zoo);
    }
}
