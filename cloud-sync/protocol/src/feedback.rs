//! Error feedback for lossy update encodings (`f16`, `int8`, `topk8`).
//!
//! A lossy encoding drops part of a delta. The edge keeps what was dropped
//! (the *residual*, itself an `f32` [`Update`] payload carrying the base it
//! was computed against) and adds it to a later delta, so nothing is lost
//! for good, only delayed. [`encode_with_feedback`] is that step as a pure
//! function: the caller reads the stored residual, passes its bytes in, and
//! persists the new residual it gets back (or clears it on `None`).
//!
//! The residual is added only when the delta's base changed. Against the
//! same base a delta is cumulative: training continued from the head that
//! produced the previous delta, so its unsent part is already inside it.
//! After a new global was adopted the local head was replaced, and only
//! then is the old residual missing from the delta.

use crate::ProtocolError;
use crate::update::{Encoding, Tensor, Update, UpdateMeta, add_into, residual};

/// What became of the residual passed to [`encode_with_feedback`].
#[derive(Debug, Clone, PartialEq)]
pub enum PriorResidual {
    /// None was passed.
    Absent,
    /// It was computed against another base and was added to this delta.
    Added,
    /// It was computed against this delta's base, which already holds it.
    SameBase,
    /// It could not be decoded and was dropped (the caller says so in its
    /// log; the new residual replaces it).
    Unreadable(ProtocolError),
}

/// The result of [`encode_with_feedback`].
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The wire payload, published as it is.
    pub wire: Vec<u8>,
    /// What this encoding dropped, as an `f32` update payload with the
    /// delta's metadata; `None` when nothing was lost (`f32`).
    pub residual: Option<Vec<u8>>,
    pub prior: PriorResidual,
}

/// Encode `tensors` (the delta against `meta.base_version`) with
/// `meta.encoding`, adding `prior_residual` first when it was computed
/// against another base, and return the payload with the new residual.
pub fn encode_with_feedback(
    meta: UpdateMeta,
    mut tensors: Vec<Tensor>,
    prior_residual: Option<&[u8]>,
) -> Result<Encoded, ProtocolError> {
    let prior = match prior_residual.map(Update::decode) {
        None => PriorResidual::Absent,
        Some(Ok(r)) if r.meta.base_version != meta.base_version => {
            add_into(&mut tensors, &r.tensors);
            PriorResidual::Added
        }
        Some(Ok(_)) => PriorResidual::SameBase,
        Some(Err(e)) => PriorResidual::Unreadable(e),
    };
    let update = Update { meta, tensors };
    let wire = update.encode()?;
    if update.meta.encoding == Encoding::F32 {
        return Ok(Encoded {
            wire,
            residual: None,
            prior,
        });
    }
    let sent = Update::decode(&wire)?;
    let lost = residual(&update.tensors, &sent.tensors);
    let residual = Update {
        meta: UpdateMeta {
            encoding: Encoding::F32,
            ..update.meta
        },
        tensors: lost,
    }
    .encode()?;
    Ok(Encoded {
        wire,
        residual: Some(residual),
        prior,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(base: &str, encoding: Encoding) -> UpdateMeta {
        UpdateMeta {
            device: "edge-1".into(),
            model: "digits".into(),
            base_version: base.into(),
            update_id: format!("edge-1:digits:{base}"),
            sample_count: 64,
            loss: 0.5,
            encoding,
        }
    }

    /// Two tensors of deterministic noise with a spread of magnitudes, so
    /// every lossy encoding drops something.
    fn delta(seed: u64) -> Vec<Tensor> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
        };
        vec![
            Tensor {
                name: "layers.0.weight".into(),
                shape: vec![8, 16],
                values: (0..128).map(|_| next()).collect(),
            },
            Tensor {
                name: "layers.0.bias".into(),
                shape: vec![8],
                values: (0..8).map(|_| next()).collect(),
            },
        ]
    }

    fn values(u: &[Tensor], name: &str) -> Vec<f32> {
        u.iter()
            .find(|t| t.name == name)
            .map(|t| t.values.clone())
            .unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Update {
        Update::decode(bytes).expect("decodes")
    }

    #[test]
    fn f32_loses_nothing_and_leaves_no_residual() {
        let d = delta(1);
        let e = encode_with_feedback(meta("1.0.0", Encoding::F32), d.clone(), None).expect("enc");
        assert_eq!(e.prior, PriorResidual::Absent);
        assert_eq!(e.residual, None);
        let sent = decode(&e.wire);
        for t in &d {
            assert_eq!(values(&sent.tensors, &t.name), t.values);
        }
    }

    #[test]
    fn the_residual_is_added_only_on_a_new_base() {
        let first =
            encode_with_feedback(meta("1.0.0", Encoding::Int8), delta(1), None).expect("first");
        let residual = first.residual.expect("int8 drops something");
        let r = decode(&residual);
        assert_eq!(r.meta.encoding, Encoding::F32);
        assert_eq!(r.meta.base_version, "1.0.0");
        assert!(r.tensors.iter().flat_map(|t| &t.values).any(|v| *v != 0.0));

        // Same base: the delta is cumulative, the residual already in it.
        let same = encode_with_feedback(meta("1.0.0", Encoding::F32), delta(2), Some(&residual))
            .expect("same base");
        assert_eq!(same.prior, PriorResidual::SameBase);
        for t in delta(2) {
            assert_eq!(values(&decode(&same.wire).tensors, &t.name), t.values);
        }

        // A new base: the residual is added before encoding.
        let new = encode_with_feedback(meta("1.0.0+g1", Encoding::F32), delta(2), Some(&residual))
            .expect("new base");
        assert_eq!(new.prior, PriorResidual::Added);
        for t in delta(2) {
            let want: Vec<f32> = t
                .values
                .iter()
                .zip(values(&r.tensors, &t.name))
                .map(|(a, b)| a + b)
                .collect();
            assert_eq!(values(&decode(&new.wire).tensors, &t.name), want);
        }
    }

    #[test]
    fn nothing_is_lost_across_two_lossy_encodings() {
        for encoding in [Encoding::F16, Encoding::Int8, Encoding::Topk8] {
            let (d1, d2) = (delta(1), delta(2));
            let e1 = encode_with_feedback(meta("1.0.0", encoding), d1.clone(), None).expect("e1");
            let e2 = encode_with_feedback(
                meta("1.0.0+g1", encoding),
                d2.clone(),
                e1.residual.as_deref(),
            )
            .expect("e2");
            assert_eq!(e2.prior, PriorResidual::Added, "{encoding:?}");
            let (s1, s2) = (decode(&e1.wire), decode(&e2.wire));
            let r2 = decode(e2.residual.as_deref().expect("residual"));
            for t in &d1 {
                let intended: Vec<f32> = t
                    .values
                    .iter()
                    .zip(values(&d2, &t.name))
                    .map(|(a, b)| a + b)
                    .collect();
                let (a, b, c) = (
                    values(&s1.tensors, &t.name),
                    values(&s2.tensors, &t.name),
                    values(&r2.tensors, &t.name),
                );
                for (i, want) in intended.iter().enumerate() {
                    let got = a[i] + b[i] + c[i];
                    assert!(
                        (got - want).abs() <= 1e-6,
                        "{encoding:?} {}[{i}]: sent1 + sent2 + residual2 = {got}, intended {want}",
                        t.name
                    );
                }
            }
        }
    }

    #[test]
    fn an_unreadable_residual_is_reported_and_replaced() {
        let e = encode_with_feedback(
            meta("1.0.0", Encoding::Int8),
            delta(3),
            Some(b"not a payload"),
        )
        .expect("encodes anyway");
        assert!(matches!(
            e.prior,
            PriorResidual::Unreadable(ProtocolError::Compression(_))
        ));
        assert!(e.residual.is_some());
    }
}
