//! Serving visual classifiers (visual prompt tuning, a linear probe or a pixel frame, each
//! with its head) from one frozen vision transformer: [`serve_vision`].
//!
//! `POST /v1/classify` takes base64 PNG/JPEG images (`input`, one or a list; a `data:` URL
//! prefix is accepted) for one stored visual prompt (`model`) and answers each image's class and
//! per-class log-probabilities. One engine thread owns the compute: rows of *different* prompts
//! waiting together go through one forward pass where their prompts are of one kind, length and
//! resolution (the backbone's per-row prompt input); rows whose prompts differ in those run as
//! separate passes of the same round. Prompts are read from the store folder on demand and
//! reread when their files change. `GET /v1/models`, `/health` and `/metrics` as for text.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use softprompt_core::{Error, Images, SoftPrompt, VisionBackbone};
use softprompt_train::vision::{
    check_classifier, class_logprobs, decode_image, is_visual_folder, read_classifier, ImageSet,
    VisualClassifier, IMAGENET_MEAN, IMAGENET_STD,
};
use tokio::sync::oneshot;

use crate::api::{body, submit, Shared};
use crate::completions::OneOrMany;
use crate::error::ApiError;
use crate::{Metrics, ServeConfig, ServeError};

/// One loaded version of a stored visual classifier.
#[derive(Debug)]
pub(crate) struct VisualEntry {
    name: String,
    /// Distinct for every loaded version: rows with the same key share one prompt slot.
    key: u64,
    model: VisualClassifier,
    fingerprint: String,
}

/// A prompt folder's config as read: it names its weights by digest, so a new version (written
/// as one unit by the store) changes it.
type Stamp = Vec<u8>;

fn stamp(dir: &Path) -> Stamp {
    std::fs::read(dir.join(softprompt_store::ADAPTER_CONFIG)).unwrap_or_default()
}

/// Reads visual classifiers from the store folder on demand; keeps each parsed while its config
/// is unchanged.
struct VisionRegistry {
    dir: PathBuf,
    cache: Mutex<HashMap<String, (Stamp, Arc<VisualEntry>)>>,
    next_key: AtomicU64,
}

/// A store folder's name and its servable entry, or why it cannot be served.
type Listed = (String, Result<Arc<VisualEntry>, ApiError>);

/// A prompt name is one folder name in the store: no separators, not hidden.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0'])
}

impl VisionRegistry {
    /// The servable classifier `name`, checked against `backbone`.
    fn get(&self, name: &str, backbone: &dyn VisionBackbone) -> Result<Arc<VisualEntry>, ApiError> {
        if !valid_name(name) {
            return Err(
                ApiError::bad_request(format!("`{name}` is not a prompt name")).param("model"),
            );
        }
        let dir = self.dir.join(name);
        if !dir.join(softprompt_store::ADAPTER_CONFIG).is_file() {
            return Err(
                ApiError::not_found(format!("no prompt `{name}` in the store")).param("model"),
            );
        }
        if !is_visual_folder(&dir) {
            return Err(ApiError::bad_request(format!(
                "prompt `{name}` is not a visual prompt: this server runs a vision model"
            ))
            .param("model"));
        }
        // a writer swaps the folder as one unit; a read that straddles two versions sees a
        // weights digest that does not match and is tried again
        let mut last = None;
        for _ in 0..3 {
            let before = stamp(&dir);
            if let Some((s, e)) = self
                .cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
            {
                if *s == before {
                    return Ok(e.clone());
                }
            }
            match read_classifier(&dir) {
                Ok((cfg, model)) => {
                    check_classifier(&cfg, &model, backbone).map_err(|e| {
                        ApiError::unprocessable(format!("prompt `{name}` cannot be served: {e}"))
                            .param("model")
                    })?;
                    let entry = Arc::new(VisualEntry {
                        name: name.to_string(),
                        key: self.next_key.fetch_add(1, Ordering::Relaxed),
                        fingerprint: backbone.spec().fingerprint.clone(),
                        model,
                    });
                    let replaced = self
                        .cache
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.to_string(), (before, entry.clone()))
                        .is_some();
                    tracing::info!(
                        prompt = name,
                        placement = entry.model.prompt.placement().as_str(),
                        virtual_tokens = entry.model.prompt.num_virtual_tokens(),
                        "{}",
                        if replaced {
                            "prompt reloaded"
                        } else {
                            "prompt loaded"
                        }
                    );
                    return Ok(entry);
                }
                Err(e) => last = Some(e),
            }
        }
        let e = last.map(|e| e.to_string()).unwrap_or_default();
        tracing::warn!(prompt = name, error = %e, "prompt unreadable");
        Err(ApiError::unprocessable(format!("prompt `{name}` cannot be read: {e}")).param("model"))
    }

    /// Every folder of the store with its servable entry or why it cannot be served.
    fn list(&self, backbone: &dyn VisionBackbone) -> Result<Vec<Listed>, ApiError> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(|e| ApiError::internal(format!("reading the store: {e}")))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(softprompt_store::ADAPTER_CONFIG).is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| valid_name(n))
            .collect();
        names.sort();
        Ok(names
            .into_iter()
            .map(|n| {
                let entry = self.get(&n, backbone);
                (n, entry)
            })
            .collect())
    }
}

/// One image to classify under one prompt: its normalised pixels at the prompt's resolution.
struct VisionRow {
    entry: Arc<VisualEntry>,
    pixels: Vec<f32>,
}

/// A request's rows and where its answer goes (per row, the class log-probabilities).
pub(crate) struct VisionJob {
    rows: Vec<VisionRow>,
    reply: oneshot::Sender<Result<Vec<Vec<f64>>, String>>,
}

#[derive(Clone)]
struct VisionState {
    backbone: Arc<dyn VisionBackbone>,
    registry: Arc<VisionRegistry>,
    config: Arc<ServeConfig>,
    metrics: Metrics,
    jobs: Arc<Mutex<Option<mpsc::Sender<VisionJob>>>>,
    next_request: Arc<AtomicU64>,
}

impl Shared for VisionState {
    type Job = VisionJob;
    fn config(&self) -> &ServeConfig {
        &self.config
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn next_request(&self) -> &AtomicU64 {
        &self.next_request
    }
    fn jobs(&self) -> &Mutex<Option<mpsc::Sender<VisionJob>>> {
        &self.jobs
    }
}

/// Rows that can share a forward pass: prompt placement, length and resolution.
type GroupKey = (&'static str, usize, usize);

/// The engine: takes the jobs waiting (up to `max_rows` rows), runs each group of compatible
/// rows as one forward pass with one prompt slot per distinct prompt, and answers every job.
fn run_engine(
    backbone: Arc<dyn VisionBackbone>,
    rx: mpsc::Receiver<VisionJob>,
    max_rows: usize,
    metrics: Metrics,
) {
    let d = backbone.spec().hidden_size;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut rows = jobs[0].rows.len();
        while rows < max_rows {
            match rx.try_recv() {
                Ok(j) => {
                    rows += j.rows.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        metrics.queued.fetch_sub(jobs.len(), Ordering::SeqCst);
        let mut groups: BTreeMap<GroupKey, Vec<(usize, usize)>> = BTreeMap::new();
        for (j, job) in jobs.iter().enumerate() {
            for (r, row) in job.rows.iter().enumerate() {
                let p = &row.entry.model.prompt;
                groups
                    .entry((
                        p.placement().as_str(),
                        p.num_virtual_tokens(),
                        row.entry.model.image_size,
                    ))
                    .or_default()
                    .push((j, r));
            }
        }
        let mut answers: Vec<Vec<Vec<f64>>> = jobs
            .iter()
            .map(|j| vec![Vec::new(); j.rows.len()])
            .collect();
        let mut failed: Vec<Option<String>> = vec![None; jobs.len()];
        for ((_, _, size), members) in groups {
            for chunk in members.chunks(max_rows.max(1)) {
                let mut prompts: Vec<SoftPrompt> = Vec::new();
                let mut slot_of: HashMap<u64, usize> = HashMap::new();
                let mut index = Vec::with_capacity(chunk.len());
                let mut pixels = Vec::with_capacity(chunk.len() * 3 * size * size);
                for &(j, r) in chunk {
                    let row = &jobs[j].rows[r];
                    let slot = *slot_of.entry(row.entry.key).or_insert_with(|| {
                        prompts.push(row.entry.model.prompt.clone());
                        prompts.len() - 1
                    });
                    index.push(slot);
                    pixels.extend_from_slice(&row.pixels);
                }
                let images = Images {
                    rows: chunk.len(),
                    channels: 3,
                    size,
                    pixels,
                };
                let result = backbone.features(&prompts, &index, &images);
                let mut per_prompt: BTreeMap<String, usize> = BTreeMap::new();
                for &(j, r) in chunk {
                    *per_prompt
                        .entry(jobs[j].rows[r].entry.name.clone())
                        .or_default() += 1;
                }
                let per_prompt: Vec<(String, usize)> = per_prompt.into_iter().collect();
                metrics.classify_batch(chunk.len(), prompts.len(), &per_prompt);
                match result {
                    Ok(f) => {
                        for (k, &(j, r)) in chunk.iter().enumerate() {
                            let model = &jobs[j].rows[r].entry.model;
                            let lp = class_logprobs(model, &f[k * d..(k + 1) * d], d);
                            answers[j][r] = lp.into_iter().next().unwrap_or_default();
                        }
                    }
                    Err(e) => {
                        for &(j, _) in chunk {
                            failed[j] = Some(e.to_string());
                        }
                    }
                }
            }
        }
        for ((job, answer), fail) in jobs.into_iter().zip(answers).zip(failed) {
            // a client that went away has dropped its receiver: nothing to do
            let _ = job.reply.send(match fail {
                Some(e) => Err(e),
                None => Ok(answer),
            });
        }
    }
}

/// `POST /v1/classify` body of a vision server.
#[derive(Debug, Deserialize)]
struct VisionClassifyRequest {
    /// Name of the visual prompt.
    model: String,
    /// Base64 PNG/JPEG image(s), optionally as `data:image/...;base64,` URLs.
    input: OneOrMany,
}

/// Decodes one request image to the prompt's normalised pixels.
fn prepare(b64: &str, size: usize) -> Result<Vec<f32>, String> {
    use base64::Engine;
    let data = match b64.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => b64,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    let rgb = decode_image(&bytes, size)?;
    let one = ImageSet {
        height: size,
        width: size,
        channels: 3,
        pixels: rgb,
        labels: vec![0],
        classes: Vec::new(),
    };
    Ok(one.prepare(&[0], size, IMAGENET_MEAN, IMAGENET_STD).pixels)
}

async fn classify(
    State(state): State<VisionState>,
    req: Result<Json<VisionClassifyRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body(&state, req)?;
    let images = req.input.into_vec();
    let limit = state.config.max_batch_inputs;
    if images.is_empty() || images.len() > limit {
        return Err(ApiError::bad_request(format!(
            "input needs 1..={limit} images (the server's max_batch_inputs limit), got {}",
            images.len()
        ))
        .param("input"));
    }
    let (registry, backbone, name) = (
        state.registry.clone(),
        state.backbone.clone(),
        req.model.clone(),
    );
    // reading the prompt and decoding images are file and CPU work: off the async workers
    let (entry, rows) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let entry = registry.get(&name, backbone.as_ref())?;
        let mut rows = Vec::with_capacity(images.len());
        for (i, image) in images.iter().enumerate() {
            let pixels = prepare(image, entry.model.image_size)
                .map_err(|e| ApiError::bad_request(format!("input[{i}]: {e}")).param("input"))?;
            rows.push(VisionRow {
                entry: entry.clone(),
                pixels,
            });
        }
        Ok((entry, rows))
    })
    .await
    .map_err(|_| ApiError::internal("decoding the request failed"))??;
    let n = rows.len();
    let (tx, rx) = oneshot::channel();
    submit(&state, VisionJob { rows, reply: tx })?;
    let scores = rx
        .await
        .map_err(|_| ApiError::internal("the engine stopped"))?
        .map_err(|e| ApiError::internal(format!("classification failed: {e}")))?;
    let classes = &entry.model.classes;
    let mut results = Vec::with_capacity(n);
    for (i, lp) in scores.iter().enumerate() {
        if lp.iter().any(|v| v.is_nan()) {
            return Err(ApiError::internal(format!(
                "{}",
                Error::NonFiniteScores {
                    what: "class log-probabilities".into()
                }
            )));
        }
        let best = softprompt_core::generate::argmax(lp) as usize;
        let map: serde_json::Map<String, Value> = classes
            .iter()
            .zip(lp)
            .map(|(c, v)| (c.clone(), json!(v)))
            .collect();
        results.push(json!({ "index": i, "label": classes[best], "logprobs": map }));
    }
    Ok(Json(json!({
        "object": "classification", "model": entry.name, "labels": classes,
        "results": results, "usage": { "images": n },
    })))
}

async fn models(State(state): State<VisionState>) -> Result<Json<Value>, ApiError> {
    let (registry, backbone) = (state.registry.clone(), state.backbone.clone());
    let list = tokio::task::spawn_blocking(move || registry.list(backbone.as_ref()))
        .await
        .map_err(|_| ApiError::internal("listing the store failed"))??;
    let data: Vec<Value> = list
        .into_iter()
        .map(|(name, entry)| {
            let mut m = json!({
                "id": name, "object": "model", "created": 0, "owned_by": "softprompt",
                "task": "image-classification",
            });
            match entry {
                Ok(e) => {
                    let p = &e.model.prompt;
                    m["peft_type"] = softprompt_train::vision::VISUAL_PEFT_TYPE.into();
                    m["placement"] = p.placement().as_str().into();
                    m["num_virtual_tokens"] = p.num_virtual_tokens().into();
                    m["token_dim"] = p.hidden_size().into();
                    m["image_size"] = e.model.image_size.into();
                    m["labels"] = e.model.classes.clone().into();
                    m["backbone_fingerprint"] = e.fingerprint.clone().into();
                    m["ready"] = true.into();
                }
                Err(err) => {
                    m["ready"] = false.into();
                    m["reason"] = err.message.into();
                }
            }
            m
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

async fn health(State(state): State<VisionState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "backend": state.backbone.backend_name(),
        "backbone": state.backbone.spec().name,
        "fingerprint": state.backbone.spec().fingerprint,
        "queue_depth": state.metrics.queued.load(Ordering::Relaxed),
    }))
}

async fn fallback() -> ApiError {
    ApiError::not_found("no such route (see /v1/models, /v1/classify, /health, /metrics)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this route does not take that method (/v1/classify takes POST; /v1/models, /health \
         and /metrics GET)",
    )
}

/// Serves the visual classifiers of the store folder `store` (one sub-folder per prompt, as
/// `softprompt train --task image-classification` writes them) on `listener` until `shutdown`
/// resolves; the limits of `config` that apply to images (queue, rows per pass, images per
/// request, body size and timeouts, connections, bearer key) as for text.
pub async fn serve_vision(
    listener: tokio::net::TcpListener,
    backbone: Arc<dyn VisionBackbone>,
    store: PathBuf,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (tx, rx) = mpsc::channel();
    let metrics = Metrics::default();
    let engine = {
        let (backbone, metrics) = (backbone.clone(), metrics.clone());
        let max_rows = config.max_batch_rows.max(1);
        std::thread::Builder::new()
            .name("softprompt-vision-engine".into())
            .spawn(move || run_engine(backbone, rx, max_rows, metrics))?
    };
    let state = VisionState {
        backbone,
        registry: Arc::new(VisionRegistry {
            dir: store,
            cache: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
        }),
        config: Arc::new(config),
        metrics,
        jobs: Arc::new(Mutex::new(Some(tx))),
        next_request: Arc::new(AtomicU64::new(1)),
    };
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/classify", post(classify));
    let rest = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(crate::api::metrics::<VisionState>));
    let app = crate::finish_router(v1, rest, state.clone(), |r| {
        r.fallback(fallback)
            .method_not_allowed_fallback(method_not_allowed)
    });
    crate::run_until_shutdown(listener, app, &state, engine, shutdown).await
}
