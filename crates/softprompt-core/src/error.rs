//! Typed errors shared by every softprompt crate.

use std::path::PathBuf;

/// Result alias used across softprompt.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every way softprompt can fail. Variants name the file, tensor or field involved so that a
/// user can act on the message without a debugger. New variants may be added: match with a
/// wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A collective operation of data-parallel training failed: a rank timed out, left, or
    /// brought a buffer of another length.
    #[error("collective operation failed: {0}")]
    Collective(String),
    /// An operating-system I/O failure on `path`.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file that cannot be parsed (truncated, corrupt header, bad offsets).
    #[error("invalid safetensors file {path}: {reason}")]
    Safetensors {
        /// File involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A GGUF file that cannot be read (truncated, corrupt header, tensors beyond the file).
    #[error("invalid GGUF file {path}: {reason}")]
    Gguf {
        /// File involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A JSON file (config.json, adapter_config.json, checkpoint) that cannot be parsed.
    #[error("invalid JSON in {path}: {reason}")]
    Json {
        /// File involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A model configuration that names an architecture softprompt does not implement.
    #[error("unsupported architecture `{model_type}` in {path} (supported: llama, mistral, qwen2, gpt2, gemma3_text)")]
    UnsupportedArchitecture {
        /// `model_type` read from config.json.
        model_type: String,
        /// The config file.
        path: PathBuf,
    },
    /// A configuration value that is present but unusable.
    #[error("invalid model configuration in {path}: {reason}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A weight the architecture needs is absent from the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor {
        /// Tensor name (Hugging Face naming).
        name: String,
    },
    /// A tensor whose shape differs from what the configuration implies.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// Tensor name.
        name: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape found.
        actual: Vec<usize>,
    },
    /// A tensor stored in a dtype softprompt cannot convert to f32.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// Tensor name.
        name: String,
        /// dtype as the file states it.
        dtype: String,
    },
    /// A soft prompt whose hidden size does not match the backbone.
    #[error("prompt hidden size {prompt} does not match the backbone's hidden size {backbone}")]
    HiddenSizeMismatch {
        /// Hidden size of the prompt.
        prompt: usize,
        /// Hidden size of the backbone.
        backbone: usize,
    },
    /// A soft prompt trained for another backbone (weights fingerprint differs).
    #[error("prompt was trained for backbone {prompt} but the loaded backbone is {backbone}")]
    FingerprintMismatch {
        /// Fingerprint recorded with the prompt.
        prompt: String,
        /// Fingerprint of the loaded backbone.
        backbone: String,
    },
    /// Values whose length does not match the declared shape.
    #[error("shape error: {0}")]
    Shape(String),
    /// A batch that is internally inconsistent or out of range for the backbone.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The backend does not implement a capability (gradients, generation, …).
    #[error("the {backend} backend does not support {capability}{}", hint.as_deref().map(|h| format!(": {h}")).unwrap_or_default())]
    Unsupported {
        /// Backend name.
        backend: String,
        /// Capability asked for.
        capability: String,
        /// What to do instead.
        hint: Option<String>,
    },
    /// A loss or gradient that is NaN or infinite.
    #[error(
        "non-finite {what} at step {step}: training stopped; the last good checkpoint is kept"
    )]
    NonFinite {
        /// "loss" or "gradient".
        what: String,
        /// Training step at which it appeared.
        step: u64,
    },
    /// An evaluation whose scores are NaN or infinite: the model's weights or the prompt hold
    /// such values, and no metric computed from them means anything.
    #[error("non-finite {what}: the model or the prompt holds NaN or infinite values; no metric is reported")]
    NonFiniteScores {
        /// What was being scored.
        what: String,
    },
    /// A malformed line of a JSONL data file.
    #[error("{path}:{line}: {reason}")]
    Data {
        /// Data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
    /// A label that the verbalizer does not know.
    #[error("unknown label `{label}` (known labels: {known})")]
    UnknownLabel {
        /// Label found.
        label: String,
        /// Known labels, comma separated.
        known: String,
    },
    /// Tokenizer loading or encoding failure.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A prompt that is not in the store.
    #[error("no prompt named `{0}` in the store")]
    PromptNotFound(String),
    /// A stored prompt directory that is malformed.
    #[error("invalid stored prompt at {path}: {reason}")]
    InvalidPrompt {
        /// Directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An optimizer or trainer setting that cannot work.
    #[error("invalid configuration: {0}")]
    InvalidArgument(String),
    /// A runtime failure inside a backend; the runtime's own error is the source.
    #[error("{backend} backend error: {source}")]
    Backend {
        /// Backend name.
        backend: String,
        /// The runtime's error (candle's, libtorch's, ONNX Runtime's, or a message).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Wraps an I/O error with the path involved.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A typed "unsupported" error for `backend` lacking `capability`.
    pub fn unsupported(backend: &str, capability: &str, hint: Option<&str>) -> Self {
        Error::Unsupported {
            backend: backend.to_string(),
            capability: capability.to_string(),
            hint: hint.map(str::to_string),
        }
    }

    /// A backend runtime error caused by `source` (a runtime's error, or a message).
    pub fn backend(
        backend: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Backend {
            backend: backend.to_string(),
            source: source.into(),
        }
    }
}
