//! Reading and writing ONNX `ModelProto`s: the pure reader and helpers are
//! `dai-onnx` (re-exported here, so `proto::f32_tensor` and friends read as
//! before); this module adds the file I/O and the hand-over to tract.
//!
//! Everything that rewrites a graph (quantize, prune, export) goes through
//! these helpers so the files it writes stay standard ONNX that both tract
//! and onnxruntime load.

use crate::ToolError;
pub use dai_onnx::*;
use prost::Message;
use std::path::Path;

/// Read and decode an ONNX file.
pub fn load(path: &Path) -> Result<pb::ModelProto, ToolError> {
    let bytes =
        std::fs::read(path).map_err(|e| ToolError::Io(format!("{}: {e}", path.display())))?;
    decode(&bytes, &path.display().to_string())
}

/// Decode ONNX bytes; `what` names the source in errors.
pub fn decode(bytes: &[u8], what: &str) -> Result<pb::ModelProto, ToolError> {
    dai_onnx::decode(bytes).map_err(|e| ToolError::Data {
        path: what.to_string(),
        message: e.to_string(),
    })
}

/// Write `model` to `path` (atomically: a temporary file, then rename).
pub fn save(model: &pb::ModelProto, path: &Path) -> Result<u64, ToolError> {
    let bytes = model.encode_to_vec();
    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, &bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| ToolError::Io(format!("writing {}: {e}", path.display())))?;
    Ok(bytes.len() as u64)
}

/// `model` as tract's own protobuf type, through its bytes: the two are
/// the same schema, and tract parses graphs only from its type.
pub fn to_tract(model: &pb::ModelProto) -> Result<tract_onnx::pb::ModelProto, ToolError> {
    tract_onnx::pb::ModelProto::decode(model.encode_to_vec().as_slice())
        .map_err(|e| ToolError::Runtime(format!("tract cannot read the model's protobuf: {e}")))
}
