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
//!
//! [`serve_vision`] serves visual classifiers (visual prompt tuning) from a frozen vision
//! transformer the same way: `POST /v1/classify` with base64 images.

mod api;
mod classify;
mod completions;
mod engine;
mod error;
mod metrics;
mod registry;
mod vision;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use softprompt_core::{Backbone, PromptStore, TextTokenizer};

pub use engine::Batching;
pub use error::ApiError;
pub use metrics::Metrics;
pub use vision::serve_vision;

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
    /// A connection whose request headers do not arrive in full within this time is closed
    /// (also an idle keep-alive connection waiting for its next request).
    pub header_read_timeout: Duration,
    /// A request whose body does not arrive in full within this time gets 408.
    pub body_read_timeout: Duration,
    /// Open connections at most; further ones are closed at once.
    pub max_connections: usize,
    /// On shutdown, in-flight requests get this long to finish; then every connection is
    /// closed.
    pub shutdown_timeout: Duration,
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
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_timeout: Duration::from_secs(30),
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
        .route("/v1/classify", post(classify::classify));
    let rest = Router::new()
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics::<AppState>));
    finish_router(v1, rest, state, |r| {
        r.fallback(api::fallback)
            .method_not_allowed_fallback(api::method_not_allowed)
    })
}

/// The server's app: the `/v1` routes behind the bearer check, the others open; `fallbacks`
/// adds the 404/405 answers to the merged routes; then the body limit, body read timeout and
/// request log around everything (text and vision servers alike).
pub(crate) fn finish_router<S: api::Shared>(
    v1: Router<S>,
    rest: Router<S>,
    state: S,
    fallbacks: impl FnOnce(Router<S>) -> Router<S>,
) -> Router {
    let v1 = v1.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        api::auth::<S>,
    ));
    let config = state.config().clone();
    fallbacks(Router::new().merge(v1).merge(rest))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            config.body_read_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::record::<S>,
        ))
        .with_state(state)
}

/// Serves `app` until `shutdown` (see [`accept_loop`]), then closes the engine's queue so that
/// it finishes what it holds, and joins it.
pub(crate) async fn run_until_shutdown<S: api::Shared>(
    listener: tokio::net::TcpListener,
    app: Router,
    state: &S,
    engine: std::thread::JoinHandle<()>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let result = accept_loop(listener, app, state.config(), shutdown).await;
    // every connection is closed: let the engine finish what it holds and stop
    state
        .jobs()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let joined = tokio::task::spawn_blocking(move || engine.join())
        .await
        .map_err(|_| ServeError::EnginePanicked)?;
    result?;
    joined.map_err(|_| ServeError::EnginePanicked)
}

/// Accepts connections until `shutdown` resolves (header read timeout and connection limit
/// from `limits`), then lets open connections finish their requests for up to
/// `limits.shutdown_timeout` and closes them.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: &ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            // reap finished connections
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    // out of file descriptors and the like: back off, keep serving
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let service = TowerToHyperService::new(app.clone());
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                connections.spawn(async move {
                    let _ = conn.await;
                    drop(slot);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_timeout) => {
            // the deadline: whatever is still open is closed
            connections.abort_all();
        }
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting connections, lets
/// in-flight requests (streams included) finish for up to [`ServeConfig::shutdown_timeout`],
/// drains the engine and returns.
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
    let app = router(state.clone());
    run_until_shutdown(listener, app, &state, engine, shutdown).await
}
