//! `dai-cloud`: the federated aggregator (library part).
//!
//! The pure logic, in this file:
//! - [`validate`]: an update decoded by `dai-protocol` is checked against the
//!   model's tensor layout (names, shapes), for finite values, a norm bound,
//!   staleness of its base version and duplicate ids, and becomes a
//!   [`Contribution`] or a [`Rejection`] with the reason the ack carries;
//! - [`combine`]: clipping (fixed or adaptive) and combining a round
//!   (weighted mean, weighted trimmed mean, median), with the robust
//!   defaults; [`staleness_weight`] for buffered asynchronous aggregation
//!   (FedBuff);
//! - [`dp`]: central differential privacy: the Rényi-DP accountant and
//!   Gaussian noise;
//! - [`validation`]: server-side validation sets that every candidate
//!   global is scored on before it is published (`--validation`);
//! - [`FedAdam`]: the server optimiser applied to the aggregated delta.
//!
//! Around it:
//! - [`state`]: durable SQLite state — seen ids, the pending buffer and the
//!   registry of global versions; ingest and aggregation are transactions,
//!   so duplicates count once and a restart continues where it stopped;
//! - [`auth`]: the enrolled devices' keys and the end-to-end check of an
//!   update (signed by the device its topic names, for this fleet);
//! - [`intake`]: the service's sans-IO core — MQTT publishes and timer
//!   ticks in; acks, signed globals and monitor events out;
//! - [`service`]: the I/O loop around the intake — an embedded rumqttd
//!   broker or an external one, one task owning the rumqttc event loop;
//! - [`gate`]: the embedded broker's mutual-TLS front and topic ACL
//!   ([`gate::acl`], pure);
//! - [`secure`]: a secure service from a fleet directory (identities,
//!   the gated broker);
//! - [`monitor`] and [`http`]: metrics, the status page, `/api/status`
//!   and `/api/models`;
//! - [`publish`]: bundles offered to the fleet (`models publish`), stored
//!   with their chunks in the state file; the intake signs the offers,
//!   serves the chunks and records the devices' reports.
//!
//! The `dai-cloud` binary (`src/main.rs`, `src/cli.rs`): `keygen`, `run`,
//! `models list|promote|rollback|publish|bundles`, `fleet`, `devices`.

use dai_protocol::update::Update;

pub mod auth;
pub mod combine;
pub use combine::{Aggregation, Clip, Robust, aggregate};
/// The DP accountant lives in `dai-protocol`: the edge's local DP
/// accounts with it too.
pub use dai_protocol::dp;
pub mod gate;
pub mod http;
pub mod intake;
pub mod monitor;
pub mod publish;
pub mod secure;
pub mod service;
pub mod state;
pub mod upstream;
pub mod validation;

/// `e` and its sources, `outer: inner: innermost` (anyhow's `{:#}`), for
/// the places that print a library error without anyhow: each error says
/// only its own part, so `to_string()` alone would drop the cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The tensors a model's head has, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLayout {
    pub model: String,
    pub tensors: Vec<(String, Vec<usize>)>,
}

/// A validated update, tensors in layout order.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub update_id: String,
    pub device: String,
    pub base_version: u64,
    pub sample_count: u64,
    pub tensors: Vec<Vec<f32>>,
}

/// Why an update was refused (sent back in the ack).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("unknown model {0:?}")]
    UnknownModel(String),
    #[error("tensor layout differs: {0}")]
    Layout(String),
    #[error("base version {0:?} is not a global version of this model")]
    BadBase(String),
    #[error("base version {base} is {staleness} versions behind {current} (max_staleness {max})")]
    Stale {
        base: u64,
        current: u64,
        staleness: u64,
        max: u64,
    },
    #[error("base version {base} is newer than the current global version {current}")]
    FromTheFuture { base: u64, current: u64 },
    #[error("base is global {base} of epoch {epoch}, but this aggregator's epoch is {current}")]
    OtherEpoch { base: u64, epoch: u64, current: u64 },
    #[error("update norm {norm:.4} exceeds the bound {bound}")]
    NormTooLarge { norm: f64, bound: f64 },
    #[error("sample_count must be at least 1")]
    NoSamples,
    #[error("update id {0:?} was already received")]
    Duplicate(String),
    /// A tier's partial aggregate that cannot be counted as it is.
    #[error("partial aggregate refused: {0}")]
    Tier(String),
}

impl Rejection {
    /// Whether the ack says `rebase` rather than `rejected`: the update's
    /// base is not a global of this version line (another epoch, or a
    /// version this state never made: the aggregator lost its state), so
    /// the edge must start again from the current global.
    pub fn is_rebase(&self) -> bool {
        matches!(
            self,
            Rejection::FromTheFuture { .. } | Rejection::OtherEpoch { .. }
        )
    }
}

/// Limits applied to every update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub current_version: u64,
    /// The aggregator's epoch: a base label of another epoch is refused
    /// with a rebase ([`dai_protocol::base`]).
    pub epoch: u64,
    pub max_staleness: u64,
    /// Updates with a larger L2 norm are rejected (clipping happens later).
    pub reject_norm: f64,
}

/// Check `update` against `layout` and `limits`. `base_of` maps the
/// update's `base_version` string to a global version; `seen` tells
/// whether an update id was already received.
pub fn validate(
    update: &Update,
    layout: &ModelLayout,
    limits: &Limits,
    base_of: impl Fn(&str) -> Option<u64>,
    seen: impl Fn(&str) -> bool,
) -> Result<Contribution, Rejection> {
    let m = &update.meta;
    if m.model != layout.model {
        return Err(Rejection::UnknownModel(m.model.clone()));
    }
    if seen(&m.update_id) {
        return Err(Rejection::Duplicate(m.update_id.clone()));
    }
    if m.sample_count == 0 {
        return Err(Rejection::NoSamples);
    }
    let base =
        base_of(&m.base_version).ok_or_else(|| Rejection::BadBase(m.base_version.clone()))?;
    if let Some(epoch) = dai_protocol::base::parse(&m.base_version).and_then(|b| b.epoch)
        && epoch != limits.epoch
    {
        return Err(Rejection::OtherEpoch {
            base,
            epoch,
            current: limits.epoch,
        });
    }
    if base > limits.current_version {
        return Err(Rejection::FromTheFuture {
            base,
            current: limits.current_version,
        });
    }
    let staleness = limits.current_version - base;
    if staleness > limits.max_staleness {
        return Err(Rejection::Stale {
            base,
            current: limits.current_version,
            staleness,
            max: limits.max_staleness,
        });
    }
    let mut tensors = Vec::with_capacity(layout.tensors.len());
    for (name, shape) in &layout.tensors {
        let t = update
            .tensors
            .iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| Rejection::Layout(format!("missing tensor {name}")))?;
        if &t.shape != shape {
            return Err(Rejection::Layout(format!(
                "{name}: shape {:?}, expected {shape:?}",
                t.shape
            )));
        }
        tensors.push(t.values.clone());
    }
    if update.tensors.len() != layout.tensors.len() {
        return Err(Rejection::Layout(format!(
            "{} tensors, expected {}",
            update.tensors.len(),
            layout.tensors.len()
        )));
    }
    // The protocol decoder already refused non-finite values.
    let norm = norm(&tensors);
    if norm > limits.reject_norm {
        return Err(Rejection::NormTooLarge {
            norm,
            bound: limits.reject_norm,
        });
    }
    Ok(Contribution {
        update_id: m.update_id.clone(),
        device: m.device.clone(),
        base_version: base,
        sample_count: m.sample_count,
        tensors,
    })
}

/// L2 norm over all tensors.
pub fn norm(tensors: &[Vec<f32>]) -> f64 {
    tensors
        .iter()
        .flat_map(|t| t.iter())
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// FedBuff's staleness discount: `1 / sqrt(1 + staleness)`.
pub fn staleness_weight(staleness: u64) -> f64 {
    1.0 / (1.0 + staleness as f64).sqrt()
}

/// FedAdam (Reddi et al., "Adaptive Federated Optimization"): the
/// aggregated delta is treated as a pseudo-gradient step direction.
#[derive(Debug, Clone)]
pub struct FedAdam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// Adaptivity (tau in the paper).
    pub tau: f32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl FedAdam {
    pub fn new(lr: f32, beta1: f32, beta2: f32, tau: f32) -> FedAdam {
        FedAdam {
            lr,
            beta1,
            beta2,
            tau,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// `global += lr * m / (sqrt(v) + tau)` with `m`, `v` tracking `delta`.
    pub fn apply(&mut self, global: &mut [Vec<f32>], delta: &[Vec<f32>]) {
        if self.m.len() != delta.len() {
            self.m = delta.iter().map(|d| vec![0.0; d.len()]).collect();
            self.v = delta.iter().map(|d| vec![0.0; d.len()]).collect();
        }
        for (t, d) in delta.iter().enumerate() {
            for (i, &g) in d.iter().enumerate() {
                let m = self.beta1 * self.m[t][i] + (1.0 - self.beta1) * g;
                let v = self.beta2 * self.v[t][i] + (1.0 - self.beta2) * g * g;
                self.m[t][i] = m;
                self.v[t][i] = v;
                global[t][i] += self.lr * m / (v.sqrt() + self.tau);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dai_protocol::update::{Encoding, Tensor, UpdateMeta};

    fn layout() -> ModelLayout {
        ModelLayout {
            model: "digits".into(),
            tensors: vec![("b".into(), vec![2]), ("w".into(), vec![2, 2])],
        }
    }

    fn update(id: &str, base: &str, samples: u64, w: [f32; 4], b: [f32; 2]) -> Update {
        Update {
            meta: UpdateMeta {
                device: "d".into(),
                model: "digits".into(),
                base_version: base.into(),
                update_id: id.into(),
                sample_count: samples,
                loss: 0.1,
                encoding: Encoding::F32,
            },
            tensors: vec![
                Tensor {
                    name: "w".into(),
                    shape: vec![2, 2],
                    values: w.to_vec(),
                },
                Tensor {
                    name: "b".into(),
                    shape: vec![2],
                    values: b.to_vec(),
                },
            ],
        }
    }

    const LIMITS: Limits = Limits {
        current_version: 5,
        epoch: 77,
        max_staleness: 2,
        reject_norm: 100.0,
    };

    fn ok(u: &Update) -> Result<Contribution, Rejection> {
        validate(u, &layout(), &LIMITS, |b| b.parse().ok(), |id| id == "seen")
    }

    #[test]
    fn validation_accepts_good_and_names_each_problem() {
        let c = ok(&update("u1", "4", 10, [1.0, 2.0, 3.0, 4.0], [0.5, 0.5])).expect("ok");
        assert_eq!(
            c.tensors,
            vec![vec![0.5, 0.5], vec![1.0, 2.0, 3.0, 4.0]],
            "layout order"
        );
        assert_eq!(
            ok(&update("seen", "5", 1, [0.0; 4], [0.0; 2])),
            Err(Rejection::Duplicate("seen".into()))
        );
        assert!(matches!(
            ok(&update("u", "1", 1, [0.0; 4], [0.0; 2])),
            Err(Rejection::Stale { staleness: 4, .. })
        ));
        assert!(matches!(
            ok(&update("u", "9", 1, [0.0; 4], [0.0; 2])),
            Err(Rejection::FromTheFuture { .. })
        ));
        assert!(matches!(
            ok(&update("u", "x", 1, [0.0; 4], [0.0; 2])),
            Err(Rejection::BadBase(_))
        ));
        // A base of another epoch: a rebase, not a plain rejection; this
        // epoch's labels pass.
        let other = validate(
            &update("u", "1.0+g5@e76", 1, [0.0; 4], [0.0; 2]),
            &layout(),
            &LIMITS,
            |b| dai_protocol::base::parse(b).map(|b| b.version),
            |_| false,
        );
        assert!(
            matches!(other, Err(ref r @ Rejection::OtherEpoch { epoch: 76, current: 77, .. }) if r.is_rebase()),
            "{other:?}"
        );
        assert!(
            validate(
                &update("u", "1.0+g5@e77", 1, [0.0; 4], [0.0; 2]),
                &layout(),
                &LIMITS,
                |b| dai_protocol::base::parse(b).map(|b| b.version),
                |_| false,
            )
            .is_ok()
        );
        assert!(matches!(
            ok(&update("u", "5", 0, [0.0; 4], [0.0; 2])),
            Err(Rejection::NoSamples)
        ));
        assert!(matches!(
            ok(&update("u", "5", 1, [100.0; 4], [0.0; 2])),
            Err(Rejection::NormTooLarge { .. })
        ));
        let mut wrong = update("u", "5", 1, [0.0; 4], [0.0; 2]);
        wrong.tensors[0].shape = vec![4];
        assert!(matches!(ok(&wrong), Err(Rejection::Layout(_))));
        let mut other = update("u", "5", 1, [0.0; 4], [0.0; 2]);
        other.meta.model = "cats".into();
        assert!(matches!(ok(&other), Err(Rejection::UnknownModel(_))));
    }

    #[test]
    fn staleness_discount_and_fedadam_move_toward_the_delta() {
        assert_eq!(staleness_weight(0), 1.0);
        assert!((staleness_weight(3) - 0.5).abs() < 1e-12);
        let mut g = vec![vec![0.0f32; 2]];
        let mut opt = FedAdam::new(0.1, 0.9, 0.99, 1e-3);
        for _ in 0..3 {
            opt.apply(&mut g, &[vec![1.0, -1.0]]);
        }
        assert!(g[0][0] > 0.0 && g[0][1] < 0.0, "{g:?}");
    }
}
