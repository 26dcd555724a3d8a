//! The fuzz targets' committed inputs (fuzz/corpus, fuzz/regressions), run
//! through the same decoders on the stable toolchain:
//! - every `seed-*` in fuzz/corpus/TARGET is a real payload made by the
//!   product's own encoders, and must still be ACCEPTED (a seed the
//!   decoder refuses has rotted and guides the fuzzer nowhere);
//! - every file in fuzz/regressions/TARGET is an input a fuzzer once
//!   crashed on: it must be refused or accepted without a panic.
//!
//! `DAI_WRITE_FUZZ_SEEDS=1 cargo test --release --test fuzz_corpus`
//! writes the seeds again from the current encoders and the shipped files.

use dai_infer::TensorSpec;
use dai_infer::codec;
use dai_infer::tensor::DType;
use dai_protocol::update::{Encoding, Update, UpdateMeta};
use dai_protocol::{decompress, global, messages};
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fuzz_dir(kind: &str, target: &str) -> PathBuf {
    repo().join("fuzz").join(kind).join(target)
}

/// The HTTP target's two input layouts (as in fuzz/fuzz_targets/http_body.rs).
fn http_specs() -> [Vec<TensorSpec>; 2] {
    let spec = |name: &str, dtype, shape: &[usize]| TensorSpec {
        name: name.into(),
        onnx_name: None,
        dtype,
        shape: shape.to_vec(),
        dynamic: Vec::new(),
    };
    [
        vec![spec("x", DType::F32, &[1, 3, 4, 4])],
        vec![
            spec("input_ids", DType::I64, &[1, 8]),
            spec("attention_mask", DType::I64, &[1, 8]),
            spec("flags", DType::U8, &[2]),
        ],
    ]
}

/// Does `target`'s decoder accept `data` (as its fuzz target feeds it)?
fn accepts(target: &str, data: &[u8]) -> bool {
    let text = std::str::from_utf8(data);
    match target {
        "update" => {
            let layout = [
                ("layers.0.bias".to_string(), vec![32]),
                ("layers.0.weight".to_string(), vec![32, 64]),
                ("layers.1.bias".to_string(), vec![10]),
                ("layers.1.weight".to_string(), vec![10, 32]),
            ];
            Update::decode(data).is_ok()
                && Update::decode_for_layout(data, dai_protocol::update::MAX_WIRE_BYTES, |m| {
                    (m == "digits").then_some(&layout[..])
                })
                .is_ok()
        }
        "global" => {
            let key = SigningKey::from_bytes(&[9; 32]);
            let Some((ids, body)) = data.split_at_checked(16) else {
                return false;
            };
            let Ok(head) = decompress(body, global::MAX_RAW_BYTES) else {
                return false;
            };
            let mut signed = ids.to_vec();
            signed.extend_from_slice(&Sha256::digest(&head));
            signed.extend_from_slice(body);
            // Signed for real here: the seed must pass the whole check.
            let wire = global::seal(&key, "f", "digits", &signed);
            global::verify(&wire, &key.verifying_key(), "f", "digits").is_ok()
        }
        "messages" => {
            messages::Ack::from_bytes(data).is_ok()
                || messages::Want::from_bytes(data).is_ok()
                || serde_json::from_slice::<messages::Status>(data).is_ok()
                || text.is_ok_and(|t| {
                    dai_protocol::topics::Topic::parse(t).is_ok()
                        || dai_protocol::base::parse(t).is_some()
                })
        }
        "head_file" => {
            dai_head::Head::from_bytes(data).is_ok()
                || dai_head::rows::Rows::from_bytes(data).is_ok()
        }
        "manifest" => text.is_ok_and(|t| dai_infer::bundle::parse_manifest(t).is_ok()),
        "edge_config" => text.is_ok_and(|t| dai_config::Config::load(t, "seed", &[]).is_ok()),
        "http_body" => http_specs().iter().any(|specs| {
            codec::decode_json(specs, "m", data).is_ok()
                || codec::decode_raw(specs, true, data).is_ok()
        }),
        "onnx" => dai_onnx::decode(data).is_ok(),
        "partial" => {
            let layout = [
                ("layers.0.bias".to_string(), vec![32]),
                ("layers.0.weight".to_string(), vec![32, 64]),
                ("layers.1.bias".to_string(), vec![10]),
                ("layers.1.weight".to_string(), vec![10, 32]),
            ];
            dai_protocol::partial::Partial::decode_for_layout(data, |m| {
                (m == "digits").then_some(&layout[..])
            })
            .is_ok()
        }
        other => panic!("unknown fuzz target {other}"),
    }
}

const TARGETS: &[&str] = &[
    "update",
    "global",
    "messages",
    "head_file",
    "manifest",
    "edge_config",
    "http_body",
    "onnx",
    "partial",
];

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Real payloads for each target, from the product's encoders and files.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let zoo = repo().join("models/zoo");
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut out = Vec::new();
    let (head, _) = dai_head::Head::from_bytes(&read(zoo.join("digits/head.safetensors")))
        .expect("the digits head");
    let mut delta = head.params.clone();
    for (i, w) in delta.weights.iter_mut().flatten().enumerate() {
        *w = ((i % 17) as f32 - 8.0) * 1e-3;
    }
    for enc in [
        Encoding::F32,
        Encoding::F16,
        Encoding::Int8,
        Encoding::Topk8,
    ] {
        let u = Update {
            meta: UpdateMeta {
                device: "edge-1".into(),
                model: "digits".into(),
                base_version: "1.0.0+g3@e1764660000123".into(),
                update_id: format!("edge-1:digits:{}", enc.as_str()),
                sample_count: 64,
                loss: 0.31,
                encoding: enc,
            },
            tensors: dai_protocol::update::head_tensors(&head.spec, &delta),
        };
        out.push((
            "update",
            format!("seed-digits-{}", enc.as_str()),
            u.encode().expect("encode"),
        ));
    }
    // A tier's partial: the sums of three updates and who sent them.
    let partial = dai_protocol::partial::Partial {
        sum: Update {
            meta: UpdateMeta {
                device: "site-1".into(),
                model: "digits".into(),
                base_version: "partial+g3@e1764660000123".into(),
                update_id: "p-site-1-0011223344556677".into(),
                sample_count: 192,
                loss: 0.29,
                encoding: Encoding::F32,
            },
            tensors: dai_protocol::update::head_tensors(&head.spec, &delta),
        },
        weight: 3.0,
        votes: 3,
        contributors: (1..=3)
            .map(|i| dai_protocol::partial::Contributor {
                update_id: format!("edge-{i}:digits:7"),
                device: format!("edge-{i}"),
            })
            .collect(),
    };
    out.push((
        "partial",
        "seed-digits-3".into(),
        partial.encode().expect("encode"),
    ));
    let mut md = std::collections::HashMap::new();
    md.insert("model".to_string(), "digits".to_string());
    md.insert("version".to_string(), "3".to_string());
    md.insert("parent".to_string(), "2".to_string());
    let file = head.to_bytes(&md).expect("head file");
    let wire =
        global::sign(&file, &SigningKey::from_bytes(&[9; 32]), "f", 1764660000123).expect("sign");
    let mut g = wire[69..85].to_vec();
    g.extend_from_slice(&wire[117..]);
    out.push(("global", "seed-digits-v3".into(), g));
    let ack = messages::Ack {
        update_id: "edge-1:digits:7".into(),
        status: messages::AckStatus::Accepted,
        reason: Some("superseded by edge-1:digits:8".into()),
        round: Some(4),
    };
    out.push(("messages", "seed-ack".into(), ack.to_bytes()));
    let want = messages::Want {
        model: "digits".into(),
        version: 3,
        epoch: 1764660000123,
    };
    out.push(("messages", "seed-want".into(), want.to_bytes()));
    let status = messages::Status {
        device: "edge-1".into(),
        state: "online".into(),
        ts: 1764660000.5,
        models: [("digits".to_string(), 3u64)].into_iter().collect(),
        outbox_pending: 2,
    };
    out.push((
        "messages",
        "seed-status".into(),
        serde_json::to_vec(&status).expect("json"),
    ));
    out.push((
        "messages",
        "seed-topic".into(),
        b"dai/v1/lab/dev/edge-1/update".to_vec(),
    ));
    out.push((
        "messages",
        "seed-base".into(),
        b"1.0.0+g3@e1764660000123".to_vec(),
    ));
    out.push((
        "head_file",
        "seed-digits-head".into(),
        read(zoo.join("digits/head.safetensors")),
    ));
    out.push((
        "head_file",
        "seed-imu-head".into(),
        read(zoo.join("imu-anomaly/head.safetensors")),
    ));
    out.push((
        "head_file",
        "seed-digits-validation".into(),
        read(zoo.join("digits/validation.safetensors")),
    ));
    for m in [
        "digits",
        "imu-anomaly",
        "minilm-l3",
        "pp-ocr-cls",
        "silero-vad",
    ] {
        out.push((
            "manifest",
            format!("seed-{m}"),
            read(zoo.join(m).join("manifest.toml")),
        ));
    }
    out.push((
        "edge_config",
        "seed-performance-config".into(),
        read(repo().join("configs/performance_config.yaml")),
    ));
    out.push((
        "edge_config",
        "seed-yocto-edge".into(),
        read(repo().join("yocto/meta-dai/recipes-dai/dai-edge/files/edge.yaml")),
    ));
    let pixels: Vec<String> = (0..48).map(|i| format!("{}.5", i % 7)).collect();
    out.push((
        "http_body",
        "seed-json-image".into(),
        format!(
            r#"{{"inputs": {{"x": {{"dtype": "f32", "shape": [1, 3, 4, 4], "data": [{}]}}}}}}"#,
            pixels.join(",")
        )
        .into_bytes(),
    ));
    out.push((
        "http_body",
        "seed-json-tokens".into(),
        br#"{"inputs": {"input_ids": {"shape": [1, 8], "data": [101, 7592, 2088, 102, 0, 0, 0, 0]}, "attention_mask": {"dtype": "i64", "shape": [1, 8], "data": [1, 1, 1, 1, 0, 0, 0, 0]}, "flags": {"shape": [2], "data": [0, 255]}}, "labels": [3]}"#.to_vec(),
    ));
    out.push((
        "http_body",
        "seed-raw-image".into(),
        (0..96)
            .flat_map(|i| (i as f32 * 0.25).to_le_bytes())
            .collect(),
    ));
    for (seed, model) in [("digits", "digits"), ("imu", "imu-anomaly")] {
        out.push((
            "onnx",
            format!("seed-{seed}-backbone"),
            read(zoo.join(model).join("backbone.onnx")),
        ));
    }
    out
}

#[test]
fn committed_seeds_are_real_payloads_and_regressions_do_not_panic() {
    if std::env::var("DAI_WRITE_FUZZ_SEEDS").as_deref() == Ok("1") {
        for (target, name, bytes) in seeds() {
            let dir = fuzz_dir("corpus", target);
            std::fs::create_dir_all(&dir).expect("corpus dir");
            std::fs::write(dir.join(name), bytes).expect("write seed");
        }
    }
    for target in TARGETS {
        let seeds: Vec<PathBuf> = files(&fuzz_dir("corpus", target))
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            })
            .collect();
        assert!(
            !seeds.is_empty(),
            "no seeds for {target} in fuzz/corpus/{target}"
        );
        for s in &seeds {
            let data = std::fs::read(s).expect("read seed");
            assert!(
                accepts(target, &data),
                "{}: the decoder refuses its own seed",
                s.display()
            );
        }
        for r in files(&fuzz_dir("regressions", target)) {
            let data = std::fs::read(&r).expect("read regression");
            // Refused or accepted, never a panic: the test fails if it
            // panics, whatever the answer.
            let _ = accepts(target, &data);
        }
    }
}
