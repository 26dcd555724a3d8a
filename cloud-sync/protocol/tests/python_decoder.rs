//! The update format is open: Python's `safetensors` + `zstandard` read what
//! Rust wrote (gated by DAI_PY_TESTS=1; .ci/run installs the packages).

use dai_protocol::update::{Encoding, Tensor, Update, UpdateMeta};

#[test]
fn python_decodes_every_encoding() {
    if std::env::var("DAI_PY_TESTS").ok().as_deref() != Some("1") {
        eprintln!(
            "SKIPPED python_decodes_every_encoding: set DAI_PY_TESTS=1 (needs `pip install safetensors zstandard numpy`; .ci/run does it)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    for enc in [
        Encoding::F32,
        Encoding::F16,
        Encoding::Int8,
        Encoding::Topk8,
    ] {
        let u = Update {
            meta: UpdateMeta {
                device: "edge-7".into(),
                model: "digits".into(),
                base_version: "3".into(),
                update_id: format!("edge-7:digits:{}", enc.as_str()),
                sample_count: 99,
                loss: 0.125,
                encoding: enc,
            },
            tensors: vec![
                Tensor {
                    name: "layers.0.weight".into(),
                    shape: vec![4, 8],
                    values: (0..32).map(|i| (i as f32 - 16.0) / 64.0).collect(),
                },
                Tensor {
                    name: "layers.0.bias".into(),
                    shape: vec![4],
                    values: vec![0.1, -0.2, 0.3, 0.0],
                },
            ],
        };
        let bytes = u.encode().expect("encode");
        let path = dir.path().join(format!("{}.upd", enc.as_str()));
        // As published on MQTT: inside the device's signed envelope (f16
        // and topk8 plain, as a file on disk would be).
        let on_disk = if matches!(enc, Encoding::F32 | Encoding::Int8) {
            let key = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
            dai_protocol::signed::seal(
                dai_protocol::signed::Kind::Update,
                &key,
                "lab",
                "dai/v1/lab/dev/edge-7/update",
                &bytes,
            )
        } else {
            bytes.clone()
        };
        std::fs::write(&path, &on_disk).expect("write");
        let out = std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/decode_update.py"))
            .arg(&path)
            .arg("--json")
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["metadata"]["update_id"], u.meta.update_id);
        assert_eq!(v["metadata"]["encoding"], enc.as_str());
        assert_eq!(v["metadata"]["sample_count"], "99");
        let rust = Update::decode(&bytes).expect("rust decode");
        for t in &rust.tensors {
            let py: Vec<f32> = v["tensors"][&t.name]["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|x| x.as_f64().expect("f") as f32)
                .collect();
            assert_eq!(py.len(), t.values.len());
            for (a, b) in py.iter().zip(&t.values) {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "{enc:?} {}: python {a} vs rust {b}",
                    t.name
                );
            }
        }
    }
}
