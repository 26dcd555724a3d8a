//! `dai-models inspect`: what an ONNX file holds and whether our runtime can
//! run it: operators and counts, parameters by element type, size,
//! inputs/outputs with shapes, a FLOPs estimate (matrix products and
//! convolutions, from the shapes tract infers), and whether tract loads and
//! optimises it (with its error when not), optionally its latency.

use crate::ToolError;
use crate::proto;
use crate::runner::{self, InputSpec, Runner};
use dai_onnx::pb;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tract_onnx::prelude::*;

#[derive(Debug, Clone, Serialize)]
pub struct Io {
    pub name: String,
    pub dtype: String,
    /// As the file declares it (symbolic names kept).
    pub shape: Vec<String>,
    /// For outputs: the shape tract returned on the probe input (the
    /// resolved input shapes), which is the truth where the declaration is
    /// symbolic or wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probed: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParamGroup {
    pub dtype: String,
    pub tensors: usize,
    pub params: usize,
    pub bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TractStatus {
    pub loads: bool,
    pub optimises: bool,
    /// Loads only when the file's value_info shapes are ignored.
    pub needs_ignore_value_info: bool,
    pub error: Option<String>,
    pub latency_ms: Option<f64>,
    /// Per-operator times (`--profile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<crate::profile::Profile>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub path: String,
    pub file_bytes: u64,
    pub producer: String,
    pub ir_version: i64,
    pub opset: i64,
    pub nodes: usize,
    pub ops: BTreeMap<String, usize>,
    pub params: usize,
    pub params_by_dtype: Vec<ParamGroup>,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
    /// Concrete shapes the checks and the FLOPs estimate used.
    pub resolved_inputs: Vec<InputSpec>,
    pub flops: Option<u64>,
    pub flops_by_op: BTreeMap<String, u64>,
    pub tract: TractStatus,
    pub notes: Vec<String>,
}

pub struct InspectOptions {
    pub shapes: HashMap<String, Vec<usize>>,
    /// Time this many runs in tract (0: do not time).
    pub bench_runs: usize,
    /// Profile this many runs node by node (0: do not profile).
    pub profile_runs: usize,
}

fn io(v: &pb::ValueInfoProto) -> Io {
    let (elem, _, names) = proto::value_shape(v);
    Io {
        name: v.name.clone(),
        dtype: proto::dtype_name(elem).to_string(),
        shape: names,
        probed: None,
    }
}

pub fn inspect(path: &Path, opts: &InspectOptions) -> Result<InspectReport, ToolError> {
    let model = proto::load(path)?;
    let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut report = inspect_model(&model, opts)?;
    report.path = path.display().to_string();
    report.file_bytes = file_bytes;
    Ok(report)
}

pub fn inspect_model(
    model: &pb::ModelProto,
    opts: &InspectOptions,
) -> Result<InspectReport, ToolError> {
    let g = proto::graph(model);
    let mut ops = BTreeMap::new();
    for n in &g.node {
        let key = if n.domain.is_empty() || n.domain == "ai.onnx" {
            n.op_type.clone()
        } else {
            format!("{}::{}", n.domain, n.op_type)
        };
        *ops.entry(key).or_insert(0) += 1;
    }
    let mut groups: BTreeMap<&'static str, ParamGroup> = BTreeMap::new();
    for t in proto::constants(g).values() {
        let name = proto::dtype_name(t.data_type);
        let e = groups.entry(name).or_insert_with(|| ParamGroup {
            dtype: name.to_string(),
            tensors: 0,
            params: 0,
            bytes: 0,
        });
        e.tensors += 1;
        e.params += proto::numel(&t.dims);
        e.bytes += proto::tensor_bytes(t);
    }
    let params_by_dtype: Vec<ParamGroup> = groups.into_values().collect();
    let (resolved, mut notes) = runner::input_specs(model, &opts.shapes)?;
    let (tract, ivi, probed) = tract_status(model, &resolved, opts.bench_runs, opts.profile_runs)?;
    let (flops, flops_by_op) = if tract.loads {
        match flops(model, &resolved, ivi) {
            Ok(f) => (Some(f.values().sum()), f),
            Err(e) => {
                notes.push(format!("FLOPs not estimated: {e}"));
                (None, BTreeMap::new())
            }
        }
    } else {
        (None, BTreeMap::new())
    };
    Ok(InspectReport {
        path: String::new(),
        file_bytes: 0,
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        ir_version: model.ir_version,
        opset: proto::opset(model),
        nodes: g.node.len(),
        ops,
        params: params_by_dtype.iter().map(|p| p.params).sum(),
        params_by_dtype,
        inputs: proto::real_inputs(g).into_iter().map(io).collect(),
        outputs: g
            .output
            .iter()
            .enumerate()
            .map(|(i, o)| Io {
                probed: probed.as_ref().and_then(|p| p.get(i).cloned()),
                ..io(o)
            })
            .collect(),
        resolved_inputs: resolved,
        flops,
        flops_by_op,
        tract,
        notes,
    })
}

/// Output shapes of one run, when it ran.
type Probed = Option<Vec<Vec<usize>>>;

/// Can tract load and optimise the model (first as the file says, then
/// ignoring its value_info shapes, which some exporters get wrong)? And the
/// output shapes of one run on synthetic inputs.
fn tract_status(
    model: &pb::ModelProto,
    specs: &[InputSpec],
    runs: usize,
    profile_runs: usize,
) -> Result<(TractStatus, bool, Probed), ToolError> {
    let first = Runner::new(model, specs, false, None);
    let (result, ivi) = match first {
        Ok(r) => (Ok(r), false),
        Err(e1) => match Runner::new(model, specs, true, None) {
            Ok(r) => (Ok(r), true),
            Err(_) => (Err(e1), false),
        },
    };
    match result {
        Ok(r) => {
            let probed = runner::synthetic_inputs(specs, 1)
                .and_then(|inputs| r.run(&inputs))
                .ok()
                .map(|outs| outs.iter().map(|t| t.shape().to_vec()).collect());
            let latency_ms = if runs > 0 {
                runner::synthetic_inputs(specs, 1)
                    .and_then(|inputs| r.latency_ms(&inputs, runs))
                    .ok()
            } else {
                None
            };
            // Asked for and failing is an error, not a missing row.
            let profile = if profile_runs > 0 {
                Some(
                    runner::synthetic_inputs(specs, 1)
                        .and_then(|inputs| r.profile(&inputs, profile_runs))?,
                )
            } else {
                None
            };
            Ok((
                TractStatus {
                    loads: true,
                    optimises: true,
                    needs_ignore_value_info: ivi,
                    error: None,
                    latency_ms,
                    profile,
                },
                ivi,
                probed,
            ))
        }
        Err(e) => {
            let msg = e.to_string();
            let loads = !msg.contains("parse the graph");
            Ok((
                TractStatus {
                    loads,
                    optimises: false,
                    needs_ignore_value_info: false,
                    error: Some(msg),
                    latency_ms: None,
                    profile: None,
                },
                false,
                None,
            ))
        }
    }
}

/// Multiply-accumulates x 2 of MatMul/Gemm/Conv-like nodes, by op type,
/// from the shapes tract infers for the given inputs.
pub fn flops(
    model: &pb::ModelProto,
    specs: &[InputSpec],
    ignore_value_info: bool,
) -> Result<BTreeMap<String, u64>, String> {
    let tract_model = proto::to_tract(model).map_err(|e| e.to_string())?;
    let mut g = tract_onnx::onnx()
        .with_ignore_value_info(ignore_value_info)
        .model_for_proto_model(&tract_model)
        .map_err(|e| format!("{e:#}"))?;
    let tract_inputs: Vec<String> = g
        .input_outlets()
        .map_err(|e| format!("{e:#}"))?
        .iter()
        .map(|o| g.node(o.node).name.clone())
        .collect();
    for s in specs {
        if let Some(pos) = tract_inputs.iter().position(|n| n == &s.name) {
            let dt = runner::tract_dt(s.elem).map_err(|e| e.to_string())?;
            g.set_input_fact(pos, InferenceFact::dt_shape(dt, s.shape.clone()))
                .map_err(|e| format!("{e:#}"))?;
        }
    }
    g.analyse(false).map_err(|e| format!("{e:#}"))?;
    let consts = proto::constants(proto::graph(model));
    let shape = |name: &str| -> Option<Vec<usize>> {
        if let Some(t) = consts.get(name) {
            return Some(t.dims.iter().map(|&d| d as usize).collect());
        }
        let o = g.find_outlet_label(name)?;
        g.outlet_fact(o)
            .ok()?
            .shape
            .as_concrete_finite()
            .ok()?
            .map(|s| s.to_vec())
    };
    let mut out = BTreeMap::new();
    let mut unknown = 0;
    for n in &proto::graph(model).node {
        let inp = |i: usize| n.input.get(i).map(String::as_str).unwrap_or("");
        let out_elems = || {
            n.output
                .first()
                .and_then(|o| shape(o))
                .map(|s| s.iter().product::<usize>())
        };
        let macs: Option<usize> = match n.op_type.as_str() {
            "MatMul" | "MatMulInteger" => shape(inp(0))
                .and_then(|a| a.last().copied())
                .zip(out_elems())
                .map(|(k, o)| k * o),
            "QLinearMatMul" => shape(inp(0))
                .and_then(|a| a.last().copied())
                .zip(out_elems())
                .map(|(k, o)| k * o),
            "Gemm" => {
                let trans_a = proto::get_int(n, "transA").unwrap_or(0) != 0;
                shape(inp(0))
                    .and_then(|a| {
                        if trans_a {
                            a.first().copied()
                        } else {
                            a.last().copied()
                        }
                    })
                    .zip(out_elems())
                    .map(|(k, o)| k * o)
            }
            "Conv" | "ConvInteger" => shape(inp(1))
                .map(|w| w[1..].iter().product::<usize>())
                .zip(out_elems())
                .map(|(k, o)| k * o),
            "QLinearConv" => shape(inp(3))
                .map(|w| w[1..].iter().product::<usize>())
                .zip(out_elems())
                .map(|(k, o)| k * o),
            _ => continue,
        };
        match macs {
            Some(m) => *out.entry(n.op_type.clone()).or_insert(0) += 2 * m as u64,
            None => unknown += 1,
        }
    }
    if unknown > 0 && out.is_empty() {
        return Err(format!(
            "{unknown} matrix/conv nodes have shapes tract could not infer"
        ));
    }
    Ok(out)
}

fn human(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2} G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

pub fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

impl InspectReport {
    /// The report as terminal tables.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "model     {}", self.path);
        let _ = writeln!(
            s,
            "size      {} ({} bytes); producer {:?}; IR {}, opset {}",
            human_bytes(self.file_bytes),
            self.file_bytes,
            self.producer,
            self.ir_version,
            self.opset
        );
        let _ = writeln!(
            s,
            "params    {} ({})",
            human(self.params as f64),
            self.params
        );
        for p in &self.params_by_dtype {
            let _ = writeln!(
                s,
                "          {:<5} {:>4} tensors {:>12} values {:>12}",
                p.dtype,
                p.tensors,
                p.params,
                human_bytes(p.bytes as u64)
            );
        }
        let fl = self
            .flops
            .map(|f| format!("{}FLOPs per run", human(f as f64)));
        let _ = writeln!(s, "compute   {}", fl.unwrap_or_else(|| "unknown".into()));
        for (op, f) in &self.flops_by_op {
            let _ = writeln!(s, "          {op:<14} {}FLOPs", human(*f as f64));
        }
        let _ = writeln!(s, "\ninputs");
        for (i, r) in self.inputs.iter().zip(&self.resolved_inputs) {
            let _ = writeln!(
                s,
                "  {:<24} {:<5} [{}]  (checked as {:?})",
                i.name,
                i.dtype,
                i.shape.join(", "),
                r.shape
            );
        }
        let _ = writeln!(s, "outputs");
        for o in &self.outputs {
            let ran = o.probed.as_ref().map_or(String::new(), |p| {
                format!("  (returns {p:?} for the inputs checked)")
            });
            let _ = writeln!(
                s,
                "  {:<24} {:<5} [{}]{ran}",
                o.name,
                o.dtype,
                o.shape.join(", ")
            );
        }
        let _ = writeln!(s, "\noperators ({} nodes)", self.nodes);
        let mut ops: Vec<_> = self.ops.iter().collect();
        ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (op, c) in ops {
            let _ = writeln!(s, "  {op:<28} {c:>5}");
        }
        let t = &self.tract;
        let _ = writeln!(s, "\nour runtime (tract)");
        let verdict = if t.optimises {
            format!(
                "loads and optimises{}",
                if t.needs_ignore_value_info {
                    " (only with ignore_value_info = true in the manifest)"
                } else {
                    ""
                }
            )
        } else if t.loads {
            "parses but does NOT optimise".into()
        } else {
            "does NOT load".into()
        };
        let _ = writeln!(s, "  {verdict}");
        if let Some(e) = &t.error {
            let _ = writeln!(s, "  why: {e}");
        }
        if let Some(ms) = t.latency_ms {
            let _ = writeln!(s, "  latency: {ms:.3} ms (median, 1 thread)");
        }
        if let Some(p) = &t.profile {
            s.push_str(&p.table());
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
