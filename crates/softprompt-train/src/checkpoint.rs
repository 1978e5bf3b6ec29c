//! Training state that survives a killed run: written atomically, read back exactly.

use std::path::Path;

use serde::{Deserialize, Serialize};
use softprompt_core::{Error, PromptMethod, Result, Rng};

/// Everything needed to continue a run where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Completed optimizer steps.
    pub step: u64,
    /// Current epoch over the training set.
    pub epoch: u64,
    /// Position inside the epoch's shuffled order.
    pub cursor: usize,
    /// Number of virtual tokens.
    pub num_virtual_tokens: usize,
    /// Width of the prompt's values (the hidden size for input embeddings).
    pub hidden_size: usize,
    /// The prompt-learning method (prompt tuning in checkpoints that predate methods).
    #[serde(default)]
    pub method: PromptMethod,
    /// Trainable parameters now: the prompt values themselves, or the method's encoder
    /// parameters ([`crate::PromptEncoder`]).
    pub prompt: Vec<f32>,
    /// Optimizer state.
    pub optimizer: serde_json::Value,
    /// Best dev metric so far (higher is better).
    pub best_metric: Option<f64>,
    /// Trainable parameters at the best dev metric.
    pub best_prompt: Option<Vec<f32>>,
    /// Step of the best dev metric.
    pub best_step: Option<u64>,
    /// Consecutive evaluations without improvement (early stopping).
    pub evals_without_improvement: usize,
    /// Seed of the data order.
    pub seed: u64,
    /// Generator state for anything random during training.
    pub rng: Rng,
    /// Fingerprint of the backbone being tuned.
    pub backbone_fingerprint: String,
    /// What defines the run ([`crate::TrainConfig::identity`] and the trainer's own settings):
    /// a resumed run must match it field by field. Empty in checkpoints that predate it.
    #[serde(default)]
    pub identity: std::collections::BTreeMap<String, String>,
}

/// Writes `state` to `path` through a temporary file and a rename.
pub fn write_checkpoint(path: &Path, state: &TrainState) -> Result<()> {
    let json = serde_json::to_vec(state).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads a checkpoint written by [`write_checkpoint`].
pub fn read_checkpoint(path: &Path) -> Result<TrainState> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let state: TrainState = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let direct = matches!(
        state.method,
        PromptMethod::PromptTuning | PromptMethod::PrefixTuning { projection: None }
    );
    if direct && state.prompt.len() != state.num_virtual_tokens * state.hidden_size {
        return Err(Error::Json {
            path: path.to_path_buf(),
            reason: format!(
                "prompt holds {} values, expected {} × {}",
                state.prompt.len(),
                state.num_virtual_tokens,
                state.hidden_size
            ),
        });
    }
    Ok(state)
}
