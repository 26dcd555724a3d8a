//! Running an ONNX `ModelProto` in tract, the runtime the devices use: input
//! shapes resolved (symbolic dims pinned), optional intermediate outputs (for
//! calibration), optimised once, then run on tract tensors.
//!
//! The tools judge every rewritten model here, in our runtime, not only on
//! paper: a quantized or pruned file is written only after it ran in tract.

use crate::ToolError;
use crate::proto;
use dai_onnx::pb;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tract_onnx::prelude::*;

/// tract's tensor type, for callers that build inputs without depending on tract.
pub use tract_onnx::prelude::Tensor;

/// One model input with a concrete shape.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct InputSpec {
    pub name: String,
    /// ONNX element type code.
    #[serde(skip)]
    pub elem: i32,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
}

/// The model's real inputs with concrete shapes: `overrides` first, then the
/// dims the file declares; a symbolic dim becomes 1 and is reported in the
/// returned notes.
pub fn input_specs(
    model: &pb::ModelProto,
    overrides: &HashMap<String, Vec<usize>>,
) -> Result<(Vec<InputSpec>, Vec<String>), ToolError> {
    let g = proto::graph(model);
    let mut notes = Vec::new();
    let mut specs = Vec::new();
    for v in proto::real_inputs(g) {
        let (elem, dims, names) = proto::value_shape(v);
        let shape = match overrides.get(&v.name) {
            Some(s) => {
                if !dims.is_empty() && s.len() != dims.len() {
                    return Err(ToolError::Data {
                        path: format!("--input-shape {}", v.name),
                        message: format!(
                            "{} axes given, the model declares {} ({})",
                            s.len(),
                            dims.len(),
                            names.join("x")
                        ),
                    });
                }
                s.clone()
            }
            None => dims
                .iter()
                .zip(&names)
                .enumerate()
                .map(|(axis, (d, n))| {
                    d.map(|d| d as usize).unwrap_or_else(|| {
                        notes.push(format!(
                            "input {:?} axis {axis} ({n}) is symbolic: set to 1 (use --input-shape)",
                            v.name
                        ));
                        1
                    })
                })
                .collect(),
        };
        specs.push(InputSpec {
            name: v.name.clone(),
            elem,
            dtype: proto::dtype_name(elem),
            shape,
        });
    }
    Ok((specs, notes))
}

/// Parse `name=1x3x48x192` (repeatable `--input-shape`).
pub fn parse_shape_override(s: &str) -> Result<(String, Vec<usize>), String> {
    let (name, dims) = s.rsplit_once('=').ok_or_else(|| {
        format!("--input-shape {s:?}: expected NAME=D1xD2x..., e.g. x=1x3x48x192")
    })?;
    let dims: Result<Vec<usize>, _> = dims
        .split(['x', ','])
        .map(|d| d.trim().parse::<usize>())
        .collect();
    match dims {
        Ok(d) if !d.is_empty() && d.iter().all(|&v| v > 0) => Ok((name.to_string(), d)),
        _ => Err(format!(
            "--input-shape {s:?}: dims must be positive integers separated by 'x'"
        )),
    }
}

pub(crate) fn tract_dt(elem: i32) -> Result<DatumType, ToolError> {
    Ok(match elem {
        proto::dt::FLOAT => f32::datum_type(),
        proto::dt::INT64 => i64::datum_type(),
        proto::dt::INT32 => i32::datum_type(),
        proto::dt::UINT8 => u8::datum_type(),
        proto::dt::INT8 => i8::datum_type(),
        proto::dt::BOOL => bool::datum_type(),
        proto::dt::FLOAT16 => f16::datum_type(),
        other => {
            return Err(ToolError::Unsupported(format!(
                "input element type {} ({other}) is not supported by the tools",
                proto::dtype_name(other)
            )));
        }
    })
}

/// A model optimised by tract for fixed input shapes.
pub struct Runner {
    plan: Arc<TypedRunnableModel>,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<String>,
    /// Position in tract's input list of each of `inputs`.
    order: Vec<usize>,
}

impl Runner {
    /// Parse, set shapes, select `outputs` (graph outputs when None) and
    /// optimise. Errors carry tract's whole cause chain.
    pub fn new(
        model: &pb::ModelProto,
        inputs: &[InputSpec],
        ignore_value_info: bool,
        outputs: Option<&[String]>,
    ) -> Result<Runner, ToolError> {
        let fail = |stage: &str, e: &dyn std::fmt::Display| {
            ToolError::Runtime(format!("tract cannot {stage}: {e:#}"))
        };
        let tract_model = proto::to_tract(model)?;
        let mut g = tract_onnx::onnx()
            .with_ignore_value_info(ignore_value_info)
            .model_for_proto_model(&tract_model)
            .map_err(|e| fail("parse the graph", &e))?;
        let tract_inputs: Vec<String> = g
            .input_outlets()
            .map_err(|e| fail("list inputs", &e))?
            .iter()
            .map(|o| g.node(o.node).name.clone())
            .collect();
        let mut order = Vec::new();
        for spec in inputs {
            let pos = tract_inputs
                .iter()
                .position(|n| n == &spec.name)
                .ok_or_else(|| {
                    ToolError::Runtime(format!(
                        "input {:?} is not a graph input (tract sees {tract_inputs:?})",
                        spec.name
                    ))
                })?;
            g.set_input_fact(
                pos,
                InferenceFact::dt_shape(tract_dt(spec.elem)?, spec.shape.clone()),
            )
            .map_err(|e| fail("set input shapes", &e))?;
            order.push(pos);
        }
        if order.len() != tract_inputs.len() {
            return Err(ToolError::Runtime(format!(
                "tract sees inputs {tract_inputs:?}, {} were given",
                order.len()
            )));
        }
        let outputs: Vec<String> = match outputs {
            Some(o) => {
                g.select_outputs_by_name(o.iter())
                    .map_err(|e| fail("select outputs", &e))?;
                o.to_vec()
            }
            None => proto::graph(model)
                .output
                .iter()
                .map(|o| o.name.clone())
                .collect(),
        };
        let plan = g
            .into_optimized()
            .map_err(|e| fail("optimise the graph", &e))?
            .into_runnable()
            .map_err(|e| fail("make a plan", &e))?;
        Ok(Runner {
            plan,
            inputs: inputs.to_vec(),
            outputs,
            order,
        })
    }

    /// Run on tensors given in `self.inputs` order.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ToolError> {
        let mut ordered: Vec<Option<TValue>> = vec![None; inputs.len()];
        for (t, &pos) in inputs.iter().zip(&self.order) {
            ordered[pos] = Some(t.clone().into_tvalue());
        }
        let outs = self
            .plan
            .run(ordered.into_iter().flatten().collect())
            .map_err(|e| ToolError::Runtime(format!("tract run failed: {e:#}")))?;
        Ok(outs.into_iter().map(|v| v.into_tensor()).collect())
    }

    /// Per-node times over `runs` runs ([`crate::profile`]).
    pub fn profile(
        &self,
        inputs: &[Tensor],
        runs: usize,
    ) -> Result<crate::profile::Profile, ToolError> {
        let mut ordered: Vec<Option<TValue>> = vec![None; inputs.len()];
        for (t, &pos) in inputs.iter().zip(&self.order) {
            ordered[pos] = Some(t.clone().into_tvalue());
        }
        let ordered: Vec<TValue> = ordered.into_iter().flatten().collect();
        crate::profile::profile(&self.plan, &ordered, runs)
    }

    /// Median wall time of `runs` runs (after 3 untimed), in milliseconds.
    pub fn latency_ms(&self, inputs: &[Tensor], runs: usize) -> Result<f64, ToolError> {
        for _ in 0..3 {
            self.run(inputs)?;
        }
        let mut times = Vec::with_capacity(runs.max(1));
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            self.run(inputs)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// Deterministic inputs for timing and for checks without data: f32 uniform
/// in [-1, 1), integers 1 (valid token ids and attention masks alike).
pub fn synthetic_inputs(specs: &[InputSpec], seed: u64) -> Result<Vec<Tensor>, ToolError> {
    let mut rng = dai_train::Rng::new(seed);
    specs
        .iter()
        .map(|s| {
            let n: usize = s.shape.iter().product();
            let t = match s.elem {
                proto::dt::FLOAT => {
                    let v: Vec<f32> = (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect();
                    Tensor::from_shape(&s.shape, &v)
                }
                proto::dt::INT64 => Tensor::from_shape(&s.shape, &vec![1i64; n]),
                proto::dt::INT32 => Tensor::from_shape(&s.shape, &vec![1i32; n]),
                proto::dt::UINT8 => Tensor::from_shape(&s.shape, &vec![1u8; n]),
                proto::dt::BOOL => Tensor::from_shape(&s.shape, &vec![true; n]),
                other => {
                    return Err(ToolError::Unsupported(format!(
                        "cannot make synthetic values for input {:?} of type {}",
                        s.name,
                        proto::dtype_name(other)
                    )));
                }
            };
            t.map_err(|e| ToolError::Runtime(format!("input {:?}: {e}", s.name)))
        })
        .collect()
}

/// A tensor's values as f32 (float and integer types), for comparisons.
pub fn values_f32(t: &Tensor) -> Result<Vec<f32>, ToolError> {
    let c = t
        .cast_to::<f32>()
        .map_err(|e| ToolError::Runtime(format!("output of type {:?}: {e}", t.datum_type())))?;
    let v = c
        .to_plain_array_view::<f32>()
        .map_err(|e| ToolError::Runtime(format!("{e}")))?;
    Ok(v.iter().copied().collect())
}
