//! Dense layers as a standard ONNX graph, written with tract's protobuf
//! types (opset 13): `input -> Mul(scale) -> [Gemm(transB=1) -> act]* -> output`.

use crate::ToolError;
use dai_onnx::pb;
use dai_train::{Activation, Head};
use prost::Message;

const FLOAT: i32 = 1;

fn tensor(name: &str, dims: &[usize], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: FLOAT,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// A `[batch, features]` f32 value info (batch symbolic).
pub(crate) fn value_info(name: &str, features: usize) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: FLOAT,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![
                        Dimension {
                            value: Some(Value::DimParam("batch".into())),
                            ..Default::default()
                        },
                        Dimension {
                            value: Some(Value::DimValue(features as i64)),
                            ..Default::default()
                        },
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    output: &str,
    attrs: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.to_string(),
        name: name.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        attribute: attrs,
        ..Default::default()
    }
}

/// Encode `layers` (a [`Head`]'s dense stack) as ONNX bytes. The input is
/// multiplied by `input_scale` first (0..16 pixels -> 0..1).
pub fn dense_model(
    layers: &Head,
    input_name: &str,
    output_name: &str,
    input_scale: f32,
) -> Result<Vec<u8>, ToolError> {
    let mut nodes = Vec::new();
    let mut inits = vec![tensor("input_scale", &[], &[input_scale])];
    nodes.push(node(
        "Mul",
        "scale",
        &[input_name, "input_scale"],
        "scaled",
        vec![],
    ));
    let mut current = "scaled".to_string();
    let n = layers.spec.layers.len();
    for (i, l) in layers.spec.layers.iter().enumerate() {
        let w = format!("layers.{i}.weight");
        let b = format!("layers.{i}.bias");
        inits.push(tensor(
            &w,
            &[l.outputs, l.inputs],
            &layers.params.weights[i],
        ));
        inits.push(tensor(&b, &[l.outputs], &layers.params.biases[i]));
        let last = i + 1 == n;
        let gemm_out = if last && l.activation == Activation::None {
            output_name.to_string()
        } else {
            format!("gemm{i}")
        };
        let trans_b = pb::AttributeProto {
            name: "transB".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: 1,
            ..Default::default()
        };
        nodes.push(node(
            "Gemm",
            &format!("gemm{i}"),
            &[&current, &w, &b],
            &gemm_out,
            vec![trans_b],
        ));
        current = match l.activation {
            Activation::None => gemm_out,
            Activation::Relu => {
                let out = if last {
                    output_name.to_string()
                } else {
                    format!("relu{i}")
                };
                nodes.push(node(
                    "Relu",
                    &format!("relu{i}"),
                    &[&gemm_out],
                    &out,
                    vec![],
                ));
                out
            }
            Activation::Gelu => {
                return Err(ToolError::Export(format!(
                    "layer {i}: GELU export is not implemented (opset 13 has no Gelu op); use relu or none in exported layers"
                )));
            }
        };
    }
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "dai-models".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(pb::GraphProto {
            name: "dai-dense".into(),
            node: nodes,
            initializer: inits,
            input: vec![value_info(input_name, layers.spec.inputs())],
            output: vec![value_info(output_name, layers.spec.outputs())],
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}
