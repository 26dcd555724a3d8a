//! The rewrite: each planned node replaced by its quantized form, new
//! nodes emitted in graph order right before the node that needs them.
//!
//! - integer matmul: `QuantizeLinear` (calibrated scale, optionally after a
//!   smoothing `Mul`) -> `MatMulInteger` -> `Cast` -> `Mul` by the folded
//!   scales [-> `Add` bias];
//! - weight-only and other large constants: `Cast(int8) * scale`, which
//!   tract folds at load;
//! - embeddings: int8 rows and their row scales gathered side by side.
//!
//! A quantized activation, a weight's int8 copy and an embedding table are
//! each emitted once however many nodes read them.

use super::QuantizeOptions;
use super::calibrate::ActRange;
use super::graph::sanitize;
use super::int8::{activation_params, best_axis_2d, quantize_weights};
use super::plan::Plan;
use crate::proto::{self, Names, dt};
use dai_onnx::pb;
use std::collections::{BTreeMap, HashMap};

/// Rewrite the graph. `ranges` holds activation ranges (int8 mode).
pub(super) fn rewrite(
    model: &pb::ModelProto,
    plans: &HashMap<usize, Plan>,
    ranges: &HashMap<String, ActRange>,
    smooth: &HashMap<String, Vec<f32>>,
    opts: &QuantizeOptions,
    rewritten: &mut BTreeMap<String, usize>,
) -> pb::ModelProto {
    let mut out = model.clone();
    let g = proto::graph(model);
    let mut rw = Rewriter {
        consts: proto::constants(g),
        per_channel: opts.per_channel,
        names: Names::of(g),
        nodes: Vec::new(),
        inits: Vec::new(),
        quantized_acts: HashMap::new(),
        weight_only: HashMap::new(),
        gather_tables: HashMap::new(),
        rewritten,
    };
    for (i, n) in g.node.iter().enumerate() {
        match plans.get(&i) {
            Some(Plan::IntMatMul {
                x,
                w,
                k,
                n: cols,
                alpha,
                bias,
                kind,
            }) => match ranges.get(x) {
                Some(r) => {
                    let factors = smooth.get(x).filter(|f| f.len() == *k);
                    let q = rw.activation(x, r, factors);
                    let m = IntMatMul {
                        w,
                        k: *k,
                        cols: *cols,
                        alpha: *alpha,
                        factors,
                    };
                    rw.int_matmul(n, &m, &q, bias.as_deref());
                    rw.count(kind);
                }
                None => rw.nodes.push(n.clone()),
            },
            Some(Plan::WeightOnly { input, axis, kind }) => rw.weight_only(n, *input, *axis, kind),
            Some(Plan::Constants(list)) => rw.constants(n, list),
            Some(Plan::GatherRows) => rw.gather_rows(n),
            None => rw.nodes.push(n.clone()),
        }
    }
    if let Some(og) = out.graph.as_mut() {
        og.node = rw.nodes;
        og.initializer.extend(rw.inits);
    }
    out
}

/// Where the rewrite puts new nodes and initializers, and what was already
/// emitted once for sharing.
struct Rewriter<'a> {
    consts: HashMap<String, &'a pb::TensorProto>,
    per_channel: bool,
    names: Names,
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    /// Activation -> its quantized form.
    quantized_acts: HashMap<String, QuantizedAct>,
    /// (constant, axis) -> f32 name of its dequantized copy.
    weight_only: HashMap<(String, usize), String>,
    /// Embedding table -> (int8 rows, row scales).
    gather_tables: HashMap<String, (String, String)>,
    rewritten: &'a mut BTreeMap<String, usize>,
}

/// An activation as `QuantizeLinear` makes it: the u8 value, its zero
/// point and its scale.
#[derive(Clone)]
struct QuantizedAct {
    value: String,
    zero_point: String,
    scale: f32,
}

/// The weights side of a planned integer matmul.
struct IntMatMul<'p> {
    /// [k, cols] row-major.
    w: &'p [f32],
    k: usize,
    cols: usize,
    alpha: f32,
    /// SmoothQuant factors of the activation's channels, when smoothed.
    factors: Option<&'p Vec<f32>>,
}

/// The name new values of node `n` are derived from.
fn node_base(n: &pb::NodeProto) -> String {
    sanitize(if n.name.is_empty() {
        &n.output[0]
    } else {
        &n.name
    })
}

fn to_f32_attr() -> Vec<pb::AttributeProto> {
    vec![proto::attr_int("to", dt::FLOAT as i64)]
}

impl Rewriter<'_> {
    fn count(&mut self, kind: &str) {
        *self.rewritten.entry(kind.to_string()).or_insert(0) += 1;
    }

    /// Activation `x` quantized to u8 with the scale of its range, emitted
    /// at its first reader (after dividing by the smoothing factors).
    fn activation(&mut self, x: &str, r: &ActRange, factors: Option<&Vec<f32>>) -> QuantizedAct {
        if let Some(q) = self.quantized_acts.get(x) {
            return q.clone();
        }
        let (sx, zp) = activation_params(r.lo, r.hi);
        let base = sanitize(x);
        let s_name = self.names.fresh(&format!("{base}_scale"));
        let z_name = self.names.fresh(&format!("{base}_zero_point"));
        let q_name = self.names.fresh(&format!("{base}_quantized"));
        self.inits.push(proto::f32_tensor(&s_name, &[], &[sx]));
        self.inits.push(proto::u8_tensor(&z_name, &[], &[zp]));
        let source = match factors {
            Some(f) => {
                let inv: Vec<f32> = f.iter().map(|v| 1.0 / v).collect();
                let inv_name = self.names.fresh(&format!("{base}_smooth"));
                let xs = self.names.fresh(&format!("{base}_smoothed"));
                self.inits
                    .push(proto::f32_tensor(&inv_name, &[inv.len()], &inv));
                let mul = self.names.fresh(&format!("{base}_smooth_mul"));
                self.nodes
                    .push(proto::node("Mul", &mul, &[x, &inv_name], &[&xs], vec![]));
                xs
            }
            None => x.to_string(),
        };
        let quantize = self.names.fresh(&format!("{base}_quantize"));
        self.nodes.push(proto::node(
            "QuantizeLinear",
            &quantize,
            &[&source, &s_name, &z_name],
            &[&q_name],
            vec![],
        ));
        let q = QuantizedAct {
            value: q_name,
            zero_point: z_name,
            scale: sx,
        };
        self.quantized_acts.insert(x.to_string(), q.clone());
        q
    }

    /// `n` as `MatMulInteger(x_q, W_q)` cast to f32 and rescaled by the
    /// activation and per-column weight scales (times Gemm's alpha), plus
    /// the bias, into `n`'s output.
    fn int_matmul(
        &mut self,
        n: &pb::NodeProto,
        m: &IntMatMul,
        x: &QuantizedAct,
        bias: Option<&pb::TensorProto>,
    ) {
        let (k, cols) = (m.k, m.cols);
        // Smoothing: rows of W times the factors x was divided by.
        let smoothed: Vec<f32>;
        let w = match m.factors {
            Some(f) => {
                smoothed =
                    m.w.iter()
                        .enumerate()
                        .map(|(i, v)| v * f[i / cols])
                        .collect();
                &smoothed
            }
            None => m.w,
        };
        let (wq, sw) = quantize_weights(w, &[k, cols], 1, self.per_channel);
        let sw: Vec<f32> = if sw.len() == 1 { vec![sw[0]; cols] } else { sw };
        let base = node_base(n);
        let w_name = self.names.fresh(&format!("{base}_weight_int8"));
        let s_name = self.names.fresh(&format!("{base}_output_scale"));
        self.inits.push(proto::i8_tensor(&w_name, &[k, cols], &wq));
        let out_scale: Vec<f32> = sw.iter().map(|s| s * x.scale * m.alpha).collect();
        self.inits
            .push(proto::f32_tensor(&s_name, &[cols], &out_scale));
        let acc = self.names.fresh(&format!("{base}_acc"));
        let accf = self.names.fresh(&format!("{base}_acc_f32"));
        let matmul = self.names.fresh(&format!("{base}_matmul_int8"));
        self.nodes.push(proto::node(
            "MatMulInteger",
            &matmul,
            &[&x.value, &w_name, &x.zero_point],
            &[&acc],
            vec![],
        ));
        let cast = self.names.fresh(&format!("{base}_cast"));
        self.nodes
            .push(proto::node("Cast", &cast, &[&acc], &[&accf], to_f32_attr()));
        self.rescale(&base, &accf, &s_name, bias, &n.output[0]);
    }

    /// `y = acc * scale [+ bias]`.
    fn rescale(
        &mut self,
        base: &str,
        acc: &str,
        scale: &str,
        bias: Option<&pb::TensorProto>,
        y: &str,
    ) {
        match bias {
            Some(b) => {
                let scaled = self.names.fresh(&format!("{base}_scaled"));
                let b_name = self.names.fresh(&format!("{base}_bias"));
                let mut b = b.clone();
                b.name = b_name.clone();
                self.inits.push(b);
                let mul = self.names.fresh(&format!("{base}_rescale"));
                self.nodes
                    .push(proto::node("Mul", &mul, &[acc, scale], &[&scaled], vec![]));
                let add = self.names.fresh(&format!("{base}_add_bias"));
                self.nodes
                    .push(proto::node("Add", &add, &[&scaled, &b_name], &[y], vec![]));
            }
            None => {
                let mul = self.names.fresh(&format!("{base}_rescale"));
                self.nodes
                    .push(proto::node("Mul", &mul, &[acc, scale], &[y], vec![]));
            }
        }
    }

    /// `n` reading the dequantized int8 copy of its constant input `input`.
    fn weight_only(&mut self, n: &pb::NodeProto, input: usize, axis: usize, kind: &str) {
        let mut m = n.clone();
        if let Some(f) = self.dequantized(&n.input[input], axis) {
            m.input[input] = f;
            self.count(kind);
        }
        self.nodes.push(m);
    }

    /// `n` reading dequantized int8 copies of each listed constant input.
    fn constants(&mut self, n: &pb::NodeProto, list: &[(usize, usize)]) {
        let mut m = n.clone();
        for &(input, axis) in list {
            if let Some(f) = self.dequantized(&n.input[input], axis) {
                m.input[input] = f;
                self.count(&format!("{} int8 constants", n.op_type));
            }
        }
        self.nodes.push(m);
    }

    /// The name of an f32 value computed as `Cast(int8 copy) * scales` of
    /// constant `src` (scales along `axis`); tract folds it at load.
    fn dequantized(&mut self, src: &str, axis: usize) -> Option<String> {
        let t = *self.consts.get(src)?;
        if let Some(f) = self.weight_only.get(&(src.to_string(), axis)) {
            return Some(f.clone());
        }
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let w = proto::to_f32(t)?;
        let axis = if dims.is_empty() {
            return None;
        } else if self.per_channel && dims.len() == 2 {
            best_axis_2d(&w, &dims, axis)
        } else {
            axis.min(dims.len() - 1)
        };
        let (q, s) = quantize_weights(&w, &dims, axis, self.per_channel);
        let base = sanitize(src);
        let q_name = self.names.fresh(&format!("{base}_int8"));
        let s_name = self.names.fresh(&format!("{base}_scale"));
        let c_name = self.names.fresh(&format!("{base}_cast"));
        let f_name = self.names.fresh(&format!("{base}_dequantized"));
        self.inits.push(proto::i8_tensor(&q_name, &dims, &q));
        let mut s_dims = vec![1usize; dims.len()];
        if s.len() > 1 {
            s_dims[axis] = s.len();
        }
        self.inits.push(proto::f32_tensor(&s_name, &s_dims, &s));
        let cast = self.names.fresh(&format!("{base}_to_f32"));
        self.nodes.push(proto::node(
            "Cast",
            &cast,
            &[&q_name],
            &[&c_name],
            to_f32_attr(),
        ));
        let mul = self.names.fresh(&format!("{base}_dequantize"));
        self.nodes.push(proto::node(
            "Mul",
            &mul,
            &[&c_name, &s_name],
            &[&f_name],
            vec![],
        ));
        self.weight_only
            .insert((src.to_string(), axis), f_name.clone());
        Some(f_name)
    }

    /// `n` (a Gather on an embedding table) as int8 rows times their row
    /// scales, both gathered with `n`'s indices.
    fn gather_rows(&mut self, n: &pb::NodeProto) {
        let src = n.input[0].clone();
        let Some(&t) = self.consts.get(&src) else {
            self.nodes.push(n.clone());
            return;
        };
        let (q_name, s_name) = match self.gather_tables.get(&src) {
            Some(table) => table.clone(),
            None => {
                let table = self.int8_rows(&src, t);
                self.gather_tables.insert(src.clone(), table.clone());
                table
            }
        };
        let base = node_base(n);
        let ids = &n.input[1];
        let rows = self.names.fresh(&format!("{base}_rows_int8"));
        let scales = self.names.fresh(&format!("{base}_row_scales"));
        let rows_f = self.names.fresh(&format!("{base}_rows_f32"));
        let gather = self.names.fresh(&format!("{base}_gather_int8"));
        self.nodes.push(proto::node(
            "Gather",
            &gather,
            &[&q_name, ids],
            &[&rows],
            vec![],
        ));
        let gather = self.names.fresh(&format!("{base}_gather_scale"));
        self.nodes.push(proto::node(
            "Gather",
            &gather,
            &[&s_name, ids],
            &[&scales],
            vec![],
        ));
        let cast = self.names.fresh(&format!("{base}_cast"));
        self.nodes.push(proto::node(
            "Cast",
            &cast,
            &[&rows],
            &[&rows_f],
            to_f32_attr(),
        ));
        let mul = self.names.fresh(&format!("{base}_dequantize"));
        self.nodes.push(proto::node(
            "Mul",
            &mul,
            &[&rows_f, &scales],
            &[&n.output[0]],
            vec![],
        ));
        self.count("Gather int8 rows");
    }

    /// Embedding table `src` as int8 rows with one scale per row; returns
    /// the names of both initializers.
    fn int8_rows(&mut self, src: &str, t: &pb::TensorProto) -> (String, String) {
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let w = proto::to_f32(t).unwrap_or_default();
        let (q, s) = quantize_weights(&w, &dims, 0, true);
        let base = sanitize(src);
        let q_name = self.names.fresh(&format!("{base}_int8"));
        let s_name = self.names.fresh(&format!("{base}_row_scale"));
        self.inits.push(proto::i8_tensor(&q_name, &dims, &q));
        self.inits
            .push(proto::f32_tensor(&s_name, &[dims[0], 1], &s));
        (q_name, s_name)
    }
}
