//! Running a model in onnxruntime (through Python) on given inputs, for the
//! reference checks of `dai-models bundle --check-ort`: every output's shape
//! and values come back, so they can be compared with tract's.

use std::io::Write;
use std::path::Path;

/// One input as onnxruntime gets it: ONNX name, our dtype name, shape, values.
pub struct OrtInput<'a> {
    pub onnx_name: &'a str,
    pub dtype: &'a str,
    pub shape: &'a [usize],
    pub values: &'a [f32],
}

/// One output as onnxruntime returned it.
#[derive(Debug, Clone)]
pub struct OrtOutput {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

const SCRIPT: &str = r#"
import json, sys
try:
    import numpy as np, onnxruntime as ort
except ImportError as e:
    print(json.dumps({"error": f"python has no {e.name}"})); sys.exit(0)
job = json.load(sys.stdin)
s = ort.InferenceSession(job["file"], providers=["CPUExecutionProvider"])
types = {"f32": np.float32, "i64": np.int64, "i32": np.int32, "u8": np.uint8, "i8": np.int8}
feed = {i["onnx_name"]: np.array(i["values"]).astype(types[i["dtype"]]).reshape(i["shape"])
        for i in job["inputs"]}
names = [o.name for o in s.get_outputs()]
outs = s.run(names, feed)
print(json.dumps({"version": ort.__version__, "outputs": [
    {"name": n, "shape": list(o.shape), "values": o.astype(np.float32).reshape(-1).tolist()}
    for n, o in zip(names, outs)]}))
"#;

/// Run `file` in onnxruntime on `inputs`. `Err` says why it could not run
/// (no Python, no onnxruntime, onnxruntime refused the model).
pub fn run(
    python: &str,
    file: &Path,
    inputs: &[OrtInput<'_>],
) -> Result<(String, Vec<OrtOutput>), String> {
    let job = serde_json::json!({
        "file": file.display().to_string(),
        "inputs": inputs.iter().map(|i| serde_json::json!({
            "onnx_name": i.onnx_name, "dtype": i.dtype, "shape": i.shape, "values": i.values,
        })).collect::<Vec<_>>(),
    });
    let v = python_json(python, SCRIPT, &job)?;
    let version = v
        .get("version")
        .and_then(|s| s.as_str())
        .unwrap_or("?")
        .to_string();
    let outputs = v
        .get("outputs")
        .and_then(|o| o.as_array())
        .ok_or("unexpected answer from python")?
        .iter()
        .map(|o| OrtOutput {
            name: o["name"].as_str().unwrap_or_default().to_string(),
            shape: o["shape"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_u64())
                        .map(|d| d as usize)
                        .collect()
                })
                .unwrap_or_default(),
            values: o["values"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    Ok((version, outputs))
}

/// Run `script` in `python` with `job` as JSON on stdin and parse the one
/// JSON value it prints; `{"error": ...}` (e.g. a missing module) becomes
/// `Err` with its text, as does failing to run Python at all.
pub fn python_json(
    python: &str,
    script: &str,
    job: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let mut child = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(job.to_string().as_bytes())
            .map_err(|e| format!("writing to {python}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{python}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).map_err(|_| {
        format!(
            "{python} gave no result ({})",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no output")
        )
    })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(e.to_string());
    }
    Ok(v)
}
