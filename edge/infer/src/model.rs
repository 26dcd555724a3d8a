//! A bundle loaded into tract: parsed once, optimised per batch size.
//!
//! The ONNX graph is parsed at load ([`LoadedModel::load`]), its outputs cut
//! down to the ones the manifest names, and a plan for one request's shape
//! is optimised eagerly (so a model that tract cannot run is refused at load,
//! not at the first request). Batching models get further plans for batch
//! sizes rounded up to a power of two, built on first use and kept; rows
//! that do not fill a plan are zero-padded and dropped from the answer.
//! Inputs with `dynamic` axes get a plan per size a request brings (tract
//! optimises best for concrete shapes); the plans live in a bounded LRU
//! ([`MAX_PLANS`]) whose builds and evictions are counted ([`PlanStats`]).

use crate::bundle::{Bundle, Preprocess, TensorSpec};
use crate::tensor::{DType, Data, TensorData};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tract_onnx::prelude::*;

type Plan = Arc<TypedRunnableModel>;

/// Plans one model keeps (batch sizes x dynamic sizes); the least recently
/// used goes first. A plan holds tract's optimised copy of the graph.
pub const MAX_PLANS: usize = 16;

/// The plan cache's figures, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlanStats {
    pub cached: usize,
    pub builds: u64,
    pub hits: u64,
    pub evictions: u64,
}

/// Plans by key (rows, then each dynamic axis's size in manifest order),
/// least recently used first in `order`.
#[derive(Debug, Default)]
struct PlanCache {
    map: HashMap<Vec<usize>, Plan>,
    order: std::collections::VecDeque<Vec<usize>>,
    stats: PlanStats,
}

impl PlanCache {
    fn get(&mut self, key: &[usize]) -> Option<Plan> {
        let plan = self.map.get(key)?.clone();
        if let Some(pos) = self.order.iter().position(|k| k == key) {
            let k = self.order.remove(pos);
            self.order.extend(k);
        }
        self.stats.hits += 1;
        Some(plan)
    }

    fn insert(&mut self, key: Vec<usize>, plan: Plan) {
        self.stats.builds += 1;
        if self.map.insert(key.clone(), plan).is_none() {
            self.order.push_back(key);
        }
        while self.map.len() > MAX_PLANS {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                    self.stats.evictions += 1;
                }
                None => break,
            }
        }
        self.stats.cached = self.map.len();
    }
}

/// Why a model cannot be loaded or run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("{model}: tract cannot load {path}: {message}")]
    Load {
        model: String,
        path: String,
        message: String,
    },
    #[error(
        "{model}: needs about {needed_mb} MiB but only {available_mb} MiB of memory_limit_mb={limit_mb} is left"
    )]
    OverMemory {
        model: String,
        needed_mb: u64,
        available_mb: u64,
        limit_mb: u64,
    },
    #[error("{0}")]
    BadInput(String),
    #[error("{model}: inference failed: {message}")]
    Run { model: String, message: String },
}

/// The trainable head currently serving, swapped atomically after training.
#[derive(Debug, Clone)]
pub struct HeadState {
    pub head: dai_head::Head,
    /// 0 = the head shipped in the bundle; n = the n-th accepted local head.
    pub version: i64,
}

/// A model ready to run.
#[derive(Debug)]
pub struct LoadedModel {
    /// The bundle's trainable head, if any; `None` for plain ONNX models.
    pub head: Option<arc_swap::ArcSwap<HeadState>>,
    /// The head as shipped in the bundle (the base local training starts from
    /// when no trained head exists yet).
    pub shipped_head: Option<dai_head::Head>,
    /// The bundle's validation rows (`[head.validation]`), if it ships
    /// them: the local-run acceptance check scores on them too.
    pub validation: Option<dai_head::rows::Rows>,
    pub bundle: Bundle,
    /// Manifest input spec index -> position in tract's input list.
    input_order: Vec<usize>,
    graph: InferenceModel,
    plans: Mutex<PlanCache>,
    /// Estimated resident size (bytes) used against memory_limit_mb.
    pub estimated_bytes: u64,
    pub max_batch: usize,
}

impl LoadedModel {
    /// Rough resident size of a model: the parsed weights plus the optimised
    /// copy (tract keeps both) plus working memory. Conservative on purpose.
    pub fn estimate_bytes(bundle: &Bundle) -> u64 {
        bundle.model_bytes * 2 + 8 * 1024 * 1024
    }

    /// Parse and optimise `bundle`. `max_batch` bounds batch plans.
    pub fn load(bundle: Bundle, max_batch: usize) -> Result<LoadedModel, ModelError> {
        let name = bundle.manifest.name.clone();
        let path = bundle.model_path();
        let load_err = |e: &dyn std::fmt::Display| ModelError::Load {
            model: name.clone(),
            path: path.display().to_string(),
            message: format!("{e:#}"),
        };
        let mut graph = tract_onnx::onnx()
            .with_ignore_value_info(bundle.manifest.model.ignore_value_info)
            .model_for_path(&path)
            .map_err(|e| load_err(&e))?;
        let outputs: Vec<&str> = bundle
            .manifest
            .outputs
            .iter()
            .map(TensorSpec::onnx_name)
            .collect();
        graph
            .select_outputs_by_name(outputs.iter().copied())
            .map_err(|e| load_err(&format!("selecting outputs {outputs:?}: {e}")))?;
        let tract_inputs: Vec<String> = graph
            .input_outlets()
            .map_err(|e| load_err(&e))?
            .iter()
            .map(|o| graph.node(o.node).name.clone())
            .collect();
        if tract_inputs.len() != bundle.manifest.inputs.len() {
            return Err(load_err(&format!(
                "the ONNX graph has inputs {tract_inputs:?}, the manifest lists {}",
                bundle.manifest.inputs.len()
            )));
        }
        let mut input_order = Vec::new();
        for spec in &bundle.manifest.inputs {
            let pos = tract_inputs
                .iter()
                .position(|n| n == spec.onnx_name())
                .ok_or_else(|| {
                    load_err(&format!(
                        "manifest input {:?} is not a graph input (graph has {tract_inputs:?})",
                        spec.onnx_name()
                    ))
                })?;
            input_order.push(pos);
        }
        let shipped_head = match &bundle.manifest.head {
            Some(h) => {
                let (head, _) =
                    dai_head::Head::load(&bundle.dir.join(&h.file)).map_err(|e| load_err(&e))?;
                let feeds = bundle
                    .manifest
                    .outputs
                    .iter()
                    .find(|o| o.name == h.input)
                    .map(TensorSpec::row_elems)
                    .unwrap_or(0);
                if head.spec.inputs() != feeds {
                    return Err(load_err(&format!(
                        "head takes {} inputs but output {:?} has {feeds} per row",
                        head.spec.inputs(),
                        h.input
                    )));
                }
                Some(head)
            }
            None => None,
        };
        let validation = match bundle
            .manifest
            .head
            .as_ref()
            .and_then(|h| h.validation.as_ref())
        {
            Some(v) => {
                let path = bundle.dir.join(&v.file);
                let rows = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| dai_head::rows::Rows::from_bytes(&b))
                    .map_err(|e| load_err(&format!("{}: {e}", path.display())))?;
                let takes = shipped_head.as_ref().map_or(0, |h| h.spec.inputs());
                if rows.features != takes {
                    return Err(load_err(&format!(
                        "{}: rows of {} features, the head takes {takes}",
                        path.display(),
                        rows.features
                    )));
                }
                Some(rows)
            }
            None => None,
        };
        let model = LoadedModel {
            validation,
            head: shipped_head
                .clone()
                .map(|head| arc_swap::ArcSwap::from_pointee(HeadState { head, version: 0 })),
            shipped_head,
            estimated_bytes: Self::estimate_bytes(&bundle),
            bundle,
            input_order,
            graph,
            plans: Mutex::new(PlanCache::default()),
            max_batch: max_batch.max(1),
        };
        let sizes = model.default_sizes();
        model.plan(1, &sizes)?;
        Ok(model)
    }

    pub fn name(&self) -> &str {
        &self.bundle.manifest.name
    }

    pub fn version(&self) -> &str {
        &self.bundle.manifest.version
    }

    /// Version string that identifies what answers this model gives: the
    /// bundle version plus the serving head version.
    pub fn answer_version(&self) -> String {
        match &self.head {
            Some(h) => format!("{}+head.{}", self.version(), h.load().version),
            None => self.version().to_string(),
        }
    }

    /// Apply the head to the backbone outputs: returns (head output, head input).
    pub fn apply_head(
        &self,
        backbone: &[TensorData],
    ) -> Result<Option<(TensorData, TensorData)>, ModelError> {
        let (Some(state), Some(href)) = (&self.head, &self.bundle.manifest.head) else {
            return Ok(None);
        };
        let err = |message: String| ModelError::Run {
            model: self.name().to_string(),
            message,
        };
        let idx = self
            .bundle
            .manifest
            .outputs
            .iter()
            .position(|o| o.name == href.input)
            .ok_or_else(|| err(format!("no output {:?} for the head", href.input)))?;
        let emb = backbone
            .get(idx)
            .ok_or_else(|| err("backbone output missing".into()))?
            .clone();
        let Data::F32(x) = &emb.data else {
            return Err(err(format!(
                "head input {:?} is {}, expected f32",
                href.input,
                emb.dtype()
            )));
        };
        let rows = emb.rows();
        let state = state.load();
        let mut out = dai_head::predict(&state.head, x, rows).map_err(|e| err(e.to_string()))?;
        let k = state.head.spec.outputs();
        if href.transform == crate::bundle::HeadTransform::Softmax {
            for row in out.chunks_mut(k) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                for v in row.iter_mut() {
                    *v /= sum;
                }
            }
        }
        let t = TensorData::new(vec![rows, k], Data::F32(out)).map_err(|e| err(e.0))?;
        Ok(Some((t, emb)))
    }

    pub fn batching(&self) -> bool {
        self.bundle.manifest.batching
    }

    /// The plan cache's figures.
    pub fn plan_stats(&self) -> PlanStats {
        self.plans.lock().stats
    }

    /// Whether any input has dynamic axes.
    pub fn has_dynamic_axes(&self) -> bool {
        self.bundle
            .manifest
            .inputs
            .iter()
            .any(|s| !s.dynamic.is_empty())
    }

    /// The manifest's size of every dynamic axis, in manifest order.
    fn default_sizes(&self) -> Vec<usize> {
        self.bundle
            .manifest
            .inputs
            .iter()
            .flat_map(|s| s.dynamic.iter().map(|d| s.shape[d.axis]))
            .collect()
    }

    /// The size of every dynamic axis in prepared `inputs` (manifest order).
    fn sizes_of(&self, inputs: &[&TensorData]) -> Vec<usize> {
        self.bundle
            .manifest
            .inputs
            .iter()
            .zip(inputs)
            .flat_map(|(s, t)| {
                s.dynamic
                    .iter()
                    .map(|d| t.shape.get(d.axis).copied().unwrap_or(0))
            })
            .collect()
    }

    /// Plan for `rows` request rows (rounded up to a power of two) at the
    /// dynamic axes' `sizes`.
    fn plan(&self, rows: usize, sizes: &[usize]) -> Result<(Plan, usize), ModelError> {
        let rows = if self.batching() {
            rows.next_power_of_two()
        } else {
            1
        };
        let mut key = Vec::with_capacity(1 + sizes.len());
        key.push(rows);
        key.extend_from_slice(sizes);
        if let Some(p) = self.plans.lock().get(&key) {
            return Ok((p, rows));
        }
        let plan = self.build_plan(rows, sizes)?;
        self.plans.lock().insert(key, plan.clone());
        Ok((plan, rows))
    }

    fn build_plan(&self, rows: usize, sizes: &[usize]) -> Result<Plan, ModelError> {
        let err = |e: TractError| ModelError::Load {
            model: self.name().to_string(),
            path: self.bundle.model_path().display().to_string(),
            message: format!("optimising for batch {rows}: {e:#}"),
        };
        let mut g = self.graph.clone();
        let mut sizes = sizes.iter();
        for (spec, &pos) in self.bundle.manifest.inputs.iter().zip(&self.input_order) {
            let mut shape = spec.shape.clone();
            if self.batching() {
                shape[0] = rows;
            }
            for d in &spec.dynamic {
                if let Some(&n) = sizes.next() {
                    shape[d.axis] = n;
                }
            }
            g.set_input_fact(pos, InferenceFact::dt_shape(tract_dt(spec.dtype), shape))
                .map_err(err)?;
        }
        g.into_optimized()
            .map_err(err)?
            .into_runnable()
            .map_err(err)
    }

    /// Check a request's inputs against the manifest (names, dtypes, shapes),
    /// apply preprocessing, and return them in manifest order with the
    /// request's row count.
    pub fn prepare(
        &self,
        mut inputs: HashMap<String, TensorData>,
    ) -> Result<(Vec<TensorData>, usize), ModelError> {
        let specs = &self.bundle.manifest.inputs;
        if let Some(extra) = inputs.keys().find(|k| !specs.iter().any(|s| &s.name == *k)) {
            return Err(ModelError::BadInput(format!(
                "unknown input {extra:?}; model {} takes {:?}",
                self.name(),
                specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
            )));
        }
        let mut rows = None;
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            let t = inputs.remove(&spec.name).ok_or_else(|| {
                ModelError::BadInput(format!(
                    "missing input {:?} ({} {:?})",
                    spec.name, spec.dtype, spec.shape
                ))
            })?;
            let t = self.preprocess(spec, t)?;
            check_shape(self, spec, &t)?;
            let r = if self.batching() { t.rows() } else { 1 };
            if *rows.get_or_insert(r) != r {
                return Err(ModelError::BadInput(format!(
                    "input {:?} has {r} rows, earlier inputs had {}",
                    spec.name,
                    rows.unwrap_or(0)
                )));
            }
            out.push(t);
        }
        Ok((out, rows.unwrap_or(1)))
    }

    fn preprocess(&self, spec: &TensorSpec, t: TensorData) -> Result<TensorData, ModelError> {
        match (&self.bundle.manifest.preprocess, spec.dtype, &t.data) {
            (
                Some(Preprocess::Normalize {
                    scale,
                    mean,
                    std,
                    channel_axis,
                }),
                DType::F32,
                Data::U8(px),
            ) => {
                if t.shape.len() != spec.shape.len() {
                    return Err(ModelError::BadInput(format!(
                        "input {:?}: shape {:?} has {} axes, expected {} ({:?})",
                        spec.name,
                        t.shape,
                        t.shape.len(),
                        spec.shape.len(),
                        spec.shape
                    )));
                }
                let inner: usize = t.shape[channel_axis + 1..].iter().product();
                let channels = t.shape[*channel_axis];
                if channels != mean.len() {
                    return Err(ModelError::BadInput(format!(
                        "input {:?}: axis {channel_axis} has {channels} channels, expected {}",
                        spec.name,
                        mean.len()
                    )));
                }
                let data = px
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let c = (i / inner) % channels;
                        (p as f32 * scale - mean[c]) / std[c]
                    })
                    .collect();
                TensorData::new(t.shape, Data::F32(data))
                    .map_err(|e| ModelError::BadInput(format!("input {:?}: {e}", spec.name)))
            }
            _ => Ok(t),
        }
    }

    /// Run prepared inputs that hold `rows` rows in total (already batched).
    /// Returns outputs with exactly `rows` rows.
    pub fn run(&self, inputs: &[&TensorData], rows: usize) -> Result<Vec<TensorData>, ModelError> {
        let run_err = |message: String| ModelError::Run {
            model: self.name().to_string(),
            message,
        };
        let (plan, plan_rows) = self.plan(rows, &self.sizes_of(inputs))?;
        let mut tract_inputs: Vec<Option<TValue>> = vec![None; inputs.len()];
        for (t, &pos) in inputs.iter().zip(&self.input_order) {
            let padded;
            let t = if self.batching() && t.rows() != plan_rows {
                padded = TensorData::concat_rows(&[t], plan_rows).map_err(|e| run_err(e.0))?;
                &padded
            } else {
                *t
            };
            tract_inputs[pos] = Some(
                to_tract(t)
                    .map_err(|e| run_err(format!("{e:#}")))?
                    .into_tvalue(),
            );
        }
        let tract_inputs: TVec<TValue> = tract_inputs.into_iter().flatten().collect();
        let outs = plan
            .run(tract_inputs)
            .map_err(|e| run_err(format!("{e:#}")))?;
        let mut result = Vec::with_capacity(outs.len());
        for (spec, o) in self.bundle.manifest.outputs.iter().zip(outs.iter()) {
            let t = from_tract(o).map_err(|e| run_err(format!("output {:?}: {e:#}", spec.name)))?;
            let t = if self.batching() && t.rows() != rows {
                t.slice_rows(0, rows).map_err(|e| run_err(e.0))?
            } else {
                t
            };
            result.push(t);
        }
        Ok(result)
    }
}

fn check_shape(m: &LoadedModel, spec: &TensorSpec, t: &TensorData) -> Result<(), ModelError> {
    if t.dtype() != spec.dtype {
        return Err(ModelError::BadInput(format!(
            "input {:?}: dtype {} but the model expects {}",
            spec.name,
            t.dtype(),
            spec.dtype
        )));
    }
    // Every axis as the manifest says, except the batch axis (any row
    // count) and dynamic axes (within their bounds).
    let fits = |axis: usize, n: usize| {
        if m.batching() && axis == 0 {
            return n >= 1;
        }
        match spec.dynamic.iter().find(|d| d.axis == axis) {
            Some(d) => (d.min..=d.max).contains(&n),
            None => spec.shape.get(axis) == Some(&n),
        }
    };
    let ok =
        t.shape.len() == spec.shape.len() && t.shape.iter().enumerate().all(|(a, &n)| fits(a, n));
    if !ok {
        let dims: Vec<String> = spec
            .shape
            .iter()
            .enumerate()
            .map(|(a, d)| match spec.dynamic.iter().find(|x| x.axis == a) {
                _ if m.batching() && a == 0 => "N".to_string(),
                Some(x) => format!("{}..{}", x.min, x.max),
                None => d.to_string(),
            })
            .collect();
        let expected = format!("[{}]", dims.join(", "));
        return Err(ModelError::BadInput(format!(
            "input {:?}: shape {:?} but the model expects {expected}",
            spec.name, t.shape
        )));
    }
    if m.batching() && t.rows() > m.max_batch {
        return Err(ModelError::BadInput(format!(
            "input {:?}: {} rows exceed batch_size {}",
            spec.name,
            t.rows(),
            m.max_batch
        )));
    }
    Ok(())
}

fn tract_dt(dt: DType) -> DatumType {
    match dt {
        DType::F32 => DatumType::F32,
        DType::I64 => DatumType::I64,
        DType::I32 => DatumType::I32,
        DType::U8 => DatumType::U8,
        DType::I8 => DatumType::I8,
    }
}

fn to_tract(t: &TensorData) -> TractResult<Tensor> {
    match &t.data {
        Data::F32(v) => Tensor::from_shape(&t.shape, v),
        Data::I64(v) => Tensor::from_shape(&t.shape, v),
        Data::I32(v) => Tensor::from_shape(&t.shape, v),
        Data::U8(v) => Tensor::from_shape(&t.shape, v),
        Data::I8(v) => Tensor::from_shape(&t.shape, v),
    }
}

fn from_tract(t: &Tensor) -> TractResult<TensorData> {
    let shape = t.shape().to_vec();
    let data = match t.datum_type() {
        DatumType::F32 => Data::F32(t.to_plain_array_view::<f32>()?.iter().copied().collect()),
        DatumType::I64 => Data::I64(t.to_plain_array_view::<i64>()?.iter().copied().collect()),
        DatumType::I32 => Data::I32(t.to_plain_array_view::<i32>()?.iter().copied().collect()),
        DatumType::U8 => Data::U8(t.to_plain_array_view::<u8>()?.iter().copied().collect()),
        DatumType::I8 => Data::I8(t.to_plain_array_view::<i8>()?.iter().copied().collect()),
        other => {
            let f = t.cast_to::<f32>()?;
            tracing::debug!(?other, "casting output to f32");
            Data::F32(f.to_plain_array_view::<f32>()?.iter().copied().collect())
        }
    };
    TensorData::new(shape, data).map_err(|e| TractError::msg(e.0))
}
