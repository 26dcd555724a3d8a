//! `dai-head`: the trainable head as a format, shared by serving
//! (`dai-infer`), training (`dai-train`), the wire (`dai-protocol`: deltas
//! of a head) and the cloud (`dai-cloud`), so none of them links the trainer
//! for a file format.
//!
//! Layout:
//! - [`spec`]: the architecture ([`HeadSpec`]: dense [`LayerSpec`]s with an
//!   [`Activation`] each, and a [`Loss`]);
//! - [`params`]: weights and biases ([`Params`]) and the [`Head`];
//! - [`layout`]: the `layers.{i}.weight|bias` names and shapes, the one
//!   place they are written;
//! - [`file`]: `head.safetensors` (architecture in `__metadata__`);
//! - [`forward`]: the CPU forward pass ([`predict`]), whose sgemm the
//!   trainer's CPU backend reuses;
//! - [`rng`]: the workspace's seeded [`Rng`];
//! - [`rows`]: labelled head-input rows in a file (`validation.safetensors`)
//!   and the accuracy of a head on them.

pub mod file;
pub mod forward;
pub mod layout;
pub mod params;
pub mod rng;
pub mod rows;
pub mod spec;

pub use forward::predict;
pub use params::{Head, Params};
pub use rng::Rng;
pub use spec::{Activation, HeadSpec, LayerSpec, Loss};

/// What can be wrong with a head or its file.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("invalid head: {0}")]
    Spec(String),
    #[error("bad head file: {0}")]
    Format(String),
    #[error("head file {}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("bad head input: {0}")]
    Data(String),
}
