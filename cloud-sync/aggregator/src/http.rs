//! The aggregator's HTTP side: the status page (`/`), its data
//! (`/api/status`), the version registry (`/api/models`), OpenMetrics
//! (`/metrics`) and a liveness probe (`/healthz`).
//!
//! Read-only: the registry comes from the SQLite state file through a
//! connection of its own (WAL lets it read while the service writes).

use crate::monitor::Monitor;
use crate::state::State;
use axum::Router;
use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

const PAGE: &str = include_str!("../assets/status.html");

#[derive(Debug, Clone)]
struct Shared {
    monitor: Arc<Monitor>,
    state_path: PathBuf,
    fleet: String,
}

/// The router; serve it with `axum::serve`.
pub fn router(monitor: Arc<Monitor>, state_path: PathBuf, fleet: String) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/models", get(models))
        .with_state(Shared {
            monitor,
            state_path,
            fleet,
        })
}

async fn metrics(Extract(s): Extract<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.monitor.encode(),
    )
        .into_response()
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({"error": format!("state file unreadable: {e}")})),
    )
        .into_response()
}

async fn read_state<T: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce(&State) -> Result<T, crate::state::StateError> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || {
        let s = State::open(&path).map_err(|e| crate::error_chain(&e))?;
        f(&s).map_err(|e| crate::error_chain(&e))
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn models(Extract(s): Extract<Shared>) -> Response {
    match read_state(s.state_path, |st| st.versions()).await {
        Ok(v) => axum::Json(json!({"versions": v})).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn status(Extract(s): Extract<Shared>) -> Response {
    let registry = read_state(s.state_path.clone(), |st| {
        Ok((st.versions()?, st.seen_counts()?))
    })
    .await;
    let (versions, (accepted, rejected)) = match registry {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    let live = s.monitor.live.lock().clone();
    // The newest version per model, plus its history (newest first, 20).
    let mut models = serde_json::Map::new();
    for v in versions.iter().rev() {
        let entry = models
            .entry(v.model.clone())
            .or_insert_with(|| json!({"current": v.version, "history": []}));
        if let Some(h) = entry["history"].as_array_mut()
            && h.len() < 20
        {
            h.push(json!({
                "version": v.version, "parent": v.parent, "contributors": v.contributors.len(),
                "metrics": v.metrics, "created_at": v.created_at,
            }));
        }
    }
    for (model, entry) in models.iter_mut() {
        entry["pending"] = json!(live.pending.get(model).copied().unwrap_or(0));
        entry["last_global"] = json!(live.last_global.get(model));
    }
    axum::Json(json!({
        "fleet": s.fleet,
        "uptime_sec": s.monitor.started.elapsed().as_secs(),
        "broker": live.broker,
        "broker_connected": live.broker_connected,
        "strategy": live.strategy,
        "seen": {"accepted": accepted, "rejected": rejected},
        "models": models,
        "devices": live.devices,
        "recent": live.recent,
    }))
    .into_response()
}
