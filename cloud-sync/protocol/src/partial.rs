//! A partial aggregate: what an intermediate tier (`dai-cloud --role
//! site|intake`) sends upstream in place of a global. It is the tier's
//! folded round: the weighted sum of its devices' deltas, their total
//! weight, the base they were trained on, and who contributed (update id
//! and device of each), so the root can count every device once however
//! many tiers a delta crossed.
//!
//! Wire form (the body of a [`crate::signed`] envelope of kind
//! `Partial`, signed by the tier's enrolled key, on
//! `dai/v1/{fleet}/dev/{tier}/partial`):
//!
//! ```text
//! u32 LE header length | header JSON | update
//! header: {"weight": W, "votes": N, "contributors": [[update_id, device], ...]}
//! ```
//!
//! `update` is an ordinary [`Update`] (f32) whose metadata carries the
//! tier as `device`, the partial's id as `update_id`, the common base and
//! the samples claimed in total; its tensors are the weighted sums
//! `sum_i w_i * delta_i`, so the root's mean is `sum(sums) / sum(W)`.
//! Pure: no I/O, every size bounded before it is allocated.

use crate::ProtocolError;
use crate::update::{MAX_WIRE_BYTES, Undecodable, Update};

/// Most contributors one partial names (a tier folding more sends
/// several partials).
pub const MAX_CONTRIBUTORS: usize = 20_000;
/// Largest header: the contributor list dominates it.
pub const MAX_HEADER_BYTES: usize = 4 << 20;
/// Largest partial body (before the signed envelope).
pub const MAX_PARTIAL_BYTES: usize = 4 + MAX_HEADER_BYTES + MAX_WIRE_BYTES;

/// One update folded into a partial.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Contributor {
    pub update_id: String,
    pub device: String,
}

/// A tier's folded round (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// Metadata (tier, partial id, model, base, samples) and the weighted
    /// sums.
    pub sum: Update,
    /// Total weight of the sum (the mean is `sum / weight`).
    pub weight: f64,
    /// How many updates were folded (one device one vote at the root).
    pub votes: u64,
    pub contributors: Vec<Contributor>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    weight: f64,
    votes: u64,
    contributors: Vec<(String, String)>,
}

fn meta_err(what: String) -> ProtocolError {
    ProtocolError::Metadata(format!("partial aggregate: {what}"))
}

impl Partial {
    /// The contributor rules every partial must keep, checked on both
    /// ends: at least one, at most [`MAX_CONTRIBUTORS`], no id twice,
    /// `votes` equal to their number, a positive finite weight.
    pub fn check(&self) -> Result<(), ProtocolError> {
        let n = self.contributors.len();
        if n == 0 || n > MAX_CONTRIBUTORS {
            return Err(meta_err(format!(
                "{n} contributors, expected 1 to {MAX_CONTRIBUTORS}"
            )));
        }
        if self.votes != n as u64 {
            return Err(meta_err(format!(
                "votes {} but {n} contributors",
                self.votes
            )));
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(meta_err(format!(
                "weight {} is not a positive finite number",
                self.weight
            )));
        }
        let mut ids = std::collections::HashSet::with_capacity(n);
        for c in &self.contributors {
            if !ids.insert(c.update_id.as_str()) {
                return Err(meta_err(format!(
                    "contributor update {:?} is listed twice",
                    c.update_id
                )));
            }
        }
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        self.check()?;
        let header = Header {
            weight: self.weight,
            votes: self.votes,
            contributors: self
                .contributors
                .iter()
                .map(|c| (c.update_id.clone(), c.device.clone()))
                .collect(),
        };
        let header = serde_json::to_vec(&header).map_err(|e| meta_err(e.to_string()))?;
        if header.len() > MAX_HEADER_BYTES {
            return Err(ProtocolError::TooLarge {
                size: header.len(),
                limit: MAX_HEADER_BYTES,
            });
        }
        let update = self.sum.encode()?;
        let mut out = Vec::with_capacity(4 + header.len() + update.len());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&update);
        Ok(out)
    }

    /// Decode a partial whose tensors must fit `layout_of(model)` (the
    /// update decoder's bounds apply to the sums). A refusal whose update
    /// metadata was readable carries it, so it can be acked by id.
    pub fn decode_for_layout<'a>(
        bytes: &[u8],
        layout_of: impl FnOnce(&str) -> Option<&'a [(String, Vec<usize>)]>,
    ) -> Result<Partial, Undecodable> {
        if bytes.len() > MAX_PARTIAL_BYTES {
            return Err(ProtocolError::TooLarge {
                size: bytes.len(),
                limit: MAX_PARTIAL_BYTES,
            }
            .into());
        }
        let Some((len, rest)) = bytes.split_first_chunk::<4>() else {
            return Err(meta_err("shorter than its 4-byte header length".into()).into());
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > MAX_HEADER_BYTES || len > rest.len() {
            return Err(meta_err(format!(
                "header length {len} exceeds {} (the most allowed is {MAX_HEADER_BYTES})",
                rest.len()
            ))
            .into());
        }
        let (header, update) = rest.split_at(len);
        let sum = Update::decode_for_layout(update, MAX_WIRE_BYTES, layout_of)?;
        let header: Header = serde_json::from_slice(header).map_err(|e| Undecodable {
            error: meta_err(format!("header: {e}")),
            meta: Some(Box::new(sum.meta.clone())),
        })?;
        let p = Partial {
            weight: header.weight,
            votes: header.votes,
            contributors: header
                .contributors
                .into_iter()
                .map(|(update_id, device)| Contributor { update_id, device })
                .collect(),
            sum,
        };
        p.check().map_err(|error| Undecodable {
            error,
            meta: Some(Box::new(p.sum.meta.clone())),
        })?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::{Encoding, Tensor, UpdateMeta};

    fn layout() -> Vec<(String, Vec<usize>)> {
        vec![("w".into(), vec![2, 2])]
    }

    fn partial(n: usize) -> Partial {
        Partial {
            sum: Update {
                meta: UpdateMeta {
                    device: "site-a".into(),
                    model: "m".into(),
                    base_version: "1.0.0+g3@e9".into(),
                    update_id: "p-1".into(),
                    sample_count: 40,
                    loss: 0.5,
                    encoding: Encoding::F32,
                },
                tensors: vec![Tensor {
                    name: "w".into(),
                    shape: vec![2, 2],
                    values: vec![1.0, -2.0, 3.5, 0.25],
                }],
            },
            weight: n as f64,
            votes: n as u64,
            contributors: (0..n)
                .map(|i| Contributor {
                    update_id: format!("u{i}"),
                    device: format!("d{i}"),
                })
                .collect(),
        }
    }

    #[test]
    fn round_trips_within_the_layout() {
        let p = partial(3);
        let wire = p.encode().expect("encodes");
        let l = layout();
        let back = Partial::decode_for_layout(&wire, |_| Some(l.as_slice())).expect("decodes");
        assert_eq!(back, p);
    }

    #[test]
    fn refuses_bad_contributor_lists_and_headers_with_the_reason() {
        let l = layout();
        let decode = |w: &[u8]| {
            Partial::decode_for_layout(w, |_| Some(l.as_slice()))
                .map_err(|e| e.to_string())
                .err()
                .unwrap_or_default()
        };
        let mut twice = partial(2);
        twice.contributors[1].update_id = "u0".into();
        assert!(twice.encode().is_err());
        // A hostile tier can write any header: rebuild one by hand.
        let good = partial(2).encode().expect("encodes");
        let hlen = u32::from_le_bytes(good[..4].try_into().expect("4")) as usize;
        let update = &good[4 + hlen..];
        let with_header = |h: &str| {
            let mut w = (h.len() as u32).to_le_bytes().to_vec();
            w.extend_from_slice(h.as_bytes());
            w.extend_from_slice(update);
            w
        };
        let e = decode(&with_header(
            r#"{"weight":2,"votes":2,"contributors":[["u0","d0"],["u0","d1"]]}"#,
        ));
        assert!(e.contains("\"u0\" is listed twice"), "{e}");
        let e = decode(&with_header(
            r#"{"weight":2,"votes":5,"contributors":[["u0","d0"]]}"#,
        ));
        assert!(e.contains("votes 5 but 1 contributors"), "{e}");
        let e = decode(&with_header(
            r#"{"weight":-1,"votes":1,"contributors":[["u0","d0"]]}"#,
        ));
        assert!(e.contains("positive finite"), "{e}");
        let e = decode(&with_header(r#"{"weight":1,"votes":0,"contributors":[]}"#));
        assert!(e.contains("0 contributors"), "{e}");
        let e = decode(&with_header("not json"));
        assert!(e.contains("header"), "{e}");
        // A length beyond the bytes, and beyond the bound.
        let mut w = good.clone();
        w[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&w).contains("header length"));
        assert!(decode(&[1, 2]).contains("4-byte"));
        // A sum that does not fit the layout is the update decoder's refusal.
        let other = vec![("w".to_string(), vec![4usize])];
        let e = Partial::decode_for_layout(&good, |_| Some(other.as_slice()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("w"), "{e}");
    }
}
