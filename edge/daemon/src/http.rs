//! The local HTTP API and status page (one port, loopback by default).
//!
//! Endpoints:
//! - `POST /v1/models/{name}/infer`: run a model. JSON body
//!   `{"inputs": {"NAME": {"dtype": "f32", "shape": [..], "data": [..]}}}`
//!   (dtype optional: the manifest's), or a raw `application/octet-stream`
//!   body: the inputs' little-endian bytes concatenated in manifest order
//!   (rows inferred for batching models). Answers JSON with `id`, `outputs`,
//!   `timings_ms`, `cached`, `worker`, `batch`; with
//!   `Accept: application/octet-stream`, the outputs' raw bytes instead
//!   (shapes in the `x-dai-output-shapes` header).
//! - `GET /v1/models`, `GET /v1/models/{name}`: the registry and manifests.
//! - `GET /v1/status`: live figures as JSON (what the status page polls).
//! - `GET /healthz`: the process answers; `GET /readyz`: 200 once a model
//!   is ready and while not shutting down, else 503 with the reason.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /`: the status page (`assets/status.html`).
//!
//! Errors are JSON `{"error": {"code", "message"}}` with a 4xx/5xx status;
//! overload is 503 with `Retry-After`.

use crate::{AppState, metrics, unix_now};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dai_infer::tensor::{DType, Data, TensorData};
use dai_infer::{InferError, InferOutcome};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const STATUS_PAGE: &str = include_str!("../assets/status.html");

pub fn router(state: Arc<AppState>) -> Router {
    let limit = (state.config.daemon.max_body_mb * 1024 * 1024) as usize;
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/v1/status", get(status))
        .route("/v1/models", get(models))
        .route("/v1/models/{name}", get(model_detail))
        .route("/v1/models/{name}/infer", post(infer))
        .route("/v1/models/{name}/samples", post(samples))
        .route("/v1/models/{name}/train", post(train_now))
        .route("/v1/feedback", post(feedback))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint".into(),
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// A JSON error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: String) -> ApiError {
        ApiError {
            status,
            code,
            message,
            retry_after: None,
        }
    }

    fn bad(message: String) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad_input", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": { "code": self.code, "message": self.message } }));
        let mut resp = (self.status, body).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl ApiError {
    fn outcome(&self) -> &'static str {
        match self.code {
            "bad_input" | "payload_too_large" | "unsupported_media_type" => "bad_request",
            "unknown_model" => "unknown_model",
            "model_unavailable" => "unavailable",
            "overloaded" => "overloaded",
            _ => "error",
        }
    }
}

fn from_infer_error(e: InferError, retry_delay_sec: u64) -> ApiError {
    match e {
        InferError::UnknownModel { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_model", e.to_string())
        }
        InferError::Unavailable { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_unavailable",
            e.to_string(),
        ),
        InferError::BadInput(m) => ApiError::bad(m),
        InferError::Overloaded(_) => ApiError {
            retry_after: Some(retry_delay_sec.max(1)),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
        },
        InferError::Failed(m) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "inference_failed", m)
        }
    }
}

async fn status_page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        Html(STATUS_PAGE),
    )
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutting_down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let ready = state
        .runtime
        .models()
        .iter()
        .filter(|m| m.model.is_some())
        .count();
    if ready == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, "no model is ready\n").into_response();
    }
    (StatusCode::OK, format!("ready: {ready} model(s)\n")).into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    sync_gauges(&state);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Copy pool and cache figures into gauges right before a scrape.
fn sync_gauges(state: &AppState) {
    let m = &state.metrics;
    let pool = state.runtime.pool();
    m.queue_depth.set(pool.queue_depth() as i64);
    m.active_workers.set(pool.active() as i64);
    m.batch_size.set(pool.batch_size() as i64);
    if let Some(c) = state.runtime.cache_stats() {
        m.cache_bytes.set(c.used_bytes as i64);
        m.cache_entries.set(c.entries as i64);
        let mut seen = m.evictions_seen.lock();
        if c.evictions > *seen {
            m.cache_evictions.inc_by(c.evictions - *seen);
            *seen = c.evictions;
        }
    }
    for info in state.runtime.models() {
        if let Some(p95) = state.stats.figures(&info.name).latency_ms.p95 {
            m.latency_p95_seconds
                .get_or_create(&metrics::ModelLabel {
                    model: info.name.clone(),
                })
                .set(p95 / 1e3);
        }
    }
}

fn specs_json(specs: &[dai_infer::TensorSpec]) -> Value {
    specs
        .iter()
        .map(|s| json!({ "name": s.name, "dtype": s.dtype, "shape": s.shape }))
        .collect()
}

fn model_json(state: &AppState, info: &dai_infer::ModelInfo) -> Value {
    let fig = state.stats.figures(&info.name);
    let loaded_at = info
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    match &info.model {
        Some(m) => {
            let man = &m.bundle.manifest;
            json!({
                "name": info.name, "version": man.version, "state": "ready",
                "error": info.error, "description": man.description, "labels": man.labels,
                "batching": man.batching, "inputs": specs_json(&man.inputs),
                "outputs": specs_json(&man.outputs), "sha256": m.bundle.model_sha256,
                "variant": m.bundle.variant, "model_file": man.model.file,
                "size_bytes": m.bundle.model_bytes, "estimated_memory_bytes": m.estimated_bytes,
                "loaded_at": loaded_at, "dir": info.dir.display().to_string(),
                "license": man.source.as_ref().map(|s| s.license.clone()),
                "origin": man.source.as_ref().map(|s| format!("{} ({} {})", s.origin, s.package, s.version)),
                "requests": fig.requests, "errors": fig.errors, "latency_ms": fig.latency_ms,
                "throughput_rps": fig.throughput_rps, "stages_ms": fig.stages_ms,
            })
        }
        None => json!({
            "name": info.name, "version": null, "state": "failed", "error": info.error,
            "batching": null, "inputs": [], "outputs": [], "loaded_at": loaded_at,
            "dir": info.dir.display().to_string(),
            "requests": fig.requests, "errors": fig.errors, "latency_ms": fig.latency_ms,
            "throughput_rps": fig.throughput_rps, "stages_ms": fig.stages_ms,
        }),
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let list: Vec<Value> = state
        .runtime
        .models()
        .iter()
        .map(|m| model_json(&state, m))
        .collect();
    Json(json!({ "models": list }))
}

async fn model_detail(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match state.runtime.models().iter().find(|m| m.name == name) {
        Some(m) => Json(model_json(&state, m)).into_response(),
        None => from_infer_error(
            InferError::UnknownModel {
                name,
                known: state.runtime.models().into_iter().map(|m| m.name).collect(),
            },
            0,
        )
        .into_response(),
    }
}

/// Operator alerts, recomputed by the resource manager each tick.
pub fn alerts(state: &AppState) -> Vec<crate::resources::Alert> {
    let mut out = Vec::new();
    let threshold = state.config.latency_threshold_ms;
    for m in state.runtime.models() {
        if m.model.is_none() {
            out.push(crate::resources::Alert {
                level: "error",
                message: format!(
                    "{} failed to load: {}",
                    m.name,
                    m.error.clone().unwrap_or_default()
                ),
            });
            continue;
        }
        if let Some(e) = &m.error {
            out.push(crate::resources::Alert {
                level: "warning",
                message: format!(
                    "{}: reload failed, previous version still serving: {e}",
                    m.name
                ),
            });
        }
        if let Some(p95) = state.stats.figures(&m.name).latency_ms.p95
            && p95 > threshold
        {
            out.push(crate::resources::Alert {
                level: "warning",
                message: format!(
                    "{} p95 {p95:.1} ms exceeds latency_threshold_ms {threshold}",
                    m.name
                ),
            });
        }
    }
    let s = *state.sample.lock();
    if let (Some(avail), Some(total)) = (s.memory_available_mb, s.memory_total_mb)
        && total > 0.0
        && avail / total < 0.1
    {
        out.push(crate::resources::Alert {
            level: "warning",
            message: format!("memory pressure: {avail:.0} of {total:.0} MiB available"),
        });
    }
    out
}

/// The `/v1/status` document (also what snapshots store).
pub fn snapshot(state: &AppState) -> Value {
    let pool = state.runtime.pool();
    let s = *state.sample.lock();
    let cache = match state.runtime.cache_stats() {
        Some(c) => {
            let looked = c.hits + c.misses;
            json!({
                "enabled": true,
                "policy": state.runtime.cache_policy().map(|p| p.as_str()),
                "capacity_bytes": c.capacity_bytes, "used_bytes": c.used_bytes,
                "entries": c.entries, "hits": c.hits, "misses": c.misses,
                "evictions": c.evictions,
                "hit_ratio": if looked > 0 { Some(c.hits as f64 / looked as f64) } else { None },
            })
        }
        None => json!({
            "enabled": false, "policy": state.config.cache_eviction_policy.as_str(),
            "capacity_bytes": 0, "used_bytes": 0, "entries": 0, "hits": 0, "misses": 0,
            "evictions": 0, "hit_ratio": null,
        }),
    };
    let workers: Vec<Value> = pool
        .worker_stats()
        .iter()
        .enumerate()
        .map(|(id, w)| {
            json!({
                "id": id,
                "active": id < pool.active(),
                "in_flight": w.in_flight.load(Ordering::Relaxed),
                "processed": w.processed.load(Ordering::Relaxed),
                "batches": w.batches.load(Ordering::Relaxed),
            })
        })
        .collect();
    let profile = state.profile.lock().clone();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "device": state.device,
        "uptime_sec": state.started.elapsed().as_secs_f64(),
        "listen": state.listen.lock().map(|a| a.to_string()),
        "ts": unix_now(),
        "models": state.runtime.models().iter().map(|m| model_json(state, m)).collect::<Vec<_>>(),
        "cache": cache,
        "resources": {
            "cpu_percent": s.cpu_percent, "process_cpu_percent": s.process_cpu_percent,
            "memory_used_mb": s.memory_used_mb, "memory_total_mb": s.memory_total_mb,
            "rss_mb": s.rss_mb, "cpu_limit": state.config.cpu_limit,
            "memory_limit_mb": state.config.memory_limit_mb,
            "models_memory_mb": state.runtime.memory_used_bytes(None) as f64 / 1048576.0,
            "active_workers": pool.active(), "max_workers": pool.max_workers(),
            "batch_size": pool.batch_size(), "max_batch_size": state.config.batch_size,
            "queue_depth": pool.queue_depth(), "queue_capacity": pool.queue_capacity(),
        },
        "load_balancing": { "strategy": pool.strategy().as_str(), "workers": workers },
        "decisions": state.decisions.recent(),
        "alerts": *state.alerts.lock(),
        "profiling": {
            "enabled": state.config.profiling_enabled,
            "interval_sec": state.config.profiling_interval_sec,
            "last_sample_ts": profile.ts,
            "models": profile.models,
        },
        "latency_threshold_ms": state.config.latency_threshold_ms,
        "throughput_target_rps": state.config.throughput_target_rps,
        "throughput_rps": state.stats.overall_rps(),
        "training": crate::training::status(state),
        "sensors": state.sensors.snapshot(),
    })
}

async fn status(State(state): State<Arc<AppState>>) -> Json<Value> {
    // The snapshot reads the SQLite store: keep it off the async threads.
    let st = state.clone();
    Json(
        tokio::task::spawn_blocking(move || snapshot(&st))
            .await
            .unwrap_or(Value::Null),
    )
}

/// Decode a JSON tensor; `spec_dtype` is used when the request gives none.
fn tensor_from_json(name: &str, v: &Value, spec_dtype: DType) -> Result<TensorData, ApiError> {
    let obj = v.as_object().ok_or_else(|| {
        ApiError::bad(format!(
            "inputs.{name}: expected an object {{dtype, shape, data}}"
        ))
    })?;
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data"))
    {
        return Err(ApiError::bad(format!(
            "inputs.{name}: unknown field {k:?}; expected dtype, shape, data"
        )));
    }
    let dtype = match obj.get("dtype") {
        None | Some(Value::Null) => spec_dtype,
        Some(Value::String(s)) => DType::parse(s).ok_or_else(|| {
            ApiError::bad(format!(
                "inputs.{name}.dtype: {s:?} is not one of f32, i64, i32, u8, i8"
            ))
        })?,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "inputs.{name}.dtype: expected a string, got {other}"
            )));
        }
    };
    let shape: Vec<usize> = match obj.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .enumerate()
            .map(|(i, d)| {
                d.as_u64().map(|x| x as usize).ok_or_else(|| {
                    ApiError::bad(format!(
                        "inputs.{name}.shape[{i}]: expected a non-negative integer, got {d}"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::bad(format!(
                "inputs.{name}.shape: expected an array of integers"
            )));
        }
    };
    let items = match obj.get("data") {
        Some(Value::Array(a)) => a,
        _ => {
            return Err(ApiError::bad(format!(
                "inputs.{name}.data: expected a flat array of numbers"
            )));
        }
    };
    let elem = |i: usize, x: &Value| -> Result<f64, ApiError> {
        x.as_f64().ok_or_else(|| {
            ApiError::bad(format!(
                "inputs.{name}.data[{i}]: expected a number, got {x}"
            ))
        })
    };
    let int = |i: usize, x: &Value, lo: i64, hi: i64| -> Result<i64, ApiError> {
        match x.as_i64() {
            Some(v) if v >= lo && v <= hi => Ok(v),
            _ => Err(ApiError::bad(format!(
                "inputs.{name}.data[{i}]: expected an integer in {lo}..={hi} for {dtype}, got {x}"
            ))),
        }
    };
    let data = match dtype {
        DType::F32 => Data::F32(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| elem(i, x).map(|v| v as f32))
                .collect::<Result<_, _>>()?,
        ),
        DType::I64 => Data::I64(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| int(i, x, i64::MIN, i64::MAX))
                .collect::<Result<_, _>>()?,
        ),
        DType::I32 => Data::I32(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| int(i, x, i32::MIN as i64, i32::MAX as i64).map(|v| v as i32))
                .collect::<Result<_, _>>()?,
        ),
        DType::U8 => Data::U8(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| int(i, x, 0, 255).map(|v| v as u8))
                .collect::<Result<_, _>>()?,
        ),
        DType::I8 => Data::I8(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| int(i, x, -128, 127).map(|v| v as i8))
                .collect::<Result<_, _>>()?,
        ),
    };
    TensorData::new(shape, data).map_err(|e| ApiError::bad(format!("inputs.{name}: {e}")))
}

fn decode_json(
    state: &AppState,
    model: &str,
    body: &[u8],
) -> Result<HashMap<String, TensorData>, ApiError> {
    let manifest = state
        .runtime
        .manifest(model)
        .map_err(|e| from_infer_error(e, 0))?;
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("malformed JSON body: {e}")))?;
    let inputs = v.get("inputs").and_then(Value::as_object).ok_or_else(|| {
        ApiError::bad("JSON body: expected {\"inputs\": {NAME: {dtype, shape, data}}}".into())
    })?;
    let mut out = HashMap::new();
    for (name, t) in inputs {
        let dtype = manifest
            .inputs
            .iter()
            .find(|s| &s.name == name)
            .map(|s| s.dtype)
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "unknown input {name:?}; model {model} takes {:?}",
                    manifest
                        .inputs
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                ))
            })?;
        out.insert(name.clone(), tensor_from_json(name, t, dtype)?);
    }
    Ok(out)
}

fn decode_raw(
    state: &AppState,
    model: &str,
    body: &[u8],
) -> Result<HashMap<String, TensorData>, ApiError> {
    let manifest = state
        .runtime
        .manifest(model)
        .map_err(|e| from_infer_error(e, 0))?;
    let row_bytes: usize = manifest
        .inputs
        .iter()
        .map(|s| s.row_elems() * s.dtype.size_of())
        .sum();
    let layout = manifest
        .inputs
        .iter()
        .map(|s| format!("{} {} {:?}", s.name, s.dtype, s.shape))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = if manifest.batching {
        if body.is_empty() || !body.len().is_multiple_of(row_bytes) {
            return Err(ApiError::bad(format!(
                "raw body of {} bytes is not a whole number of rows of {row_bytes} bytes ({layout}, little-endian, in this order)",
                body.len()
            )));
        }
        body.len() / row_bytes
    } else {
        let expected: usize = manifest
            .inputs
            .iter()
            .map(|s| s.elems() * s.dtype.size_of())
            .sum();
        if body.len() != expected {
            return Err(ApiError::bad(format!(
                "raw body of {} bytes, expected exactly {expected} bytes ({layout}, little-endian, in this order)",
                body.len()
            )));
        }
        1
    };
    let mut offset = 0;
    let mut out = HashMap::new();
    for s in &manifest.inputs {
        let mut shape = s.shape.clone();
        if manifest.batching {
            shape[0] = rows;
        }
        let n: usize = shape.iter().product::<usize>() * s.dtype.size_of();
        let data = Data::from_le_bytes(s.dtype, &body[offset..offset + n])
            .map_err(|e| ApiError::bad(e.0))?;
        offset += n;
        out.insert(
            s.name.clone(),
            TensorData::new(shape, data).map_err(|e| ApiError::bad(e.0))?,
        );
    }
    Ok(out)
}

fn tensor_json(t: &TensorData) -> Value {
    let data: Value = match &t.data {
        Data::F32(v) => v.iter().map(|x| json!(x)).collect(),
        Data::I64(v) => v.iter().map(|x| json!(x)).collect(),
        Data::I32(v) => v.iter().map(|x| json!(x)).collect(),
        Data::U8(v) => v.iter().map(|x| json!(x)).collect(),
        Data::I8(v) => v.iter().map(|x| json!(x)).collect(),
    };
    json!({ "dtype": t.dtype(), "shape": t.shape, "data": data })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let started = Instant::now();
    match infer_inner(&state, &name, peer, &headers, body, started).await {
        Ok(resp) => resp,
        Err(e) => {
            let model = if state.runtime.model(&name).is_ok() {
                name.as_str()
            } else {
                "_unknown"
            };
            state
                .metrics
                .requests
                .get_or_create(&metrics::ModelOutcome {
                    model: model.to_string(),
                    outcome: e.outcome().into(),
                })
                .inc();
            if e.code == "overloaded" {
                state.metrics.overloaded.inc();
            }
            if model != "_unknown" {
                state.stats.record_error(model);
            }
            tracing::debug!(model = %name, code = e.code, message = %e.message, "request refused");
            e.into_response()
        }
    }
}

async fn infer_inner(
    state: &AppState,
    name: &str,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    started: Instant,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| body_error(state, e))?;
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase();
    let inputs = if ctype.starts_with("application/json") {
        decode_json(state, name, &body)?
    } else if ctype.starts_with("application/octet-stream") {
        decode_raw(state, name, &body)?
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content-type {ctype:?}: expected application/json or application/octet-stream"
            ),
        ));
    };
    let decoded = started.elapsed();
    let out = state
        .runtime
        .infer(name, inputs, Some(peer.ip()))
        .await
        .map_err(|e| from_infer_error(e, state.config.retry_delay_sec))?;
    let t_post = Instant::now();
    let seq = state.request_seq.fetch_add(1, Ordering::Relaxed);
    let id = format!("{:x}-{seq:x}", state.boot_id);
    if let Some(emb) = &out.head_input
        && let Data::F32(features) = &emb.data
    {
        state.training.feedback.lock().put(
            id.clone(),
            out.model.clone(),
            out.version.clone(),
            features.clone(),
            emb.rows(),
        );
    }
    let want_raw = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/octet-stream"));
    let resp = if want_raw {
        raw_response(&out, &id)
    } else {
        json_response(&out, &id, decoded, started, t_post)
    };
    let post = t_post.elapsed() + out.batching;
    let total = started.elapsed();
    record_ok(state, &out, decoded + out.prepare, post, total);
    Ok(resp)
}

fn json_response(
    out: &InferOutcome,
    id: &str,
    decoded: Duration,
    started: Instant,
    t_post: Instant,
) -> Response {
    let outputs: serde_json::Map<String, Value> = out
        .output_names
        .iter()
        .zip(out.outputs.iter())
        .map(|(n, t)| (n.clone(), tensor_json(t)))
        .collect();
    let body = json!({
        "id": id,
        "model": out.model,
        "version": out.version,
        "cached": out.cached,
        "worker": out.worker,
        "head_version": out.head_version,
        "batch": { "rows": out.batch_rows, "requests": out.batch_requests },
        "timings_ms": {
            "preprocess": ms(decoded + out.prepare),
            "queue": ms(out.queue),
            "infer": ms(out.infer),
            "postprocess": ms(out.batching + t_post.elapsed()),
            "total": ms(started.elapsed()),
        },
        "outputs": outputs,
    });
    Json(body).into_response()
}

fn raw_response(out: &InferOutcome, id: &str) -> Response {
    let mut bytes = Vec::new();
    let mut shapes = Vec::new();
    for (n, t) in out.output_names.iter().zip(out.outputs.iter()) {
        bytes.extend(t.data.to_le_bytes());
        let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        shapes.push(format!("{n}:{}:{}", t.dtype(), dims.join("x")));
    }
    let mut resp = (StatusCode::OK, bytes).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&shapes.join(",")) {
        h.insert("x-dai-output-shapes", v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-dai-request-id", v);
    }
    resp
}

fn record_ok(state: &AppState, out: &InferOutcome, pre: Duration, post: Duration, total: Duration) {
    let m = &state.metrics;
    let model = metrics::ModelLabel {
        model: out.model.clone(),
    };
    let outcome = if out.cached { "cached" } else { "ok" };
    m.requests
        .get_or_create(&metrics::ModelOutcome {
            model: out.model.clone(),
            outcome: outcome.into(),
        })
        .inc();
    m.request_duration
        .get_or_create(&model)
        .observe(total.as_secs_f64());
    if state.runtime.cache_stats().is_some() {
        if out.cached {
            m.cache_hits.inc();
        } else {
            m.cache_misses.inc();
            m.batch_rows
                .get_or_create(&model)
                .observe(out.batch_rows as f64);
        }
    } else {
        m.batch_rows
            .get_or_create(&model)
            .observe(out.batch_rows as f64);
    }
    let stages = [
        ("preprocess", pre),
        ("queue", out.queue),
        ("infer", out.infer),
        ("postprocess", post),
    ];
    if state.config.profiling_enabled {
        for (stage, d) in stages {
            m.stage_duration
                .get_or_create(&metrics::ModelStage {
                    model: out.model.clone(),
                    stage: stage.into(),
                })
                .observe(d.as_secs_f64());
        }
        state.stats.record_ok(&out.model, total, &stages);
    } else {
        state.stats.record_ok(&out.model, total, &[]);
    }
}

fn body_error(state: &AppState, e: axum::extract::rejection::BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "request body larger than max_body_mb = {} MiB",
                state.config.daemon.max_body_mb
            ),
        )
    } else {
        ApiError::bad(format!("cannot read request body: {e}"))
    }
}

fn from_training_error(e: crate::training::TrainingError) -> ApiError {
    use crate::training::TrainingError as T;
    match e {
        T::BadInput(m) => ApiError::bad(m),
        T::Model(e) => from_infer_error(e, 0),
        T::NoHead(_) => ApiError::new(StatusCode::CONFLICT, "no_head", e.to_string()),
        T::Busy(_) => ApiError::new(StatusCode::CONFLICT, "training_busy", e.to_string()),
        T::Store(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        ),
        T::Failed(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "training_failed", m),
    }
}

/// `"label": N` or `"labels": [N, ...]`.
fn labels_of(v: &Value) -> Result<Vec<i64>, ApiError> {
    let as_int = |x: &Value, at: &str| {
        x.as_i64()
            .ok_or_else(|| ApiError::bad(format!("{at}: expected an integer class label, got {x}")))
    };
    match (v.get("label"), v.get("labels")) {
        (Some(l), None) => Ok(vec![as_int(l, "label")?]),
        (None, Some(Value::Array(a))) => a
            .iter()
            .enumerate()
            .map(|(i, x)| as_int(x, &format!("labels[{i}]")))
            .collect(),
        _ => Err(ApiError::bad(
            "expected \"label\": N or \"labels\": [N, ...]".into(),
        )),
    }
}

async fn samples(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let run = async {
        let body = body.map_err(|e| body_error(&state, e))?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("malformed JSON body: {e}")))?;
        let labels = labels_of(&v)?;
        let inputs = decode_json(&state, &name, &body)?;
        for (n, t) in &inputs {
            if let Data::F32(x) = &t.data
                && x.iter().any(|v| !v.is_finite())
            {
                return Err(ApiError::bad(format!(
                    "inputs.{n}: NaN or infinite values are not valid samples"
                )));
            }
        }
        let out = state
            .runtime
            .infer(&name, inputs, Some(peer.ip()))
            .await
            .map_err(|e| from_infer_error(e, state.config.retry_delay_sec))?;
        let emb = out.head_input.ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_head",
                format!("model {name} has no trainable head"),
            )
        })?;
        let Data::F32(features) = &emb.data else {
            return Err(ApiError::bad("the head input is not f32".into()));
        };
        let st = state.clone();
        let (features, rows) = (features.clone(), emb.rows());
        let ids = tokio::task::spawn_blocking(move || {
            crate::training::store_sample(&st, &name, &features, rows, &labels, "api")
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(from_training_error)?;
        Ok::<_, ApiError>(Json(json!({ "stored": ids.len(), "ids": ids })).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn feedback(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let run = async {
        let body = body.map_err(|e| body_error(&state, e))?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("malformed JSON body: {e}")))?;
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ApiError::bad("expected \"id\": the id of an earlier inference answer".into())
            })?
            .to_string();
        let labels = labels_of(&v)?;
        // An answer can be labelled once: the entry is taken out.
        let entry = state.training.feedback.lock().take(&id);
        let (model, version, features, rows) = entry.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_inference",
                format!("no recent inference with id {id:?} (only answers of models with a trainable head are kept, the last 10000)"),
            )
        })?;
        let current = state
            .runtime
            .model(&model)
            .map_err(|e| from_infer_error(e, 0))?;
        if current.version() != version {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "stale_inference",
                format!(
                    "inference {id} used {model} {version}; {} is loaded now",
                    current.version()
                ),
            ));
        }
        let st = state.clone();
        let m2 = model.clone();
        let ids = tokio::task::spawn_blocking(move || {
            crate::training::store_sample(&st, &m2, &features, rows, &labels, "feedback")
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(from_training_error)?;
        Ok::<_, ApiError>(
            Json(json!({ "stored": ids.len(), "ids": ids, "model": model })).into_response(),
        )
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn train_now(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let st = state.clone();
    let result =
        tokio::task::spawn_blocking(move || crate::training::run_training(&st, &name)).await;
    match result {
        Ok(Ok(run)) => Json(json!({ "run": run })).into_response(),
        Ok(Err(e)) => from_training_error(e).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            .into_response(),
    }
}
