//! What a backbone states about itself.

use serde::{Deserialize, Serialize};

use crate::model::Architecture;

/// Identity of a frozen backbone: enough to refuse a prompt trained for another model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneSpec {
    /// Model family.
    pub architecture: Architecture,
    /// Width of the token embeddings (and of each virtual token).
    pub hidden_size: usize,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Attention (query) heads per block.
    pub num_attention_heads: usize,
    /// Key/value heads per block (the width of a key/value prefix; 0 when not applicable).
    #[serde(default)]
    pub num_key_value_heads: usize,
    /// Width of one attention head (0 when not applicable).
    #[serde(default)]
    pub head_dim: usize,
    /// Hex SHA-256 over the tensor names, shapes and f32 values of the weights.
    pub fingerprint: String,
    /// Human-readable name (the model directory or file name).
    pub name: String,
}

impl BackboneSpec {
    /// Short fingerprint for messages (first 16 hex digits).
    pub fn short_fingerprint(&self) -> &str {
        &self.fingerprint[..self.fingerprint.len().min(16)]
    }
}
