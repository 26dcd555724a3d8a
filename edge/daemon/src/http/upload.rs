//! `POST /v1/models`: a bundle archive into the running daemon.
//!
//! The body (tar or tar.gz, any content type) streams to a file under the
//! installer's `.incoming/`, never into memory, and is cut at
//! `daemon.max_upload_mb` (413). A body that ends early (the client went
//! away) is refused 400 with the bytes received. The install itself
//! ([`crate::install::Installer::install`]) runs on the blocking pool;
//! a bundle it refuses is 400 `bad_bundle` with the reason and nothing
//! changes. Uploads need the API token: with no `http.auth_token_file`
//! (loopback, unauthenticated) they are refused 403, since a model is code
//! the daemon runs.

use super::{ApiError, App};
use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::io::Write;
use std::sync::Arc;

pub async fn upload(
    State(app): State<Arc<App>>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if app.config.http.tokens.api.is_none() {
        super::oversize::discard(req.into_body(), super::oversize::REFUSED_DRAIN).await;
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "upload_disabled",
            "installing models needs an API token: set http.auth_token_file".into(),
        ));
    }
    let installer = app.installer.clone();
    let path = installer
        .incoming_path("archive")
        .map_err(|e| ApiError::internal(crate::error::chain(&e).to_string()))?;
    let received = receive(
        req,
        &path,
        installer.max_bytes(),
        app.config.daemon.max_upload_mb,
    )
    .await;
    if let Err(e) = received {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    let runtime = app.inference.clone();
    let store = app.store.clone();
    let training = app.training.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let r = installer.install(&runtime.runtime, &path);
        if let Ok(done) = &r {
            store.record_load(&done.event);
            training.restore_head(&done.name);
        }
        r
    })
    .await
    .map_err(|e| ApiError::internal(format!("install task failed: {e}")))?;
    app.inference.refresh_model_info();
    match outcome {
        Ok(done) => {
            tracing::info!(model = %done.name, version = %done.version, sha256 = %done.sha256, "bundle installed");
            Ok((
                StatusCode::CREATED,
                Json(json!({
                    "name": done.name,
                    "version": done.version,
                    "sha256": done.sha256,
                    "load_ms": done.load_ms,
                    "replaced": done.replaced.map(|(v, s)| json!({"version": v, "sha256": s})),
                })),
            ))
        }
        Err(e) => {
            let message = crate::error::chain(&e).to_string();
            tracing::warn!(error = %message, "bundle upload refused");
            if e.is_bad_bundle() {
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_bundle",
                    message,
                ))
            } else {
                Err(ApiError::internal(message))
            }
        }
    }
}

/// Stream the body into `path`, at most `max` bytes.
async fn receive(req: Request, path: &std::path::Path, max: u64, mb: u64) -> Result<(), ApiError> {
    let mut file = std::fs::File::create(path)
        .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    let mut body = req.into_body();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad(format!(
                "upload cut short after {total} bytes (nothing installed): {e}"
            ))
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        total += data.len() as u64;
        if total > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("bundle archive larger than max_upload_mb = {mb} MiB"),
            ));
        }
        // Small synchronous writes: the page cache absorbs them.
        file.write_all(data)
            .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    }
    if total == 0 {
        return Err(ApiError::bad(
            "empty body: send a bundle archive (tar or tar.gz of a bundle directory)".into(),
        ));
    }
    file.sync_all()
        .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    Ok(())
}
