//! `dai-models` binary: thin CLI over the library.

mod commands;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "dai-models",
    version,
    about = "Make, convert and inspect DAI model bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Split the digits data set across N simulated devices (writes one CSV.gz per device).
    Shard(ShardArgs),
    /// Operators, parameters, size, inputs/outputs, FLOPs, and whether tract runs it.
    Inspect(InspectArgs),
    /// Any ONNX file -> a complete bundle (manifest with measured output
    /// shapes and batching), verified through the daemon's loader.
    Bundle(BundleArgs),
    /// int8 / f16 quantization, calibrated and verified in tract before it is written.
    Quantize(QuantizeArgs),
    /// Magnitude pruning (unstructured or channel-structured) with an accuracy/size report.
    Prune(PruneArgs),
    /// A bundle's backbone + trained head as one ONNX file, checked against the daemon's output.
    Export(ExportArgs),
    /// Labelled head-input rows from a CSV through a bundle's backbone: the
    /// bundle's own validation rows (--into-bundle) or an aggregator's
    /// --validation file.
    ValidationSet(ValidationSetArgs),
    /// Train a model the project ships.
    Train {
        #[command(subcommand)]
        model: TrainModel,
    },
}

// Each subcommand's arguments are a struct of their own (the variant's doc
// comment stays the subcommand's about), so its handler in `commands` takes
// one value instead of a long list of fields.

#[derive(clap::Args, Debug)]
struct ValidationSetArgs {
    /// The bundle directory (its backbone makes the head inputs).
    #[arg(long)]
    bundle: PathBuf,
    /// CSV or CSV.gz: per line the input's values for one row, then the label.
    #[arg(long)]
    data: PathBuf,
    /// test (the class-balanced split `dai-models train` holds out) or all.
    #[arg(long, default_value = "test")]
    split: String,
    /// With --split test: the share of each class held out.
    #[arg(long, default_value_t = 0.2)]
    fraction: f64,
    /// With --split test: the seed of the shuffle (`dai-models train`'s).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where to write (default with --into-bundle: BUNDLE/validation.safetensors).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Ship the rows in the bundle: the file and `[head.validation]` in its manifest.
    #[arg(long)]
    into_bundle: bool,
}

#[derive(clap::Args, Debug)]
struct ShardArgs {
    #[arg(long, default_value = "models/data/digits.csv.gz")]
    data: PathBuf,
    #[arg(long, short)]
    out: PathBuf,
    #[arg(long, default_value_t = 3)]
    devices: usize,
    /// iid | dirichlet:ALPHA | labels:N
    #[arg(long, default_value = "iid")]
    scheme: String,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(clap::Args, Debug)]
struct InspectArgs {
    /// An ONNX file, or a bundle directory (its manifest gives the shapes).
    model: PathBuf,
    /// Concrete shape for an input, e.g. x=1x3x48x192 (repeatable).
    #[arg(long = "input-shape", value_parser = dai_models::runner::parse_shape_override)]
    input_shape: Vec<(String, Vec<usize>)>,
    /// Time this many runs in tract (median, 1 thread); 0 to skip.
    #[arg(long, default_value_t = 0)]
    bench: usize,
    /// Time every node of tract's optimised plan over this many runs and
    /// show the time by operator and the slowest nodes; 0 to skip.
    #[arg(long, default_value_t = 0)]
    profile: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct BundleArgs {
    /// The ONNX file.
    model: PathBuf,
    /// The bundle directory to write.
    #[arg(long, short)]
    out: PathBuf,
    /// Model name in the API (default: the file name).
    #[arg(long)]
    name: Option<String>,
    #[arg(long = "model-version", default_value = "1.0.0")]
    model_version: String,
    #[arg(long, default_value = "")]
    description: String,
    /// Concrete shape for an input with symbolic axes, e.g. x=1x1x64x256
    /// (repeatable); a symbolic axis 0 is the batch axis and needs none.
    #[arg(long = "input-shape", value_parser = dai_models::runner::parse_shape_override)]
    input_shape: Vec<(String, Vec<usize>)>,
    /// Serve an input axis at any size within bounds: NAME:AXIS=MIN..MAX,
    /// e.g. input1:3=16..1024 (repeatable; the probe runs at MIN unless
    /// --input-shape says otherwise, and tract is run at both bounds).
    #[arg(long, value_parser = parse_dynamic)]
    dynamic: Vec<(String, usize, usize, usize)>,
    /// A text file with one class label per line (as many as the first
    /// output's last axis).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// MEAN,STD for u8 requests: x = (pixel * scale - mean) / std; each may
    /// be one value or per-channel values joined by ':' (0.485:0.456:0.406).
    #[arg(long)]
    normalize: Option<String>,
    /// Pixel scale before normalising.
    #[arg(long, default_value_t = 1.0 / 255.0)]
    scale: f32,
    /// The channel axis of --normalize.
    #[arg(long, default_value_t = 1)]
    channel_axis: usize,
    /// The model's licence (SPDX id), recorded in the manifest.
    #[arg(long)]
    license: Option<String>,
    /// Where the model comes from, recorded in the manifest.
    #[arg(long)]
    origin: Option<String>,
    /// Also run it in onnxruntime on the same probe input and compare.
    #[arg(long)]
    check_ort: bool,
    /// Python with onnxruntime for --check-ort.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Largest allowed |onnxruntime - tract|.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
    /// Replace a non-empty output directory.
    #[arg(long)]
    force: bool,
    /// Cut the model at this tensor: the graph up to it is the backbone,
    /// the dense layers after it become a trainable head.safetensors.
    #[arg(long)]
    head: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `NAME:AXIS=MIN..MAX` of `bundle --dynamic`.
fn parse_dynamic(s: &str) -> Result<(String, usize, usize, usize), String> {
    let bad = || format!("--dynamic {s:?}: expected NAME:AXIS=MIN..MAX, e.g. input1:3=16..1024");
    let (head, range) = s.rsplit_once('=').ok_or_else(bad)?;
    let (name, axis) = head.rsplit_once(':').ok_or_else(bad)?;
    let (min, max) = range.split_once("..").ok_or_else(bad)?;
    let num = |v: &str| v.trim().parse::<usize>().map_err(|_| bad());
    Ok((name.to_string(), num(axis)?, num(min)?, num(max)?))
}

#[derive(clap::Args, Debug)]
struct PruneArgs {
    /// An ONNX file, or a bundle directory.
    model: PathBuf,
    /// Fraction of weights (or channels, with --structured) set to zero, in [0, 1).
    #[arg(long)]
    sparsity: f64,
    /// Zero whole output channels by L2 norm instead of single weights.
    #[arg(long)]
    structured: bool,
    /// Samples to measure accuracy/deviation on (formats as quantize --calibration).
    #[arg(long, default_value = "random:16")]
    samples: String,
    /// Use at most this many samples.
    #[arg(long, default_value_t = 500)]
    limit: usize,
    /// Keep this node unpruned (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// Concrete shape for an input, e.g. x=1x3x48x192 (repeatable).
    #[arg(long = "input-shape", value_parser = dai_models::runner::parse_shape_override)]
    input_shape: Vec<(String, Vec<usize>)>,
    /// Time this many runs of each model in tract (0: skip).
    #[arg(long, default_value_t = 0)]
    bench: usize,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    /// The bundle directory (with a [head]).
    bundle: PathBuf,
    /// The ONNX file to write.
    #[arg(long, short)]
    out: PathBuf,
    /// A head.safetensors to export instead of the bundle's (e.g. one trained on a device).
    #[arg(long)]
    head: Option<PathBuf>,
    /// Samples compared against the daemon's path.
    #[arg(long, default_value_t = 16)]
    samples: usize,
    /// Largest allowed difference.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
    /// Python with onnxruntime for the second check ("off" to skip).
    #[arg(long, default_value = "python3")]
    onnxruntime: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct QuantizeArgs {
    /// An ONNX file, or a bundle directory (the result becomes a variant of the bundle).
    model: PathBuf,
    /// Calibration samples: random:N[:SEED], a .csv/.csv.gz (features then label) or a .safetensors file.
    #[arg(long)]
    calibration: Option<String>,
    /// Verification samples (same formats); defaults to the calibration samples.
    #[arg(long)]
    verify: Option<String>,
    /// int8 (integer MatMul/Gemm, int8 Conv/embedding weights), int8-weights, or f16.
    #[arg(long, default_value = "int8")]
    mode: dai_models::quantize::Mode,
    /// Activation ranges: minmax, percentile or percentile:P.
    #[arg(long, default_value = "minmax")]
    method: dai_models::quantize::Calibration,
    /// One scale per weight tensor instead of one per output channel.
    #[arg(long)]
    per_tensor: bool,
    /// Largest allowed |quantized - f32| on a checked output (default 0.05 without labels;
    /// with labelled samples only --max-accuracy-drop applies unless this is given).
    #[arg(long)]
    tolerance: Option<f32>,
    /// MatMul/Gemm weights with fewer values keep f32 compute with int8 weights.
    #[arg(long, default_value_t = 16384)]
    min_int8_params: usize,
    /// Keep node and internal value names (default: shortened, to save space).
    #[arg(long)]
    keep_names: bool,
    /// SmoothQuant strength for integer matmuls: activation outliers moved into weights (0: off).
    #[arg(long, default_value_t = 0.0)]
    smooth: f32,
    /// Largest allowed accuracy drop in points (when the samples carry labels).
    #[arg(long, default_value_t = 1.0)]
    max_accuracy_drop: f64,
    /// Keep this node in f32 (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// Output to check (repeatable); default: the bundle's outputs, else every float output.
    #[arg(long = "check-output")]
    check_output: Vec<String>,
    /// Concrete shape for an input, e.g. x=1x3x48x192 (repeatable).
    #[arg(long = "input-shape", value_parser = dai_models::runner::parse_shape_override)]
    input_shape: Vec<(String, Vec<usize>)>,
    /// Use at most this many samples of each set.
    #[arg(long, default_value_t = 200)]
    limit: usize,
    /// Time this many runs of each model in tract (0: skip).
    #[arg(long, default_value_t = 20)]
    bench: usize,
    #[command(flatten)]
    output: OutputArgs,
}

/// Where a rewriting command writes, shared by quantize and prune.
#[derive(clap::Args, Debug)]
struct OutputArgs {
    /// Where to write; default: next to the input as NAME.<suffix>.onnx
    /// (quantize on a bundle: also listed in its manifest as a variant).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Replace an existing output file (or bundle variant).
    #[arg(long)]
    force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

impl OutputArgs {
    /// `--out`, or `input` renamed to NAME.`suffix`.onnx; refused when it
    /// exists and `--force` is not given.
    fn file(&self, input: &std::path::Path, suffix: &str) -> anyhow::Result<PathBuf> {
        let out = self.out.clone().unwrap_or_else(|| {
            let stem = input
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            input.with_file_name(format!("{stem}.{suffix}.onnx"))
        });
        if out.exists() && !self.force {
            anyhow::bail!("{} exists; pass --force to replace it", out.display());
        }
        Ok(out)
    }
}

#[derive(Subcommand, Debug)]
enum TrainModel {
    /// The IMU vibration classifier -> models/zoo/imu-anomaly (from simulated windows).
    Imu(ImuArgs),
    /// The UCI digits MLP -> models/zoo/digits (backbone.onnx + head.safetensors).
    Digits(DigitsArgs),
}

#[derive(clap::Args, Debug)]
struct ImuArgs {
    #[arg(long, short, default_value = "models/zoo/imu-anomaly")]
    out: PathBuf,
    #[arg(long, default_value_t = 400)]
    windows_per_class: usize,
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(clap::Args, Debug)]
struct DigitsArgs {
    #[arg(long, default_value = "models/data/digits.csv.gz")]
    data: PathBuf,
    #[arg(long, short, default_value = "models/zoo/digits")]
    out: PathBuf,
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 0.003)]
    lr: f32,
    /// Train on the GPU (wgpu) when an adapter exists.
    #[arg(long)]
    gpu: bool,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

// An error returned from `main` is printed by std as `Error: {:?}` (anyhow's
// chain, "Caused by:" and, with RUST_BACKTRACE, the backtrace) with exit
// status 1; `main` keeps returning it so that output stays as it was.
fn main() -> anyhow::Result<()> {
    init_tracing();
    commands::run(Cli::parse().command)
}

/// Logs go to stderr (stdout carries the reports), filtered by `DAI_LOG`,
/// warnings only by default.
fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DAI_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
