//! `dai-infer`: the edge inference runtime on tract-onnx.
//!
//! Layout:
//! - [`bundle`]: model bundles (`manifest.toml` + ONNX), parsing and checksums;
//! - [`fetch`]: pinned, checksummed download of zoo models from PyPI wheels;
//! - [`tensor`]: the API's tensor value ([`TensorData`]);
//! - [`model`]: one bundle loaded into tract, with per-batch-size plans;
//! - [`cache`]: the byte-bounded result cache (LRU / LFU / FIFO);
//! - [`pool`]: worker threads, load balancing, dynamic batching, bounded queues;
//! - [`runtime`]: the registry of models and [`Runtime::infer`], which ties
//!   the others together. The daemon (`dai-edge`) only talks to [`Runtime`].

pub mod bundle;
pub mod cache;
pub mod fetch;
pub mod model;
pub mod options;
pub mod pool;
pub mod runtime;
pub mod tensor;

pub use bundle::{Bundle, BundleError, Manifest, TensorSpec};
pub use model::{LoadedModel, ModelError};
pub use options::{CacheOptions, EvictionPolicy, LoadBalancingStrategy, RuntimeOptions};
pub use runtime::{InferError, InferOutcome, LoadEvent, ModelInfo, Runtime};
pub use tensor::{DType, Data, TensorData};
