//! Oversized bodies answered so the client can read the answer: a request
//! whose `Content-Length` is over `max_body_mb` gets its 413 only after
//! the body was read and thrown away (bounded: at most [`MAX_DRAIN`] x the
//! limit and [`DRAIN_TIMEOUT`]). Answering before reading it would close
//! the connection with the body unread, the kernel would reset it, and
//! the client would often see a broken connection instead of the 413.

use super::App;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Duration;

/// Most bytes drained, in multiples of the limit; a larger body is cut.
const MAX_DRAIN: usize = 4;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn reject_oversized(
    State(app): State<Arc<App>>,
    req: Request,
    next: Next,
) -> Response {
    let limit = (app.config.daemon.max_body_mb * 1024 * 1024) as usize;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let Some(len) = declared.filter(|&n| n > limit) else {
        return next.run(req).await;
    };
    let answer = super::ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!(
            "request body of {len} bytes is larger than max_body_mb = {} MiB",
            app.config.daemon.max_body_mb
        ),
    );
    if len <= limit.saturating_mul(MAX_DRAIN) {
        let body: Body = req.into_body();
        let drain = axum::body::to_bytes(body, limit.saturating_mul(MAX_DRAIN));
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    }
    answer.into_response()
}
