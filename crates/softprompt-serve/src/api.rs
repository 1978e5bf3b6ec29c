//! HTTP handlers: OpenAI-style completions, classification, model listing, health, metrics.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use serde::Deserialize;
use serde_json::{json, Value};
use softprompt_core::{GenerationParams, StopReason};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{ClassifyJob, ClassifyRow, GenEvent, GenerateJob, Job};
use crate::registry::Entry;
use crate::AppState;

/// An error answered as `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI error type.
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
        }
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }
    /// 422: a prompt that exists but cannot run here.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "incompatible_prompt_error",
            message,
        )
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    /// Names the request field at fault.
    pub fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": {
            "message": self.message, "type": self.kind, "param": self.param,
            "code": self.status.as_u16(),
        }});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// The JSON body, with extractor failures turned into clear 400s (413 past the body limit).
fn body<T>(state: &AppState, r: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    match r {
        Ok(Json(t)) => Ok(t),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "request body exceeds the server's limit of {} bytes (max_body_bytes)",
                state.config.max_body_bytes
            ),
        )),
        Err(e) => Err(ApiError::bad_request(e.body_text())),
    }
}

/// A string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Many.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `POST /v1/completions` body (OpenAI's fields; `n`, `echo`, `logprobs`, `best_of` beyond
/// their defaults are refused).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Name of the soft prompt.
    pub model: String,
    /// The text to continue (one string, or a list holding one).
    pub prompt: OneOrMany,
    /// Tokens to generate (default 16).
    pub max_tokens: Option<usize>,
    /// Sampling temperature (default 1; 0 is greedy).
    pub temperature: Option<f32>,
    /// Nucleus mass (default 1).
    pub top_p: Option<f32>,
    /// Stop strings (up to 4), not included in the text.
    pub stop: Option<OneOrMany>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Sampler seed.
    pub seed: Option<u64>,
    /// Must be 1.
    pub n: Option<usize>,
    /// Must be 1.
    pub best_of: Option<usize>,
    /// Must be false.
    pub echo: Option<bool>,
    /// Must be absent or null.
    pub logprobs: Option<Value>,
    /// softprompt extension: wrap the text in the prompt's stored template.
    #[serde(default)]
    pub use_template: bool,
}

/// `POST /v1/classify` body.
#[derive(Debug, Deserialize)]
pub struct ClassifyRequest {
    /// Name of the soft prompt (or use `ensemble`).
    pub model: Option<String>,
    /// Several prompts that vote (Lester et al.'s prompt ensembling), scored in one batch.
    pub ensemble: Option<Vec<String>>,
    /// Text(s) to classify; each is put into the prompt's stored template.
    pub input: OneOrMany,
    /// Skip the template: `input` is the whole context.
    #[serde(default)]
    pub raw: bool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sends `job` to the engine unless the queue is full.
fn submit(state: &AppState, job: Job) -> Result<(), ApiError> {
    let limit = state.config.queue_capacity;
    let depth = state.metrics.queued.fetch_add(1, Ordering::SeqCst);
    if depth >= limit {
        state.metrics.queued.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded_error",
            format!("server is at capacity: {depth} requests queued (queue_capacity {limit}); retry later"),
        ));
    }
    let sent = state
        .jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|tx| tx.send(job).is_ok())
        .unwrap_or(false);
    if !sent {
        state.metrics.queued.fetch_sub(1, Ordering::SeqCst);
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
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
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

/// Builds the generation job of a completion request.
async fn completion_job(
    state: &AppState,
    req: &CompletionRequest,
) -> Result<(Arc<Entry>, Vec<u32>, GenerationParams, Vec<String>), ApiError> {
    let c = &state.config;
    if req.n.unwrap_or(1) != 1 || req.best_of.unwrap_or(1) != 1 {
        return Err(ApiError::bad_request("only n = 1 and best_of = 1 are supported").param("n"));
    }
    if req.echo.unwrap_or(false) {
        return Err(ApiError::bad_request("echo is not supported").param("echo"));
    }
    if req.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad_request("logprobs are not supported").param("logprobs"));
    }
    let max_tokens = req.max_tokens.unwrap_or(16.min(c.max_new_tokens));
    if max_tokens == 0 || max_tokens > c.max_new_tokens {
        return Err(ApiError::bad_request(format!(
            "max_tokens must be in 1..={} (the server's max_new_tokens limit), got {max_tokens}",
            c.max_new_tokens
        ))
        .param("max_tokens"));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::bad_request(format!(
            "temperature must be in [0, 2], got {temperature}"
        ))
        .param("temperature"));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(
            ApiError::bad_request(format!("top_p must be in (0, 1], got {top_p}")).param("top_p"),
        );
    }
    let stop = req
        .stop
        .clone()
        .map(OneOrMany::into_vec)
        .unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop takes up to 4 non-empty strings").param("stop"));
    }
    let texts = req.prompt.clone().into_vec();
    if texts.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "one prompt per request is supported, got {}",
            texts.len()
        ))
        .param("prompt"));
    }
    let entry = state.registry.get(&req.model).await?;
    let text = if req.use_template {
        entry.render(&texts[0])
    } else {
        texts[0].clone()
    };
    let ids = state
        .tokenizer
        .encode(&text, true)
        .map_err(|e| ApiError::bad_request(e.to_string()).param("prompt"))?;
    check_input_len(state, &entry, ids.len(), max_tokens)?;
    let params = GenerationParams {
        max_new_tokens: max_tokens,
        temperature,
        top_p,
        stop_tokens: state.tokenizer.eos_id().into_iter().collect(),
        seed: req.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        }),
    };
    Ok((entry, ids, params, stop))
}

/// Errors unless the input fits `max_input_tokens` and, with the prompt and `new_tokens`
/// generated tokens, the model's context.
fn check_input_len(
    state: &AppState,
    entry: &Entry,
    len: usize,
    new_tokens: usize,
) -> Result<(), ApiError> {
    let c = &state.config;
    if len > c.max_input_tokens {
        return Err(ApiError::bad_request(format!(
            "input is {len} tokens, over the server's max_input_tokens limit of {}",
            c.max_input_tokens
        ))
        .param("prompt"));
    }
    let n = entry.prompt.num_virtual_tokens();
    if let Some(ctx) = c.context_length {
        if n + len + new_tokens > ctx {
            return Err(ApiError::bad_request(format!(
                "{n} virtual + {len} input + {new_tokens} new tokens exceed the model's context of {ctx}"
            ))
            .param("max_tokens"));
        }
    }
    Ok(())
}

/// Turns token events into text: decodes the whole output each time (so multi-token
/// characters come out whole) and cuts at the first stop string.
struct TextAssembler<'a> {
    state: &'a AppState,
    ids: Vec<u32>,
    sent: usize,
    stop: Vec<String>,
}

enum Piece {
    Delta(String),
    Finished(String, &'static str),
}

impl TextAssembler<'_> {
    fn push(&mut self, ev: GenEvent) -> Result<Option<Piece>, ApiError> {
        match ev {
            GenEvent::Token(t) => {
                if Some(t) == self.state.tokenizer.eos_id() {
                    return Ok(None);
                }
                self.ids.push(t);
                let text = self
                    .state
                    .tokenizer
                    .decode(&self.ids)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                if let Some(cut) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                    let delta = text.get(self.sent..cut).unwrap_or("").to_string();
                    self.sent = cut;
                    return Ok(Some(Piece::Finished(delta, "stop")));
                }
                // hold back an incomplete character and anything a stop string may start with
                let mut safe = text.len();
                if text.ends_with('\u{FFFD}') {
                    safe = text.trim_end_matches('\u{FFFD}').len();
                }
                for s in &self.stop {
                    for k in (1..s.len()).rev() {
                        if s.is_char_boundary(k) && text[..safe].ends_with(&s[..k]) {
                            safe = safe.min(safe - k);
                            break;
                        }
                    }
                }
                if safe > self.sent && text.is_char_boundary(safe) {
                    let delta = text[self.sent..safe].to_string();
                    self.sent = safe;
                    return Ok(Some(Piece::Delta(delta)));
                }
                Ok(None)
            }
            GenEvent::Done(reason) => {
                let text = self
                    .state
                    .tokenizer
                    .decode(&self.ids)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                let delta = text.get(self.sent..).unwrap_or("").to_string();
                self.sent = text.len();
                let why = match reason {
                    StopReason::MaxTokens => "length",
                    StopReason::StopToken(_) => "stop",
                };
                Ok(Some(Piece::Finished(delta, why)))
            }
            GenEvent::Failed(e) => Err(ApiError::internal(format!("generation failed: {e}"))),
        }
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    req: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(&state, req)?;
    let (entry, ids, params, stop) = completion_job(&state, &req).await?;
    let prompt_tokens = ids.len();
    let (tx, mut rx) = mpsc::unbounded_channel();
    submit(
        &state,
        Job::Generate(GenerateJob {
            entry: entry.clone(),
            ids,
            params,
            events: tx,
            admitted: Instant::now(),
        }),
    )?;
    let id = format!(
        "cmpl-{:x}",
        state.next_request.fetch_add(1, Ordering::Relaxed)
    );
    let created = now_secs();
    let model = entry.name.clone();
    if !req.stream {
        let mut asm = TextAssembler {
            state: &state,
            ids: Vec::new(),
            sent: 0,
            stop,
        };
        let mut text = String::new();
        let mut generated = 0;
        let finish = loop {
            let Some(ev) = rx.recv().await else {
                return Err(ApiError::internal("the engine stopped"));
            };
            if matches!(ev, GenEvent::Token(_)) {
                generated += 1;
            }
            match asm.push(ev)? {
                Some(Piece::Delta(d)) => text.push_str(&d),
                Some(Piece::Finished(d, why)) => {
                    text.push_str(&d);
                    break why;
                }
                None => {}
            }
        };
        return Ok(Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }],
            "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": generated,
                       "total_tokens": prompt_tokens + generated },
        }))
        .into_response());
    }
    // streaming: a task turns token events into SSE chunks; a client that leaves drops the
    // stream, which drops the token receiver, which cancels the sequence in the engine
    let (out_tx, out_rx) = mpsc::channel::<Event>(64);
    let chunk = move |text: &str, finish: Option<&str>| {
        Event::default().data(
            json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }],
            })
            .to_string(),
        )
    };
    tokio::spawn(async move {
        let mut asm = TextAssembler {
            state: &state,
            ids: Vec::new(),
            sent: 0,
            stop,
        };
        while let Some(ev) = rx.recv().await {
            let event = match asm.push(ev) {
                Ok(Some(Piece::Delta(d))) => chunk(&d, None),
                Ok(Some(Piece::Finished(d, why))) => {
                    let _ = out_tx.send(chunk(&d, Some(why))).await;
                    break;
                }
                Ok(None) => continue,
                Err(e) => {
                    let body = json!({ "error": { "message": e.message, "type": e.kind } });
                    let _ = out_tx
                        .send(Event::default().event("error").data(body.to_string()))
                        .await;
                    break;
                }
            };
            if out_tx.send(event).await.is_err() {
                return; // client gone
            }
        }
        let _ = out_tx.send(Event::default().data("[DONE]")).await;
    });
    let events = stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<Event, Infallible>(e), rx))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Label names and words of every prompt must agree for an ensemble to vote.
fn same_labels(a: &Entry, b: &Entry) -> bool {
    a.labels.len() == b.labels.len() && a.labels.iter().zip(&b.labels).all(|(x, y)| x.0 == y.0)
}

fn argmax(v: &[f64]) -> usize {
    softprompt_core::generate::argmax(v) as usize
}

/// `POST /v1/classify`.
pub async fn classify(
    State(state): State<AppState>,
    req: Result<Json<ClassifyRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body(&state, req)?;
    let c = &state.config;
    let names: Vec<String> = match (&req.model, &req.ensemble) {
        (Some(m), None) => vec![m.clone()],
        (None, Some(e)) if !e.is_empty() && e.len() <= c.max_ensemble => e.clone(),
        (None, Some(e)) => {
            return Err(ApiError::bad_request(format!(
                "ensemble needs 1..={} prompt names, got {}",
                c.max_ensemble,
                e.len()
            ))
            .param("ensemble"))
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `model` (a prompt name) or `ensemble` (a list of them)",
            )
            .param("model"))
        }
    };
    let texts = req.input.into_vec();
    if texts.is_empty() || texts.len() > c.max_batch_inputs {
        return Err(ApiError::bad_request(format!(
            "input needs 1..={} texts (the server's max_batch_inputs limit), got {}",
            c.max_batch_inputs,
            texts.len()
        ))
        .param("input"));
    }
    let mut entries: Vec<Arc<Entry>> = Vec::with_capacity(names.len());
    for name in &names {
        let e = state.registry.get(name).await?;
        if e.labels.is_empty() {
            return Err(ApiError::bad_request(format!(
                "prompt `{name}` has no labels: it is not a classifier (use /v1/completions)"
            ))
            .param("model"));
        }
        if let Some(first) = entries.first() {
            if !same_labels(first, &e) {
                return Err(ApiError::bad_request(format!(
                    "ensemble members must share labels: `{}` and `{name}` differ",
                    names[0]
                ))
                .param("ensemble"));
            }
        }
        entries.push(e);
    }
    let mut rows = Vec::with_capacity(texts.len() * entries.len());
    let mut prompt_tokens = 0;
    for text in &texts {
        for e in &entries {
            let ctx = if req.raw {
                text.clone()
            } else {
                e.render(text)
            };
            let ids = state
                .tokenizer
                .encode(&ctx, true)
                .map_err(|err| ApiError::bad_request(err.to_string()).param("input"))?;
            let longest = e.label_ids.iter().map(Vec::len).max().unwrap_or(1);
            check_input_len(&state, e, ids.len(), longest)?;
            if ids.is_empty() && e.prompt.num_virtual_tokens() == 0 {
                return Err(ApiError::bad_request("input encodes to no tokens").param("input"));
            }
            prompt_tokens += ids.len();
            rows.push(ClassifyRow {
                entry: e.clone(),
                ids,
            });
        }
    }
    let (tx, rx) = oneshot::channel();
    submit(
        &state,
        Job::Classify(ClassifyJob {
            rows,
            reply: tx,
            admitted: Instant::now(),
        }),
    )?;
    let scores = rx
        .await
        .map_err(|_| ApiError::internal("the engine stopped"))?
        .map_err(|e| ApiError::internal(format!("classification failed: {e}")))?;
    let labels: Vec<String> = entries[0].labels.iter().map(|(l, _)| l.clone()).collect();
    let as_map = |lp: &[f64]| -> Value {
        labels
            .iter()
            .zip(lp)
            .map(|(l, v)| (l.clone(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let k = entries.len();
    let results: Vec<Value> = scores
        .chunks(k)
        .enumerate()
        .map(|(i, member)| {
            if k == 1 {
                let best = argmax(&member[0]);
                return json!({ "index": i, "label": labels[best], "logprobs": as_map(&member[0]) });
            }
            // majority vote; ties go to the larger summed log-probability
            let mut votes = vec![0usize; labels.len()];
            let mut sum = vec![0f64; labels.len()];
            for lp in member {
                votes[argmax(lp)] += 1;
                for (s, v) in sum.iter_mut().zip(lp) {
                    *s += v;
                }
            }
            let best = (0..labels.len()).fold(0, |b, j| {
                if (votes[j], sum[j]) > (votes[b], sum[b]) {
                    j
                } else {
                    b
                }
            });
            json!({
                "index": i, "label": labels[best],
                "votes": labels.iter().zip(&votes).map(|(l, v)| (l.clone(), json!(v)))
                    .collect::<serde_json::Map<_, _>>(),
                "members": names.iter().zip(member).map(|(n, lp)| json!({
                    "model": n, "label": labels[argmax(lp)], "logprobs": as_map(lp),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut out = json!({
        "object": "classification", "labels": labels, "results": results,
        "usage": { "prompt_tokens": prompt_tokens },
    });
    match (req.model, req.ensemble) {
        (Some(m), _) => out["model"] = m.into(),
        (_, Some(e)) => out["ensemble"] = e.into(),
        _ => {}
    }
    Ok(Json(out))
}

/// Checks `Authorization: Bearer <key>` when the server has a key.
pub async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
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
pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req.uri().path().to_string();
    let started = Instant::now();
    let r = next.run(req).await;
    let endpoint = match endpoint.as_str() {
        "/v1/completions" | "/v1/classify" | "/v1/models" | "/health" | "/metrics" => endpoint,
        _ => "other".to_string(),
    };
    state.metrics.request(
        &endpoint,
        r.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    r
}

/// A JSON 404 for unknown routes.
pub async fn fallback() -> ApiError {
    ApiError::not_found(
        "no such route (see /v1/models, /v1/completions, /v1/classify, /health, /metrics)",
    )
}
