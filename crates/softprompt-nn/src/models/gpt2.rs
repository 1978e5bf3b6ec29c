//! GPT-2: learned positions, LayerNorm, fused q/k/v (`Conv1D`), GELU MLP, tied head.

use softprompt_core::model::Gpt2Activation;
use softprompt_core::model::{gpt2_names, GPT2_LN_F, GPT2_WPE, GPT2_WTE, LM_HEAD};
use softprompt_core::{Error, Gpt2Config, Result};

use crate::loader::Loader;
use crate::ops::{Gelu, Heads, Linear, Ops, Pass};

/// A LayerNorm's scale and shift.
#[derive(Debug, Clone)]
pub struct Norm<T> {
    /// Scale.
    pub w: T,
    /// Shift.
    pub b: T,
}

/// One GPT-2 block.
#[derive(Debug, Clone)]
pub struct Block<T> {
    /// LayerNorm before attention.
    pub ln_1: Norm<T>,
    /// q, k and v side by side.
    pub c_attn: Linear<T>,
    /// Attention output projection.
    pub c_proj: Linear<T>,
    /// LayerNorm before the MLP.
    pub ln_2: Norm<T>,
    /// MLP up projection.
    pub c_fc: Linear<T>,
    /// MLP down projection.
    pub mlp_proj: Linear<T>,
}

/// A GPT-2 decoder.
#[derive(Debug, Clone)]
pub struct Gpt2<T> {
    /// Hyper-parameters.
    pub cfg: Gpt2Config,
    /// Token embeddings `[vocab, d]`.
    pub wte: T,
    /// Position embeddings `[n_positions, d]`.
    pub wpe: T,
    /// Blocks.
    pub blocks: Vec<Block<T>>,
    /// Final LayerNorm.
    pub ln_f: Norm<T>,
    /// Output head (`wte` when tied).
    pub head: T,
}

impl<T: Clone> Gpt2<T> {
    /// Loads the weights under Hugging Face names (`transformer.` already stripped).
    pub fn load<O: Ops<Tensor = T>>(cfg: &Gpt2Config, l: &mut Loader<'_, O>) -> Result<Self> {
        let d = cfg.n_embd;
        let norm = |l: &mut Loader<'_, O>, p: &str| -> Result<Norm<T>> {
            Ok(Norm {
                w: l.tensor(&format!("{p}.weight"), &[d])?,
                b: l.tensor(&format!("{p}.bias"), &[d])?,
            })
        };
        let wte = l.tensor(GPT2_WTE, &[cfg.vocab_size, d])?;
        let wpe = l.tensor(GPT2_WPE, &[cfg.n_positions, d])?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = gpt2_names(i);
            blocks.push(Block {
                ln_1: norm(l, &n.ln_1)?,
                c_attn: l.conv1d(&n.c_attn, d, 3 * d)?,
                c_proj: l.conv1d(&n.c_proj, d, d)?,
                ln_2: norm(l, &n.ln_2)?,
                c_fc: l.conv1d(&n.c_fc, d, cfg.n_inner)?,
                mlp_proj: l.conv1d(&n.mlp_proj, cfg.n_inner, d)?,
            });
        }
        let ln_f = norm(l, GPT2_LN_F)?;
        let head = l.head(LM_HEAD, cfg.tie_word_embeddings, &wte, &[cfg.vocab_size, d])?;
        Ok(Gpt2 {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            head,
        })
    }

    /// Attention geometry.
    pub fn heads(&self) -> Heads {
        let h = self.cfg.n_head;
        Heads {
            q: h,
            kv: h,
            dim: self.cfg.n_embd / h,
        }
    }

    /// The residual stream after every block, `[rows, tokens, d]`, for input embeddings `x`
    /// (position embeddings are added here).
    pub fn forward<O: Ops<Tensor = T>>(&self, ops: &O, x: &T, pass: &mut Pass<'_, T>) -> Result<T> {
        let c = &self.cfg;
        if let Some(end) = pass.positions.end().filter(|e| *e > c.n_positions) {
            return Err(Error::InvalidBatch(format!(
                "sequence of {end} positions exceeds GPT-2's n_positions {}",
                c.n_positions
            )));
        }
        let eps = c.layer_norm_epsilon;
        let act = match c.activation {
            Gpt2Activation::GeluTanh => Gelu::Tanh,
            Gpt2Activation::GeluErf => Gelu::Erf,
        };
        let mut x = ops.add(x, &ops.position_rows(&self.wpe, &pass.positions)?)?;
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = ops.layer_norm(&x, &b.ln_1.w, &b.ln_1.b, eps)?;
            let qkv = ops.linear(&h, &b.c_attn)?;
            let att = ops.self_attention(&qkv, self.heads(), None, layer, pass)?;
            x = ops.add(&x, &ops.linear(&att, &b.c_proj)?)?;
            let h = ops.layer_norm(&x, &b.ln_2.w, &b.ln_2.b, eps)?;
            let up = ops.gelu(&ops.linear(&h, &b.c_fc)?, act)?;
            x = ops.add(&x, &ops.linear(&up, &b.mlp_proj)?)?;
        }
        Ok(x)
    }

    /// Logits of residual-stream rows (final LayerNorm, then the head).
    pub fn logits<O: Ops<Tensor = T>>(&self, ops: &O, h: &T) -> Result<T> {
        let h = ops.layer_norm(h, &self.ln_f.w, &self.ln_f.b, self.cfg.layer_norm_epsilon)?;
        ops.head(&h, &self.head)
    }
}
