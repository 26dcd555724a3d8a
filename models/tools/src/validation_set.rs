//! `dai-models validation-set`: labelled head-input rows for a bundle
//! (`dai_head::rows`): each example of a CSV run through the bundle's
//! backbone, its head input kept with its label. The file serves twice:
//! shipped in the bundle (`--into-bundle`: `validation.safetensors` and
//! `[head.validation]` in the manifest), the edge will not accept a local
//! run that loses accuracy on it, which label-flipped posts cannot game;
//! given to `dai-cloud run --validation MODEL=FILE`, the aggregator scores
//! every candidate global on it.
//!
//! The CSV (optionally gzip-compressed): one example per line, the model
//! input's values for one row, then the integer label.

use crate::ToolError;
use dai_infer::bundle::Bundle;
use dai_infer::model::LoadedModel;
use dai_infer::tensor::{Data, TensorData};
use dai_train::head::rows::Rows;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Which examples of the CSV become rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    All,
    /// The class-balanced test split `dai-models train` uses (`fraction`
    /// of each class, shuffled with `seed`): rows the shipped head was not
    /// trained on.
    Test {
        fraction: f64,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Options {
    pub bundle: PathBuf,
    pub data: PathBuf,
    pub split: Split,
    /// Write here; with `into_bundle` and no `out`, the bundle's
    /// `validation.safetensors`.
    pub out: Option<PathBuf>,
    pub into_bundle: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Report {
    pub path: PathBuf,
    pub rows: usize,
    pub features: usize,
    /// The shipped head's accuracy on the rows.
    pub head_accuracy: Option<f64>,
}

fn data_err(path: &Path, message: String) -> ToolError {
    ToolError::Data {
        path: path.display().to_string(),
        message,
    }
}

/// (row values, label) per CSV line; `width` values per row.
pub fn read_csv(path: &Path, width: usize) -> Result<Vec<(Vec<f32>, u32)>, ToolError> {
    let bytes = std::fs::read(path).map_err(|e| data_err(path, e.to_string()))?;
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut t = String::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_string(&mut t)
            .map_err(|e| data_err(path, format!("not gzip text: {e}")))?;
        t
    } else {
        String::from_utf8(bytes).map_err(|_| data_err(path, "not UTF-8 text".into()))?
    };
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<f64> = line
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|e| data_err(path, format!("line {}: {e}", n + 1)))?;
        if vals.len() != width + 1 {
            return Err(data_err(
                path,
                format!(
                    "line {}: {} columns, expected {} (the input's {width} values, then the label)",
                    n + 1,
                    vals.len(),
                    width + 1
                ),
            ));
        }
        let label = vals[width];
        if label < 0.0 || label.fract() != 0.0 || label > f64::from(u32::MAX) {
            return Err(data_err(
                path,
                format!("line {}: label {label} is not a class number", n + 1),
            ));
        }
        out.push((
            vals[..width].iter().map(|&v| v as f32).collect(),
            label as u32,
        ));
    }
    if out.is_empty() {
        return Err(data_err(path, "no rows".into()));
    }
    Ok(out)
}

pub fn run(o: &Options) -> Result<Report, ToolError> {
    let bundle = Bundle::open(&o.bundle).map_err(|e| data_err(&o.bundle, e.to_string()))?;
    let manifest = bundle.manifest.clone();
    let head = manifest
        .head
        .clone()
        .ok_or_else(|| data_err(&o.bundle, "the bundle has no [head]".into()))?;
    let [input] = manifest.inputs.as_slice() else {
        return Err(ToolError::Unsupported(format!(
            "{} inputs; validation rows need a bundle with one",
            manifest.inputs.len()
        )));
    };
    let width = input.row_elems();
    let out_index = manifest
        .outputs
        .iter()
        .position(|s| s.name == head.input)
        .ok_or_else(|| {
            data_err(
                &o.bundle,
                format!("no output {:?} for the head", head.input),
            )
        })?;
    let examples = read_csv(&o.data, width)?;
    let chosen: Vec<usize> = match o.split {
        Split::All => (0..examples.len()).collect(),
        Split::Test { fraction, seed } => {
            let labels: Vec<u32> = examples.iter().map(|e| e.1).collect();
            crate::digits::split_labels(&labels, fraction, seed).1
        }
    };
    let model = LoadedModel::load(bundle, 64).map_err(|e| ToolError::Runtime(e.to_string()))?;
    let mut x = Vec::new();
    let mut labels = Vec::new();
    let mut features = 0;
    for chunk in chosen.chunks(64) {
        let values: Vec<f32> = chunk.iter().flat_map(|&i| examples[i].0.clone()).collect();
        let mut shape = vec![chunk.len()];
        shape.extend(input.shape.iter().skip(1).map(|d| d.max(&1)).copied());
        let t = TensorData::new(shape, Data::F32(values))
            .map_err(|e| ToolError::Runtime(e.to_string()))?;
        let outs = model
            .run(&[&t], chunk.len())
            .map_err(|e| ToolError::Runtime(e.to_string()))?;
        let Data::F32(e) = &outs[out_index].data else {
            return Err(ToolError::Unsupported(format!(
                "output {:?} is not f32",
                head.input
            )));
        };
        features = e.len() / chunk.len();
        x.extend_from_slice(e);
        labels.extend(chunk.iter().map(|&i| examples[i].1));
    }
    let rows = Rows {
        x,
        features,
        labels,
    };
    let head_accuracy = match &model.shipped_head {
        Some(h) => Some(rows.accuracy(h).map_err(ToolError::Verify)?),
        None => None,
    };
    let bytes = rows.to_bytes().map_err(ToolError::Io)?;
    let path = match (&o.out, o.into_bundle) {
        (Some(p), _) => p.clone(),
        (None, true) => o.bundle.join("validation.safetensors"),
        (None, false) => {
            return Err(ToolError::Refused(
                "say where: -o FILE, or --into-bundle".into(),
            ));
        }
    };
    crate::train_digits::write(&path, &bytes)?;
    if o.into_bundle {
        add_to_manifest(&o.bundle, &path, &bytes)?;
    }
    Ok(Report {
        path,
        rows: rows.labels.len(),
        features,
        head_accuracy,
    })
}

/// `[head.validation]` in the bundle's manifest, naming `file` (inside the
/// bundle) and its sha256; the text around it (comments) is kept.
fn add_to_manifest(dir: &Path, file: &Path, bytes: &[u8]) -> Result<(), ToolError> {
    let name = file
        .strip_prefix(dir)
        .ok()
        .and_then(|p| p.to_str())
        .ok_or_else(|| ToolError::Refused("--into-bundle writes inside the bundle".into()))?
        .to_string();
    let mpath = Bundle::manifest_path(dir);
    let text = std::fs::read_to_string(&mpath).map_err(|e| data_err(&mpath, e.to_string()))?;
    // Drop an earlier [head.validation] table (up to the next table).
    let mut kept = Vec::new();
    let mut skipping = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            skipping = t == "[head.validation]";
        }
        if !skipping {
            kept.push(line);
        }
    }
    let mut out = kept.join("\n").trim_end().to_string();
    out.push_str(&format!(
        "\n\n[head.validation]\nfile = \"{name}\"\nsha256 = \"{}\"\n",
        crate::train_digits::sha256(bytes)
    ));
    dai_infer::bundle::parse_manifest(&out).map_err(|e| data_err(&mpath, e))?;
    crate::train_digits::write(&mpath, out.as_bytes())
}
