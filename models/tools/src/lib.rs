//! `dai-models`: tools that make and convert model bundles.
//!
//! Layout:
//! - [`digits`]: the UCI digits data set shipped in `models/data`;
//! - [`onnx`]: writes dense layers as a standard ONNX graph (Mul for input
//!   scaling, Gemm + activation per layer) with tract's protobuf types;
//! - [`train_digits`]: trains the MLP with the same trainer the daemon uses,
//!   exports the first layers as `backbone.onnx` and the rest as
//!   `head.safetensors`, verifies the export in tract, and writes the
//!   `digits` bundle with its test accuracy;
//! - [`make_bundle`]: `dai-models bundle`, any ONNX file -> a served
//!   bundle whose output shapes and batching flags were measured in tract
//!   and checked through the daemon's loader (and [`ort`], onnxruntime);
//!   [`head_split`] cuts a model at a tensor into backbone + trainable head
//!   for `bundle --head`;
//! - [`inspect`]: `dai-models inspect`, what a file holds, whether tract
//!   runs it, and ([`profile`]) where its time goes node by node;
//! - [`train_imu`]: the sensor model (`imu-anomaly`) from simulated IMU
//!   windows and the daemon's own window features.

pub mod bundle_io;
pub mod calib;
pub mod digits;
pub mod export;
pub mod head_split;
pub mod inspect;
pub mod make_bundle;
pub mod onnx;
pub mod ort;
pub mod profile;
pub mod progress;
pub mod proto;
pub mod prune;
pub mod quantize;
pub mod runner;
pub mod shard;
pub mod train_digits;
pub mod train_imu;
pub mod validation_set;
pub mod variants;

/// Tool errors.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{path}: {message}")]
    Data { path: String, message: String },
    #[error("cannot export: {0}")]
    Export(String),
    #[error(transparent)]
    Train(#[from] dai_train::TrainError),
    /// Head spec and file errors, which dai-train now reports as
    /// `dai_head::HeadError` (shown as before, through `TrainError::Head`).
    #[error(transparent)]
    Head(#[from] dai_train::HeadError),
    #[error("{0}")]
    Io(String),
    #[error("verification failed: {0}")]
    Verify(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Runtime(String),
    #[error("refused: {0}")]
    Refused(String),
}
