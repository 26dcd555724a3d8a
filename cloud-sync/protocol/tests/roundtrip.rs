//! Property tests: every encoding of the wire contract decodes to what was
//! encoded (exactly, or within the encoding's stated precision), for
//! arbitrary names, shapes, values and metadata.

use dai_protocol::base::{self, GlobalId};
use dai_protocol::global;
use dai_protocol::messages::{Ack, AckStatus, Want};
use dai_protocol::signed::{self, Kind};
use dai_protocol::topics::Topic;
use dai_protocol::update::{Encoding, Tensor, Update, UpdateMeta};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

fn meta(encoding: Encoding) -> impl Strategy<Value = UpdateMeta> {
    (
        segment(),
        segment(),
        "[ -~]{0,40}",
        "[ -~]{1,256}",
        any::<u64>(),
        -1e6f32..1e6,
    )
        .prop_map(
            move |(device, model, base_version, update_id, sample_count, loss)| UpdateMeta {
                device,
                model,
                base_version,
                update_id,
                sample_count,
                loss,
                encoding,
            },
        )
}

/// 1-4 tensors of 0-3 dims (each 1-9) with distinct names and values in
/// [-100, 100].
fn tensors() -> impl Strategy<Value = Vec<Tensor>> {
    prop::collection::btree_map(
        "[a-z]{1,8}(\\.[0-9]{1,2})?",
        prop::collection::vec(1usize..10, 0..4),
        1..5,
    )
    .prop_flat_map(|shapes| {
        shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                prop::collection::vec(-100f32..100.0, n).prop_map(move |values| Tensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    values,
                })
            })
            .collect::<Vec<_>>()
    })
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        Just(Encoding::F32),
        Just(Encoding::F16),
        Just(Encoding::Int8),
        Just(Encoding::Topk8),
    ]
}

fn update() -> impl Strategy<Value = Update> {
    encoding().prop_flat_map(|e| {
        (meta(e), tensors()).prop_map(|(meta, tensors)| Update { meta, tensors })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn updates_round_trip_within_their_encodings_precision(u in update()) {
        let wire = u.encode().expect("encodes");
        let back = Update::decode(&wire).expect("decodes");
        prop_assert_eq!(&back.meta, &u.meta);
        let mut want = u.tensors.clone();
        want.sort_by(|a, b| a.name.cmp(&b.name));
        prop_assert_eq!(back.tensors.len(), want.len());
        for (got, t) in back.tensors.iter().zip(&want) {
            prop_assert_eq!(&got.name, &t.name);
            prop_assert_eq!(&got.shape, &t.shape);
            let max = t.values.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (x, y) in got.values.iter().zip(&t.values) {
                match u.meta.encoding {
                    Encoding::F32 => prop_assert_eq!(x, y),
                    Encoding::F16 => prop_assert!((x - y).abs() <= 0.06 + y.abs() * 1e-3),
                    // Per-row (int8) or per-tensor (topk8) scale of max/127;
                    // a topk8 entry that was not kept decodes to zero.
                    Encoding::Int8 => prop_assert!((x - y).abs() <= max / 127.0 * 0.5 + 1e-4),
                    Encoding::Topk8 => prop_assert!(
                        *x == 0.0 || (x - y).abs() <= max / 127.0 * 0.5 + 1e-4
                    ),
                }
            }
        }
        // The layout-checked decoder takes what the plain one takes.
        let layout: Vec<(String, Vec<usize>)> =
            want.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
        let checked = Update::decode_for_layout(&wire, usize::MAX, |_| Some(layout.as_slice()))
            .expect("decodes for its own layout");
        prop_assert_eq!(checked, back);
    }

    #[test]
    fn sealed_bodies_open_only_for_their_topic(
        body in prop::collection::vec(any::<u8>(), 0..512),
        fleet in segment(),
        device in segment(),
        seed in any::<[u8; 32]>(),
    ) {
        let key = SigningKey::from_bytes(&seed);
        let topic = Topic::Update { fleet: fleet.clone(), device }.build().expect("topic");
        for kind in [Kind::Update, Kind::Ack] {
            let wire = signed::seal(kind, &key, &fleet, &topic, &body);
            let opened = signed::open(kind, &key.verifying_key(), &fleet, &topic, &wire);
            prop_assert_eq!(opened.ok(), Some(body.as_slice()));
            let other = format!("{topic}x");
            prop_assert!(signed::open(kind, &key.verifying_key(), &fleet, &other, &wire).is_err());
        }
    }

    #[test]
    fn globals_verify_to_the_signed_head(
        version in any::<u64>(),
        epoch in any::<u64>(),
        extra in prop::collection::vec(any::<u8>(), 0..256),
        model in segment(),
        fleet in segment(),
    ) {
        let mut md = std::collections::HashMap::new();
        md.insert("model".to_string(), model.clone());
        md.insert("version".to_string(), version.to_string());
        let view = safetensors::tensor::TensorView::new(
            safetensors::tensor::Dtype::U8, vec![extra.len()], &extra,
        ).expect("view");
        let head = safetensors::serialize([("x", view)], Some(md)).expect("head");
        let key = SigningKey::from_bytes(&[5; 32]);
        let wire = global::sign(&head, &key, &fleet, epoch).expect("signs");
        let g = global::verify(&wire, &key.verifying_key(), &fleet, &model).expect("verifies");
        prop_assert_eq!((g.version, g.epoch), (version, epoch));
        prop_assert_eq!(g.head_file, head);
    }

    #[test]
    fn acks_and_wants_round_trip(
        id in "[ -~]{0,80}",
        status in prop_oneof![Just(AckStatus::Accepted), Just(AckStatus::Rejected), Just(AckStatus::Rebase)],
        reason in prop::option::of("\\PC{0,40}"),
        round in prop::option::of(any::<u64>()),
        model in segment(),
        version in any::<u64>(),
        epoch in any::<u64>(),
    ) {
        let ack = Ack { update_id: id, status, reason, round };
        prop_assert_eq!(Ack::from_bytes(&ack.to_bytes()).ok(), Some(ack));
        let want = Want { model, version, epoch };
        prop_assert_eq!(Want::from_bytes(&want.to_bytes()).ok(), Some(want));
    }

    #[test]
    fn topics_and_base_labels_round_trip(
        fleet in segment(),
        device in segment(),
        bundle in "[0-9a-z.+-]{1,12}",
        version in any::<u64>(),
        epoch in any::<u64>(),
    ) {
        for t in [
            Topic::Update { fleet: fleet.clone(), device: device.clone() },
            Topic::Ack { fleet: fleet.clone(), device: device.clone() },
            Topic::Status { fleet: fleet.clone(), device: device.clone() },
            Topic::Want { fleet: fleet.clone(), device: device.clone() },
            Topic::Global { fleet: fleet.clone(), model: device.clone() },
        ] {
            let s = t.build().expect("builds");
            prop_assert_eq!(Topic::parse(&s).ok(), Some(t));
        }
        let g = GlobalId { epoch, version };
        let b = base::parse(&base::label(&bundle, Some(g))).expect("parses");
        prop_assert_eq!((b.version, b.epoch), (version, Some(epoch)));
    }
}
