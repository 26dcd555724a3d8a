//! Planning: which quantized form each node of the graph gets, from the
//! mode, the opset and the size of its constant weights. Nothing is
//! rewritten here; [`super::rewrite`] carries the plans out.

use super::{Mode, QuantizeOptions};
use crate::proto::{self, dt};
use dai_onnx::pb;
use std::collections::{HashMap, HashSet};

/// What to do with one node.
pub(super) enum Plan {
    /// int8 x int8 matmul with a calibrated activation scale.
    IntMatMul {
        x: String,
        /// Weights as [K, N] row-major.
        w: Vec<f32>,
        k: usize,
        n: usize,
        alpha: f32,
        bias: Option<Box<pb::TensorProto>>,
        kind: &'static str,
    },
    /// Replace input `input` by int8 weights with scales along `axis`.
    WeightOnly {
        input: usize,
        axis: usize,
        kind: &'static str,
    },
    /// Embedding rows in int8 with per-row scales.
    GatherRows,
    /// Other large float constants (LSTM/GRU weights...): (input, axis) each
    /// given as int8 weights, f32 compute.
    Constants(Vec<(usize, usize)>),
}

/// What an op-specific rule decides for a node.
enum Verdict {
    Plan(Plan),
    /// Leave the node as it is, large constants included: a MatMul or Gemm
    /// whose weights are no usable constant, a Gather on a non-float table,
    /// shape plumbing.
    Keep,
    /// No rule of its own: the generic large-constant rule applies.
    Other,
}

type Consts<'a> = HashMap<String, &'a pb::TensorProto>;

pub(super) fn float_const<'a>(
    consts: &'a Consts,
    name: &str,
) -> Option<(&'a pb::TensorProto, Vec<f32>)> {
    let t = consts.get(name)?;
    if !matches!(t.data_type, dt::FLOAT | dt::DOUBLE | dt::FLOAT16) {
        return None;
    }
    proto::to_f32(t).map(|v| (*t, v))
}

/// The plan of every node that gets one, by node index. Nodes named in
/// `--exclude` are listed in `skipped`.
pub(super) fn plan_nodes(
    model: &pb::ModelProto,
    opts: &QuantizeOptions,
    skipped: &mut Vec<String>,
) -> HashMap<usize, Plan> {
    let g = proto::graph(model);
    let consts = proto::constants(g);
    let int_ok = proto::opset(model) >= 10;
    let mut plans = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        if opts.exclude.iter().any(|e| e == &n.name) {
            skipped.push(format!("{} {:?}: excluded", n.op_type, n.name));
            continue;
        }
        let verdict = match n.op_type.as_str() {
            "MatMul" => plan_matmul(n, &consts, opts, int_ok),
            "Gemm" => plan_gemm(n, &consts, opts, int_ok),
            "Conv" => plan_conv(n, &consts),
            "Gather" => plan_gather(n, &consts),
            "Reshape" | "Shape" | "ConstantOfShape" | "Constant" => Verdict::Keep,
            _ => Verdict::Other,
        };
        let plan = match verdict {
            Verdict::Plan(p) => Some(p),
            Verdict::Keep => None,
            Verdict::Other => plan_constants(n, &consts),
        };
        if let Some(p) = plan {
            plans.insert(i, p);
        }
    }
    plans
}

fn input(n: &pb::NodeProto, k: usize) -> &str {
    n.input.get(k).map(String::as_str).unwrap_or("")
}

fn plan_matmul(
    n: &pb::NodeProto,
    consts: &Consts,
    opts: &QuantizeOptions,
    int_ok: bool,
) -> Verdict {
    let Some((t, w)) = float_const(consts, input(n, 1)) else {
        return Verdict::Keep;
    };
    if t.dims.len() != 2 || consts.contains_key(input(n, 0)) {
        return Verdict::Keep;
    }
    let (k, nn) = (t.dims[0] as usize, t.dims[1] as usize);
    Verdict::Plan(
        if opts.mode == Mode::Int8 && int_ok && k * nn >= opts.min_int8_params {
            Plan::IntMatMul {
                x: input(n, 0).to_string(),
                w,
                k,
                n: nn,
                alpha: 1.0,
                bias: None,
                kind: "MatMul int8 compute",
            }
        } else {
            Plan::WeightOnly {
                input: 1,
                axis: 1,
                kind: "MatMul int8 weights",
            }
        },
    )
}

/// Gemm as an integer matmul needs an untransposed A and a constant (or
/// no) C; otherwise its B gets int8 weights along the output axis.
fn plan_gemm(n: &pb::NodeProto, consts: &Consts, opts: &QuantizeOptions, int_ok: bool) -> Verdict {
    let Some((t, w)) = float_const(consts, input(n, 1)) else {
        return Verdict::Keep;
    };
    if t.dims.len() != 2 {
        return Verdict::Keep;
    }
    let trans_a = proto::get_int(n, "transA").unwrap_or(0) != 0;
    let trans_b = proto::get_int(n, "transB").unwrap_or(0) != 0;
    let alpha = proto::get_float(n, "alpha").unwrap_or(1.0);
    let beta = proto::get_float(n, "beta").unwrap_or(1.0);
    // Some(None): no C; Some(Some(c)): constant C with beta folded in;
    // None: a computed C, which the integer form cannot take.
    let c = if input(n, 2).is_empty() {
        Some(None)
    } else {
        float_const(consts, input(n, 2)).map(|(t, v)| {
            let v: Vec<f32> = v.iter().map(|x| x * beta).collect();
            let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            Some(Box::new(proto::f32_tensor("", &shape, &v)))
        })
    };
    let (r0, r1) = (t.dims[0] as usize, t.dims[1] as usize);
    if opts.mode == Mode::Int8
        && int_ok
        && !trans_a
        && c.is_some()
        && r0 * r1 >= opts.min_int8_params
    {
        let (k, nn, w) = if trans_b {
            (r1, r0, transpose(&w, r0, r1))
        } else {
            (r0, r1, w)
        };
        Verdict::Plan(Plan::IntMatMul {
            x: input(n, 0).to_string(),
            w,
            k,
            n: nn,
            alpha,
            bias: c.flatten(),
            kind: "Gemm int8 compute",
        })
    } else {
        let axis = if trans_b { 0 } else { 1 };
        Verdict::Plan(Plan::WeightOnly {
            input: 1,
            axis,
            kind: "Gemm int8 weights",
        })
    }
}

/// `w` ([rows, cols] row-major) as [cols, rows].
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut wt = vec![0.0; rows * cols];
    for a in 0..rows {
        for b in 0..cols {
            wt[b * rows + a] = w[a * cols + b];
        }
    }
    wt
}

fn plan_conv(n: &pb::NodeProto, consts: &Consts) -> Verdict {
    if float_const(consts, input(n, 1)).is_some() {
        Verdict::Plan(Plan::WeightOnly {
            input: 1,
            axis: 0,
            kind: "Conv int8 weights",
        })
    } else {
        Verdict::Other
    }
}

/// Embedding tables: 2-D, gathered along rows, large enough to matter.
fn plan_gather(n: &pb::NodeProto, consts: &Consts) -> Verdict {
    let Some((t, _)) = float_const(consts, input(n, 0)) else {
        return Verdict::Keep;
    };
    if t.dims.len() == 2
        && proto::get_int(n, "axis").unwrap_or(0) == 0
        && proto::numel(&t.dims) >= 1024
    {
        Verdict::Plan(Plan::GatherRows)
    } else {
        Verdict::Other
    }
}

/// Anything else holding a large float constant (recurrent weights,
/// attention tables): int8 storage, f32 compute.
fn plan_constants(n: &pb::NodeProto, consts: &Consts) -> Option<Plan> {
    let list: Vec<(usize, usize)> = n
        .input
        .iter()
        .enumerate()
        .filter_map(|(k, name)| {
            let t = consts.get(name.as_str())?;
            let big = matches!(t.data_type, dt::FLOAT | dt::DOUBLE | dt::FLOAT16)
                && proto::numel(&t.dims) >= 1024;
            // Scales along the first axis longer than 1 (an LSTM's
            // [directions, 4 * hidden, inputs] -> axis 1).
            big.then(|| (k, t.dims.iter().position(|&d| d > 1).unwrap_or(0)))
        })
        .collect();
    (!list.is_empty()).then_some(Plan::Constants(list))
}

/// The activations the integer matmuls quantize, each once, sorted (the
/// order calibration reads them in).
pub(super) fn int8_activations(plans: &HashMap<usize, Plan>) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut v: Vec<String> = plans
        .values()
        .filter_map(|p| match p {
            Plan::IntMatMul { x, .. } => Some(x.clone()),
            _ => None,
        })
        .filter(|x| seen.insert(x.clone()))
        .collect();
    v.sort();
    v
}
