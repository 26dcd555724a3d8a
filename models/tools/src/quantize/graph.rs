//! Graph hygiene after a rewrite: values nothing reads any more dropped,
//! internal names shortened, and the name sanitising every new value's name
//! goes through.

use dai_onnx::pb;
use std::collections::{HashMap, HashSet};

/// Short names for every internal value (graph inputs and outputs keep
/// theirs) and no node names: in small models the names are a large part of
/// the file (digits: a third).
pub fn minify_names(model: &mut pb::ModelProto) {
    let Some(g) = model.graph.as_mut() else {
        return;
    };
    let keep: HashSet<String> = g
        .input
        .iter()
        .map(|i| i.name.clone())
        .chain(g.output.iter().map(|o| o.name.clone()))
        .collect();
    let mut map: HashMap<String, String> = HashMap::new();
    let mut next = 0usize;
    let mut short = |old: &str, map: &mut HashMap<String, String>| -> String {
        if old.is_empty() || keep.contains(old) {
            return old.to_string();
        }
        map.entry(old.to_string())
            .or_insert_with(|| {
                let mut n = next;
                next += 1;
                let mut s = String::from("_");
                loop {
                    s.push(char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
                    n /= 36;
                    if n == 0 {
                        break;
                    }
                }
                s
            })
            .clone()
    };
    for t in g.initializer.iter_mut() {
        t.name = short(&t.name, &mut map);
    }
    for n in g.node.iter_mut() {
        n.name.clear();
        for i in n.input.iter_mut() {
            *i = short(i, &mut map);
        }
        for o in n.output.iter_mut() {
            *o = short(o, &mut map);
        }
    }
    // Initializers listed as inputs in old IRs are renamed with them.
    for v in g.value_info.iter_mut() {
        v.name = short(&v.name, &mut map);
    }
}

/// `s` with every character outside `[A-Za-z0-9_.]` replaced by `_`, as
/// the base of derived value and node names.
pub(super) fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Drop initializers and Constant nodes nothing reads any more, graph inputs
/// that named dropped initializers, and value_info of vanished values.
pub fn prune_unused(model: &mut pb::ModelProto) {
    let Some(g) = model.graph.as_mut() else {
        return;
    };
    let mut dropped: HashSet<String> = HashSet::new();
    loop {
        let used: HashSet<String> = g
            .node
            .iter()
            .flat_map(|n| n.input.iter().cloned())
            .chain(g.output.iter().map(|o| o.name.clone()))
            .collect();
        let before = g.node.len() + g.initializer.len();
        g.initializer.retain(|t| {
            let keep = used.contains(&t.name);
            if !keep {
                dropped.insert(t.name.clone());
            }
            keep
        });
        g.node
            .retain(|n| n.op_type != "Constant" || n.output.iter().any(|o| used.contains(o)));
        if g.node.len() + g.initializer.len() == before {
            break;
        }
    }
    // Older exporters list initializers as graph inputs too.
    g.input.retain(|i| !dropped.contains(&i.name));
    let known: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .collect();
    g.value_info.retain(|v| known.contains(&v.name));
}
