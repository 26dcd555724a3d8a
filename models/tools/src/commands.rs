//! What each `dai-models` subcommand does with its parsed arguments: call
//! the library, print its report (table on stdout, or JSON with `--json`)
//! and write the result. Kept apart from `main` so that `main` only parses,
//! sets up logging and dispatches.

use crate::{
    BundleArgs, Command, DigitsArgs, ExportArgs, ImuArgs, InspectArgs, PruneArgs, QuantizeArgs,
    ShardArgs, TrainModel, ValidationSetArgs,
};
use anyhow::Context;

/// Run one parsed subcommand.
pub(crate) fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Quantize(args) => quantize(args),
        Command::Prune(args) => prune(args),
        Command::Export(args) => export(args),
        Command::Inspect(args) => inspect(args),
        Command::Bundle(args) => bundle(args),
        Command::Shard(args) => shard(args),
        Command::ValidationSet(args) => validation_set(args),
        Command::Train {
            model: TrainModel::Imu(args),
        } => train_imu(args),
        Command::Train {
            model: TrainModel::Digits(args),
        } => train_digits(args),
    }
}

fn validation_set(a: ValidationSetArgs) -> anyhow::Result<()> {
    use dai_models::validation_set::{Options, Split, run};
    let split = match a.split.as_str() {
        "all" => Split::All,
        "test" if a.fraction > 0.0 && a.fraction < 1.0 => Split::Test {
            fraction: a.fraction,
            seed: a.seed,
        },
        "test" => anyhow::bail!("--fraction {}: expected a number in (0, 1)", a.fraction),
        other => anyhow::bail!("--split {other:?}: expected test or all"),
    };
    let r = run(&Options {
        bundle: a.bundle,
        data: a.data,
        split,
        out: a.out,
        into_bundle: a.into_bundle,
    })?;
    println!(
        "wrote {}: {} rows of {} head inputs{}",
        r.path.display(),
        r.rows,
        r.features,
        r.head_accuracy.map_or(String::new(), |a| format!(
            "; the shipped head scores {a:.4} on them"
        ))
    );
    Ok(())
}

/// Print `report` as pretty JSON, or as its table: the choice every
/// reporting subcommand offers with `--json`.
fn print_report<R: serde::Serialize>(
    report: &R,
    json: bool,
    table: impl FnOnce(&R) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", table(report));
    }
    Ok(())
}

fn prune(a: PruneArgs) -> anyhow::Result<()> {
    use dai_models::{bundle_io, calib, proto, prune, runner};
    let r = bundle_io::resolve_ref(&a.model, a.input_shape)?;
    let m = proto::load(&r.file)?;
    let (specs, _) = runner::input_specs(&m, &r.shapes)?;
    let set = calib::load(&a.samples, &specs)
        .with_context(|| format!("reading samples {:?}", a.samples))?
        .take(a.limit);
    // The default output name tells sparsity and kind apart: NAME.pruned50s.onnx.
    let suffix = format!(
        "pruned{}{}",
        (a.sparsity * 100.0).round() as u32,
        if a.structured { "s" } else { "" }
    );
    let out = a.output.file(&r.file, &suffix)?;
    let (pruned, report) = prune::prune(
        &m,
        &specs,
        &set,
        &prune::PruneOptions {
            sparsity: a.sparsity,
            structured: a.structured,
            exclude: a.exclude,
            ignore_value_info: r.ignore_value_info,
            bench_runs: a.bench,
        },
    )
    .with_context(|| format!("pruning {}", r.file.display()))?;
    print_report(&report, a.output.json, |r| r.table())?;
    proto::save(&pruned, &out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn export(a: ExportArgs) -> anyhow::Result<()> {
    let r = dai_models::export::export(
        &a.bundle,
        &a.out,
        &dai_models::export::ExportOptions {
            head: a.head,
            samples: a.samples,
            tolerance: a.tolerance,
            python: Some(a.onnxruntime),
        },
    )
    .with_context(|| format!("exporting {}", a.bundle.display()))?;
    print_report(&r, a.json, |r| r.table())?;
    // With --json stdout is the report alone, so the note is left out too.
    if !a.json {
        eprintln!("wrote {}", a.out.display());
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let (file, shapes) = dai_models::bundle_io::resolve(&a.model, a.input_shape)?;
    let r = dai_models::inspect::inspect(
        &file,
        &dai_models::inspect::InspectOptions {
            shapes,
            bench_runs: a.bench,
            profile_runs: a.profile,
        },
    )
    .with_context(|| format!("inspecting {}", a.model.display()))?;
    print_report(&r, a.json, |r| r.table())
}

/// `--normalize MEAN,STD`, each one value or per-channel values joined by ':'.
fn parse_normalize(s: &str) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let list = |part: &str| -> anyhow::Result<Vec<f32>> {
        part.split(':')
            .map(|v| {
                v.trim()
                    .parse::<f32>()
                    .with_context(|| format!("--normalize {s:?}: {v:?} is not a number"))
            })
            .collect()
    };
    let (mean, std) = s
        .split_once(',')
        .with_context(|| format!("--normalize {s:?}: expected MEAN,STD, e.g. 0.5,0.5"))?;
    let (mean, std) = (list(mean)?, list(std)?);
    anyhow::ensure!(
        mean.len() == std.len() || mean.len() == 1 || std.len() == 1,
        "--normalize {s:?}: {} means but {} stds",
        mean.len(),
        std.len()
    );
    let n = mean.len().max(std.len());
    let widen = |v: Vec<f32>| if v.len() == 1 { vec![v[0]; n] } else { v };
    Ok((widen(mean), widen(std)))
}

fn bundle(a: BundleArgs) -> anyhow::Result<()> {
    let labels = match &a.labels {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("--labels {}", p.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None => Vec::new(),
    };
    let normalize = a.normalize.as_deref().map(parse_normalize).transpose()?;
    let r = dai_models::make_bundle::bundle(
        &a.model,
        &dai_models::make_bundle::BundleOptions {
            out: a.out.clone(),
            name: a.name,
            version: a.model_version,
            description: a.description,
            shapes: a.input_shape.into_iter().collect(),
            dynamic: a.dynamic,
            labels,
            normalize,
            scale: a.scale,
            channel_axis: a.channel_axis,
            license: a.license,
            origin: a.origin,
            check_ort: a.check_ort.then_some(a.python),
            tolerance: a.tolerance,
            force: a.force,
            head: a.head,
        },
    )
    .with_context(|| format!("bundling {}", a.model.display()))?;
    print_report(&r, a.json, |r| r.table())
}

fn train_imu(a: ImuArgs) -> anyhow::Result<()> {
    let r = dai_models::train_imu::run(&dai_models::train_imu::ImuOptions {
        out: a.out.clone(),
        windows_per_class: a.windows_per_class,
        epochs: a.epochs,
        seed: a.seed,
    })
    .context("training the IMU model")?;
    println!(
        "imu-anomaly: {} train / {} test windows, test accuracy {:.2}% (bundle through tract: {:.2}%), {:.1} s -> {}",
        r.train_windows,
        r.test_windows,
        r.test_accuracy * 100.0,
        r.bundle_test_accuracy * 100.0,
        r.seconds,
        a.out.display()
    );
    Ok(())
}

fn train_digits(a: DigitsArgs) -> anyhow::Result<()> {
    let json = a.json;
    let opts = dai_models::train_digits::DigitsOptions {
        data: a.data,
        out: a.out.clone(),
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        gpu: a.gpu,
        seed: a.seed,
    };
    // Per-epoch progress only for people reading the table; JSON stays clean.
    let report = dai_models::train_digits::run(&opts, |epoch, loss| {
        if !json {
            eprintln!("epoch {epoch:>3}  loss {loss:.4}");
        }
    })
    .context("training digits")?;
    print_report(&report, json, |report| {
        format!(
            "digits: backend {}{}, {} train / {} test samples, final loss {:.4}, test accuracy {:.2}% \
             (bundle through tract: {:.2}%, max |dp| {:.1e}), {:.1} s -> {}\n",
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
            a.out.display()
        )
    })
}

fn shard(a: ShardArgs) -> anyhow::Result<()> {
    use dai_models::shard::Scheme;
    use std::io::Write;
    let (data, out, devices, seed) = (&a.data, &a.out, a.devices, a.seed);
    let scheme: Scheme = a.scheme.parse().map_err(|e| anyhow::anyhow!("--{e}"))?;
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
