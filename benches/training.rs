//! Training-throughput benchmark: our CPU backend vs PyTorch CPU, side by side.
//!
//! Same MLPs, same data, same batch sizes, same optimiser settings; samples
//! per second over timed epochs after one warm-up epoch, median of rounds.
//! - MLP 64-64-32-10 on the digits data (1,797 samples);
//! - head 384-256-10 (a MiniLM-sized embedding head) on 16,384 synthetic samples;
//! - batches 32 and 256; SGD (momentum 0.9) and Adam; PyTorch at 1 thread and
//!   at all cores; ours at 1 thread (see docs/benchmarks.md);
//! - the wgpu backend on whatever adapter exists (lavapipe here: correctness
//!   only, not speed).
//!
//! `cargo bench --bench training` writes its section of docs/benchmarks.md.
//! `cargo bench --bench training -- --gpu-only` prints one JSON line per
//! configuration for the wgpu backend (used by bench/gpu/run_gpu_bench.sh).

mod common;
use common::{env_usize, median, repo};

use dai_train::cpu::CpuBackend;
use dai_train::{
    Activation, Backend, Dataset, Head, HeadSpec, Loss, Optimizer, Rng, TrainConfig, train,
};
use std::process::Command;
use std::time::Instant;

struct Net {
    name: &'static str,
    sizes: Vec<usize>,
    acts: Vec<Activation>,
    data: Dataset,
    torch_data: Vec<String>,
}

fn digits() -> Dataset {
    let rows = dai_models::digits::load(&repo().join("models/data/digits.csv.gz")).expect("digits");
    let idx: Vec<usize> = (0..rows.len()).collect();
    dai_models::digits::dataset(&rows, &idx)
}

fn synthetic(n: usize, features: usize, classes: u32, seed: u64) -> Dataset {
    let mut r = Rng::new(seed);
    Dataset {
        x: (0..n * features).map(|_| r.uniform() * 2.0 - 1.0).collect(),
        features,
        classes: (0..n)
            .map(|_| (r.next_u64() % classes as u64) as u32)
            .collect(),
        values: vec![],
        outputs: classes as usize,
    }
}

fn optimizer(name: &str) -> Optimizer {
    match name {
        "adam" => Optimizer::adam(0.001),
        _ => Optimizer::sgd(0.05, 0.9),
    }
}

/// Samples per second of `epochs` timed epochs after one warm-up epoch.
fn ours(backend: &mut dyn Backend, net: &Net, opt: &str, batch: usize, epochs: usize) -> f64 {
    let spec = HeadSpec::new(&net.sizes, &net.acts, Loss::SoftmaxCrossEntropy).expect("spec");
    let mut head = Head::init(spec, 1);
    let warm = TrainConfig {
        optimizer: optimizer(opt),
        batch_size: batch,
        epochs: 1,
        seed: 1,
    };
    train(backend, &mut head, &net.data, &warm, |_| true).expect("warm-up");
    let cfg = TrainConfig { epochs, ..warm };
    let t = Instant::now();
    let r = train(backend, &mut head, &net.data, &cfg, |_| true).expect("train");
    r.samples_seen as f64 / t.elapsed().as_secs_f64()
}

fn torch(
    net: &Net,
    opt: &str,
    batch: usize,
    epochs: usize,
    threads: usize,
) -> Option<(f64, String)> {
    let python = std::env::var("DAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let sizes: Vec<String> = net.sizes.iter().map(|s| s.to_string()).collect();
    let acts: Vec<&str> = net.acts.iter().map(|a| a.as_str()).collect();
    let (lr, momentum) = if opt == "adam" {
        ("0.001", "0")
    } else {
        ("0.05", "0.9")
    };
    let out = Command::new(python)
        .arg(repo().join("bench/torch_train.py"))
        .args([
            "--sizes",
            &sizes.join(","),
            "--activations",
            &acts.join(","),
            "--optimizer",
            opt,
        ])
        .args([
            "--lr",
            lr,
            "--momentum",
            momentum,
            "--batch",
            &batch.to_string(),
            "--epochs",
            &epochs.to_string(),
        ])
        .args(["--threads", &threads.to_string()])
        .args(&net.torch_data)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "torch_train.py: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((
        v["samples_per_sec"].as_f64()?,
        v["torch"].as_str().unwrap_or("?").to_string(),
    ))
}

fn nets() -> Vec<Net> {
    vec![
        Net {
            name: "MLP 64-64-32-10 (digits)",
            sizes: vec![64, 64, 32, 10],
            acts: vec![Activation::Relu, Activation::Relu, Activation::None],
            data: digits(),
            torch_data: vec![
                "--data".into(),
                repo()
                    .join("models/data/digits.csv.gz")
                    .display()
                    .to_string(),
            ],
        },
        Net {
            name: "head 384-256-10 (synthetic 16384)",
            sizes: vec![384, 256, 10],
            acts: vec![Activation::Relu, Activation::None],
            data: synthetic(16_384, 384, 10, 3),
            torch_data: vec!["--synthetic".into(), "16384".into()],
        },
    ]
}

fn wgpu(net: &Net, opt: &str, batch: usize, epochs: usize) -> Result<(f64, String), String> {
    let spec = HeadSpec::new(&net.sizes, &net.acts, Loss::SoftmaxCrossEntropy)
        .map_err(|e| e.to_string())?;
    let mut g = dai_train::gpu::GpuBackend::new(1.0, &spec, batch).map_err(|e| e.to_string())?;
    let name = g.name();
    Ok((ours(&mut g, net, opt, batch, epochs), name))
}

fn gpu_only() {
    let mut n = nets();
    n[0].data = synthetic(16_384, 64, 10, 4);
    for net in &n {
        for batch in [32, 256, 1024] {
            match wgpu(net, "sgd", batch, 5) {
                Ok((sps, adapter)) => println!(
                    "{}",
                    serde_json::json!({"backend": "wgpu", "adapter": adapter, "sizes": net.sizes, "batch": batch,
                        "optimizer": "sgd", "samples_per_sec": sps})
                ),
                Err(e) => eprintln!("wgpu {}: {e}", net.name),
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if args.iter().any(|a| a == "--gpu-only") {
        gpu_only();
        return;
    }
    let rounds = env_usize("DAI_BENCH_ROUNDS", 3);
    let epochs = env_usize("DAI_BENCH_EPOCHS", 5);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut md = String::from("## Training throughput: dai-train CPU backend vs PyTorch CPU\n\n");
    let mut torch_version = None;
    let mut table = String::from(
        "| model | optimizer | batch | ours 1 thread (samples/s) | PyTorch 1 thread | ratio | PyTorch all cores | ratio vs all cores |\n|---|---|---|---|---|---|---|---|\n",
    );
    for net in &nets() {
        for opt in ["sgd", "adam"] {
            for batch in [32, 256] {
                let mut o = Vec::new();
                let mut t1 = Vec::new();
                let mut tn = Vec::new();
                for _ in 0..rounds {
                    o.push(ours(&mut CpuBackend::new(), net, opt, batch, epochs));
                    if let Some((v, ver)) = torch(net, opt, batch, epochs, 1) {
                        t1.push(v);
                        torch_version = Some(ver);
                    }
                    if let Some((v, _)) = torch(net, opt, batch, epochs, cores) {
                        tn.push(v);
                    }
                }
                let (o, t1, tn) = (median(o), median(t1), median(tn));
                eprintln!(
                    "{} {opt} b{batch}: ours {o:.0}, torch1 {t1:.0}, torch{cores} {tn:.0}",
                    net.name
                );
                table.push_str(&format!(
                    "| {} | {} | {batch} | {o:.0} | {t1:.0} | {:.2} | {tn:.0} | {:.2} |\n",
                    net.name,
                    if opt == "sgd" { "SGD m=0.9" } else { "Adam" },
                    o / t1,
                    o / tn
                ));
            }
        }
    }
    md.push_str(&format!(
        "Command: `cargo bench --bench training` (median of {rounds} rounds; {epochs} timed epochs after one warm-up epoch; \
         PyTorch {} via `bench/torch_train.py`, same shuffled mini-batch loop: slice, zero_grad, forward, cross-entropy, backward, step). \
         \"all cores\" = {cores} threads. Our CPU backend runs one thread (`matrixmultiply` sgemm; see the notes below).\n\n",
        torch_version.as_deref().unwrap_or("(not installed: `pip install torch`)")
    ));
    md.push_str(&table);
    let net = &nets()[0];
    match wgpu(net, "sgd", 256, 1) {
        Ok((sps, adapter)) => md.push_str(&format!(
            "\nwgpu backend on this machine's adapter ({adapter}), MLP 64-64-32-10, SGD, batch 256: {sps:.0} samples/s. \
             This is Mesa's software Vulkan driver (lavapipe): it proves the GPU code path (the parity suite checks its numbers), \
             it is not a speed measurement. `bench/gpu/run_gpu_bench.sh` times the wgpu backend against PyTorch CUDA on an NVIDIA GPU.\n"
        )),
        Err(e) => md.push_str(&format!("\nwgpu backend: no adapter here ({e}).\n")),
    }
    println!("{md}");
    common::write_section("training", &md);
}
