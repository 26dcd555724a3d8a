//! The training endpoints: `POST /v1/models/{name}/samples`,
//! `POST /v1/feedback` and `POST /v1/models/{name}/train`, over the
//! [`Training`](crate::training::Training) handle. Store work and runs go
//! to the blocking pool.

use super::{ApiError, App, body_error, from_infer_error};
use crate::training::TrainingError;
use crate::training::feedback::FEEDBACK_KEEP;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dai_infer::codec;
use dai_infer::tensor::Data;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;

fn from_training_error(e: TrainingError) -> ApiError {
    let message = crate::error::chain(&e).to_string();
    match e {
        TrainingError::BadInput(m) => ApiError::bad(m),
        TrainingError::Model(e) => from_infer_error(e, 0),
        TrainingError::NoHead(_) => ApiError::new(StatusCode::CONFLICT, "no_head", message),
        TrainingError::Busy(_) => ApiError::new(StatusCode::CONFLICT, "training_busy", message),
        TrainingError::Store(e) if e.is_disk_full() => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            format!(
                "the data dir is full; nothing was stored (what was stored before is intact): {message}"
            ),
        ),
        TrainingError::Store(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            message,
        ),
        TrainingError::Failed(m) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "training_failed", m)
        }
    }
}

/// `POST /v1/models/{name}/samples`: the tensors and their label(s).
#[derive(serde::Deserialize)]
struct SamplesBody {
    inputs: std::collections::BTreeMap<String, codec::JsonTensor>,
    label: Option<i64>,
    labels: Option<Vec<i64>>,
}

/// `POST /v1/feedback`: an earlier answer's id and its label(s).
#[derive(serde::Deserialize)]
struct FeedbackBody {
    id: Option<String>,
    label: Option<i64>,
    labels: Option<Vec<i64>>,
}

/// `"label": N` or `"labels": [N, ...]`, exactly one of them.
fn labels_of(label: Option<i64>, labels: Option<Vec<i64>>) -> Result<Vec<i64>, ApiError> {
    match (label, labels) {
        (Some(l), None) => Ok(vec![l]),
        (None, Some(a)) => Ok(a),
        _ => Err(ApiError::bad(
            "expected \"label\": N or \"labels\": [N, ...]".into(),
        )),
    }
}

/// Read the body and parse it once into `T`.
fn parse_body<T: serde::de::DeserializeOwned>(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| body_error(app, e))?;
    Ok(codec::parse_json(&body)?)
}

/// Store samples on the blocking pool; the answer lists their ids.
async fn store(
    app: &App,
    model: String,
    features: Vec<f32>,
    rows: usize,
    labels: Vec<i64>,
    source: &'static str,
) -> Result<Vec<i64>, ApiError> {
    let training = app.training.clone();
    tokio::task::spawn_blocking(move || {
        training.store_sample(&model, &features, rows, &labels, source)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(from_training_error)
}

pub async fn samples(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    samples_inner(&app, name, peer, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn samples_inner(
    app: &App,
    name: String,
    peer: SocketAddr,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let parsed: SamplesBody = parse_body(app, body)?;
    let labels = labels_of(parsed.label, parsed.labels)?;
    let runtime = &app.inference.runtime;
    let manifest = runtime
        .manifest(&name)
        .map_err(|e| from_infer_error(e, 0))?;
    let inputs = codec::inputs_from_json(&manifest.inputs, &name, parsed.inputs)?;
    for (n, t) in &inputs {
        if let Data::F32(x) = &t.data
            && x.iter().any(|v| !v.is_finite())
        {
            return Err(ApiError::bad(format!(
                "inputs.{n}: NaN or infinite values are not valid samples"
            )));
        }
    }
    let out = runtime
        .infer(&name, inputs, Some(peer.ip()))
        .await
        .map_err(|e| from_infer_error(e, app.config.retry_delay_sec))?;
    let emb = out.head_input.ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_head",
            format!("model {name} has no trainable head"),
        )
    })?;
    let rows = emb.rows();
    let Data::F32(features) = emb.data else {
        return Err(ApiError::bad("the head input is not f32".into()));
    };
    let ids = store(app, name, features, rows, labels, "api").await?;
    Ok(Json(json!({ "stored": ids.len(), "ids": ids })).into_response())
}

pub async fn feedback(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    feedback_inner(&app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn feedback_inner(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let parsed: FeedbackBody = parse_body(app, body)?;
    let id = parsed.id.ok_or_else(|| {
        ApiError::bad("expected \"id\": the id of an earlier inference answer".into())
    })?;
    let labels = labels_of(parsed.label, parsed.labels)?;
    let answer = app.training.take_answer(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_inference",
            format!("no recent inference with id {id:?} (only answers of models with a trainable head are kept, the last {FEEDBACK_KEEP})"),
        )
    })?;
    let current = app
        .inference
        .runtime
        .model(&answer.model)
        .map_err(|e| from_infer_error(e, 0))?;
    if current.version() != answer.version {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "stale_inference",
            format!(
                "inference {id} used {} {}; {} is loaded now",
                answer.model,
                answer.version,
                current.version()
            ),
        ));
    }
    let model = answer.model.clone();
    let ids = store(
        app,
        answer.model,
        answer.features,
        answer.rows,
        labels,
        "feedback",
    )
    .await?;
    Ok(Json(json!({ "stored": ids.len(), "ids": ids, "model": model })).into_response())
}

pub async fn train_now(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let training = app.training.clone();
    match tokio::task::spawn_blocking(move || training.run(&name)).await {
        Ok(Ok(run)) => Json(json!({ "run": run })).into_response(),
        Ok(Err(e)) => from_training_error(e).into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}
