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
    /// Mean training loss of the last completed step (so that resuming a finished run still
    /// reports it). `None` before the first step and in checkpoints that predate it.
    #[serde(default)]
    pub last_loss: Option<f32>,
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
    clean_stale(path);
    let written = std::fs::write(&tmp, json)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        // a full disk or a failed rename: the previous checkpoint stays, the partial copy goes
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Removes the temporary files `<name>.tmp.<pid>` beside `path` that writers which no longer
/// run left (a run killed between writing and renaming its checkpoint).
fn clean_stale(path: &Path) {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{}.tmp.", stem.to_string_lossy());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !softprompt_core::process_alive(p)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TrainState {
        TrainState {
            step: 3,
            epoch: 0,
            cursor: 0,
            num_virtual_tokens: 1,
            hidden_size: 2,
            method: PromptMethod::PromptTuning,
            prompt: vec![0.5, -0.5],
            optimizer: serde_json::Value::Null,
            best_metric: None,
            best_prompt: None,
            best_step: None,
            evals_without_improvement: 0,
            seed: 0,
            rng: Rng::seed_from_u64(0),
            backbone_fingerprint: "fp".into(),
            identity: Default::default(),
            last_loss: Some(0.25),
        }
    }

    /// A write that fails at its last step (the rename, here onto a folder that holds a file)
    /// leaves no partial copy behind.
    #[test]
    fn a_failed_write_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.json");
        write_checkpoint(&path, &state()).unwrap();
        assert_eq!(read_checkpoint(&path).unwrap(), state());
        let blocked = dir.path().join("blocked.json");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"x").unwrap();
        assert!(write_checkpoint(&blocked, &state()).is_err());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["blocked.json", "checkpoint.json"]);
    }
}
