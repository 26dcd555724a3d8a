//! The local HTTP API and status page (one port, loopback by default).
//!
//! Endpoints:
//! - `POST /v1/models/{name}/infer` ([`infer`]): run a model. JSON body
//!   `{"inputs": {"NAME": {"dtype": "f32", "shape": [..], "data": [..]}}}`
//!   (dtype optional: the manifest's), or a raw `application/octet-stream`
//!   body: the inputs' little-endian bytes concatenated in manifest order
//!   (rows inferred for batching models); both decoded by [`dai_infer::codec`].
//!   Answers JSON with `id`, `outputs`, `timings_ms`, `cached`, `worker`,
//!   `batch`; with `Accept: application/octet-stream`, the outputs' raw
//!   bytes instead (shapes in the `x-dai-output-shapes` header).
//! - `POST /v1/models/{name}/samples` ([`training`]): labelled inputs
//!   (`"label": N` or `"labels": [..]`) stored as training samples.
//! - `POST /v1/feedback` ([`training`]): `{id, label(s)}` for an earlier
//!   answer; its head input becomes a sample without a rerun.
//! - `POST /v1/models/{name}/train` ([`training`]): one training run now.
//! - `GET /v1/models`, `GET /v1/models/{name}` ([`status`]): the registry
//!   and manifests.
//! - `POST /v1/models` ([`upload`]): a bundle archive (tar or tar.gz),
//!   streamed to disk (at most `max_upload_mb`), verified, loaded next to
//!   the others and persisted ([`crate::install`]); needs the API token.
//! - `GET /v1/status` ([`status`]): live figures as JSON (what the status
//!   page polls, and what snapshots store).
//! - `GET /healthz`: the process answers; `GET /readyz`: 200 once a model
//!   is ready and while not shutting down, else 503 with the reason.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /debug/pprof/profile?seconds=N[&format=svg]` ([`pprof`]): a CPU
//!   profile of the daemon (pprof protobuf or flamegraph), behind the API
//!   token, one at a time, at most 60 s.
//! - `GET /`: the status page (`assets/status.html`).
//!
//! Errors are JSON `{"error": {"code", "message"}}` with a 4xx/5xx status
//! ([`ApiError`]); overload is 503 with `Retry-After`; a body declared
//! larger than `max_body_mb` is drained (bounded) and answered 413
//! (`oversize`), so the client reads the answer; a body over 1 MiB waits
//! for one of `daemon.max_concurrent_bodies` permits before it is read
//! (503 `overloaded` after 30 s), which bounds the memory of concurrent
//! large requests. JSON bodies are parsed once into typed structs
//! ([`dai_infer::codec`]), never into a `serde_json::Value` tree.
//!
//! Authentication ([`auth`]): with `http.auth_token_file`, every endpoint
//! but `/`, `/healthz`, `/readyz` and `/metrics` needs `Authorization:
//! Bearer TOKEN` (401 otherwise, before the body is read); with
//! `http.metrics_token_file`, `/metrics` needs that token or the API's.
//! The page itself is static and open; its script sends the token.
//!
//! Handlers share one [`App`], composed of the daemon's handles.

pub mod auth;
pub mod infer;
mod oversize;
mod pprof;
pub mod status;
pub mod training;
pub mod upload;

use crate::handles::{Inference, ShutdownFlag, StoreHandle};
use crate::resources::Machine;
use crate::sensors::Sensors;
use crate::training::Training;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dai_config::Config;
use dai_infer::InferError;
use parking_lot::Mutex;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What the handlers share: the daemon's handles and its identity.
#[derive(Debug)]
pub struct App {
    pub config: Arc<Config>,
    pub inference: Inference,
    pub store: StoreHandle,
    pub training: Training,
    pub sensors: Sensors,
    pub machine: Arc<Machine>,
    pub shutdown: ShutdownFlag,
    /// Host name (status document).
    pub device: String,
    /// Start time in Unix seconds: answer ids are `{boot_id:x}-{seq:x}`.
    pub boot_id: u64,
    pub started: Instant,
    /// The address being served, once bound.
    pub listen: Mutex<Option<SocketAddr>>,
    pub(crate) request_seq: AtomicU64,
    /// Permits for requests with large bodies (`daemon.max_concurrent_bodies`,
    /// [`oversize`]).
    pub heavy: Arc<tokio::sync::Semaphore>,
    /// Where `POST /v1/models` installs bundles ([`crate::install`]).
    pub installer: Arc<crate::install::Installer>,
    /// The corrupt store file moved aside at this start, if any.
    pub store_quarantine: Option<dai_store::Quarantine>,
}

impl App {
    /// A new answer id, unique within this boot.
    fn next_id(&self) -> String {
        let seq = self.request_seq.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{seq:x}", self.boot_id)
    }
}

pub fn router(app: Arc<App>) -> Router {
    let limit = (app.config.daemon.max_body_mb * 1024 * 1024) as usize;
    let tokens = &app.config.http.tokens;
    let api = guarded(
        Router::new()
            .route("/v1/status", get(status::status))
            .route("/v1/models", get(status::models).post(upload::upload))
            .route("/v1/models/{name}", get(status::model_detail))
            .route("/v1/models/{name}/infer", post(infer::infer))
            .route("/v1/models/{name}/samples", post(training::samples))
            .route("/v1/models/{name}/train", post(training::train_now))
            .route("/v1/feedback", post(training::feedback))
            .route("/debug/pprof/profile", get(pprof::profile)),
        auth::Guard::new(&tokens.api),
    );
    let metrics = guarded(
        Router::new().route("/metrics", get(status::metrics_text)),
        tokens
            .metrics
            .as_ref()
            .and_then(|m| auth::Guard::new([m].into_iter().chain(&tokens.api))),
    );
    Router::new()
        .route("/", get(status::status_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(status::readyz))
        .merge(metrics)
        .merge(api)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint".into(),
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            oversize::limit_bodies,
        ))
        .with_state(app)
}

/// `routes` behind `guard`, or open without one.
fn guarded(routes: Router<Arc<App>>, guard: Option<Arc<auth::Guard>>) -> Router<Arc<App>> {
    match guard {
        Some(g) => routes.route_layer(from_fn_with_state(g, auth::require)),
        None => routes,
    }
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

    fn internal(message: String) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The `outcome` label of `dai_edge_requests_total` for this refusal.
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

impl From<dai_infer::codec::BadInput> for ApiError {
    fn from(e: dai_infer::codec::BadInput) -> ApiError {
        ApiError::bad(e.0)
    }
}

fn from_infer_error(e: InferError, retry_delay_sec: u64) -> ApiError {
    let message = crate::error::chain(&e).to_string();
    match e {
        InferError::UnknownModel { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_model", message)
        }
        InferError::Unavailable { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_unavailable",
            message,
        ),
        InferError::BadInput(m) => ApiError::bad(m),
        InferError::Overloaded(_) => ApiError {
            retry_after: Some(retry_delay_sec.max(1)),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
        },
        InferError::Failed(m) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "inference_failed", m)
        }
    }
}

fn body_error(app: &App, e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "request body larger than max_body_mb = {} MiB",
                app.config.daemon.max_body_mb
            ),
        )
    } else {
        ApiError::bad(format!("cannot read request body: {e}"))
    }
}
