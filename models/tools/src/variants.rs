//! Listing an optimised model file as a variant of its bundle: a
//! `[[variants]]` table appended to `manifest.toml` (kind, file, sha256 and
//! the verification figures), which the daemon uses when its config prefers
//! that kind. The manifest is edited as text so its comments survive; the
//! result is parsed again before it replaces the old file.

use crate::ToolError;
use crate::quantize::QuantReport;
use dai_infer::bundle::{Bundle, sha256_file};
use std::fmt::Write;
use std::path::Path;

/// Add (or with `force`, replace) the variant `kind` -> `file` in `dir`'s manifest.
pub fn record(
    dir: &Path,
    kind: &str,
    file: &str,
    report: &QuantReport,
    force: bool,
) -> Result<(), ToolError> {
    let mut metrics = vec![
        ("size_ratio", report.size_ratio),
        ("bytes", report.bytes_after as f64),
    ];
    if let Some(o) = report
        .outputs
        .iter()
        .map(|o| o.max_abs_diff)
        .reduce(f32::max)
    {
        metrics.push(("max_abs_diff", o as f64));
    }
    if let Some(a) = report.accuracy_quantized {
        metrics.push(("accuracy", a));
    }
    if let Some(s) = report.speedup {
        metrics.push(("tract_speedup", s));
    }
    record_metrics(dir, kind, file, &metrics, force)
}

pub fn record_metrics(
    dir: &Path,
    kind: &str,
    file: &str,
    metrics: &[(&str, f64)],
    force: bool,
) -> Result<(), ToolError> {
    let path = Bundle::manifest_path(dir);
    let io = |e: std::io::Error| ToolError::Io(format!("{}: {e}", path.display()));
    let text = std::fs::read_to_string(&path).map_err(io)?;
    let manifest = Bundle::read_manifest(dir).map_err(|e| ToolError::Data {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let exists = manifest.variants.iter().any(|v| v.kind == kind);
    if exists && !force {
        return Err(ToolError::Data {
            path: path.display().to_string(),
            message: format!("already lists a {kind:?} variant; pass --force to replace it"),
        });
    }
    let text = if exists {
        remove_variant(&text, kind)
    } else {
        text
    };
    let (sha, _) = sha256_file(&dir.join(file)).map_err(|e| ToolError::Io(e.to_string()))?;
    let mut block = String::new();
    let _ = writeln!(
        block,
        "\n# Made by dai-models quantize; verified in tract before it was written."
    );
    let _ = writeln!(block, "[[variants]]");
    let _ = writeln!(block, "kind = {kind:?}");
    let _ = writeln!(block, "file = {file:?}");
    let _ = writeln!(block, "sha256 = {sha:?}");
    let m: Vec<String> = metrics
        .iter()
        .map(|(k, v)| format!("{k} = {v:.6}"))
        .collect();
    let _ = writeln!(block, "metrics = {{ {} }}", m.join(", "));
    let new_text = format!("{}\n{}", text.trim_end(), block);
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, &new_text).map_err(io)?;
    // Parse the edited manifest from a scratch copy before replacing.
    let check: Result<dai_infer::Manifest, _> = toml_check(&new_text);
    if let Err(e) = check {
        let _ = std::fs::remove_file(&tmp);
        return Err(ToolError::Data {
            path: path.display().to_string(),
            message: format!("the edited manifest does not parse ({e}); left unchanged"),
        });
    }
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(())
}

fn toml_check(text: &str) -> Result<dai_infer::Manifest, String> {
    dai_infer::bundle::parse_manifest(text)
}

/// The manifest text without the `[[variants]]` table of `kind` (and its
/// comment line made by this tool).
fn remove_variant(text: &str, kind: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "[[variants]]" {
            let end = (i + 1..lines.len())
                .find(|&j| lines[j].trim_start().starts_with('['))
                .unwrap_or(lines.len());
            let is_kind = lines[i + 1..end]
                .iter()
                .any(|l| l.replace(' ', "") == format!("kind={kind:?}"));
            if is_kind {
                if out
                    .last()
                    .is_some_and(|l| l.starts_with("# Made by dai-models"))
                {
                    out.pop();
                }
                // Drop trailing comment/blank lines that belong to the next table.
                let mut stop = end;
                while stop > i + 1
                    && (lines[stop - 1].trim().is_empty()
                        || lines[stop - 1].starts_with("# Made by dai-models"))
                {
                    stop -= 1;
                }
                i = stop;
                continue;
            }
        }
        out.push(lines[i]);
        i += 1;
    }
    out.join("\n") + "\n"
}
