//! `POST /v1/completions`: OpenAI-style text completion under a stored prompt, streamed as
//! server-sent events or answered whole.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use serde::Deserialize;
use serde_json::{json, Value};
use softprompt_core::{GenerationParams, StopReason};
use tokio::sync::mpsc;

use crate::api::{body, now_secs, submit};
use crate::engine::{GenEvent, GenerateJob, Job};
use crate::error::ApiError;
use crate::registry::Entry;
use crate::AppState;

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
    pub(crate) fn into_vec(self) -> Vec<String> {
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
    check_input_len(
        state,
        &entry,
        ids.len(),
        max_tokens,
        ("prompt", "max_tokens"),
    )?;
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
/// generated tokens, the model's context; the errors name the request fields `params` (the
/// input's, then the one that asked for the new tokens).
pub(crate) fn check_input_len(
    state: &AppState,
    entry: &Entry,
    len: usize,
    new_tokens: usize,
    (input, new): (&'static str, &'static str),
) -> Result<(), ApiError> {
    let c = &state.config;
    if len > c.max_input_tokens {
        return Err(ApiError::bad_request(format!(
            "input is {len} tokens, over the server's max_input_tokens limit of {}",
            c.max_input_tokens
        ))
        .param(input));
    }
    let n = entry.prompt.num_virtual_tokens();
    if let Some(ctx) = c.context_length {
        if n + len + new_tokens > ctx {
            return Err(ApiError::bad_request(format!(
                "{n} virtual + {len} input + {new_tokens} new tokens exceed the model's context of {ctx}"
            ))
            .param(new));
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
