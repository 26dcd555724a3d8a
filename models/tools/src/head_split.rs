//! `dai-models bundle --head TENSOR`: a user's model cut at a named tensor
//! into a backbone (everything that computes the tensor, run by tract) and
//! a trainable head in the `dai_head` format (what follows it), so the
//! device can fine-tune the head. Pure: protobuf in, protobuf and head out.
//!
//! What follows the tensor must be a chain of dense layers as the head
//! format knows them: `Gemm` (B and C constant, transA 0, alpha and beta
//! both one) or `MatMul` by a constant (optionally followed by `Add` of a
//! constant bias), each optionally followed by `Relu`, and at most one
//! final `Softmax` (the head's `softmax` transform, trained with cross
//! entropy; without it the head is trained with squared error). Anything
//! else is refused naming the node and its operator.

use crate::ToolError;
use crate::proto::{self, pb};
use dai_infer::bundle::HeadTransform;
use dai_train::head::{Activation, Head, HeadSpec, Loss, Params};
use std::collections::{HashMap, HashSet};

/// The two halves of a model.
#[derive(Debug)]
pub struct Split {
    /// The graph up to the tensor, which is now its output.
    pub backbone: pb::ModelProto,
    pub head: Head,
    pub transform: HeadTransform,
    /// The tensor cut at (the backbone's output, the head's input).
    pub cut: String,
    /// The model output the head computes.
    pub output: String,
}

struct Dense {
    /// `[outputs, inputs]`, row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
    activation: Activation,
}

fn refuse(m: String) -> ToolError {
    ToolError::Refused(m)
}

/// A constant 2-D (or 1-D for a bias) f32 tensor's dims and values.
fn constant(
    consts: &HashMap<String, &pb::TensorProto>,
    name: &str,
) -> Option<(Vec<usize>, Vec<f32>)> {
    let t = consts.get(name)?;
    let v = proto::to_f32(t)?;
    Some((t.dims.iter().map(|&d| d.max(0) as usize).collect(), v))
}

fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// Cut `model` at `tensor`.
pub fn split(model: &pb::ModelProto, tensor: &str) -> Result<Split, ToolError> {
    let g = proto::graph(model);
    let consts = proto::constants(g);
    let produced: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .chain(g.input.iter().map(|i| i.name.as_str()))
        .collect();
    if !produced.contains(tensor) {
        let mut some: Vec<&str> = g
            .node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        some.truncate(12);
        return Err(refuse(format!(
            "--head {tensor}: no tensor of that name in the graph (node outputs include {})",
            some.join(", ")
        )));
    }
    let outputs: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for input in &n.input {
            consumers.entry(input.as_str()).or_default().push(i);
        }
    }
    let mut head_nodes = HashSet::new();
    let mut layers: Vec<Dense> = Vec::new();
    let mut transform = HeadTransform::None;
    let mut v = tensor.to_string();
    // A MatMul's output waiting for its bias.
    let mut after_matmul = false;
    loop {
        let users = consumers.get(v.as_str()).cloned().unwrap_or_default();
        if users.is_empty() && outputs.contains(v.as_str()) {
            break;
        }
        let [i] = users.as_slice() else {
            return Err(refuse(format!(
                "--head {tensor}: tensor {v:?} feeds {} nodes{}; a head is one chain of dense layers ending in a model output",
                users.len(),
                if outputs.contains(v.as_str()) {
                    " and is a model output"
                } else {
                    ""
                }
            )));
        };
        let n = &g.node[*i];
        let at = || format!("node {:?} ({}) after tensor {tensor:?}", n.name, n.op_type);
        let other = |n: &pb::NodeProto| n.input.iter().find(|x| **x != v).cloned();
        if transform != HeadTransform::None {
            return Err(refuse(format!(
                "--head {tensor}: {}: Softmax must be the last node",
                at()
            )));
        }
        match n.op_type.as_str() {
            "Gemm" => {
                let alpha = proto::get_float(n, "alpha").unwrap_or(1.0);
                let beta = proto::get_float(n, "beta").unwrap_or(1.0);
                let trans_a = proto::get_int(n, "transA").unwrap_or(0);
                let trans_b = proto::get_int(n, "transB").unwrap_or(0);
                let Some((dims, w)) = n.input.get(1).and_then(|b| constant(&consts, b)) else {
                    return Err(refuse(format!(
                        "--head {tensor}: {}: B is not a constant f32 matrix",
                        at()
                    )));
                };
                if n.input.first() != Some(&v)
                    || trans_a != 0
                    || alpha != 1.0
                    || beta != 1.0
                    || dims.len() != 2
                {
                    return Err(refuse(format!(
                        "--head {tensor}: {}: only Gemm(x, W, b) with transA = 0, alpha = beta = 1 is a dense layer",
                        at()
                    )));
                }
                let (outs, ins, weight) = if trans_b == 1 {
                    (dims[0], dims[1], w)
                } else {
                    (dims[1], dims[0], transpose(&w, dims[0], dims[1]))
                };
                let bias = match n.input.get(2).filter(|c| !c.is_empty()) {
                    Some(c) => match constant(&consts, c) {
                        Some((_, b)) if b.len() == outs => b,
                        Some((_, b)) if b.len() == 1 => vec![b[0]; outs],
                        _ => {
                            return Err(refuse(format!(
                                "--head {tensor}: {}: C is not a constant bias of {outs} values",
                                at()
                            )));
                        }
                    },
                    None => vec![0.0; outs],
                };
                layers.push(Dense {
                    weight,
                    bias,
                    inputs: ins,
                    outputs: outs,
                    activation: Activation::None,
                });
                after_matmul = false;
            }
            "MatMul" => {
                let Some((dims, w)) = n.input.get(1).and_then(|b| constant(&consts, b)) else {
                    return Err(refuse(format!(
                        "--head {tensor}: {}: the weight is not a constant f32 matrix",
                        at()
                    )));
                };
                if n.input.first() != Some(&v) || dims.len() != 2 {
                    return Err(refuse(format!(
                        "--head {tensor}: {}: only MatMul(x, W) with a 2-D W is a dense layer",
                        at()
                    )));
                }
                layers.push(Dense {
                    weight: transpose(&w, dims[0], dims[1]),
                    bias: vec![0.0; dims[1]],
                    inputs: dims[0],
                    outputs: dims[1],
                    activation: Activation::None,
                });
                after_matmul = true;
            }
            "Add" if after_matmul => {
                let last = layers.last_mut().ok_or_else(|| refuse(at()))?;
                match other(n).and_then(|b| constant(&consts, &b)) {
                    Some((_, b)) if b.len() == last.outputs => last.bias = b,
                    _ => {
                        return Err(refuse(format!(
                            "--head {tensor}: {}: not a constant bias of {} values",
                            at(),
                            last.outputs
                        )));
                    }
                }
                after_matmul = false;
            }
            "Relu" => {
                match layers.last_mut() {
                    Some(l) if l.activation == Activation::None => l.activation = Activation::Relu,
                    _ => {
                        return Err(refuse(format!(
                            "--head {tensor}: {}: Relu must follow a dense layer",
                            at()
                        )));
                    }
                }
                after_matmul = false;
            }
            "Softmax" => {
                let axis = proto::get_int(n, "axis").unwrap_or(if proto::opset(model) >= 13 {
                    -1
                } else {
                    1
                });
                if layers.is_empty() || !(axis == -1 || axis == 1) {
                    return Err(refuse(format!(
                        "--head {tensor}: {}: Softmax over the last axis after a dense layer only",
                        at()
                    )));
                }
                transform = HeadTransform::Softmax;
            }
            op => {
                return Err(refuse(format!(
                    "--head {tensor}: {}: a head is Gemm or MatMul (+Add) layers with Relu and a final Softmax; {op} is not one",
                    at()
                )));
            }
        }
        head_nodes.insert(*i);
        v = n.output.first().cloned().unwrap_or_default();
    }
    if layers.is_empty() {
        return Err(refuse(format!(
            "--head {tensor}: it is a model output already; nothing follows it"
        )));
    }
    for w in layers.windows(2) {
        if w[0].outputs != w[1].inputs {
            return Err(refuse(format!(
                "--head {tensor}: a layer of {} outputs feeds one of {} inputs",
                w[0].outputs, w[1].inputs
            )));
        }
    }
    let mut sizes = vec![layers[0].inputs];
    sizes.extend(layers.iter().map(|l| l.outputs));
    let acts: Vec<Activation> = layers.iter().map(|l| l.activation).collect();
    let loss = if transform == HeadTransform::Softmax {
        Loss::SoftmaxCrossEntropy
    } else {
        Loss::Mse
    };
    let spec =
        HeadSpec::new(&sizes, &acts, loss).map_err(|e| refuse(format!("--head {tensor}: {e}")))?;
    let params = Params {
        weights: layers.iter().map(|l| l.weight.clone()).collect(),
        biases: layers.iter().map(|l| l.bias.clone()).collect(),
    };
    let head = Head { spec, params };
    let backbone = cut(model, tensor, &head_nodes, &v);
    Ok(Split {
        backbone,
        head,
        transform,
        cut: tensor.to_string(),
        output: v,
    })
}

/// `model` without `head_nodes`, its output `tensor` (and any other model
/// output but `dropped`), initializers no remaining node uses removed.
fn cut(
    model: &pb::ModelProto,
    tensor: &str,
    head_nodes: &HashSet<usize>,
    dropped: &str,
) -> pb::ModelProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    let mut m = model.clone();
    let Some(g) = m.graph.as_mut() else { return m };
    let nodes: Vec<pb::NodeProto> = g
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| !head_nodes.contains(i))
        .map(|(_, n)| n.clone())
        .collect();
    g.node = nodes;
    let used: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    g.initializer.retain(|t| used.contains(&t.name));
    g.input
        .retain(|i| used.contains(&i.name) || !model_inits(model).contains(&i.name));
    let known = g.value_info.iter().find(|v| v.name == tensor).cloned();
    let out = known.unwrap_or_else(|| pb::ValueInfoProto {
        name: tensor.to_string(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![Dimension {
                        value: Some(Value::DimParam("batch".into())),
                        denotation: String::new(),
                    }],
                }),
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
        ..Default::default()
    });
    g.output.retain(|o| o.name != dropped && o.name != tensor);
    g.output.insert(0, out);
    m
}

fn model_inits(model: &pb::ModelProto) -> HashSet<String> {
    proto::graph(model)
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .collect()
}
