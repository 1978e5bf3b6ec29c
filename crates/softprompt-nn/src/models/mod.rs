//! Model families, each written once against [`crate::Ops`]: one file per family, one struct per
//! Hugging Face module, loaded by Hugging Face tensor names.
//!
//! Adding a family is a file here, a variant of [`softprompt_core::ModelConfig`] (its
//! `config.json` / GGUF mapping) and an arm in [`Model`]'s dispatch.

pub mod gemma3;
pub mod gpt2;
pub mod llama;
pub mod vit;

use softprompt_core::{ModelConfig, ModelWeights, Result};

use crate::loader::Loader;
use crate::ops::{Heads, Ops, Pass};

pub use gemma3::Gemma3;
pub use gpt2::Gpt2;
pub use llama::Llama;
pub use vit::{Vit, VitBlock, VitPrompt};

/// A decoder of any supported family, its weights held as the runtime's tensors `T`.
#[derive(Debug, Clone)]
pub enum Model<T> {
    /// Llama family.
    Llama(Box<Llama<T>>),
    /// GPT-2.
    Gpt2(Box<Gpt2<T>>),
    /// Gemma 3 (text).
    Gemma3(Box<Gemma3<T>>),
}

/// Runs the same expression on whichever family `$m` holds.
macro_rules! each {
    ($m:expr, $x:ident => $e:expr) => {
        match $m {
            Model::Llama($x) => $e,
            Model::Gpt2($x) => $e,
            Model::Gemma3($x) => $e,
        }
    };
}

impl<T: Clone> Model<T> {
    /// Loads the family `config` names from `weights` into `ops`' runtime (consuming the weights
    /// it takes).
    pub fn load<O: Ops<Tensor = T>>(
        ops: &O,
        config: &ModelConfig,
        weights: &mut ModelWeights,
    ) -> Result<Self> {
        let mut l = Loader::new(ops, weights);
        Ok(match config {
            ModelConfig::Llama(c) => Model::Llama(Box::new(Llama::load(c, &mut l)?)),
            ModelConfig::Gpt2(c) => Model::Gpt2(Box::new(Gpt2::load(c, &mut l)?)),
            ModelConfig::Gemma3(c) => Model::Gemma3(Box::new(Gemma3::load(c, &mut l)?)),
        })
    }

    /// The token-embedding table `[vocab, d]`, as stored (for a table held in quantized
    /// blocks, the runtime's shape-only stand-in: read rows through [`Model::embed`]).
    pub fn embedding_table(&self) -> &T {
        match self {
            Model::Llama(m) => &m.embed.w,
            Model::Gpt2(m) => &m.wte,
            Model::Gemma3(m) => &m.embed.w,
        }
    }

    /// Input embeddings of integer `ids` (any shape): `ids.shape ++ [d]`, as the model's own
    /// embedding module computes them (Gemma scales them by `√hidden`).
    pub fn embed<O: Ops<Tensor = T>>(&self, ops: &O, ids: &T) -> Result<T> {
        match self {
            Model::Gemma3(m) => m.embed(ops, ids),
            Model::Llama(m) => ops.table_rows(&m.embed, ids),
            Model::Gpt2(m) => ops.embedding(&m.wte, ids),
        }
    }

    /// The residual stream after every block for input embeddings `x [rows, tokens, d]`.
    pub fn forward<O: Ops<Tensor = T>>(&self, ops: &O, x: &T, pass: &mut Pass<'_, T>) -> Result<T> {
        each!(self, m => m.forward(ops, x, pass))
    }

    /// Logits of residual-stream rows (final norm and head), `[.., vocab]`.
    pub fn logits<O: Ops<Tensor = T>>(&self, ops: &O, h: &T) -> Result<T> {
        each!(self, m => m.logits(ops, h))
    }

    /// Number of blocks (of key/value cache slots).
    pub fn num_layers(&self) -> usize {
        each!(self, m => m.blocks.len())
    }

    /// Attention geometry of every block.
    pub fn heads(&self) -> Heads {
        each!(self, m => m.heads())
    }
}
