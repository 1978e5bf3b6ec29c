//! Serving many soft prompts from one frozen backbone.
//!
//! [`serve`] runs an HTTP server (tokio + axum) over any [`Backbone`]: `POST /v1/completions`
//! (OpenAI-compatible, with server-sent-event streaming), `POST /v1/classify` (labels and
//! per-label log-probabilities from the prompt's stored template and verbalizer, optionally an
//! ensemble of prompts voting), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus).
//!
//! One engine thread owns the compute and packs requests for *different* prompts into the same
//! forward pass through the per-row prompt input; generation is continuously batched (sequences
//! join and leave between decode steps). The queue is bounded: past `queue_capacity` a request
//! gets a 503 at once. Prompts are read from a [`PromptStore`] on demand and reread when the
//! store's tag for them changes, so they can be added, replaced and removed while the server
//! runs. The server never writes to the store.

mod api;
mod classify;
mod completions;
mod engine;
mod error;
mod metrics;
mod registry;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use softprompt_core::{Backbone, PromptStore, TextTokenizer};

pub use engine::Batching;
pub use error::ApiError;
pub use metrics::Metrics;

/// Server limits and behaviour.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Requests admitted but not yet started; beyond it requests get 503.
    pub queue_capacity: usize,
    /// Most classification rows in one forward pass.
    pub max_batch_rows: usize,
    /// Most sequences decoded together.
    pub max_active_sequences: usize,
    /// Largest `max_tokens` a completion may ask for.
    pub max_new_tokens: usize,
    /// Longest input in tokens (template applied, before virtual tokens).
    pub max_input_tokens: usize,
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most texts in one classification request.
    pub max_batch_inputs: usize,
    /// Most prompts in one ensemble.
    pub max_ensemble: usize,
    /// The model's context length (virtual + input + generated tokens), when known.
    pub context_length: Option<usize>,
    /// Mixed-prompt batches (default) or one prompt per batch (baseline).
    pub batching: Batching,
    /// When set, `/v1/*` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            queue_capacity: 256,
            max_batch_rows: 32,
            max_active_sequences: 32,
            max_new_tokens: 512,
            max_input_tokens: 1024,
            max_body_bytes: 1 << 20,
            max_batch_inputs: 64,
            max_ensemble: 16,
            context_length: None,
            batching: Batching::Mixed,
            api_key: None,
        }
    }
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener failed.
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The engine thread panicked.
    #[error("the engine thread panicked")]
    EnginePanicked,
}

/// Shared by every handler.
#[derive(Clone)]
pub(crate) struct AppState {
    backbone: Arc<dyn Backbone>,
    tokenizer: Arc<dyn TextTokenizer>,
    registry: Arc<registry::Registry>,
    config: Arc<ServeConfig>,
    metrics: Metrics,
    /// `None` once shutdown has begun.
    jobs: Arc<Mutex<Option<mpsc::Sender<engine::Job>>>>,
    next_request: Arc<AtomicU64>,
}

fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(api::models))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/classify", post(classify::classify))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::auth,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .fallback(api::fallback)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::record,
        ))
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting connections, lets
/// in-flight requests (streams included) finish, drains the engine and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backbone: Arc<dyn Backbone>,
    tokenizer: Arc<dyn TextTokenizer>,
    store: Arc<dyn PromptStore>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (tx, rx) = mpsc::channel();
    let metrics = Metrics::default();
    let engine_config = engine::EngineConfig {
        max_batch_rows: config.max_batch_rows.max(1),
        max_active: config.max_active_sequences.max(1),
        batching: config.batching,
    };
    let engine = {
        let (backbone, metrics) = (backbone.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("softprompt-engine".into())
            .spawn(move || engine::run(backbone, rx, engine_config, metrics))?
    };
    let state = AppState {
        registry: Arc::new(registry::Registry::new(
            store,
            backbone.spec().clone(),
            tokenizer.clone(),
        )),
        backbone,
        tokenizer,
        config: Arc::new(config),
        metrics,
        jobs: Arc::new(Mutex::new(Some(tx))),
        next_request: Arc::new(AtomicU64::new(1)),
    };
    let jobs = state.jobs.clone();
    let result = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await;
    // every connection is closed: let the engine finish what it holds and stop
    jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
    let joined = tokio::task::spawn_blocking(move || engine.join())
        .await
        .map_err(|_| ServeError::EnginePanicked)?;
    result?;
    joined.map_err(|_| ServeError::EnginePanicked)
}
