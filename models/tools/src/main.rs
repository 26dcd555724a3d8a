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
    /// Train a model the project ships.
    Train {
        #[command(subcommand)]
        model: TrainModel,
    },
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
