//! `dai-protocol`: the one wire contract between `dai-edge` and `dai-cloud`.
//!
//! No I/O here: both ends build and parse the same bytes with this crate.
//! - [`topics`]: `dai/v1/{fleet}/dev/{device}/update|ack|status` and
//!   `dai/v1/{fleet}/model/{model}/global`, builders and a parser;
//! - [`update`]: an edge's head delta: safetensors (tensors + `__metadata__`:
//!   device, model, base_version, update_id, sample_count, loss, encoding)
//!   compressed with zstd; encodings `f32`, `f16` and `int8` (per-row scale);
//! - [`base`]: an update's `base_version` label (which global, which
//!   aggregator epoch) and the (epoch, version) order of globals;
//! - [`dp`]: the Rényi-DP accountant of the Gaussian mechanism (central DP
//!   at the aggregator, local DP on the edge) and Gaussian samples;
//! - [`feedback`]: error feedback for lossy encodings (what one update
//!   dropped is added to a later one);
//! - [`global`]: a global head signed with ed25519 by the aggregator over
//!   fleet, model, version and epoch;
//! - [`signed`]: the signed envelope of updates (device key) and acks
//!   (aggregator key), bound to fleet and topic;
//! - [`bundle`]: model bundles sent to devices: the aggregator's signed
//!   offer (size, sha256, one sha256 per chunk, targets), a device's fetch
//!   of chunks, the chunks, a device's report (downloading, verified,
//!   loaded, failed);
//! - [`partial`]: a tier's partial aggregate (weighted sums, total
//!   weight, the contributors' update ids and devices), what intermediate
//!   aggregators send upstream;
//! - [`messages`]: the JSON ack, status heartbeat and global request;
//! - [`limits`]: the largest payload of each topic and which may be
//!   retained (what the brokers' front doors enforce);
//! - [`crashpoint`]: named points where the fault-injection tests make a
//!   process abort (inert unless `DAI_CRASH_POINT` is set).
//!
//! Every decoder takes a size bound and returns a [`ProtocolError`] that
//! says what was wrong; nothing here panics on input.

pub mod base;
pub mod bundle;
pub mod crashpoint;
pub mod dp;
pub mod feedback;
pub mod global;
pub mod limits;
pub mod messages;
pub mod partial;
pub mod signed;
pub mod topics;
pub mod update;

/// Why bytes or a topic were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("topic {topic:?}: {reason}")]
    Topic { topic: String, reason: String },
    #[error("payload of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("not zstd data: {0}")]
    Compression(String),
    #[error("not a safetensors file: {0}")]
    Format(String),
    #[error("metadata: {0}")]
    Metadata(String),
    #[error("tensor {name}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("signature: {0}")]
    Signature(String),
    #[error("checksum: {0}")]
    Checksum(String),
}

/// Decompress zstd `bytes`, refusing more than `limit` bytes of output.
pub fn decompress(bytes: &[u8], limit: usize) -> Result<Vec<u8>, ProtocolError> {
    use std::io::Read;
    let decoder = zstd::stream::read::Decoder::new(bytes)
        .map_err(|e| ProtocolError::Compression(e.to_string()))?;
    let mut out = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ProtocolError::Compression(e.to_string()))?;
    if out.len() > limit {
        return Err(ProtocolError::TooLarge {
            size: out.len(),
            limit,
        });
    }
    Ok(out)
}

/// zstd at the given level (3 is zstd's default).
pub fn compress(bytes: &[u8], level: i32) -> Vec<u8> {
    // Writing into a Vec cannot fail; an empty result would only come from
    // an allocation failure, which aborts anyway.
    zstd::stream::encode_all(bytes, level).unwrap_or_default()
}
