//! `GET /debug/pprof/profile?seconds=N[&format=svg]`: a CPU profile of the
//! running daemon ([`dai_profile`]), behind the API token like the rest of
//! the API (which a non-loopback address requires). The capture blocks a
//! blocking-pool thread, never a runtime worker; one runs at a time (409).

use super::ApiError;
use axum::extract::RawQuery;
use axum::http::StatusCode;
use axum::response::Response;

#[cfg(feature = "profiling")]
pub(super) async fn profile(RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    use axum::http::header;
    use axum::response::IntoResponse;
    let req = dai_profile::Request::parse(query.as_deref()).map_err(refusal)?;
    tracing::info!(seconds = req.seconds, "CPU profile requested");
    let c = tokio::task::spawn_blocking(move || dai_profile::capture(&req))
        .await
        .map_err(|e| ApiError::internal(format!("the profiling thread failed: {e}")))?
        .map_err(refusal)?;
    Ok(([(header::CONTENT_TYPE, c.content_type)], c.body).into_response())
}

#[cfg(feature = "profiling")]
fn refusal(e: dai_profile::ProfileError) -> ApiError {
    let (status, code) = match e.status() {
        400 => (StatusCode::BAD_REQUEST, "bad_input"),
        409 => (StatusCode::CONFLICT, "busy"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    ApiError::new(status, code, e.to_string())
}

#[cfg(not(feature = "profiling"))]
pub(super) async fn profile(RawQuery(_): RawQuery) -> Result<Response, ApiError> {
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_built",
        "this dai-edge was built without the `profiling` feature (the size-first \
         --no-default-features build); CPU profiles need a default build"
            .into(),
    ))
}
