//! What the daemon says about itself: the status page, `/v1/status` (the
//! [`snapshot`] document, also what the store's snapshots hold), the
//! model registry, readiness and `/metrics`.

use super::{App, from_infer_error};
use crate::metrics;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use dai_infer::InferError;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

const STATUS_PAGE: &str = include_str!("../../assets/status.html");

pub async fn status_page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The page may be opened as /?token=...: never pass that URL on.
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        Html(STATUS_PAGE),
    )
}

pub async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.shutdown.is_set() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let ready = app
        .inference
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

pub async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    sync_gauges(&app);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.inference.metrics.encode(),
    )
        .into_response()
}

/// Copy pool and cache figures into gauges right before a scrape.
fn sync_gauges(app: &App) {
    let inference = &app.inference;
    let m = &inference.metrics;
    let pool = inference.runtime.pool();
    m.queue_depth.set(pool.queue_depth() as i64);
    m.active_workers.set(pool.active() as i64);
    m.batch_size.set(pool.batch_size() as i64);
    if let Some(c) = inference.runtime.cache_stats() {
        m.cache_bytes.set(c.used_bytes as i64);
        m.cache_entries.set(c.entries as i64);
        let mut seen = m.evictions_seen.lock();
        if c.evictions > *seen {
            m.cache_evictions.inc_by(c.evictions - *seen);
            *seen = c.evictions;
        }
    }
    for info in inference.runtime.models() {
        if let Some(lm) = &info.model {
            let label = metrics::ModelLabel {
                model: info.name.clone(),
            };
            let p = lm.plan_stats();
            m.model_plans.get_or_create(&label).set(p.cached as i64);
            m.model_plan_builds
                .get_or_create(&label)
                .set(p.builds as i64);
            m.model_plan_evictions
                .get_or_create(&label)
                .set(p.evictions as i64);
        }
        if let Some(p95) = inference.stats.figures(&info.name).latency_ms.p95 {
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
        .map(|s| {
            let mut v = json!({ "name": s.name, "dtype": s.dtype, "shape": s.shape });
            if !s.dynamic.is_empty() {
                v["dynamic"] = json!(s.dynamic);
            }
            v
        })
        .collect()
}

fn model_json(app: &App, info: &dai_infer::ModelInfo) -> Value {
    let fig = app.inference.stats.figures(&info.name);
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

pub async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let list: Vec<Value> = app
        .inference
        .runtime
        .models()
        .iter()
        .map(|m| model_json(&app, m))
        .collect();
    Json(json!({ "models": list }))
}

pub async fn model_detail(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let models = app.inference.runtime.models();
    match models.iter().find(|m| m.name == name) {
        Some(m) => Json(model_json(&app, m)).into_response(),
        None => from_infer_error(
            InferError::UnknownModel {
                name,
                known: models.into_iter().map(|m| m.name).collect(),
            },
            0,
        )
        .into_response(),
    }
}

/// The `cache` section of the status document.
fn cache_json(app: &App) -> Value {
    let runtime = &app.inference.runtime;
    match runtime.cache_stats() {
        Some(c) => {
            let looked = c.hits + c.misses;
            json!({
                "enabled": true,
                "policy": runtime.cache_policy().map(|p| p.as_str()),
                "capacity_bytes": c.capacity_bytes, "used_bytes": c.used_bytes,
                "entries": c.entries, "hits": c.hits, "misses": c.misses,
                "evictions": c.evictions,
                "hit_ratio": if looked > 0 { Some(c.hits as f64 / looked as f64) } else { None },
            })
        }
        None => json!({
            "enabled": false, "policy": app.config.cache_eviction_policy.as_str(),
            "capacity_bytes": 0, "used_bytes": 0, "entries": 0, "hits": 0, "misses": 0,
            "evictions": 0, "hit_ratio": null,
        }),
    }
}

/// The resource manager's alerts, and the store's: a file quarantined at
/// this start.
fn alerts(app: &App) -> Vec<crate::resources::Alert> {
    let mut out = app.machine.alerts.lock().clone();
    if let Some(q) = &app.store_quarantine {
        out.push(crate::resources::Alert {
            level: "error",
            message: format!(
                "the store file was corrupt and was moved aside to {}; a fresh store was started (samples, heads and pending updates before it are in that file): {}",
                q.file.display(),
                q.reason
            ),
        });
    }
    out
}

/// The `store` section: where it is and what was quarantined.
fn store_json(app: &App) -> Value {
    json!({
        "path": app.store.path().display().to_string(),
        "quarantined": app.store_quarantine.as_ref().map(|q| json!({
            "file": q.file.display().to_string(), "reason": q.reason, "at": q.at,
        })),
        "quarantined_files": dai_store::quarantine::quarantined(&app.config.daemon.data_dir)
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>(),
    })
}

/// The `/v1/status` document (also what snapshots store). Reads the
/// SQLite store: call it off the async threads.
pub fn snapshot(app: &App) -> Value {
    let (config, runtime) = (&app.config, &app.inference.runtime);
    let pool = runtime.pool();
    let s = *app.machine.sample.lock();
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
    let profile = app.machine.profile.lock().clone();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "device": app.device,
        "uptime_sec": app.started.elapsed().as_secs_f64(),
        "listen": app.listen.lock().map(|a| a.to_string()),
        "ts": crate::unix_now(),
        "models": runtime.models().iter().map(|m| model_json(app, m)).collect::<Vec<_>>(),
        "cache": cache_json(app),
        "resources": {
            "cpu_percent": s.cpu_percent, "process_cpu_percent": s.process_cpu_percent,
            "memory_used_mb": s.memory_used_mb, "memory_total_mb": s.memory_total_mb,
            "rss_mb": s.rss_mb, "cpu_limit": config.cpu_limit,
            "memory_limit_mb": config.memory_limit_mb,
            "models_memory_mb": runtime.memory_used_bytes(None) as f64 / 1048576.0,
            "active_workers": pool.active(), "max_workers": pool.max_workers(),
            "batch_size": pool.batch_size(), "max_batch_size": config.batch_size,
            "queue_depth": pool.queue_depth(), "queue_capacity": pool.queue_capacity(),
        },
        "load_balancing": { "strategy": pool.strategy().as_str(), "workers": workers },
        "decisions": app.machine.decisions.recent(),
        "alerts": alerts(app),
        "store": store_json(app),
        "profiling": {
            "enabled": config.profiling_enabled,
            "interval_sec": config.profiling_interval_sec,
            "last_sample_ts": profile.ts,
            "models": profile.models,
        },
        "latency_threshold_ms": config.latency_threshold_ms,
        "throughput_target_rps": config.throughput_target_rps,
        "throughput_rps": app.inference.stats.overall_rps(),
        "training": app.training.status(),
        "sensors": app.sensors.snapshot(),
    })
}

pub async fn status(State(app): State<Arc<App>>) -> Json<Value> {
    let a = app.clone();
    Json(
        tokio::task::spawn_blocking(move || snapshot(&a))
            .await
            .unwrap_or(Value::Null),
    )
}
