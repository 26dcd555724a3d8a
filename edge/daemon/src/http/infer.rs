//! `POST /v1/models/{name}/infer`: decode ([`dai_infer::codec`]), run through
//! the runtime, remember the head input for feedback, answer JSON or raw,
//! and record the request in metrics and the rolling figures.

use super::{ApiError, App, body_error, from_infer_error};
use crate::metrics;
use crate::training::feedback::Answer;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dai_infer::InferOutcome;
use dai_infer::codec;
use dai_infer::tensor::Data;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub async fn infer(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    match infer_inner(&app, &name, peer, &headers, body, started).await {
        Ok(resp) => resp,
        Err(e) => {
            record_refusal(&app, &name, &e);
            e.into_response()
        }
    }
}

/// A refused request in metrics (under `_unknown` for a model that does
/// not exist, so request paths cannot grow the label set).
fn record_refusal(app: &App, name: &str, e: &ApiError) {
    let inference = &app.inference;
    let model = if inference.runtime.model(name).is_ok() {
        name
    } else {
        "_unknown"
    };
    inference
        .metrics
        .requests
        .get_or_create(&metrics::ModelOutcome {
            model: model.to_string(),
            outcome: e.outcome().into(),
        })
        .inc();
    if e.code == "overloaded" {
        inference.metrics.overloaded.inc();
    }
    if model != "_unknown" {
        inference.stats.record_error(model);
    }
    tracing::debug!(model = %name, code = e.code, message = %e.message, "request refused");
}

async fn infer_inner(
    app: &App,
    name: &str,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    started: Instant,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| body_error(app, e))?;
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase();
    let json = ctype.starts_with("application/json");
    if !json && !ctype.starts_with("application/octet-stream") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content-type {ctype:?}: expected application/json or application/octet-stream"
            ),
        ));
    }
    let runtime = &app.inference.runtime;
    let manifest = runtime.manifest(name).map_err(|e| from_infer_error(e, 0))?;
    let inputs = if json {
        codec::decode_json(&manifest.inputs, name, &body)?
    } else {
        codec::decode_raw(&manifest.inputs, manifest.batching, &body)?
    };
    let decoded = started.elapsed();
    let out = runtime
        .infer(name, inputs, Some(peer.ip()))
        .await
        .map_err(|e| from_infer_error(e, app.config.retry_delay_sec))?;
    let t_post = Instant::now();
    let id = app.next_id();
    if let Some(emb) = &out.head_input
        && let Data::F32(features) = &emb.data
    {
        app.training.remember(
            id.clone(),
            Answer {
                model: out.model.clone(),
                version: out.version.clone(),
                features: features.clone(),
                rows: emb.rows(),
            },
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
    record_ok(app, &out, decoded + out.prepare, post, total);
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
        .map(|(n, t)| (n.clone(), codec::tensor_json(t)))
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
    let (bytes, shapes) = codec::encode_raw(&out.output_names, &out.outputs);
    let mut resp = (StatusCode::OK, bytes).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&shapes) {
        h.insert("x-dai-output-shapes", v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-dai-request-id", v);
    }
    resp
}

fn record_ok(app: &App, out: &InferOutcome, pre: Duration, post: Duration, total: Duration) {
    let inference = &app.inference;
    let m = &inference.metrics;
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
    let caching = inference.runtime.cache_stats().is_some();
    if caching && out.cached {
        m.cache_hits.inc();
    } else {
        if caching {
            m.cache_misses.inc();
        }
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
    if app.config.profiling_enabled {
        for (stage, d) in stages {
            m.stage_duration
                .get_or_create(&metrics::ModelStage {
                    model: out.model.clone(),
                    stage: stage.into(),
                })
                .observe(d.as_secs_f64());
        }
        inference.stats.record_ok(&out.model, total, &stages);
    } else {
        inference.stats.record_ok(&out.model, total, &[]);
    }
}
