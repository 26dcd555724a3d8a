//! Round trips and bounds of every update encoding.
use super::*;

pub(crate) fn sample(encoding: Encoding) -> Update {
    Update {
        meta: UpdateMeta {
            device: "edge-1".into(),
            model: "digits".into(),
            base_version: "1.0.0".into(),
            update_id: "edge-1:digits:1".into(),
            sample_count: 320,
            loss: 0.25,
            encoding,
        },
        tensors: vec![
            Tensor {
                name: "layers.0.weight".into(),
                shape: vec![3, 4],
                values: (0..12).map(|i| (i as f32 - 5.5) * 0.01).collect(),
            },
            Tensor {
                name: "layers.0.bias".into(),
                shape: vec![3],
                values: vec![0.5, -0.25, 0.0],
            },
        ],
    }
}

#[test]
fn round_trips_in_every_encoding_within_its_precision() {
    for (enc, tol) in [
        (Encoding::F32, 0.0),
        (Encoding::F16, 1e-3),
        (Encoding::Int8, 0.005),
    ] {
        let u = sample(enc);
        let back = Update::decode(&u.encode().expect("encode")).expect("decode");
        assert_eq!(back.meta, u.meta);
        let mut want = u.tensors.clone();
        want.sort_by(|a, b| a.name.cmp(&b.name));
        for (a, b) in back.tensors.iter().zip(&want) {
            assert_eq!((a.name.as_str(), &a.shape), (b.name.as_str(), &b.shape));
            for (x, y) in a.values.iter().zip(&b.values) {
                assert!(
                    (x - y).abs() <= tol * y.abs().max(1.0),
                    "{enc:?} {}: {x} vs {y}",
                    a.name
                );
            }
        }
    }
}

#[test]
fn topk8_keeps_the_largest_eighth_and_error_feedback_carries_the_rest() {
    let u = sample(Encoding::Topk8);
    let back = Update::decode(&u.encode().expect("encode")).expect("decode");
    assert_eq!(back.meta, u.meta);
    for t in &u.tensors {
        let b = back
            .tensors
            .iter()
            .find(|x| x.name == t.name)
            .expect("tensor");
        assert_eq!(b.shape, t.shape);
        let k = (t.values.len() as f64 * TOPK_DENSITY).ceil() as usize;
        let kept: Vec<usize> = (0..b.values.len())
            .filter(|&i| b.values[i] != 0.0)
            .collect();
        assert_eq!(kept.len(), k, "{}: {:?}", t.name, b.values);
        // Every kept entry is at least as large as every dropped one.
        let min_kept = kept
            .iter()
            .map(|&i| t.values[i].abs())
            .fold(f32::MAX, f32::min);
        for i in (0..t.values.len()).filter(|i| !kept.contains(i)) {
            assert!(t.values[i].abs() <= min_kept, "{}[{i}]", t.name);
        }
        for &i in &kept {
            assert!((b.values[i] - t.values[i]).abs() <= 0.005 * t.values[i].abs().max(0.06));
        }
    }
    // intended = sent + residual, exactly.
    let mut intended = u.tensors.clone();
    intended.sort_by(|a, b| a.name.cmp(&b.name));
    let r = residual(&intended, &back.tensors);
    let mut sum = back.tensors.clone();
    add_into(&mut sum, &r);
    for (a, b) in sum.iter().zip(&intended) {
        for (x, y) in a.values.iter().zip(&b.values) {
            assert!((x - y).abs() < 1e-7);
        }
    }
}

#[test]
fn topk8_refuses_inconsistent_parts() {
    let raw = |mask: Vec<u8>, values: Vec<u8>| {
        let mut meta = HashMap::new();
        for (k, v) in [
            ("device", "d"),
            ("model", "m"),
            ("base_version", "1"),
            ("update_id", "u"),
            ("sample_count", "1"),
            ("loss", "0"),
            ("encoding", "topk8"),
            ("shapes", r#"{"w": [2, 4]}"#),
        ] {
            meta.insert(k.to_string(), v.to_string());
        }
        let scale = 1.0f32.to_le_bytes().to_vec();
        let views = vec![
            (
                "w.mask".to_string(),
                TensorView::new(Dtype::U8, vec![mask.len()], &mask).expect("v"),
            ),
            (
                "w.values".to_string(),
                TensorView::new(Dtype::I8, vec![values.len()], &values).expect("v"),
            ),
            (
                "w.scale".to_string(),
                TensorView::new(Dtype::F32, vec![1], &scale).expect("v"),
            ),
        ];
        compress(&safetensors::serialize(views, Some(meta)).expect("st"), 3)
    };
    assert!(Update::decode(&raw(vec![0b0000_0011], vec![5, 6])).is_ok());
    // A small payload claiming a huge dense shape is refused, not allocated.
    let huge = {
        let mut meta = HashMap::new();
        for (k, v) in [
            ("device", "d"),
            ("model", "m"),
            ("base_version", "1"),
            ("update_id", "u"),
            ("sample_count", "1"),
            ("loss", "0"),
            ("encoding", "topk8"),
            ("shapes", r#"{"w": [1000000000]}"#),
        ] {
            meta.insert(k.to_string(), v.to_string());
        }
        let one = vec![0u8];
        let views = vec![(
            "w.mask".to_string(),
            TensorView::new(Dtype::U8, vec![1], &one).expect("v"),
        )];
        compress(&safetensors::serialize(views, Some(meta)).expect("st"), 3)
    };
    let e = Update::decode(&huge).expect_err("huge").to_string();
    assert!(e.contains("too large"), "{e}");
    for (mask, values, why) in [
        (vec![0b0000_0111], vec![5, 6], "more entries"),
        (vec![0b0000_0001], vec![5, 6], "fewer entries"),
        (vec![1, 0], vec![5], "expected 1"),
    ] {
        let e = Update::decode(&raw(mask, values))
            .expect_err(why)
            .to_string();
        assert!(e.contains(why), "{e}");
    }
}

#[test]
fn refuses_bad_payloads_precisely() {
    let good = sample(Encoding::F32).encode().expect("encode");
    assert!(matches!(
        Update::decode(b"not zstd at all"),
        Err(ProtocolError::Compression(_))
    ));
    assert!(matches!(
        Update::decode(&good[..good.len() / 2]),
        Err(ProtocolError::Compression(_))
    ));
    assert!(matches!(
        Update::decode_with_limits(&good, 10, 1000),
        Err(ProtocolError::TooLarge { .. })
    ));
    assert!(matches!(
        Update::decode_with_limits(&good, 1 << 20, 16),
        Err(ProtocolError::TooLarge { .. })
    ));
    assert!(matches!(
        Update::decode(&compress(b"{}", 3)),
        Err(ProtocolError::Format(_))
    ));
    let mut nan = sample(Encoding::F32);
    nan.tensors[0].values[3] = f32::NAN;
    let err = Update::decode(&nan.encode().expect("encode")).expect_err("nan");
    assert!(err.to_string().contains("not finite"), "{err}");
}

/// Deterministic noise, like a real delta (repetitive data would flatter f32 under zstd).
fn noise(n: usize) -> Vec<f32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
        })
        .collect()
}

#[test]
fn int8_and_f16_are_smaller() {
    let mut u = sample(Encoding::F32);
    u.tensors[0] = Tensor {
        name: "w".into(),
        shape: vec![64, 64],
        values: noise(4096),
    };
    let f32b = u.encode().expect("f32").len();
    u.meta.encoding = Encoding::F16;
    let f16b = u.encode().expect("f16").len();
    u.meta.encoding = Encoding::Int8;
    let i8b = u.encode().expect("int8").len();
    assert!(
        f16b < f32b && i8b < f16b,
        "f32 {f32b}, f16 {f16b}, int8 {i8b}"
    );
}

fn sample_layout() -> Vec<(String, Vec<usize>)> {
    vec![
        ("layers.0.bias".into(), vec![3]),
        ("layers.0.weight".into(), vec![3, 4]),
    ]
}

#[test]
fn decoding_for_a_layout_accepts_every_encoding_of_it() {
    let layout = sample_layout();
    for enc in [
        Encoding::F32,
        Encoding::F16,
        Encoding::Int8,
        Encoding::Topk8,
    ] {
        let wire = sample(enc).encode().expect("encode");
        let u = Update::decode_for_layout(&wire, MAX_WIRE_BYTES, |m| {
            (m == "digits").then_some(layout.as_slice())
        })
        .expect("decodes");
        assert_eq!(u.tensors.len(), 2, "{enc:?}");
    }
}

#[test]
fn decoding_for_a_layout_checks_shapes_before_values_and_keeps_the_id() {
    let layout = sample_layout();
    let of = |m: &str| (m == "digits").then_some(layout.as_slice());
    // One shape off: refused, and the refusal carries the update's id.
    let mut u = sample(Encoding::Int8);
    u.tensors[0].shape = vec![4, 3];
    let e = Update::decode_for_layout(&u.encode().expect("encode"), MAX_WIRE_BYTES, of)
        .expect_err("refused");
    assert!(e.to_string().contains("shape [4, 3]"), "{e}");
    assert_eq!(
        e.meta.map(|m| m.update_id).as_deref(),
        Some("edge-1:digits:1")
    );
    // A tensor the layout lacks.
    let mut u = sample(Encoding::F32);
    u.tensors[1].name = "layers.9.bias".into();
    let e = Update::decode_for_layout(&u.encode().expect("encode"), MAX_WIRE_BYTES, of)
        .expect_err("refused");
    assert!(
        e.to_string().contains("do not match the model's layout"),
        "{e}"
    );
    // A model this aggregator does not serve.
    let mut u = sample(Encoding::F32);
    u.meta.model = "other".into();
    let e = Update::decode_for_layout(&u.encode().expect("encode"), MAX_WIRE_BYTES, of)
        .expect_err("refused");
    assert!(e.to_string().contains("\"other\" is not served"), "{e}");
    assert!(e.meta.is_some());
}

#[test]
fn an_update_decompresses_no_further_than_its_layout_allows() {
    // 8 MiB of int8 zeros compresses to almost nothing and would be 32 MiB
    // of f32: far beyond the 3x4 + 3 layout, so it is refused while still
    // compressed data, before any value is decoded.
    let layout = sample_layout();
    let mut u = sample(Encoding::Int8);
    u.tensors[0].shape = vec![2048, 4096];
    u.tensors[0].values = vec![0.0; 2048 * 4096];
    let wire = u.encode().expect("encode");
    assert!(wire.len() < 64 << 10, "{} bytes", wire.len());
    let e = Update::decode_for_layout(&wire, MAX_WIRE_BYTES, |_| Some(layout.as_slice()))
        .expect_err("refused");
    assert!(
        matches!(e.error, ProtocolError::TooLarge { limit, .. } if limit < 4096),
        "{e:?}"
    );
    // Its id was read from the header, so it can be acked as rejected.
    assert_eq!(e.meta.map(|m| m.device).as_deref(), Some("edge-1"));
    // The unbounded decoder takes it (64 MiB raw limit): the layout bound
    // is what stops it.
    assert!(Update::decode(&wire).is_ok());
}
