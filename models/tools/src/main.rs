//! `dai-models` binary: thin CLI over the library.

use anyhow::Context;
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
    Shard {
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
    },
    /// Operators, parameters, size, inputs/outputs, FLOPs, and whether tract runs it.
    Inspect {
        /// An ONNX file, or a bundle directory (its manifest gives the shapes).
        model: PathBuf,
        /// Concrete shape for an input, e.g. x=1x3x48x192 (repeatable).
        #[arg(long = "input-shape", value_parser = dai_models::runner::parse_shape_override)]
        input_shape: Vec<(String, Vec<usize>)>,
        /// Time this many runs in tract (median, 1 thread); 0 to skip.
        #[arg(long, default_value_t = 0)]
        bench: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// int8 / f16 quantization, calibrated and verified in tract before it is written.
    Quantize(QuantizeArgs),
    /// Magnitude pruning (unstructured or channel-structured) with an accuracy/size report.
    Prune {
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
    },
    /// A bundle's backbone + trained head as one ONNX file, checked against the daemon's output.
    Export {
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
    },
    /// Train a model the project ships.
    Train {
        #[command(subcommand)]
        model: TrainModel,
    },
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
    Imu {
        #[arg(long, short, default_value = "models/zoo/imu-anomaly")]
        out: PathBuf,
        #[arg(long, default_value_t = 400)]
        windows_per_class: usize,
        #[arg(long, default_value_t = 60)]
        epochs: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// The UCI digits MLP -> models/zoo/digits (backbone.onnx + head.safetensors).
    Digits {
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
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DAI_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Quantize(args) => quantize(args),
        Command::Prune {
            model,
            sparsity,
            structured,
            samples,
            limit,
            exclude,
            input_shape,
            bench,
            output,
        } => {
            use dai_models::{bundle_io, calib, proto, prune, runner};
            let r = bundle_io::resolve_ref(&model, input_shape)?;
            let m = proto::load(&r.file)?;
            let (specs, _) = runner::input_specs(&m, &r.shapes)?;
            let set = calib::load(&samples, &specs)
                .with_context(|| format!("reading samples {samples:?}"))?
                .take(limit);
            let suffix = format!(
                "pruned{}{}",
                (sparsity * 100.0).round() as u32,
                if structured { "s" } else { "" }
            );
            let out = output.file(&r.file, &suffix)?;
            let (pruned, report) = prune::prune(
                &m,
                &specs,
                &set,
                &prune::PruneOptions {
                    sparsity,
                    structured,
                    exclude,
                    ignore_value_info: r.ignore_value_info,
                    bench_runs: bench,
                },
            )
            .with_context(|| format!("pruning {}", r.file.display()))?;
            if output.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            proto::save(&pruned, &out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Export {
            bundle,
            out,
            head,
            samples,
            tolerance,
            onnxruntime,
            json,
        } => {
            let r = dai_models::export::export(
                &bundle,
                &out,
                &dai_models::export::ExportOptions {
                    head,
                    samples,
                    tolerance,
                    python: Some(onnxruntime),
                },
            )
            .with_context(|| format!("exporting {}", bundle.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.table());
                eprintln!("wrote {}", out.display());
            }
            Ok(())
        }
        Command::Inspect {
            model,
            input_shape,
            bench,
            json,
        } => {
            let (file, shapes) = dai_models::bundle_io::resolve(&model, input_shape)?;
            let r = dai_models::inspect::inspect(
                &file,
                &dai_models::inspect::InspectOptions {
                    shapes,
                    bench_runs: bench,
                },
            )
            .with_context(|| format!("inspecting {}", model.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.table());
            }
            Ok(())
        }
        Command::Shard {
            data,
            out,
            devices,
            scheme,
            seed,
        } => shard(&data, &out, devices, &scheme, seed),
        Command::Train {
            model:
                TrainModel::Imu {
                    out,
                    windows_per_class,
                    epochs,
                    seed,
                },
        } => {
            let r = dai_models::train_imu::run(&dai_models::train_imu::ImuOptions {
                out: out.clone(),
                windows_per_class,
                epochs,
                seed,
            })
            .context("training the IMU model")?;
            println!(
                "imu-anomaly: {} train / {} test windows, test accuracy {:.2}% (bundle through tract: {:.2}%), {:.1} s -> {}",
                r.train_windows,
                r.test_windows,
                r.test_accuracy * 100.0,
                r.bundle_test_accuracy * 100.0,
                r.seconds,
                out.display()
            );
            Ok(())
        }
        Command::Train {
            model:
                TrainModel::Digits {
                    data,
                    out,
                    epochs,
                    batch_size,
                    lr,
                    gpu,
                    seed,
                    json,
                },
        } => {
            let opts = dai_models::train_digits::DigitsOptions {
                data,
                out: out.clone(),
                epochs,
                batch_size,
                lr,
                gpu,
                seed,
            };
            let report = dai_models::train_digits::run(&opts, |epoch, loss| {
                if !json {
                    eprintln!("epoch {epoch:>3}  loss {loss:.4}");
                }
            })
            .context("training digits")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "digits: backend {}{}, {} train / {} test samples, final loss {:.4}, test accuracy {:.2}% \
                     (bundle through tract: {:.2}%, max |dp| {:.1e}), {:.1} s -> {}",
                    report.backend,
                    report
                        .fallback_reason
                        .as_ref()
                        .map(|r| format!(" (GPU fallback: {r})"))
                        .unwrap_or_default(),
                    report.train_samples,
                    report.test_samples,
                    report.final_loss,
                    report.test_accuracy * 100.0,
                    report.bundle_test_accuracy * 100.0,
                    report.max_abs_diff_vs_trainer,
                    report.seconds,
                    out.display()
                );
            }
            Ok(())
        }
    }
}

fn shard(
    data: &std::path::Path,
    out: &std::path::Path,
    devices: usize,
    scheme: &str,
    seed: u64,
) -> anyhow::Result<()> {
    use dai_models::shard::Scheme;
    use std::io::Write;
    let scheme: Scheme = scheme.parse().map_err(|e| anyhow::anyhow!("--{e}"))?;
    let rows = dai_models::digits::load(data).context("reading the data set")?;
    let labels: Vec<u32> = rows.iter().map(|r| r.1).collect();
    let shards = dai_models::shard::shard(&labels, devices, scheme, seed);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (d, idx) in shards.iter().enumerate() {
        let path = out.join(format!("device-{d}.csv.gz"));
        let f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        for &i in idx {
            let (px, label) = &rows[i];
            let line: Vec<String> = px
                .iter()
                .map(|v| format!("{v}"))
                .chain(std::iter::once(label.to_string()))
                .collect();
            writeln!(gz, "{}", line.join(","))?;
        }
        gz.finish()?;
        let mut counts = [0usize; 10];
        for &i in idx {
            counts[rows[i].1 as usize] += 1;
        }
        println!(
            "{}: {} samples, per class {counts:?}",
            path.display(),
            idx.len()
        );
    }
    Ok(())
}

fn quantize(a: QuantizeArgs) -> anyhow::Result<()> {
    use dai_models::{bundle_io, calib, proto, quantize, runner};
    let r = bundle_io::resolve_ref(&a.model, a.input_shape.clone())?;
    let model = proto::load(&r.file)?;
    let (specs, notes) = runner::input_specs(&model, &r.shapes)?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    let cal_arg = match (&a.calibration, a.mode) {
        (Some(c), _) => c.clone(),
        (None, quantize::Mode::Int8) => anyhow::bail!(
            "--mode int8 needs --calibration DATA (random:N[:SEED], a .csv/.csv.gz or a .safetensors file)"
        ),
        (None, _) => "random:16".to_string(),
    };
    let calibration = calib::load(&cal_arg, &specs)
        .with_context(|| format!("reading calibration samples {cal_arg:?}"))?
        .take(a.limit);
    let verification = match &a.verify {
        Some(v) => calib::load(v, &specs)
            .with_context(|| format!("reading verification samples {v:?}"))?
            .take(a.limit),
        None => calibration.take(a.limit),
    };
    let check_outputs = if a.check_output.is_empty() {
        r.manifest
            .as_ref()
            .map(|m| {
                m.outputs
                    .iter()
                    .map(|o| o.onnx_name().to_string())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        a.check_output.clone()
    };
    let out = a.output.file(&r.file, a.mode.suffix())?;
    let opts = quantize::QuantizeOptions {
        mode: a.mode,
        calibration: a.method,
        per_channel: !a.per_tensor,
        tolerance: a.tolerance,
        min_int8_params: a.min_int8_params,
        keep_names: a.keep_names,
        smooth: a.smooth,
        head: bundle_head(&r)?,
        max_accuracy_drop: a.max_accuracy_drop,
        exclude: a.exclude.clone(),
        check_outputs,
        bench_runs: a.bench,
        ignore_value_info: r.ignore_value_info,
    };
    let (report, quantized) =
        quantize::quantize(&model, &specs, &calibration, &verification, &opts)
            .with_context(|| format!("quantizing {}", r.file.display()))?;
    if a.output.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    let Some(quantized) = quantized else {
        anyhow::bail!("quantization refused: {}", report.refusal.join("; "));
    };
    let bytes = proto::save(&quantized, &out)?;
    if let Some(dir) = &r.bundle_dir
        && a.output.out.is_none()
    {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        dai_models::variants::record(dir, a.mode.suffix(), &name, &report, a.output.force)
            .with_context(|| format!("recording the variant in {}", dir.display()))?;
        eprintln!(
            "wrote {} ({bytes} bytes) and listed it in {}/manifest.toml",
            out.display(),
            dir.display()
        );
    } else {
        eprintln!("wrote {} ({bytes} bytes)", out.display());
    }
    Ok(())
}

/// The head of a bundle whose ONNX file is only its backbone: accuracy on
/// labelled samples is judged after it.
fn bundle_head(
    r: &dai_models::bundle_io::ModelRef,
) -> anyhow::Result<Option<dai_models::quantize::HeadCheck>> {
    let (Some(m), Some(dir)) = (&r.manifest, &r.bundle_dir) else {
        return Ok(None);
    };
    let Some(h) = &m.head else { return Ok(None) };
    let Some(input) = m.outputs.iter().find(|o| o.name == h.input) else {
        return Ok(None);
    };
    let (head, _) = dai_train::Head::load(&dir.join(&h.file))
        .with_context(|| format!("loading the bundle's head {}", h.file))?;
    Ok(Some(dai_models::quantize::HeadCheck {
        head,
        input: input.onnx_name().to_string(),
        output: h.output.clone(),
    }))
}
