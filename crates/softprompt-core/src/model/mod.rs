//! Model descriptions shared by every backend: `config.json`, safetensors weights, the
//! fingerprint that identifies them, and the one place where tensor names are spelled.

mod config;
mod names;
mod weights;

pub use config::{
    Architecture, Gemma3Config, Gpt2Activation, Gpt2Config, LlamaConfig, ModelConfig,
};
pub use names::{
    gpt2_names, llama_names, Gpt2LayerNames, LlamaLayerNames, GPT2_LN_F, GPT2_WPE, GPT2_WTE,
    LLAMA_EMBED, LLAMA_FINAL_NORM, LM_HEAD,
};
pub use weights::{HostTensor, ModelWeights};

use std::path::{Path, PathBuf};

use crate::{BackboneSpec, Error, Result};

/// A model on disk, read into host memory: configuration, weights and identity.
#[derive(Debug)]
pub struct ModelSource {
    /// Parsed configuration.
    pub config: ModelConfig,
    /// All weights as f32, keyed by Hugging Face name.
    pub weights: ModelWeights,
    /// Identity of these weights.
    pub spec: BackboneSpec,
    /// Where it was read from.
    pub path: PathBuf,
}

impl ModelSource {
    /// Reads a Hugging Face model directory (`config.json` + `model.safetensors`, or shards
    /// listed in `model.safetensors.index.json`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let dir = path.as_ref();
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = ModelConfig::from_file(dir.join("config.json"))?;
        let mut weights = ModelWeights::load_dir(dir)?;
        if config.architecture() == Architecture::gpt2() {
            weights.strip_prefix("transformer.");
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Self::from_parts(config, weights, name, dir.to_path_buf())
    }

    /// Assembles a model from an already parsed config and weights (GGUF readers, tests).
    pub fn from_parts(
        config: ModelConfig,
        weights: ModelWeights,
        name: String,
        path: PathBuf,
    ) -> Result<Self> {
        let spec = BackboneSpec {
            architecture: config.architecture(),
            hidden_size: config.hidden_size(),
            vocab_size: config.vocab_size(),
            num_layers: config.num_layers(),
            num_attention_heads: config.num_attention_heads(),
            num_key_value_heads: config.num_key_value_heads(),
            head_dim: config.head_dim(),
            fingerprint: weights.fingerprint(),
            name,
        };
        Ok(ModelSource {
            config,
            weights,
            spec,
            path,
        })
    }
}
