//! BatchNormalization folded into the Conv that feeds it, before the int8
//! modes plan the graph.

use super::graph::{prune_unused, sanitize};
use crate::proto::{self, Names};
use dai_onnx::pb;
use std::collections::{HashMap, HashSet};

/// Fold each `BatchNormalization` that follows a `Conv` with constant
/// weights into that Conv (exact in f32: W' = W * g / sqrt(v + e) per output
/// channel, b' = (b - m) * g / sqrt(v + e) + beta). Inference graphs exported
/// from training frameworks keep BN separate; folded, its parameters vanish
/// and the Conv's weights carry them into quantization.
pub fn fold_batchnorm(model: &pb::ModelProto) -> (pb::ModelProto, usize) {
    let mut out = model.clone();
    let g = proto::graph(model);
    let consts = proto::constants(g);
    let wiring = Wiring::of(g);
    let mut names = Names::of(g);
    let mut replace: HashMap<usize, pb::NodeProto> = HashMap::new();
    let mut drop: HashSet<usize> = HashSet::new();
    let mut inits = Vec::new();
    for (bi, bn) in g.node.iter().enumerate() {
        let Some(ci) = wiring.sole_conv_before(g, bn) else {
            continue;
        };
        // A Conv already folded with another BN keeps that one.
        if replace.contains_key(&ci) {
            continue;
        }
        let conv = &g.node[ci];
        let Some(f) = folded_params(&consts, bn, conv) else {
            continue;
        };
        let base = sanitize(if conv.name.is_empty() {
            &conv.output[0]
        } else {
            &conv.name
        });
        let w_name = names.fresh(&format!("{base}_weight_bn"));
        let b_name = names.fresh(&format!("{base}_bias_bn"));
        inits.push(proto::f32_tensor(&w_name, &f.dims, &f.weights));
        inits.push(proto::f32_tensor(&b_name, &[f.bias.len()], &f.bias));
        let mut folded = conv.clone();
        folded.input.truncate(1);
        folded.input.push(w_name);
        folded.input.push(b_name);
        folded.output = vec![bn.output[0].clone()];
        replace.insert(ci, folded);
        drop.insert(bi);
    }
    let count = drop.len();
    if let Some(og) = out.graph.as_mut() {
        og.node = g
            .node
            .iter()
            .enumerate()
            .filter(|(i, _)| !drop.contains(i))
            .map(|(i, n)| replace.remove(&i).unwrap_or_else(|| n.clone()))
            .collect();
        og.initializer.extend(inits);
    }
    prune_unused(&mut out);
    (out, count)
}

/// Who reads and who writes each value of a graph.
struct Wiring<'g> {
    consumers: HashMap<&'g str, usize>,
    outputs: HashSet<&'g str>,
    producer: HashMap<&'g str, usize>,
}

impl<'g> Wiring<'g> {
    fn of(g: &'g pb::GraphProto) -> Wiring<'g> {
        let mut consumers: HashMap<&str, usize> = HashMap::new();
        for n in &g.node {
            for i in &n.input {
                *consumers.entry(i.as_str()).or_insert(0) += 1;
            }
        }
        Wiring {
            consumers,
            outputs: g.output.iter().map(|o| o.name.as_str()).collect(),
            producer: g
                .node
                .iter()
                .enumerate()
                .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
                .collect(),
        }
    }

    /// The index of the Conv whose output only `bn` (a BatchNormalization
    /// in its inference form) reads: folding must not change what any other
    /// reader of that value sees.
    fn sole_conv_before(&self, g: &pb::GraphProto, bn: &pb::NodeProto) -> Option<usize> {
        if bn.op_type != "BatchNormalization" || bn.output.len() != 1 || bn.input.len() != 5 {
            return None;
        }
        let x = bn.input[0].as_str();
        let &ci = self.producer.get(x)?;
        let sole = g.node[ci].op_type == "Conv"
            && self.consumers.get(x) == Some(&1)
            && !self.outputs.contains(x);
        sole.then_some(ci)
    }
}

/// A Conv's weights and bias with a BatchNormalization folded in.
struct Folded {
    dims: Vec<usize>,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

/// None when the BN's parameters or the Conv's weights and bias are not
/// float constants of one value per output channel.
fn folded_params(
    consts: &HashMap<String, &pb::TensorProto>,
    bn: &pb::NodeProto,
    conv: &pb::NodeProto,
) -> Option<Folded> {
    let get = |k: usize| {
        bn.input
            .get(k)
            .and_then(|n| consts.get(n))
            .and_then(|t| proto::to_f32(t))
    };
    let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
    let wt = conv.input.get(1).and_then(|n| consts.get(n))?;
    let w = proto::to_f32(wt)?;
    let c = wt.dims.first().copied().unwrap_or(0) as usize;
    if c == 0 || gamma.len() != c || beta.len() != c || mean.len() != c || var.len() != c {
        return None;
    }
    let bias = match conv.input.get(2).filter(|n| !n.is_empty()) {
        Some(name) => match consts.get(name).and_then(|t| proto::to_f32(t)) {
            Some(b) if b.len() == c => b,
            _ => return None,
        },
        None => vec![0.0; c],
    };
    let eps = proto::get_float(bn, "epsilon").unwrap_or(1e-5);
    let k: Vec<f32> = (0..c).map(|j| gamma[j] / (var[j] + eps).sqrt()).collect();
    let per = w.len() / c;
    Some(Folded {
        dims: wt.dims.iter().map(|&d| d as usize).collect(),
        weights: w.iter().enumerate().map(|(i, v)| v * k[i / per]).collect(),
        bias: (0..c)
            .map(|j| (bias[j] - mean[j]) * k[j] + beta[j])
            .collect(),
    })
}
