//! `dai-models prune`: magnitude pruning of MatMul/Gemm/Conv weights.
//!
//! - unstructured: in each weight tensor the `sparsity` fraction of values
//!   with the smallest |w| become 0;
//! - structured (`--structured`): whole output channels (Conv filters, Gemm
//!   rows, MatMul columns) with the smallest L2 norm become 0, their bias too,
//!   so the channel is dead.
//!
//! Shapes stay as they are, so the file is a drop-in replacement; the gain
//! is in what ships over the air (zstd, as model updates are sent) and in
//! accuracy headroom for quantization. The report gives the sparsity reached
//! per tensor, sizes raw and compressed, and the accuracy or output deviation
//! measured in tract against the original.

use crate::ToolError;
use crate::calib::SampleSet;
use crate::proto::{self, Names};
use crate::quantize::{OutputCheck, compare, prune_unused};
use crate::runner::{InputSpec, Runner};
use dai_onnx::pb;
use prost::Message;
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Serialize)]
pub struct TensorSparsity {
    pub node: String,
    pub op: String,
    pub shape: Vec<usize>,
    pub values: usize,
    pub zeros: usize,
    pub sparsity: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub requested: f64,
    pub structured: bool,
    pub tensors: Vec<TensorSparsity>,
    /// Zeros / values over all pruned tensors.
    pub sparsity: f64,
    pub bytes: u64,
    pub zstd_bytes_before: u64,
    pub zstd_bytes_after: u64,
    pub samples: usize,
    pub outputs: Vec<OutputCheck>,
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
    pub latency_before_ms: Option<f64>,
    pub latency_after_ms: Option<f64>,
}

pub struct PruneOptions {
    pub sparsity: f64,
    pub structured: bool,
    pub exclude: Vec<String>,
    pub ignore_value_info: bool,
    pub bench_runs: usize,
}

fn zstd_len(bytes: &[u8]) -> Result<u64, ToolError> {
    zstd::bulk::compress(bytes, 9)
        .map(|c| c.len() as u64)
        .map_err(|e| ToolError::Io(format!("zstd: {e}")))
}

/// Prune `model`; returns the pruned model and its report.
pub fn prune(
    model: &pb::ModelProto,
    specs: &[InputSpec],
    samples: &SampleSet,
    opts: &PruneOptions,
) -> Result<(pb::ModelProto, PruneReport), ToolError> {
    check_sparsity(opts.sparsity)?;
    let g = proto::graph(model);
    let consts = proto::constants(g);
    let mut rw = Rewrites {
        names: Names::of(g),
        inits: Vec::new(),
        renames: HashMap::new(),
        tensors: Vec::new(),
    };
    for (i, n) in g.node.iter().enumerate() {
        if opts.exclude.iter().any(|e| e == &n.name) {
            continue;
        }
        prune_node(i, n, &consts, opts, &mut rw);
    }
    if rw.tensors.is_empty() {
        return Err(ToolError::Unsupported(
            "nothing to prune: no MatMul/Gemm/Conv with constant float weights".into(),
        ));
    }
    let mut out = model.clone();
    if let Some(og) = out.graph.as_mut() {
        for ((i, k), name) in rw.renames {
            og.node[i].input[k] = name;
        }
        og.initializer.extend(rw.inits);
    }
    // The original weights are no longer read by any node: drop them, or
    // the file would carry both copies.
    prune_unused(&mut out);
    let report = measure(model, &out, specs, samples, opts, rw.tensors)?;
    Ok((out, report))
}

fn check_sparsity(sparsity: f64) -> Result<(), ToolError> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(ToolError::Data {
            path: "--sparsity".into(),
            message: format!("{sparsity} is outside [0, 1)"),
        });
    }
    Ok(())
}

/// What pruning makes while the original graph is read: new initializers,
/// which node inputs switch to them, and the per-tensor report rows. They
/// are applied to the copy only once every node has been seen.
struct Rewrites {
    names: Names,
    inits: Vec<pb::TensorProto>,
    /// (node index, input index) -> name of the pruned initializer.
    renames: HashMap<(usize, usize), String>,
    tensors: Vec<TensorSparsity>,
}

/// The weight's channel axis and the bias input of a prunable node; `None`
/// for ops that are not pruned.
fn channel_layout(n: &pb::NodeProto) -> Option<(usize, Option<usize>)> {
    match n.op_type.as_str() {
        "MatMul" => Some((1usize, None)),
        "Gemm" => {
            if proto::get_int(n, "transB").unwrap_or(0) != 0 {
                Some((0, Some(2usize)))
            } else {
                Some((1, Some(2)))
            }
        }
        "Conv" => Some((0, Some(2))),
        _ => None,
    }
}

/// Prune node `i`'s constant weight (input 1) into `rw`, and with whole
/// channels dead its bias too. Nodes without a usable float weight, or one
/// too small to be worth it, are left alone.
fn prune_node(
    i: usize,
    n: &pb::NodeProto,
    consts: &HashMap<String, &pb::TensorProto>,
    opts: &PruneOptions,
    rw: &mut Rewrites,
) {
    let Some((axis, bias)) = channel_layout(n) else {
        return;
    };
    let Some(t) = n.input.get(1).and_then(|w| consts.get(w)) else {
        return;
    };
    let Some(mut w) = proto::to_f32(t) else {
        return;
    };
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    if w.len() < 16 || dims.len() < 2 || (n.op_type == "MatMul" && dims.len() != 2) {
        return;
    }
    let dead_channels = if opts.structured {
        zero_weakest_channels(&mut w, &dims, axis, opts.sparsity)
    } else {
        zero_smallest_values(&mut w, opts.sparsity);
        Vec::new()
    };
    let zeros = w.iter().filter(|v| **v == 0.0).count();
    let base = if n.name.is_empty() {
        n.output[0].clone()
    } else {
        n.name.clone()
    };
    let w_name = rw.names.fresh(&format!("{}_pruned", n.input[1]));
    rw.inits.push(proto::f32_tensor(&w_name, &dims, &w));
    rw.renames.insert((i, 1), w_name);
    if let Some(b) = bias
        && !dead_channels.is_empty()
        && let Some(bt) = n.input.get(b).and_then(|x| consts.get(x))
    {
        zero_bias(i, n, b, bt, &dead_channels, rw);
    }
    rw.tensors.push(TensorSparsity {
        node: base,
        op: n.op_type.clone(),
        shape: dims,
        values: w.len(),
        zeros,
        sparsity: zeros as f64 / w.len() as f64,
    });
}

/// Structured pruning: zero the `sparsity` fraction of channels along
/// `axis` with the smallest L2 norm; returns those channels.
fn zero_weakest_channels(w: &mut [f32], dims: &[usize], axis: usize, sparsity: f64) -> Vec<usize> {
    let channels = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let chan = |k: usize| (k / inner) % channels;
    let mut norms = vec![0.0f64; channels];
    for (k, v) in w.iter().enumerate() {
        norms[chan(k)] += (*v as f64) * (*v as f64);
    }
    let mut order: Vec<usize> = (0..channels).collect();
    order.sort_by(|a, b| norms[*a].total_cmp(&norms[*b]));
    let cut = (sparsity * channels as f64).round() as usize;
    let dead: std::collections::HashSet<usize> = order[..cut].iter().copied().collect();
    for (k, v) in w.iter_mut().enumerate() {
        if dead.contains(&chan(k)) {
            *v = 0.0;
        }
    }
    dead.into_iter().collect()
}

/// Unstructured pruning: zero the `sparsity` fraction of values with the
/// smallest |w|.
fn zero_smallest_values(w: &mut [f32], sparsity: f64) {
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|a, b| w[*a].abs().total_cmp(&w[*b].abs()));
    let cut = (sparsity * w.len() as f64).round() as usize;
    for &k in &order[..cut] {
        w[k] = 0.0;
    }
}

/// Zero the dead channels' entries of bias `bt` (input `b` of node `i`), so
/// those channels output exactly 0 rather than a constant.
fn zero_bias(
    i: usize,
    n: &pb::NodeProto,
    b: usize,
    bt: &pb::TensorProto,
    dead_channels: &[usize],
    rw: &mut Rewrites,
) {
    let Some(mut bv) = proto::to_f32(bt) else {
        return;
    };
    for &c in dead_channels {
        if let Some(v) = bv.get_mut(c) {
            *v = 0.0;
        }
    }
    let b_name = rw.names.fresh(&format!("{}_pruned", n.input[b]));
    let bdims: Vec<usize> = bt.dims.iter().map(|&d| d as usize).collect();
    rw.inits.push(proto::f32_tensor(&b_name, &bdims, &bv));
    rw.renames.insert((i, b), b_name);
}

/// Run both models in tract on `samples` (and time them with `--bench`) and
/// put the report together.
fn measure(
    model: &pb::ModelProto,
    out: &pb::ModelProto,
    specs: &[InputSpec],
    samples: &SampleSet,
    opts: &PruneOptions,
    tensors: Vec<TensorSparsity>,
) -> Result<PruneReport, ToolError> {
    let before = model.encode_to_vec();
    let after = out.encode_to_vec();
    let reference = Runner::new(model, specs, opts.ignore_value_info, None)?;
    let pruned = Runner::new(out, specs, opts.ignore_value_info, None)?;
    // No tolerance: pruning is judged by the numbers reported, not refused.
    let cmp = compare(
        &reference,
        &pruned,
        samples,
        &[],
        f32::INFINITY,
        "measuring",
        None,
    )?;
    let (mut lb, mut la) = (None, None);
    if opts.bench_runs > 0
        && let Some(s) = samples.samples.first()
    {
        lb = Some(reference.latency_ms(s, opts.bench_runs)?);
        la = Some(pruned.latency_ms(s, opts.bench_runs)?);
    }
    let values: usize = tensors.iter().map(|t| t.values).sum();
    let zeros: usize = tensors.iter().map(|t| t.zeros).sum();
    Ok(PruneReport {
        requested: opts.sparsity,
        structured: opts.structured,
        sparsity: zeros as f64 / values.max(1) as f64,
        tensors,
        bytes: after.len() as u64,
        zstd_bytes_before: zstd_len(&before)?,
        zstd_bytes_after: zstd_len(&after)?,
        samples: samples.len(),
        outputs: cmp.outputs,
        accuracy_before: cmp.accuracy_ref,
        accuracy_after: cmp.accuracy_new,
        latency_before_ms: lb,
        latency_after_ms: la,
    })
}

impl PruneReport {
    pub fn table(&self) -> String {
        use crate::inspect::human_bytes;
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} magnitude pruning, requested sparsity {:.1}%, reached {:.2}% over {} tensors\n",
            if self.structured {
                "channel-structured"
            } else {
                "unstructured"
            },
            self.requested * 100.0,
            self.sparsity * 100.0,
            self.tensors.len()
        );
        let _ = writeln!(s, "| node | op | shape | values | zeros | sparsity |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for t in &self.tensors {
            let _ = writeln!(
                s,
                "| {} | {} | {:?} | {} | {} | {:.1}% |",
                t.node,
                t.op,
                t.shape,
                t.values,
                t.zeros,
                t.sparsity * 100.0
            );
        }
        let _ = writeln!(
            s,
            "\nsize          {} (shapes unchanged); zstd -9: {} -> {} ({:.2}x smaller)",
            human_bytes(self.bytes),
            human_bytes(self.zstd_bytes_before),
            human_bytes(self.zstd_bytes_after),
            self.zstd_bytes_before as f64 / self.zstd_bytes_after.max(1) as f64
        );
        for o in &self.outputs {
            let _ = writeln!(
                s,
                "output        {:?}: max |pruned - original| {:.3e}, mean {:.3e} (original up to {:.3}) on {} samples",
                o.name, o.max_abs_diff, o.mean_abs_diff, o.ref_max_abs, self.samples
            );
        }
        match (self.accuracy_before, self.accuracy_after) {
            (Some(a), Some(b)) => {
                let _ = writeln!(
                    s,
                    "accuracy      {:.2}% -> {:.2}% ({:+.2} points; no fine-tuning after pruning)",
                    a * 100.0,
                    b * 100.0,
                    (b - a) * 100.0
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "accuracy      no labels in the samples: output deviation above"
                );
            }
        }
        if let (Some(a), Some(b)) = (self.latency_before_ms, self.latency_after_ms) {
            let _ = writeln!(s, "latency       tract {a:.3} ms -> {b:.3} ms");
        }
        s
    }
}
