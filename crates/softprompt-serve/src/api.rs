//! HTTP plumbing shared by the handlers (request bodies, the engine queue, authentication,
//! request metrics) and the small endpoints: health, metrics, model listing, 404.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::engine::Job;
use crate::error::ApiError;
use crate::AppState;

/// What every server (text or vision) shares with the plumbing here: its limits, metrics,
/// request counter and engine queue.
pub(crate) trait Shared: Clone + Send + Sync + 'static {
    /// The engine's job type.
    type Job: Send;
    fn config(&self) -> &crate::ServeConfig;
    fn metrics(&self) -> &crate::Metrics;
    fn next_request(&self) -> &std::sync::atomic::AtomicU64;
    fn jobs(&self) -> &std::sync::Mutex<Option<std::sync::mpsc::Sender<Self::Job>>>;
}

impl Shared for AppState {
    type Job = Job;
    fn config(&self) -> &crate::ServeConfig {
        &self.config
    }
    fn metrics(&self) -> &crate::Metrics {
        &self.metrics
    }
    fn next_request(&self) -> &std::sync::atomic::AtomicU64 {
        &self.next_request
    }
    fn jobs(&self) -> &std::sync::Mutex<Option<std::sync::mpsc::Sender<Job>>> {
        &self.jobs
    }
}

/// The JSON body, with extractor failures turned into clear 400s (413 past the body limit, 408
/// past the body read timeout).
pub(crate) fn body<S: Shared, T>(
    state: &S,
    r: Result<Json<T>, JsonRejection>,
) -> Result<T, ApiError> {
    let config = state.config();
    match r {
        Ok(Json(t)) => Ok(t),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "request body exceeds the server's limit of {} bytes (max_body_bytes)",
                config.max_body_bytes
            ),
        )),
        Err(e) if timed_out(&e) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {:?} (body_read_timeout)",
                config.body_read_timeout
            ),
        )),
        Err(e) => Err(ApiError::bad_request(e.body_text())),
    }
}

/// Whether reading the body stopped at the body read timeout.
fn timed_out(e: &JsonRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = err.source();
    }
    false
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sends `job` to the engine unless the queue is full.
pub(crate) fn submit<S: Shared>(state: &S, job: S::Job) -> Result<(), ApiError> {
    let limit = state.config().queue_capacity;
    let depth = state.metrics().queued.fetch_add(1, Ordering::SeqCst);
    if depth >= limit {
        state.metrics().queued.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded_error",
            format!("server is at capacity: {depth} requests queued (queue_capacity {limit}); retry later"),
        ));
    }
    let sent = state
        .jobs()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|tx| tx.send(job).is_ok())
        .unwrap_or(false);
    if !sent {
        state.metrics().queued.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded_error",
            "server is shutting down",
        ));
    }
    Ok(())
}

/// `GET /health`.
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "backend": state.backbone.backend_name(),
        "backbone": state.backbone.spec().name,
        "fingerprint": state.backbone.spec().fingerprint,
        "queue_depth": state.metrics.queued.load(Ordering::Relaxed),
        "active_sequences": state.metrics.active.load(Ordering::Relaxed),
    }))
}

/// `GET /metrics`.
pub(crate) async fn metrics<S: Shared>(State(state): State<S>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics().render(),
    )
}

/// `GET /v1/models`.
pub async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let list = state.registry.list().await?;
    let data: Vec<Value> = list
        .into_iter()
        .map(|row| {
            let mut m = json!({
                "id": row.name, "object": "model", "created": 0, "owned_by": "softprompt",
            });
            match row.entry {
                Ok(e) => {
                    m["num_virtual_tokens"] = e.prompt.num_virtual_tokens().into();
                    m["token_dim"] = e.prompt.hidden_size().into();
                    m["peft_type"] = e.peft_type.clone().into();
                    m["placement"] = e.prompt.placement().as_str().into();
                    m["backbone_fingerprint"] = e.backbone_fingerprint.clone().into();
                    m["ready"] = true.into();
                    m["task"] = e.task.into();
                    m["labels"] = e.labels.iter().map(|(l, _)| l.clone()).collect();
                    m["template"] = e.template.as_ref().map(|t| t.pattern()).into();
                    m["size_bytes"] = e.size_bytes.into();
                }
                Err(err) => {
                    let stored = row.stored.as_ref();
                    m["num_virtual_tokens"] = stored.map(|s| s.prompt.num_virtual_tokens()).into();
                    m["token_dim"] = stored.map(|s| s.prompt.hidden_size()).into();
                    m["peft_type"] = stored.map(|s| s.config.peft_type.clone()).into();
                    m["placement"] = stored.map(|s| s.prompt.placement().as_str()).into();
                    m["backbone_fingerprint"] = stored
                        .and_then(|s| s.config.softprompt.as_ref())
                        .map(|p| p.backbone_fingerprint.clone())
                        .filter(|f| !f.is_empty())
                        .into();
                    m["ready"] = false.into();
                    m["reason"] = err.message.into();
                }
            }
            m
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// Checks `Authorization: Bearer <key>` when the server has a key.
pub(crate) async fn auth<S: Shared>(State(state): State<S>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config().api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // the scheme is case-insensitive (RFC 9110 §11.1)
            .and_then(|v| v.trim().split_once(char::is_whitespace))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        if given != Some(key.as_str()) {
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or wrong bearer token (Authorization: Bearer <key>)",
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// Records every request's status and latency.
pub(crate) async fn record<S: Shared>(
    State(state): State<S>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let id = state.next_request().fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let mut r = next.run(req).await;
    let seconds = started.elapsed().as_secs_f64();
    let endpoint = match path.as_str() {
        "/v1/completions" | "/v1/classify" | "/v1/models" | "/health" | "/metrics" => path.clone(),
        _ => "other".to_string(),
    };
    let status = r.status().as_u16();
    state.metrics().request(&endpoint, status, seconds);
    if let Ok(v) = HeaderValue::from_str(&format!("req-{id}")) {
        r.headers_mut().insert("x-request-id", v);
    }
    let error = r
        .extensions()
        .get::<crate::error::ErrorNote>()
        .map(|n| n.0.as_str());
    let ms = (seconds * 1e3 * 100.0).round() / 100.0;
    match status {
        500.. => {
            tracing::error!(request_id = id, %method, path, status, ms, error, "request failed")
        }
        400.. => {
            tracing::warn!(request_id = id, %method, path, status, ms, error, "request refused")
        }
        _ => tracing::info!(request_id = id, %method, path, status, ms, "request"),
    }
    r
}

/// A JSON 405 for a known route called with another method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this route does not take that method (/v1/completions and /v1/classify take POST; \
         /v1/models, /health and /metrics GET)",
    )
}

/// A JSON 404 for unknown routes.
pub async fn fallback() -> ApiError {
    ApiError::not_found(
        "no such route (see /v1/models, /v1/completions, /v1/classify, /health, /metrics)",
    )
}
