//! `dai-models export`: a bundle's backbone and its trained head as one
//! standard ONNX file (the head as Gemm + activation nodes, softmax when the
//! bundle applies one), checked against the daemon's own path (the bundle
//! loaded by dai-infer, head applied) in tract, and in onnxruntime when a
//! Python with it is available.
//!
//! This is how weights trained on devices leave the DAI world: any ONNX
//! runtime can serve the exported file.

use crate::ToolError;
use crate::proto::{self, Names};
use crate::runner::{self, Runner};
use dai_infer::bundle::{Bundle, HeadRef, HeadTransform, Manifest, TensorSpec};
use dai_onnx::pb;
use dai_train::{Activation, Head, LayerSpec};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tract_onnx::prelude::Tensor;

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub bundle: String,
    pub head: String,
    pub output: String,
    pub layers: Vec<String>,
    pub bytes: u64,
    pub samples: usize,
    /// Largest |exported in tract - daemon path| over the samples.
    pub max_abs_diff_tract: f32,
    /// Same against onnxruntime, when it ran.
    pub max_abs_diff_onnxruntime: Option<f32>,
    pub onnxruntime: String,
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2 / pi), as dai-train's GELU

/// The nodes and initializers a head adds to the backbone's graph, and the
/// graph's names, so that every new name stays unique in it.
struct HeadGraph {
    names: Names,
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
}

impl HeadGraph {
    /// A scalar f32 initializer named after `base`; returns its name.
    fn scalar(&mut self, base: &str, v: f32) -> String {
        let n = self.names.fresh(base);
        self.inits.push(proto::f32_tensor(&n, &[], &[v]));
        n
    }

    /// Layer `i` as a Gemm on `input` (weights stored [outputs, inputs], as
    /// dai-train keeps them, hence transB); returns its output's name.
    fn linear(&mut self, i: usize, l: &LayerSpec, head: &Head, input: &str) -> String {
        let w = self.names.fresh(&format!("head.{i}.weight"));
        let b = self.names.fresh(&format!("head.{i}.bias"));
        self.inits.push(proto::f32_tensor(
            &w,
            &[l.outputs, l.inputs],
            &head.params.weights[i],
        ));
        self.inits
            .push(proto::f32_tensor(&b, &[l.outputs], &head.params.biases[i]));
        let z = self.names.fresh(&format!("head.{i}.linear"));
        let gemm = self.names.fresh(&format!("head.{i}.gemm"));
        self.nodes.push(proto::node(
            "Gemm",
            &gemm,
            &[input, &w, &b],
            &[&z],
            vec![proto::attr_int("transB", 1)],
        ));
        z
    }

    /// Layer `i`'s activation applied to `z`; returns its output's name.
    fn activation(&mut self, i: usize, activation: Activation, z: String) -> String {
        match activation {
            Activation::None => z,
            Activation::Relu => {
                let y = self.names.fresh(&format!("head.{i}.relu"));
                self.nodes
                    .push(proto::node("Relu", &y, &[&z], &[&y], vec![]));
                y
            }
            Activation::Gelu => self.gelu(i, &z),
        }
    }

    /// 0.5 z (1 + tanh(c (z + 0.044715 z^3))), dai-train's form, in plain
    /// Mul/Add/Tanh nodes: standard ONNX has no tanh-approximated GELU
    /// before opset 20, and the export must match the trainer exactly.
    fn gelu(&mut self, i: usize, z: &str) -> String {
        let p = |s: &str| format!("head.{i}.gelu.{s}");
        let k1 = self.scalar(&p("k"), 0.044715);
        let kc = self.scalar(&p("c"), GELU_C);
        let one = self.scalar(&p("one"), 1.0);
        let half = self.scalar(&p("half"), 0.5);
        let [z2, z3, kz3, inner, u, t, t1, hz, y] = [
            "z2", "z3", "kz3", "inner", "u", "tanh", "one_plus", "half_z", "out",
        ]
        .map(|s| self.names.fresh(&p(s)));
        let steps: [(&str, &str, &str, &str); 5] = [
            ("Mul", z, z, &z2),
            ("Mul", &z2, z, &z3),
            ("Mul", &z3, &k1, &kz3),
            ("Add", z, &kz3, &inner),
            ("Mul", &inner, &kc, &u),
        ];
        for (op, a, b2, o) in steps {
            self.push_binary(op, a, b2, o);
        }
        let tanh = self.names.fresh(&t);
        self.nodes
            .push(proto::node("Tanh", &tanh, &[&u], &[&t], vec![]));
        self.push_binary("Add", &t, &one, &t1);
        self.push_binary("Mul", z, &half, &hz);
        self.push_binary("Mul", &hz, &t1, &y);
        y
    }

    /// `o = op(a, b)`, the node named after its output.
    fn push_binary(&mut self, op: &str, a: &str, b: &str, o: &str) {
        let name = self.names.fresh(o);
        self.nodes
            .push(proto::node(op, &name, &[a, b], &[o], vec![]));
    }

    /// The last node, renaming `current` to `output`: Softmax when the
    /// bundle applies one, else Identity.
    fn output(&mut self, transform: HeadTransform, current: &str, output: &str) {
        self.nodes.push(match transform {
            HeadTransform::Softmax => proto::node(
                "Softmax",
                "head.softmax",
                &[current],
                &[output],
                vec![proto::attr_int("axis", -1)],
            ),
            HeadTransform::None => {
                proto::node("Identity", "head.output", &[current], &[output], vec![])
            }
        });
    }
}

/// Append `head` after value `input` of `model`; the head's output becomes
/// the only graph output, named `output`.
pub fn append_head(
    model: &pb::ModelProto,
    input: &str,
    head: &Head,
    transform: HeadTransform,
    output: &str,
) -> Result<pb::ModelProto, ToolError> {
    let mut out = model.clone();
    let g = out
        .graph
        .as_mut()
        .ok_or_else(|| ToolError::Export("the backbone has no graph".into()))?;
    let names = Names::of(g);
    if names_contains(g, output) {
        return Err(ToolError::Export(format!(
            "the backbone already has a value named {output:?}; the head's output needs that name"
        )));
    }
    let mut hg = HeadGraph {
        names,
        nodes: Vec::new(),
        inits: Vec::new(),
    };
    let mut current = input.to_string();
    for (i, l) in head.spec.layers.iter().enumerate() {
        let z = hg.linear(i, l, head, &current);
        current = hg.activation(i, l.activation, z);
    }
    if !head.spec.layers.is_empty() {
        hg.output(transform, &current, output);
    }
    g.node.extend(hg.nodes);
    g.initializer.extend(hg.inits);
    g.output = vec![crate::onnx::value_info(output, head.spec.outputs())];
    // The backbone keeps its opset: Gemm, Relu, Tanh, Mul, Add and a 2-D
    // Softmax over the last axis mean the same in every opset from 7 on.
    crate::quantize::prune_unused(&mut out);
    out.producer_name = "dai-models export".into();
    out.producer_version = env!("CARGO_PKG_VERSION").into();
    Ok(out)
}

fn names_contains(g: &pb::GraphProto, name: &str) -> bool {
    g.node.iter().any(|n| n.output.iter().any(|o| o == name))
        || g.input.iter().any(|i| i.name == name)
        || g.initializer.iter().any(|i| i.name == name)
}

pub struct ExportOptions {
    pub head: Option<PathBuf>,
    pub samples: usize,
    /// Largest allowed difference to the daemon's output.
    pub tolerance: f32,
    /// python3 with onnxruntime: "auto" tries `python3`, "off" skips.
    pub python: Option<String>,
}

/// Export `bundle_dir` to `out`. Refuses (writes nothing) when the exported
/// model disagrees with the daemon's path.
pub fn export(
    bundle_dir: &Path,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport, ToolError> {
    let bundle = Bundle::open(bundle_dir).map_err(|e| ToolError::Data {
        path: bundle_dir.display().to_string(),
        message: e.to_string(),
    })?;
    let m = bundle.manifest.clone();
    let head_ref = m.head.clone().ok_or_else(|| ToolError::Data {
        path: Bundle::manifest_path(bundle_dir).display().to_string(),
        message: "the bundle has no [head]: its ONNX file is already the whole model".into(),
    })?;
    let head_path = opts
        .head
        .clone()
        .unwrap_or_else(|| bundle_dir.join(&head_ref.file));
    let (head, _) = Head::load(&head_path).map_err(|e| ToolError::Data {
        path: head_path.display().to_string(),
        message: e.to_string(),
    })?;
    let emb = head_input(&m, &head_ref, &head)?;
    let backbone = proto::load(&bundle.model_path())?;
    let exported = append_head(
        &backbone,
        emb.onnx_name(),
        &head,
        head_ref.transform,
        &head_ref.output,
    )?;
    let loaded = daemon_model(&bundle, bundle_dir, &head_path, opts)?;
    let check = compare_with_daemon(&loaded, &m, &exported, opts.samples)?;
    if check.max_diff.is_nan() || check.max_diff > opts.tolerance {
        return Err(ToolError::Verify(format!(
            "exported model differs from the daemon's output by {:.3e} (> {}); nothing written",
            check.max_diff, opts.tolerance
        )));
    }
    let bytes = proto::save(&exported, out)?;
    let (ort_diff, ort_status) = onnxruntime_verdict(opts, out, &m.inputs, &check.rows)?;
    Ok(ExportReport {
        bundle: bundle_dir.display().to_string(),
        head: head_path.display().to_string(),
        output: head_ref.output.clone(),
        layers: head
            .spec
            .layers
            .iter()
            .map(|l| format!("{}->{} {}", l.inputs, l.outputs, l.activation.as_str()))
            .collect(),
        bytes,
        samples: check.samples,
        max_abs_diff_tract: check.max_diff,
        max_abs_diff_onnxruntime: ort_diff,
        onnxruntime: ort_status,
    })
}

/// The manifest output the head reads, checked to be [batch, features] with
/// as many features as the head takes.
fn head_input<'m>(
    m: &'m Manifest,
    head_ref: &HeadRef,
    head: &Head,
) -> Result<&'m TensorSpec, ToolError> {
    let emb = m
        .outputs
        .iter()
        .find(|o| o.name == head_ref.input)
        .ok_or_else(|| {
            ToolError::Export(format!(
                "manifest output {:?} (the head's input) not found",
                head_ref.input
            ))
        })?;
    if emb.shape.len() != 2 || emb.row_elems() != head.spec.inputs() {
        return Err(ToolError::Export(format!(
            "the head takes {} features, output {:?} has shape {:?} (expected [batch, {}])",
            head.spec.inputs(),
            emb.name,
            emb.shape,
            head.spec.inputs()
        )));
    }
    Ok(emb)
}

/// The daemon's path: the same bundle through dai-infer, head applied.
/// A head given with --head replaces the shipped one there too.
fn daemon_model(
    bundle: &Bundle,
    bundle_dir: &Path,
    head_path: &Path,
    opts: &ExportOptions,
) -> Result<dai_infer::LoadedModel, ToolError> {
    let mut daemon_bundle = bundle.clone();
    if opts.head.is_some() {
        daemon_bundle.dir = stage_with_head(bundle_dir, head_path)?;
    }
    dai_infer::LoadedModel::load(daemon_bundle, 1).map_err(|e| ToolError::Verify(e.to_string()))
}

/// How the exported model compared with the daemon in tract.
struct DaemonCheck {
    /// Largest |exported - daemon| over all samples.
    max_diff: f32,
    /// Each sample's raw inputs and the daemon's output, for onnxruntime.
    rows: Vec<(Vec<Vec<f32>>, Vec<f32>)>,
    samples: usize,
}

/// Run `exported` in tract and the daemon's model on the same `samples`
/// random inputs (seed 5, so runs are repeatable).
fn compare_with_daemon(
    loaded: &dai_infer::LoadedModel,
    m: &Manifest,
    exported: &pb::ModelProto,
    samples: usize,
) -> Result<DaemonCheck, ToolError> {
    let mut shapes = std::collections::HashMap::new();
    for i in &m.inputs {
        shapes.insert(i.onnx_name().to_string(), i.shape.clone());
    }
    let (specs, _) = runner::input_specs(exported, &shapes)?;
    let runner = Runner::new(exported, &specs, m.model.ignore_value_info, None)?;
    let set = crate::calib::load(&format!("random:{}:5", samples.max(1)), &specs)?;
    let mut max_diff = 0.0f32;
    let mut rows: Vec<(Vec<Vec<f32>>, Vec<f32>)> = Vec::new();
    for sample in &set.samples {
        let (raw_inputs, daemon) = daemon_output(loaded, &m.inputs, sample)?;
        let ours = runner::values_f32(&runner.run(sample)?[0])?;
        if ours.len() != daemon.len() {
            return Err(ToolError::Verify(format!(
                "exported output has {} values, the daemon's {}",
                ours.len(),
                daemon.len()
            )));
        }
        for (a, b) in ours.iter().zip(&daemon) {
            max_diff = max_diff.max((a - b).abs());
        }
        rows.push((raw_inputs, daemon));
    }
    Ok(DaemonCheck {
        max_diff,
        rows,
        samples: set.len(),
    })
}

/// One sample through the daemon's model (prepare, run, apply the head):
/// the sample's inputs as plain values, and the head's f32 output.
fn daemon_output(
    loaded: &dai_infer::LoadedModel,
    inputs: &[TensorSpec],
    sample: &[Tensor],
) -> Result<(Vec<Vec<f32>>, Vec<f32>), ToolError> {
    let mut named = std::collections::HashMap::new();
    let mut raw_inputs = Vec::new();
    for (spec, t) in inputs.iter().zip(sample) {
        let td = to_tensordata(t)?;
        raw_inputs.push(runner::values_f32(t)?);
        named.insert(spec.name.clone(), td);
    }
    let (prepared, r) = loaded
        .prepare(named)
        .map_err(|e| ToolError::Verify(e.to_string()))?;
    let refs: Vec<&dai_infer::TensorData> = prepared.iter().collect();
    let outs = loaded
        .run(&refs, r)
        .map_err(|e| ToolError::Verify(e.to_string()))?;
    let (probs, _) = loaded
        .apply_head(&outs)
        .map_err(|e| ToolError::Verify(e.to_string()))?
        .ok_or_else(|| ToolError::Verify("the daemon applied no head".into()))?;
    match probs.data {
        dai_infer::Data::F32(v) => Ok((raw_inputs, v)),
        _ => Err(ToolError::Verify("head output is not f32".into())),
    }
}

/// The onnxruntime check of the written file: its difference and status
/// line. onnxruntime being unavailable only skips the check; a difference
/// over the tolerance removes the file and fails the export.
fn onnxruntime_verdict(
    opts: &ExportOptions,
    out: &Path,
    inputs: &[TensorSpec],
    rows: &[(Vec<Vec<f32>>, Vec<f32>)],
) -> Result<(Option<f32>, String), ToolError> {
    let (ort_diff, ort_status) = match opts.python.as_deref() {
        Some("off") => (None, "skipped (--onnxruntime off)".to_string()),
        py => match check_onnxruntime(py.unwrap_or("python3"), out, inputs, rows) {
            Ok(d) => (Some(d), "checked".to_string()),
            Err(why) => (None, why),
        },
    };
    if let Some(d) = ort_diff
        && (d.is_nan() || d > opts.tolerance)
    {
        let _ = std::fs::remove_file(out);
        return Err(ToolError::Verify(format!(
            "onnxruntime's output differs from the daemon's by {d:.3e} (> {}); {} removed",
            opts.tolerance,
            out.display()
        )));
    }
    Ok((ort_diff, ort_status))
}

/// A copy of the bundle directory with `head` as its head file (checksum
/// updated), so the daemon's loader can be run on a device-trained head.
fn stage_with_head(dir: &Path, head: &Path) -> Result<PathBuf, ToolError> {
    let io = |e: std::io::Error| ToolError::Io(e.to_string());
    let tmp = std::env::temp_dir().join(format!("dai-export-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(io)?;
    let m = Bundle::read_manifest(dir).map_err(|e| ToolError::Io(e.to_string()))?;
    std::fs::copy(dir.join(&m.model.file), tmp.join(&m.model.file)).map_err(io)?;
    let h = m.head.as_ref().map(|h| h.file.clone()).unwrap_or_default();
    std::fs::copy(head, tmp.join(&h)).map_err(io)?;
    let (sum, _) =
        dai_infer::bundle::sha256_file(&tmp.join(&h)).map_err(|e| ToolError::Io(e.to_string()))?;
    let mut m2 = m.clone();
    if let Some(hr) = m2.head.as_mut() {
        hr.sha256 = sum;
    }
    let text = toml::to_string(&m2).map_err(|e| ToolError::Io(e.to_string()))?;
    std::fs::write(Bundle::manifest_path(&tmp), text).map_err(io)?;
    Ok(tmp)
}

fn to_tensordata(t: &Tensor) -> Result<dai_infer::TensorData, ToolError> {
    let shape = t.shape().to_vec();
    let v = runner::values_f32(t)?;
    let data = match t.datum_type() {
        tract_onnx::prelude::DatumType::I64 => {
            dai_infer::Data::I64(v.iter().map(|x| *x as i64).collect())
        }
        _ => dai_infer::Data::F32(v),
    };
    dai_infer::TensorData::new(shape, data).map_err(|e| ToolError::Verify(e.0))
}

/// Run the exported file in onnxruntime (through Python) on the same rows
/// and return the largest difference to the daemon's outputs.
fn check_onnxruntime(
    python: &str,
    file: &Path,
    inputs: &[TensorSpec],
    rows: &[(Vec<Vec<f32>>, Vec<f32>)],
) -> Result<f32, String> {
    let script = r#"
import json, sys
try:
    import numpy as np, onnxruntime as ort
except ImportError as e:
    print(json.dumps({"error": f"python has no {e.name}"})); sys.exit(0)
job = json.load(sys.stdin)
s = ort.InferenceSession(job["file"], providers=["CPUExecutionProvider"])
worst = 0.0
for row in job["rows"]:
    feed = {}
    for spec, values in zip(job["inputs"], row["inputs"]):
        dt = np.int64 if spec["dtype"] == "i64" else np.float32
        feed[spec["onnx_name"]] = np.array(values, dtype=dt).reshape(spec["shape"])
    out = s.run(None, feed)[0].reshape(-1)
    worst = max(worst, float(np.abs(out - np.array(row["expected"], dtype=np.float32)).max()))
print(json.dumps({"max_abs_diff": worst, "version": ort.__version__}))
"#;
    let job = serde_json::json!({
        "file": file.display().to_string(),
        "inputs": inputs.iter().map(|i| serde_json::json!({
            "onnx_name": i.onnx_name(), "dtype": i.dtype.to_string(), "shape": i.shape})).collect::<Vec<_>>(),
        "rows": rows.iter().map(|(i, e)| serde_json::json!({"inputs": i, "expected": e})).collect::<Vec<_>>(),
    });
    let v = crate::ort::python_json(python, script, &job).map_err(|e| format!("skipped: {e}"))?;
    v.get("max_abs_diff")
        .and_then(|d| d.as_f64())
        .map(|d| d as f32)
        .ok_or_else(|| "skipped: unexpected answer from python".into())
}

impl ExportReport {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "bundle        {}", self.bundle);
        let _ = writeln!(
            s,
            "head          {} ({})",
            self.head,
            self.layers.join(", ")
        );
        let _ = writeln!(s, "output        {:?}", self.output);
        let _ = writeln!(
            s,
            "size          {}",
            crate::inspect::human_bytes(self.bytes)
        );
        let _ = writeln!(
            s,
            "tract         max |exported - daemon| = {:.2e} over {} samples",
            self.max_abs_diff_tract, self.samples
        );
        match self.max_abs_diff_onnxruntime {
            Some(d) => {
                let _ = writeln!(s, "onnxruntime   max |exported - daemon| = {d:.2e}");
            }
            None => {
                let _ = writeln!(s, "onnxruntime   {}", self.onnxruntime);
            }
        }
        s
    }
}
