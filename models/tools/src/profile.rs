//! `dai-models inspect --profile RUNS`: where a model's time goes, from
//! tract's own evaluation hook (`SimpleState::run_plan_with_eval`, the one
//! `tract --profile` uses): every node of the optimised plan is timed on
//! each run, and the report gives per-node medians, their sum by operator
//! and each operator's share of the run.
//!
//! The nodes are tract's optimised ones (fused and renamed: `OptMatMul`,
//! `Conv` lowered to `LirMatMul` and friends), which is the point: they
//! are what the kernels run, so the table says which kernel to improve.
//! The numbers are wall times on this machine at tract's default (one)
//! thread, after untimed warm-up runs.

use crate::ToolError;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;
use tract_onnx::prelude::*;

/// Warm-up runs before timing (caches, allocator, lazily packed weights).
const WARMUP: usize = 3;
/// Nodes listed one by one (the rest only count in their operator's sum).
pub const TOP_NODES: usize = 15;
/// Most timed runs (bounds the time a `--profile` asks for).
pub const MAX_RUNS: usize = 1000;

/// One node of the optimised plan.
#[derive(Debug, Clone, Serialize)]
pub struct NodeTime {
    pub name: String,
    pub op: String,
    /// Median over the runs.
    pub ms: f64,
}

/// One operator (tract's op name) summed over its nodes.
#[derive(Debug, Clone, Serialize)]
pub struct OpTime {
    pub op: String,
    pub nodes: usize,
    pub ms: f64,
    /// Of the sum over all nodes.
    pub share: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub runs: usize,
    /// Median of whole runs with the hook in place.
    pub run_ms: f64,
    /// Sum of the node medians (the hook's own cost is the difference).
    pub nodes_ms: f64,
    pub by_op: Vec<OpTime>,
    /// The slowest nodes, slowest first.
    pub top: Vec<NodeTime>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Time every node of `plan` on `inputs` (in tract's input order) over
/// `runs` runs.
pub fn profile(
    plan: &Arc<TypedRunnableModel>,
    inputs: &[TValue],
    runs: usize,
) -> Result<Profile, ToolError> {
    let runs = runs.clamp(1, MAX_RUNS);
    let fail = |e: &dyn std::fmt::Display| ToolError::Runtime(format!("tract run failed: {e:#}"));
    let mut state = plan.spawn().map_err(|e| fail(&e))?;
    let nodes = plan.model().nodes().len();
    let mut per_node: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); nodes];
    let mut whole = Vec::with_capacity(runs);
    for i in 0..WARMUP + runs {
        let timed = i >= WARMUP;
        let start = Instant::now();
        state
            .run_plan_with_eval(inputs.iter().cloned().collect(), |ctx, st, node, input| {
                let t = Instant::now();
                let r = tract_onnx::tract_core::plan::eval(ctx, st, node, input);
                if timed && let Some(v) = per_node.get_mut(node.id) {
                    v.push(t.elapsed().as_secs_f64() * 1e3);
                }
                r
            })
            .map_err(|e| fail(&e))?;
        if timed {
            whole.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let model = plan.model();
    let mut times: Vec<NodeTime> = per_node
        .iter_mut()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .map(|(id, v)| {
            let n = model.node(id);
            NodeTime {
                name: n.name.clone(),
                op: n.op().name().to_string(),
                ms: median(v),
            }
        })
        .collect();
    let nodes_ms: f64 = times.iter().map(|t| t.ms).sum();
    let mut ops: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for t in &times {
        let e = ops.entry(t.op.clone()).or_default();
        e.0 += 1;
        e.1 += t.ms;
    }
    let mut by_op: Vec<OpTime> = ops
        .into_iter()
        .map(|(op, (nodes, ms))| OpTime {
            op,
            nodes,
            ms,
            share: if nodes_ms > 0.0 { ms / nodes_ms } else { 0.0 },
        })
        .collect();
    by_op.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.op.cmp(&b.op)));
    times.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.name.cmp(&b.name)));
    times.truncate(TOP_NODES);
    Ok(Profile {
        runs,
        run_ms: median(&mut whole),
        nodes_ms,
        by_op,
        top: times,
    })
}

impl Profile {
    /// The profile as a terminal table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nprofile (tract's optimised plan, median of {} runs, 1 thread): {:.3} ms per run, {:.3} ms in nodes",
            self.runs, self.run_ms, self.nodes_ms
        );
        let _ = writeln!(s, "  by operator");
        for o in &self.by_op {
            let _ = writeln!(
                s,
                "    {:<28} {:>4} nodes {:>10.3} ms {:>6.1}%",
                o.op,
                o.nodes,
                o.ms,
                o.share * 100.0
            );
        }
        let _ = writeln!(s, "  slowest nodes");
        for n in &self.top {
            let _ = writeln!(s, "    {:<40} {:<20} {:>10.3} ms", n.name, n.op, n.ms);
        }
        s
    }
}
