//! `dai-models bundle`: any ONNX file -> a complete bundle the daemon serves.
//!
//! Nothing in the manifest is taken on the file's word where it can be
//! measured: output shapes come from running the model in tract on a probe
//! input (exporters often declare them wrongly), batching is decided by
//! running batch 4 and checking that each row's answer equals its batch-1
//! answer, dynamic batching by timing batch 8 against batch 1. The written
//! bundle is then opened and run through the daemon's own loader
//! (`dai_infer::LoadedModel`), and with `--check-ort` compared with
//! onnxruntime on the same input.

use crate::ToolError;
use crate::ort;
use crate::proto;
use crate::runner::{self, InputSpec, Runner, Tensor};
use dai_infer::bundle::{Bundle, DynamicAxis, Manifest, ModelFile, Preprocess, TensorSpec};
use dai_infer::{DType, Data, TensorData};
use dai_onnx::pb;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What `bundle` is asked to write.
pub struct BundleOptions {
    pub out: PathBuf,
    pub name: Option<String>,
    pub version: String,
    pub description: String,
    /// Concrete shapes for inputs with symbolic axes (beyond a batch axis 0).
    pub shapes: HashMap<String, Vec<usize>>,
    /// Axes served at any size within bounds: (input, axis, min, max).
    pub dynamic: Vec<(String, usize, usize, usize)>,
    pub labels: Vec<String>,
    /// Per-channel mean and std (one value = every channel) for u8 requests.
    pub normalize: Option<(Vec<f32>, Vec<f32>)>,
    pub scale: f32,
    pub channel_axis: usize,
    pub license: Option<String>,
    pub origin: Option<String>,
    /// Python with onnxruntime to compare with (None: no comparison).
    pub check_ort: Option<String>,
    pub tolerance: f32,
    pub force: bool,
    /// Cut at this tensor into a backbone and a trainable head
    /// ([`crate::head_split`]).
    pub head: Option<String>,
}

/// One output as found by running the model.
#[derive(Debug, Clone, Serialize)]
pub struct ProbedOutput {
    pub name: String,
    pub onnx_name: String,
    pub dtype: DType,
    /// What the file declares (symbolic names kept).
    pub declared: Vec<String>,
    /// What tract returned on the probe input.
    pub probed: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BundleReport {
    pub dir: String,
    pub name: String,
    pub model_bytes: u64,
    pub sha256: String,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<ProbedOutput>,
    pub batching: bool,
    pub dynamic_batching: bool,
    /// Per-row latency at batch 1 and batch 8, ms (when batching).
    pub per_row_ms: Option<(f64, f64)>,
    pub ignore_value_info: bool,
    /// Dynamic axes run at both bounds in tract: "x axis 3 at 16 and 1024".
    pub dynamic_checked: Vec<String>,
    /// max |daemon path - tract probe| on the probe input.
    pub max_abs_diff_daemon: f32,
    pub max_abs_diff_onnxruntime: Option<f32>,
    pub onnxruntime: String,
    pub notes: Vec<String>,
}

/// A name the daemon accepts in URLs and metrics (`[A-Za-z0-9._-]`, <= 64).
fn api_name(onnx: &str) -> String {
    let s: String = onnx
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() { "x".into() } else { s }
}

fn dtype_of(elem: i32, what: &str) -> Result<DType, ToolError> {
    Ok(match elem {
        proto::dt::FLOAT => DType::F32,
        proto::dt::INT64 => DType::I64,
        proto::dt::INT32 => DType::I32,
        proto::dt::UINT8 => DType::U8,
        proto::dt::INT8 => DType::I8,
        other => {
            return Err(ToolError::Refused(format!(
                "{what} has element type {}; the daemon serves f32, i64, i32, u8 and i8",
                proto::dtype_name(other)
            )));
        }
    })
}

/// Operators of `g` (and of its subgraphs) that tract has no builder for,
/// with the first node using each and how many do.
pub fn unsupported_ops(g: &pb::GraphProto) -> BTreeMap<String, (String, usize)> {
    let known = tract_onnx::onnx().op_register;
    let mut out = BTreeMap::new();
    let mut stack = vec![g];
    while let Some(g) = stack.pop() {
        for n in &g.node {
            if !known.0.contains_key(&n.op_type) {
                let e = out
                    .entry(n.op_type.clone())
                    .or_insert_with(|| (n.name.clone(), 0));
                e.1 += 1;
            }
            for a in &n.attribute {
                stack.extend(a.g.iter());
                stack.extend(a.graphs.iter());
            }
        }
    }
    out
}

/// Input shapes: `--input-shape` first; a symbolic axis 0 becomes 1 (the
/// batch axis, tested below); any other symbolic axis must be fixed.
fn input_specs(
    model: &pb::ModelProto,
    shapes: &HashMap<String, Vec<usize>>,
    dynamic: &[(String, usize, usize, usize)],
) -> Result<(Vec<InputSpec>, bool), ToolError> {
    let (mut specs, _) = runner::input_specs(model, shapes)?;
    for (name, axis, min, _) in dynamic {
        let spec = specs.iter_mut().find(|s| &s.name == name).ok_or_else(|| {
            ToolError::Refused(format!("--dynamic {name}: the model has no input {name:?}"))
        })?;
        let rank = spec.shape.len();
        let size = spec.shape.get_mut(*axis).filter(|_| *axis > 0).ok_or_else(|| {
            ToolError::Refused(format!(
                "--dynamic {name}:{axis}: input {name:?} has axes 1..{} besides the batch axis 0",
                rank.saturating_sub(1)
            ))
        })?;
        if !shapes.contains_key(name) {
            *size = *min;
        }
    }
    let is_dynamic =
        |name: &str, axis: usize| dynamic.iter().any(|(n, a, _, _)| n == name && *a == axis);
    let mut batch_axis_symbolic = true;
    for v in proto::real_inputs(proto::graph(model)) {
        let (_, dims, names) = proto::value_shape(v);
        if dims.first().is_none_or(|d| d.is_some()) {
            batch_axis_symbolic = false;
        }
        if shapes.contains_key(&v.name) {
            continue;
        }
        if let Some(axis) = dims
            .iter()
            .enumerate()
            .skip(1)
            .position(|(a, d)| d.is_none() && !is_dynamic(&v.name, a))
        {
            let axis = axis + 1;
            let example: Vec<String> = dims
                .iter()
                .map(|d| d.map_or("N".into(), |d| d.to_string()))
                .collect();
            return Err(ToolError::Refused(format!(
                "input {:?} axis {axis} ({}) is symbolic ([{}]): fix it with --input-shape {}={} (each N a size)",
                v.name,
                names[axis],
                names.join(", "),
                v.name,
                example.join("x")
            )));
        }
    }
    Ok((specs, batch_axis_symbolic))
}

/// The spec with axis 0 set to `rows`.
fn with_rows(specs: &[InputSpec], rows: usize) -> Vec<InputSpec> {
    specs
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.shape[0] = rows;
            s
        })
        .collect()
}

/// `t` (axis 0 of size 1) repeated `rows` times along axis 0.
fn repeat_rows(t: &Tensor, rows: usize) -> Result<Tensor, ToolError> {
    let parts: Vec<Tensor> = (0..rows).map(|_| t.clone()).collect();
    Tensor::stack_tensors(0, &parts).map_err(|e| ToolError::Runtime(format!("{e:#}")))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) })
}

/// Does the model answer batch 4 row by row as it answers batch 1 (every
/// output's axis 0 is the batch), and is a row cheaper at batch 8?
fn measure_batching(
    model: &pb::ModelProto,
    specs: &[InputSpec],
    ivi: bool,
    probe: &[Tensor],
    probe_out: &[Tensor],
    notes: &mut Vec<String>,
) -> Result<(bool, Option<(f64, f64)>), ToolError> {
    let four = match Runner::new(model, &with_rows(specs, 4), ivi, None) {
        Ok(r) => r,
        Err(e) => {
            notes.push(format!("batching off: batch 4 does not load ({e})"));
            return Ok((false, None));
        }
    };
    let inputs: Vec<Tensor> = probe
        .iter()
        .map(|t| repeat_rows(t, 4))
        .collect::<Result<_, _>>()?;
    let outs = match four.run(&inputs) {
        Ok(o) => o,
        Err(e) => {
            notes.push(format!("batching off: batch 4 does not run ({e})"));
            return Ok((false, None));
        }
    };
    for (o, one) in outs.iter().zip(probe_out) {
        if o.shape().first() != Some(&4) || one.shape().first() != Some(&1) {
            notes.push(format!(
                "batching off: at batch 4 an output has shape {:?} (batch 1: {:?}), axis 0 is not the batch",
                o.shape(),
                one.shape()
            ));
            return Ok((false, None));
        }
        let want = runner::values_f32(&repeat_rows(one, 4)?)?;
        let d = max_diff(&runner::values_f32(o)?, &want);
        if d.is_nan() || d > 1e-4 {
            notes.push(format!(
                "batching off: rows at batch 4 differ from batch 1 by {d:.2e}"
            ));
            return Ok((false, None));
        }
    }
    let one = Runner::new(model, specs, ivi, None)?;
    let eight = Runner::new(model, &with_rows(specs, 8), ivi, None)?;
    let eight_in: Vec<Tensor> = probe
        .iter()
        .map(|t| repeat_rows(t, 8))
        .collect::<Result<_, _>>()?;
    let t1 = one.latency_ms(probe, 7)?;
    let t8 = eight.latency_ms(&eight_in, 7)? / 8.0;
    Ok((true, Some((t1, t8))))
}

/// Run the model in tract with each dynamic axis at its minimum and at its
/// maximum (the others at their probe sizes): a bound it cannot run at is
/// refused here, not at a device's first request.
fn check_dynamic(
    model: &pb::ModelProto,
    specs: &[InputSpec],
    ivi: bool,
    dynamic: &[(String, usize, usize, usize)],
) -> Result<Vec<String>, ToolError> {
    let mut checked = Vec::new();
    for (name, axis, min, max) in dynamic {
        if min > max || *min == 0 {
            return Err(ToolError::Refused(format!(
                "--dynamic {name}:{axis}={min}..{max}: expected 1 <= MIN <= MAX"
            )));
        }
        for size in [*min, *max] {
            let mut at = specs.to_vec();
            if let Some(s) = at.iter_mut().find(|s| &s.name == name) {
                s.shape[*axis] = size;
            }
            let ran = Runner::new(model, &at, ivi, None)
                .and_then(|r| runner::synthetic_inputs(&at, 3).and_then(|inputs| r.run(&inputs)));
            if let Err(e) = ran {
                return Err(ToolError::Refused(format!(
                    "--dynamic {name}:{axis}: the model does not run with axis {axis} = {size}: {e}"
                )));
            }
        }
        checked.push(format!("{name} axis {axis} at {min} and {max}"));
    }
    Ok(checked)
}

/// Convert a probe tensor for the daemon's API.
fn to_tensordata(t: &Tensor, dtype: DType) -> Result<TensorData, ToolError> {
    let v = runner::values_f32(t)?;
    let data = match dtype {
        DType::F32 => Data::F32(v),
        DType::I64 => Data::I64(v.iter().map(|x| *x as i64).collect()),
        DType::I32 => Data::I32(v.iter().map(|x| *x as i32).collect()),
        DType::U8 => Data::U8(v.iter().map(|x| *x as u8).collect()),
        DType::I8 => Data::I8(v.iter().map(|x| *x as i8).collect()),
    };
    TensorData::new(t.shape().to_vec(), data).map_err(|e| ToolError::Verify(e.0))
}

fn data_f32(t: &TensorData) -> Vec<f32> {
    match &t.data {
        Data::F32(v) => v.clone(),
        Data::I64(v) => v.iter().map(|x| *x as f32).collect(),
        Data::I32(v) => v.iter().map(|x| *x as f32).collect(),
        Data::U8(v) => v.iter().map(|x| *x as f32).collect(),
        Data::I8(v) => v.iter().map(|x| *x as f32).collect(),
    }
}

/// Make the bundle for `file` in `opts.out`.
pub fn bundle(file: &Path, opts: &BundleOptions) -> Result<BundleReport, ToolError> {
    let Some(tensor) = &opts.head else {
        return bundle_graph(file, file, opts, None);
    };
    let original = proto::load(file)?;
    let split = crate::head_split::split(&original, tensor)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp =
        std::env::temp_dir().join(format!("dai-backbone-{}-{nanos}.onnx", std::process::id()));
    proto::save(&split.backbone, &tmp)?;
    let r = bundle_graph(&tmp, file, opts, Some((&original, &split)));
    let _ = std::fs::remove_file(&tmp);
    r
}

/// [`bundle`] of the graph in `file` (the backbone when `split`), named
/// after `named`.
fn bundle_graph(
    file: &Path,
    named: &Path,
    opts: &BundleOptions,
    split: Option<(&pb::ModelProto, &crate::head_split::Split)>,
) -> Result<BundleReport, ToolError> {
    let model = proto::load(file)?;
    let g = proto::graph(&model);
    let missing = unsupported_ops(g);
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|(op, (node, n))| format!("{op} (node {node:?}, {n} in all)"))
            .collect();
        return Err(ToolError::Refused(format!(
            "{}: tract cannot load this model: it has no implementation of operator {}",
            file.display(),
            list.join(", ")
        )));
    }
    let (specs, batch_symbolic) = input_specs(&model, &opts.shapes, &opts.dynamic)?;
    let mut notes = Vec::new();
    let (runner, ivi) = match Runner::new(&model, &specs, false, None) {
        Ok(r) => (r, false),
        Err(first) => match Runner::new(&model, &specs, true, None) {
            Ok(r) => {
                notes.push("loads only ignoring the file's value_info shapes".into());
                (r, true)
            }
            Err(_) => {
                return Err(ToolError::Refused(format!(
                    "{}: tract cannot run it: {first}",
                    file.display()
                )));
            }
        },
    };
    let probe = runner::synthetic_inputs(&specs, 7)?;
    let probe_out = runner.run(&probe)?;
    let outputs = probe_outputs(g, &probe_out)?;
    let (batching, per_row_ms) = if batch_symbolic && specs.iter().all(|s| s.shape[0] == 1) {
        measure_batching(&model, &specs, ivi, &probe, &probe_out, &mut notes)?
    } else {
        notes.push("batching off: the inputs' axis 0 is fixed by the file".into());
        (false, None)
    };
    let dynamic_checked = check_dynamic(&model, &specs, ivi, &opts.dynamic)?;
    // Requests of different sizes cannot be merged into one run.
    let dynamic_batching =
        opts.dynamic.is_empty() && per_row_ms.is_some_and(|(one, eight)| eight < 0.8 * one);
    match split {
        Some((_, sp)) => check_head_labels(&opts.labels, sp)?,
        None => check_labels(&opts.labels, &outputs)?,
    }
    let manifest = manifest(
        opts,
        named,
        &specs,
        &outputs,
        batching,
        dynamic_batching,
        ivi,
    )?;
    let (sha256, model_bytes) = write(opts, file, manifest, split.map(|(_, sp)| sp))?;
    // With a head, the bundle answers what the whole original model does.
    let (ort_file, expected) = match split {
        Some((original, sp)) => {
            let full = Runner::new(original, &specs, ivi, None)?.run(&probe)?;
            let at = proto::graph(original)
                .output
                .iter()
                .position(|o| o.name == sp.output)
                .unwrap_or(0);
            let want = full.get(at).cloned().ok_or_else(|| {
                ToolError::Verify(format!("the model returned no {:?}", sp.output))
            })?;
            (named, Some((full, want)))
        }
        None => (file, None),
    };
    let verified = match &expected {
        Some((_, want)) => verify_daemon_head(&opts.out, &probe, want),
        None => verify_daemon(&opts.out, &probe, &probe_out),
    };
    let max_abs_diff_daemon = match verified {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&opts.out);
            return Err(e);
        }
    };
    let (max_abs_diff_onnxruntime, onnxruntime) = match &opts.check_ort {
        None => (None, "not checked (pass --check-ort)".into()),
        Some(py) => match check_ort(
            py,
            ort_file,
            &specs,
            &probe,
            expected.as_ref().map_or(&probe_out, |(full, _)| full),
            opts.tolerance,
        ) {
            Ok((d, version)) => (Some(d), format!("onnxruntime {version}")),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&opts.out);
                return Err(e);
            }
        },
    };
    Ok(BundleReport {
        dir: opts.out.display().to_string(),
        name: opts.name.clone().unwrap_or_else(|| default_name(named)),
        model_bytes,
        sha256,
        inputs: specs,
        outputs,
        batching,
        dynamic_batching,
        per_row_ms,
        ignore_value_info: ivi,
        dynamic_checked,
        max_abs_diff_daemon,
        max_abs_diff_onnxruntime,
        onnxruntime,
        notes,
    })
}

fn probe_outputs(g: &pb::GraphProto, outs: &[Tensor]) -> Result<Vec<ProbedOutput>, ToolError> {
    let mut names = std::collections::HashSet::new();
    g.output
        .iter()
        .zip(outs)
        .map(|(o, t)| {
            let (elem, _, declared) = proto::value_shape(o);
            let dtype = dtype_of(elem, &format!("output {:?}", o.name))?;
            let mut name = api_name(&o.name);
            while !names.insert(name.clone()) {
                name.push('_');
            }
            Ok(ProbedOutput {
                name,
                onnx_name: o.name.clone(),
                dtype,
                declared,
                probed: t.shape().to_vec(),
            })
        })
        .collect()
}

fn check_labels(labels: &[String], outputs: &[ProbedOutput]) -> Result<(), ToolError> {
    let Some(first) = outputs.first() else {
        return Ok(());
    };
    let classes = first.probed.last().copied().unwrap_or(1);
    if !labels.is_empty() && labels.len() != classes {
        return Err(ToolError::Refused(format!(
            "--labels: {} labels, but output {:?} has {classes} values on its last axis ({:?})",
            labels.len(),
            first.onnx_name,
            first.probed
        )));
    }
    Ok(())
}

/// `--labels` name the head's outputs.
fn check_head_labels(labels: &[String], sp: &crate::head_split::Split) -> Result<(), ToolError> {
    let classes = sp.head.spec.outputs();
    if !labels.is_empty() && labels.len() != classes {
        return Err(ToolError::Refused(format!(
            "--labels: {} labels, but the head after {:?} has {classes} outputs",
            labels.len(),
            sp.cut
        )));
    }
    Ok(())
}

fn default_name(file: &Path) -> String {
    api_name(
        &file
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
    )
}

fn manifest(
    opts: &BundleOptions,
    file: &Path,
    specs: &[InputSpec],
    outputs: &[ProbedOutput],
    batching: bool,
    dynamic_batching: bool,
    ignore_value_info: bool,
) -> Result<Manifest, ToolError> {
    let inputs = specs
        .iter()
        .map(|s| {
            let name = api_name(&s.name);
            Ok(TensorSpec {
                onnx_name: (name != s.name).then(|| s.name.clone()),
                name,
                dtype: dtype_of(s.elem, &format!("input {:?}", s.name))?,
                shape: s.shape.clone(),
                dynamic: opts
                    .dynamic
                    .iter()
                    .filter(|(n, ..)| n == &s.name)
                    .map(|&(_, axis, min, max)| DynamicAxis { axis, min, max })
                    .collect(),
            })
        })
        .collect::<Result<Vec<_>, ToolError>>()?;
    let outputs = outputs
        .iter()
        .map(|o| {
            Ok(TensorSpec {
                onnx_name: (o.name != o.onnx_name).then(|| o.onnx_name.clone()),
                name: o.name.clone(),
                dtype: o.dtype,
                shape: o.probed.clone(),
                dynamic: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, ToolError>>()?;
    let preprocess = opts.normalize.as_ref().map(|(mean, std)| {
        let channels = inputs
            .iter()
            .find(|s| s.dtype == DType::F32)
            .and_then(|s| s.shape.get(opts.channel_axis).copied())
            .unwrap_or(1);
        let widen = |v: &Vec<f32>| {
            if v.len() == 1 {
                vec![v[0]; channels]
            } else {
                v.clone()
            }
        };
        Preprocess::Normalize {
            scale: opts.scale,
            mean: widen(mean),
            std: widen(std),
            channel_axis: opts.channel_axis,
        }
    });
    let m = Manifest {
        name: opts.name.clone().unwrap_or_else(|| default_name(file)),
        version: opts.version.clone(),
        description: opts.description.clone(),
        labels: opts.labels.clone(),
        batching,
        dynamic_batching,
        model: ModelFile {
            file: "model.onnx".into(),
            sha256: "0".repeat(64),
            ignore_value_info,
        },
        source: None,
        license: opts.license.clone(),
        origin: opts.origin.clone(),
        preprocess,
        head: None,
        metrics: BTreeMap::new(),
        inputs,
        outputs,
        variants: Vec::new(),
    };
    // The daemon's own manifest rules, with their precise messages.
    let text = toml::to_string(&m).map_err(|e| ToolError::Runtime(e.to_string()))?;
    dai_infer::bundle::parse_manifest(&text)
        .map_err(|e| ToolError::Refused(format!("the manifest it would write: {e}")))
}

/// Copy the model in and write the manifest with its checksum.
fn write(
    opts: &BundleOptions,
    file: &Path,
    mut m: Manifest,
    split: Option<&crate::head_split::Split>,
) -> Result<(String, u64), ToolError> {
    let io = |what: &Path, e: std::io::Error| ToolError::Io(format!("{}: {e}", what.display()));
    if opts.out.exists() {
        let non_empty = std::fs::read_dir(&opts.out)
            .map_err(|e| io(&opts.out, e))?
            .next()
            .is_some();
        if non_empty && !opts.force {
            return Err(ToolError::Refused(format!(
                "{} exists and is not empty; pass --force to replace it",
                opts.out.display()
            )));
        }
        if non_empty {
            std::fs::remove_dir_all(&opts.out).map_err(|e| io(&opts.out, e))?;
        }
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| io(&opts.out, e))?;
    let dest = opts.out.join(&m.model.file);
    std::fs::copy(file, &dest).map_err(|e| io(&dest, e))?;
    let (sha, bytes) =
        dai_infer::bundle::sha256_file(&dest).map_err(|e| ToolError::Io(format!("{e:#}")))?;
    m.model.sha256 = sha.clone();
    if let Some(sp) = split {
        let path = opts.out.join("head.safetensors");
        let mut meta = HashMap::new();
        meta.insert("cut_at".to_string(), sp.cut.clone());
        sp.head
            .save(&path, &meta)
            .map_err(|e| ToolError::Io(format!("{}: {e}", path.display())))?;
        let (head_sha, _) =
            dai_infer::bundle::sha256_file(&path).map_err(|e| ToolError::Io(format!("{e:#}")))?;
        m.head = Some(dai_infer::bundle::HeadRef {
            file: "head.safetensors".into(),
            sha256: head_sha,
            input: api_name(&sp.cut),
            output: api_name(&sp.output),
            transform: sp.transform,
            validation: None,
        });
    }
    let text = toml::to_string(&m).map_err(|e| ToolError::Runtime(e.to_string()))?;
    let path = Bundle::manifest_path(&opts.out);
    std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    Ok((sha, bytes))
}

fn daemon_failure(e: &dyn std::fmt::Display) -> ToolError {
    ToolError::Verify(format!("the daemon's loader: {e}"))
}

/// Open the written bundle as the daemon does and run the probe through
/// its backbone: the loaded model and its outputs.
fn daemon_run(
    dir: &Path,
    probe: &[Tensor],
) -> Result<(dai_infer::LoadedModel, Vec<TensorData>), ToolError> {
    let fail = daemon_failure;
    let b = Bundle::open(dir).map_err(|e| fail(&format!("{e:#}")))?;
    let m = dai_infer::LoadedModel::load(b, 8).map_err(|e| fail(&e))?;
    let mut inputs = HashMap::new();
    for (t, ms) in probe.iter().zip(&m.bundle.manifest.inputs) {
        inputs.insert(ms.name.clone(), to_tensordata(t, ms.dtype)?);
    }
    let (prepared, rows) = m.prepare(inputs).map_err(|e| fail(&e))?;
    let refs: Vec<&TensorData> = prepared.iter().collect();
    let outs = m.run(&refs, rows).map_err(|e| fail(&e))?;
    Ok((m, outs))
}

/// The daemon's outputs on the probe against tract's alone.
fn verify_daemon(dir: &Path, probe: &[Tensor], probe_out: &[Tensor]) -> Result<f32, ToolError> {
    let (_, outs) = daemon_run(dir, probe)?;
    let mut worst = 0.0f32;
    for (o, want) in outs.iter().zip(probe_out) {
        if o.shape != want.shape() {
            return Err(daemon_failure(&format!(
                "output shape {:?}, tract alone gave {:?}",
                o.shape,
                want.shape()
            )));
        }
        worst = worst.max(max_diff(&data_f32(o), &runner::values_f32(want)?));
    }
    Ok(worst)
}

/// Backbone + head, as the daemon runs them, against what the whole model
/// does (`want`).
fn verify_daemon_head(dir: &Path, probe: &[Tensor], want: &Tensor) -> Result<f32, ToolError> {
    let fail = daemon_failure;
    let (m, outs) = daemon_run(dir, probe)?;
    let (head_out, _) = m
        .apply_head(&outs)
        .map_err(|e| fail(&e))?
        .ok_or_else(|| fail(&"the bundle has no head"))?;
    let want_values = runner::values_f32(want)?;
    if head_out.shape.iter().product::<usize>() != want_values.len() {
        return Err(fail(&format!(
            "head output shape {:?}, the whole model gave {:?}",
            head_out.shape,
            want.shape()
        )));
    }
    Ok(max_diff(&data_f32(&head_out), &want_values))
}

/// Compare every output with onnxruntime's on the probe input.
fn check_ort(
    python: &str,
    file: &Path,
    specs: &[InputSpec],
    probe: &[Tensor],
    probe_out: &[Tensor],
    tolerance: f32,
) -> Result<(f32, String), ToolError> {
    let values: Vec<Vec<f32>> = probe
        .iter()
        .map(runner::values_f32)
        .collect::<Result<_, _>>()?;
    let dtypes: Vec<String> = specs
        .iter()
        .map(|s| dtype_of(s.elem, &s.name).map(|d| d.to_string()))
        .collect::<Result<_, _>>()?;
    let inputs: Vec<ort::OrtInput<'_>> = specs
        .iter()
        .zip(&values)
        .zip(&dtypes)
        .map(|((s, v), d)| ort::OrtInput {
            onnx_name: &s.name,
            dtype: d,
            shape: &s.shape,
            values: v,
        })
        .collect();
    let (version, outs) = ort::run(python, file, &inputs)
        .map_err(|e| ToolError::Verify(format!("--check-ort: {e}")))?;
    let mut worst = 0.0f32;
    for (o, want) in outs.iter().zip(probe_out) {
        if o.shape != want.shape() {
            return Err(ToolError::Verify(format!(
                "onnxruntime returns {:?} with shape {:?}, tract {:?}",
                o.name,
                o.shape,
                want.shape()
            )));
        }
        let d = max_diff(&o.values, &runner::values_f32(want)?);
        if d.is_nan() || d > tolerance {
            return Err(ToolError::Verify(format!(
                "output {:?}: onnxruntime and tract differ by {d:.3e} (> {tolerance})",
                o.name
            )));
        }
        worst = worst.max(d);
    }
    Ok((worst, version))
}

impl BundleReport {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "bundle      {} ({})", self.dir, self.name);
        let _ = writeln!(
            s,
            "model       model.onnx, {} bytes, sha256 {}",
            self.model_bytes, self.sha256
        );
        for i in &self.inputs {
            let _ = writeln!(s, "input       {:<24} {:<4} {:?}", i.name, i.dtype, i.shape);
        }
        for o in &self.outputs {
            let _ = writeln!(
                s,
                "output      {:<24} {:<4} {:?} (the file declares [{}])",
                o.onnx_name,
                o.dtype,
                o.probed,
                o.declared.join(", ")
            );
        }
        let timing = self.per_row_ms.map_or(String::new(), |(a, b)| {
            format!(" (per row: {a:.3} ms at batch 1, {b:.3} ms at batch 8)")
        });
        let _ = writeln!(
            s,
            "batching    {}; dynamic batching {}{timing}",
            self.batching, self.dynamic_batching
        );
        for d in &self.dynamic_checked {
            let _ = writeln!(s, "dynamic     {d}: runs");
        }
        let _ = writeln!(
            s,
            "verified    daemon loader max |diff| {:.2e}; {}{}",
            self.max_abs_diff_daemon,
            self.onnxruntime,
            self.max_abs_diff_onnxruntime
                .map_or(String::new(), |d| format!(" max |diff| {d:.2e}"))
        );
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
