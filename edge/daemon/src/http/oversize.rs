//! Request bodies held to what the daemon can afford:
//! - an oversized body (`Content-Length` over `max_body_mb`) is answered 413
//!   only after it was read and thrown away (bounded: at most [`MAX_DRAIN`]
//!   x the limit and [`DRAIN_TIMEOUT`]), never buffered. Answering before
//!   reading it would close the connection with the body unread, the kernel
//!   would reset it, and the client would often see a broken connection
//!   instead of the 413;
//! - a heavy body (over [`HEAVY_BYTES`], or of unknown length) waits for
//!   one of `daemon.max_concurrent_bodies` permits before it is read, and
//!   keeps it while its request runs: a request's memory is a few times its
//!   body (buffer, parsed numbers, tensors), so this bounds what concurrent
//!   large requests can take under the unit's `MemoryMax=`. One that waits
//!   longer than [`HEAVY_WAIT`] gets 503 `overloaded` with `Retry-After`.

use super::App;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;

/// Most bytes drained, in multiples of the limit; a larger body is cut.
const MAX_DRAIN: usize = 4;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bodies above this size (or without a declared size) need a permit.
pub const HEAVY_BYTES: usize = 1 << 20;
/// Longest a heavy request waits for a permit.
pub const HEAVY_WAIT: Duration = Duration::from_secs(30);

pub(super) async fn limit_bodies(
    State(app): State<Arc<App>>,
    req: Request,
    next: Next,
) -> Response {
    // A bundle upload streams to disk ([`super::upload`]): its own bound.
    let upload = req.method() == axum::http::Method::POST && req.uri().path() == "/v1/models";
    let (limit, key, mb) = if upload {
        let mb = app.config.daemon.max_upload_mb;
        ((mb * 1024 * 1024) as usize, "max_upload_mb", mb)
    } else {
        let mb = app.config.daemon.max_body_mb;
        ((mb * 1024 * 1024) as usize, "max_body_mb", mb)
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared.filter(|&n| n > limit) {
        let answer = super::ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body of {len} bytes is larger than {key} = {mb} MiB"),
        );
        if !upload && len <= limit.saturating_mul(MAX_DRAIN) {
            discard(req.into_body(), limit.saturating_mul(MAX_DRAIN)).await;
        }
        return answer.into_response();
    }
    let chunked = declared.is_none() && req.headers().contains_key(header::TRANSFER_ENCODING);
    if !chunked && declared.is_none_or(|n| n <= HEAVY_BYTES) {
        return next.run(req).await;
    }
    let permit = match tokio::time::timeout(HEAVY_WAIT, app.heavy.clone().acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        // Timed out (or closed at shutdown): answer without holding the body.
        _ => {
            app.inference.metrics.overloaded.inc();
            discard(req.into_body(), limit).await;
            let mut resp = super::ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "{} large requests are already in progress (daemon.max_concurrent_bodies); try again later",
                    app.config.daemon.max_concurrent_bodies
                ),
            )
            .into_response();
            let retry = app.config.retry_delay_sec.max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&retry) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return resp;
        }
    };
    let resp = next.run(req).await;
    drop(permit);
    resp
}

/// Most bytes of a refused (401, 403) body read before the answer.
pub const REFUSED_DRAIN: usize = 8 << 20;

/// Read and drop up to `max` bytes of `body` (frame by frame, never held),
/// for at most [`DRAIN_TIMEOUT`]. Every early answer to a request whose
/// body may still be on its way (413, 503, 401, 403) drains first: hyper
/// closes a connection whose body was not read, and a client still
/// writing it would see a broken pipe instead of the answer. A body
/// larger than `max` is cut, as before.
pub(super) async fn discard(mut body: Body, max: usize) {
    let drain = async {
        let mut read = 0usize;
        while read <= max {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
}
