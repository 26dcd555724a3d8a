//! The crate map of ARCHITECTURE.md, checked against `cargo metadata`:
//! every workspace crate depends (normal dependencies, transitively) only on
//! crates in lower layers, so the runtime never links the trainer or the
//! config parser and the cloud never links the trainer.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Layers, lowest first; a crate may depend only on crates of lower layers.
const LAYERS: &[&[&str]] = &[
    &["dai-head", "dai-store", "dai-onnx", "dai-profile"],
    &[
        "dai-sensors",
        "dai-protocol",
        "dai-trust",
        "dai-train",
        "dai-infer",
    ],
    &["dai-config", "dai-sync", "dai-models", "dai-cloud"],
    &["dai-edge", "dai-testkit"],
    &["dai"],
];

/// Edges the issue that split the workspace named explicitly.
const FORBIDDEN: &[(&str, &str)] = &[
    ("dai-infer", "dai-train"),
    ("dai-infer", "dai-config"),
    ("dai-infer", "dai-sensors"),
    ("dai-cloud", "dai-train"),
    ("dai-protocol", "dai-train"),
    // The test kit serves the cloud and uplink tests, whose crates must not
    // link the daemon or the trainer through it.
    ("dai-testkit", "dai-edge"),
    ("dai-testkit", "dai-train"),
];

fn layer_of(name: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&name))
}

/// Normal (non-dev, non-build) dependencies between workspace crates.
fn workspace_graph() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let name_of = |id: &str| -> Option<String> {
        meta["packages"]
            .as_array()?
            .iter()
            .find(|p| p["id"] == id)
            .and_then(|p| p["name"].as_str())
            .map(str::to_string)
    };
    let mut graph = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve") {
        let id = node["id"].as_str().unwrap_or_default();
        if !members.contains(id) {
            continue;
        }
        let deps: BTreeSet<String> = node["deps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k["kind"].is_null()))
            })
            .filter_map(|d| d["pkg"].as_str())
            .filter(|p| members.contains(p))
            .filter_map(name_of)
            .collect();
        graph.insert(name_of(id).expect("name"), deps);
    }
    graph
}

fn closure(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(c) = todo.pop() {
        for d in graph.get(&c).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn crates_depend_only_downwards() {
    let graph = workspace_graph();
    let mut problems = Vec::new();
    for (krate, deps) in &graph {
        let Some(l) = layer_of(krate) else {
            problems.push(format!("{krate} is not in the crate map's layers"));
            continue;
        };
        for d in deps {
            match layer_of(d) {
                Some(dl) if dl < l => {}
                _ => problems.push(format!("{krate} (layer {l}) depends on {d}")),
            }
        }
    }
    for (a, b) in FORBIDDEN {
        if closure(&graph, a).contains(*b) {
            problems.push(format!("{a} links {b}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The check itself sees the graph: the daemon reaches every edge crate.
    let edge = closure(&graph, "dai-edge");
    for c in [
        "dai-head",
        "dai-infer",
        "dai-train",
        "dai-config",
        "dai-store",
    ] {
        assert!(edge.contains(c), "dai-edge should link {c}: {edge:?}");
    }
}
