//! f16 storage: float constants of 16+ values stored as f16 and cast back
//! to f32 by a `Cast` node (mode `f16`, and what stays float after the int8
//! rewrite).

use super::graph::sanitize;
use crate::proto::{self, Names, dt};
use dai_onnx::pb;
use std::collections::BTreeMap;

/// f16 storage of every float constant with at least 16 values.
pub(super) fn to_f16(
    model: &pb::ModelProto,
    rewritten: &mut BTreeMap<String, usize>,
) -> pb::ModelProto {
    let mut out = model.clone();
    let Some(g) = out.graph.as_mut() else {
        return out;
    };
    let mut names = Names::of(g);
    let mut casts = Vec::new();
    let mut inits = Vec::new();
    for t in g.initializer.iter_mut() {
        if t.data_type == dt::FLOAT
            && proto::numel(&t.dims) >= 16
            && let Some(v) = proto::to_f32(t)
        {
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let h = names.fresh(&format!("{}_f16", sanitize(&t.name)));
            inits.push(proto::f16_tensor(&h, &dims, &v));
            casts.push(proto::node(
                "Cast",
                &names.fresh(&format!("{}_to_f32", sanitize(&t.name))),
                &[&h],
                &[&t.name],
                vec![proto::attr_int("to", dt::FLOAT as i64)],
            ));
            t.name.clear(); // dropped below
            *rewritten.entry("initializer f16".into()).or_insert(0) += 1;
        }
    }
    g.initializer.retain(|t| !t.name.is_empty());
    let mut nodes = Vec::new();
    for n in std::mem::take(&mut g.node) {
        let value = n
            .attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref());
        if n.op_type == "Constant"
            && let Some(t) = value
            && t.data_type == dt::FLOAT
            && proto::numel(&t.dims) >= 16
            && let Some(v) = proto::to_f32(t)
        {
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let h = names.fresh(&format!("{}_f16", sanitize(&n.output[0])));
            inits.push(proto::f16_tensor(&h, &dims, &v));
            nodes.push(proto::node(
                "Cast",
                &n.name,
                &[&h],
                &[&n.output[0]],
                vec![proto::attr_int("to", dt::FLOAT as i64)],
            ));
            *rewritten.entry("Constant f16".into()).or_insert(0) += 1;
            continue;
        }
        nodes.push(n);
    }
    casts.extend(nodes);
    g.node = casts;
    g.initializer.extend(inits);
    out
}
