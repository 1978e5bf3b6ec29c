//! `POST /v1/classify`: labels and per-label log-probabilities from each prompt's stored
//! template and verbalizer, optionally an ensemble of prompts voting.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::api::{body, submit};
use crate::completions::{check_input_len, OneOrMany};
use crate::engine::{ClassifyJob, ClassifyRow, Job};
use crate::error::ApiError;
use crate::registry::Entry;
use crate::AppState;

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
            // classification asks for no new tokens: the input is what is too long
            check_input_len(&state, e, ids.len(), longest, ("input", "input"))?;
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
