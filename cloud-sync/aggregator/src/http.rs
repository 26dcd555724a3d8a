//! The aggregator's HTTP side: the status page (`/`), its data
//! (`/api/status`), the version registry (`/api/models`), OpenMetrics
//! (`/metrics`), a liveness probe (`/healthz`), a readiness probe
//! (`/readyz`: the state file can be read) and an on-demand CPU profile
//! (`/debug/pprof/profile?seconds=N[&format=svg]`, [`dai_profile`]: pprof
//! protobuf or a flamegraph, one at a time, at most 60 s).
//!
//! Read-only: the registry comes from the SQLite state file through a
//! connection of its own (WAL lets it read while the service writes).
//!
//! Authentication ([`Access`], `dai-cloud run --auth-token-file`): with a
//! token, `/api/*` and `/debug/pprof/profile` need `Authorization: Bearer TOKEN` (compared in
//! constant time), else 401 with `WWW-Authenticate: Bearer`; the page,
//! `/healthz`, `/readyz` and `/metrics` stay open (the page is static; its
//! script asks for the token or takes it once from `/?token=`). A
//! non-loopback address without a token is refused unless
//! `--allow-unauthenticated-http`. Nothing here logs a token or a query.

use crate::monitor::Monitor;
use crate::state::State;
use axum::Router;
use axum::extract::{Request, State as Extract};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use subtle::ConstantTimeEq;

const PAGE: &str = include_str!("../assets/status.html");

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = dai_trust::token::BearerToken::MIN_LEN;
/// Largest token file read.
pub const MAX_TOKEN_FILE_BYTES: u64 = dai_trust::token::BearerToken::MAX_FILE_BYTES;

/// Who may read `/api/*`.
#[derive(Debug, Clone, Default)]
pub enum Access {
    /// Anyone (loopback, or `--allow-unauthenticated-http`).
    #[default]
    Open,
    /// Requests with `Authorization: Bearer` and this token.
    Token(Arc<Token>),
}

/// A bearer token: trimmed, 16 to 4096 visible ASCII characters. `Debug`
/// does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(<{} characters, redacted>)", self.0.len())
    }
}

/// Why the HTTP side will not start as asked (a usage error).
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "--http {addr} is not a loopback address: pass --auth-token-file FILE (or \
         --allow-unauthenticated-http to serve /api to anyone who reaches it)"
    )]
    Unauthenticated { addr: SocketAddr },
    #[error("--auth-token-file and --allow-unauthenticated-http contradict each other")]
    Contradiction,
    #[error(
        "--auth-token-file {path}: the file {why}: expected a file of at most \
         {MAX_TOKEN_FILE_BYTES} bytes holding one token of at least {MIN_TOKEN_LEN} visible \
         ASCII characters"
    )]
    TokenFile { path: PathBuf, why: String },
}

impl Access {
    /// The access for a listener on `addr`: the token of `token_file`, or
    /// open where that is allowed (loopback, or `allow_unauthenticated`,
    /// which logs a warning beyond loopback). A token file that others, or
    /// a group this process is not in, may read is logged as a warning.
    pub fn for_listener(
        addr: SocketAddr,
        token_file: Option<&Path>,
        allow_unauthenticated: bool,
    ) -> Result<Access, AccessError> {
        let loopback = addr.ip().to_canonical().is_loopback();
        match token_file {
            Some(_) if allow_unauthenticated => Err(AccessError::Contradiction),
            Some(path) => {
                let (token, mode) = read_token(path).map_err(|why| AccessError::TokenFile {
                    path: path.to_path_buf(),
                    why,
                })?;
                if let Some(mode) = mode {
                    tracing::warn!(
                        "--auth-token-file {} is readable by others or by a group \
                         this process is not in (mode {mode:03o}); chmod 600 it",
                        path.display()
                    );
                }
                tracing::info!("/api/* requires a bearer token (--auth-token-file)");
                Ok(Access::Token(Arc::new(token)))
            }
            None if loopback => Ok(Access::Open),
            None if allow_unauthenticated => {
                tracing::warn!(
                    "HTTP API on {addr} WITHOUT authentication (--allow-unauthenticated-http): \
                     anyone who reaches it can read the fleet's status"
                );
                Ok(Access::Open)
            }
            None => Err(AccessError::Unauthenticated { addr }),
        }
    }
}

/// Read a token file with the token reader both HTTP APIs share
/// ([`dai_trust::token::BearerToken`]); the permission bits when others,
/// or a group this process is not in, may read it.
fn read_token(path: &Path) -> Result<(Token, Option<u32>), String> {
    let t = dai_trust::token::BearerToken::read(path)?;
    Ok((Token(t.expose().to_string()), t.loose_mode()))
}

#[derive(Debug, Clone)]
struct Shared {
    monitor: Arc<Monitor>,
    state_path: PathBuf,
    fleet: String,
}

/// The router, open to anyone; serve it with `axum::serve`.
pub fn router(monitor: Arc<Monitor>, state_path: PathBuf, fleet: String) -> Router {
    router_with(monitor, state_path, fleet, Access::Open)
}

/// The router with `/api/*` behind `access`.
pub fn router_with(
    monitor: Arc<Monitor>,
    state_path: PathBuf,
    fleet: String,
    access: Access,
) -> Router {
    let api = Router::new()
        .route("/api/status", get(status))
        .route("/api/models", get(models))
        .route("/debug/pprof/profile", get(profile));
    let api = match access {
        Access::Open => api,
        Access::Token(token) => api.route_layer(from_fn_with_state(token, require_token)),
    };
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(Shared {
            monitor,
            state_path,
            fleet,
        })
}

/// A CPU profile of this process, taken on a blocking thread.
async fn profile(axum::extract::RawQuery(query): axum::extract::RawQuery) -> Response {
    let refuse = |e: dai_profile::ProfileError| {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(json!({ "error": e.to_string() }))).into_response()
    };
    let req = match dai_profile::Request::parse(query.as_deref()) {
        Ok(r) => r,
        Err(e) => return refuse(e),
    };
    tracing::info!(seconds = req.seconds, "CPU profile requested");
    match tokio::task::spawn_blocking(move || dai_profile::capture(&req)).await {
        Ok(Ok(c)) => ([(header::CONTENT_TYPE, c.content_type)], c.body).into_response(),
        Ok(Err(e)) => refuse(e),
        Err(e) => refuse(dai_profile::ProfileError::Profiler(format!(
            "the profiling thread failed: {e}"
        ))),
    }
}

async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The page may be opened as /?token=...: never pass that URL on.
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(PAGE),
    )
        .into_response()
}

/// Middleware: pass requests with `Authorization: Bearer <token>` on,
/// answer 401 to the rest (logged with the path only).
async fn require_token(Extract(token): Extract<Arc<Token>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| v.split_at_checked(7))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|(_, t)| t.trim_ascii());
    let why = match presented {
        Some(t) if bool::from(token.0.as_bytes().ct_eq(t)) => return next.run(req).await,
        Some(_) => "the bearer token is not valid",
        None => "this endpoint needs `Authorization: Bearer TOKEN` (--auth-token-file)",
    };
    tracing::debug!(path = %req.uri().path(), why, "request refused");
    let mut resp = (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": format!("unauthorized: {why}")})),
    )
        .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"dai-cloud\""),
    );
    resp
}

/// 200 once the state file can be read (the version registry), else 503.
async fn readyz(Extract(s): Extract<Shared>) -> Response {
    match read_state(s.state_path, |st| st.versions()).await {
        Ok(v) => (StatusCode::OK, format!("ready: {} version(s)\n", v.len())).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("state file unreadable: {e}\n"),
        )
            .into_response(),
    }
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
        // The newest 20 per model (what the page shows), not the history.
        Ok((st.recent_versions(20)?, st.seen_counts()?))
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
                "version": v.version, "parent": v.parent, "contributors": v.updates(),
                "metrics": v.metrics, "created_at": v.created_at,
            }));
        }
    }
    for (model, entry) in models.iter_mut() {
        entry["pending"] = json!(live.pending.get(model).copied().unwrap_or(0));
        entry["last_global"] = json!(live.last_global.get(model));
        // Central DP: the epsilon spent (null: infinite, a version was
        // made without noise); absent when DP is off.
        if let Some(e) = live.dp_epsilon.get(model) {
            entry["dp_epsilon"] = json!(e);
        }
    }
    axum::Json(json!({
        "fleet": s.fleet,
        "uptime_sec": s.monitor.started.elapsed().as_secs(),
        "broker": live.broker,
        "broker_connected": live.broker_connected,
        // Subscriptions acknowledged on this broker session.
        "subscriptions": live.subscriptions,
        // A tier: partials not yet acked upstream (null on a root).
        "tier_outbox": live.tier_outbox,
        // While state writes fail (disk full, I/O): what SQLite said.
        "state_error": live.state_error,
        "strategy": live.strategy,
        "seen": {"accepted": accepted, "rejected": rejected},
        "models": models,
        "devices": live.devices,
        "recent": live.recent,
    }))
    .into_response()
}
