//! Text ↔ token ids. Backends never see text; the trainer and CLI go through this trait.

use std::path::Path;

use crate::{Error, Result};

/// Turns text into token ids and back.
pub trait TextTokenizer: Send + Sync {
    /// Ids of `text`; `add_special_tokens` adds BOS/EOS as the tokenizer's post-processor says.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>>;

    /// Text of `ids`, special tokens skipped.
    fn decode(&self, ids: &[u32]) -> Result<String>;

    /// End-of-sequence id, if the tokenizer has one.
    fn eos_id(&self) -> Option<u32>;

    /// Id used for right padding (EOS when there is no pad token, 0 as a last resort).
    fn pad_id(&self) -> u32;
}

/// A Hugging Face `tokenizer.json` through the `tokenizers` crate.
#[derive(Debug, Clone)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    eos: Option<u32>,
    pad: Option<u32>,
}

impl HfTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::Tokenizer(format!("{} not found", path.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::from_tokenizer(inner))
    }

    /// Loads `tokenizer.json` of a model directory, reading special ids from its config files.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tok = Self::from_file(dir.join("tokenizer.json"))?;
        for file in ["generation_config.json", "config.json"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let first = |key: &str| {
                        let x = v.get(key)?;
                        x.as_u64()
                            .or_else(|| x.as_array()?.first()?.as_u64())
                            .map(|n| n as u32)
                    };
                    tok.eos = tok.eos.or(first("eos_token_id"));
                    tok.pad = tok.pad.or(first("pad_token_id"));
                }
            }
        }
        Ok(tok)
    }

    /// Wraps an already built tokenizer (GGUF vocabularies, tests).
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos = find(&["<|endoftext|>", "</s>", "<|im_end|>", "<eos>"]);
        let pad = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| find(&["<pad>", "<|pad|>"]));
        HfTokenizer { inner, eos, pad }
    }

    /// Overrides the end-of-sequence id.
    pub fn with_eos(mut self, eos: Option<u32>) -> Self {
        self.eos = eos;
        self
    }

    /// Overrides the padding id.
    pub fn with_pad(mut self, pad: Option<u32>) -> Self {
        self.pad = pad.or(self.pad);
        self
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    fn pad_id(&self) -> u32 {
        self.pad.or(self.eos).unwrap_or(0)
    }
}
