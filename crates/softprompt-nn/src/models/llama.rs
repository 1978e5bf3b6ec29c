//! The Llama family (Llama, SmolLM, Mistral, Qwen2): RMSNorm, rotary positions, grouped-query
//! attention, SwiGLU, tied or untied head.

use softprompt_core::model::{llama_names, LLAMA_EMBED, LLAMA_FINAL_NORM, LM_HEAD};
use softprompt_core::{LlamaConfig, Result};

use crate::loader::Loader;
use crate::ops::{attend_cached, Heads, Linear, Ops, Pass, PreNormBlock};

/// One decoder block, q/k/v and gate/up each fused into one projection at load.
#[derive(Debug, Clone)]
pub struct Block<T> {
    /// RMSNorm before attention.
    pub input_norm: T,
    /// q, k and v side by side: `[(h + 2·kv)·hd, d]`.
    pub qkv: Linear<T>,
    /// Attention output projection.
    pub o: Linear<T>,
    /// RMSNorm before the MLP.
    pub post_norm: T,
    /// gate and up side by side: `[2·intermediate, d]`.
    pub gate_up: Linear<T>,
    /// Down projection.
    pub down: Linear<T>,
}

/// A Llama-family decoder.
#[derive(Debug, Clone)]
pub struct Llama<T> {
    /// Hyper-parameters.
    pub cfg: LlamaConfig,
    /// Token embeddings `[vocab, d]`.
    pub embed: Linear<T>,
    /// Decoder blocks.
    pub blocks: Vec<Block<T>>,
    /// Final RMSNorm.
    pub norm: T,
    /// Output head `[vocab, d]` (the embeddings when tied).
    pub head: Linear<T>,
}

impl<T: Clone> Llama<T> {
    /// Loads the weights under Hugging Face names.
    pub fn load<O: Ops<Tensor = T>>(cfg: &LlamaConfig, l: &mut Loader<'_, O>) -> Result<Self> {
        let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (qo, kvo) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let embed = l.table(LLAMA_EMBED, &[cfg.vocab_size, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for layer in 0..cfg.num_hidden_layers {
            let n = llama_names(layer);
            let p = format!("model.layers.{layer}");
            blocks.push(Block {
                input_norm: l.tensor(&n.input_norm, &[d])?,
                qkv: l.linear_cat(
                    &format!("{p}.self_attn.qkv_proj"),
                    &[(&n.q, qo), (&n.k, kvo), (&n.v, kvo)],
                    d,
                    cfg.qkv_bias,
                )?,
                o: l.linear(&n.o, d, qo, cfg.o_bias)?,
                post_norm: l.tensor(&n.post_norm, &[d])?,
                gate_up: l.linear_cat(
                    &format!("{p}.mlp.gate_up_proj"),
                    &[(&n.gate, i), (&n.up, i)],
                    d,
                    cfg.mlp_bias,
                )?,
                down: l.linear(&n.down, d, i, cfg.mlp_bias)?,
            });
        }
        let norm = l.tensor(LLAMA_FINAL_NORM, &[d])?;
        let head = l.head_table(
            LM_HEAD,
            cfg.tie_word_embeddings,
            &embed,
            &[cfg.vocab_size, d],
        )?;
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            head,
        })
    }

    /// Attention geometry.
    pub fn heads(&self) -> Heads {
        Heads {
            q: self.cfg.num_attention_heads,
            kv: self.cfg.num_key_value_heads,
            dim: self.cfg.head_dim,
        }
    }

    /// The residual stream after every block, `[rows, tokens, d]`, for input embeddings `x`.
    pub fn forward<O: Ops<Tensor = T>>(&self, ops: &O, x: &T, pass: &mut Pass<'_, T>) -> Result<T> {
        let c = &self.cfg;
        let heads = self.heads();
        let rope = ops.rope_tables(
            &pass.positions,
            c.head_dim,
            c.rope_theta,
            c.max_position_embeddings,
        )?;
        let mut x = x.clone();
        for (layer, b) in self.blocks.iter().enumerate() {
            let view = PreNormBlock {
                input_norm: &b.input_norm,
                qkv: &b.qkv,
                o: &b.o,
                post_norm: &b.post_norm,
                gate_up: &b.gate_up,
                down: &b.down,
                eps: c.rms_norm_eps,
                heads,
            };
            // a whole-block kernel knows the full-attention bias only
            if c.sliding_window.is_none() {
                if let Some(y) = ops.fused_block(&view, &x, &rope, layer, pass)? {
                    x = y;
                    continue;
                }
            }
            let h = ops.rms_norm(&x, &b.input_norm, c.rms_norm_eps)?;
            let qkv = ops.linear(&h, &b.qkv)?;
            let att = if c.sliding_window.is_some() {
                // every layer over the window (Mistral)
                let (q, k, v) = ops.split_heads(&qkv, heads, Some(&rope))?;
                let bias = pass.layer_bias(true);
                attend_cached(ops, &q, k, v, heads, layer, pass, bias)?
            } else {
                ops.self_attention(&qkv, heads, Some(&rope), layer, pass)?
            };
            x = ops.add(&x, &ops.linear(&att, &b.o)?)?;
            let h = ops.rms_norm(&x, &b.post_norm, c.rms_norm_eps)?;
            let mlp = ops.swiglu(&ops.linear(&h, &b.gate_up)?, c.intermediate_size)?;
            x = ops.add(&x, &ops.linear(&mlp, &b.down)?)?;
        }
        Ok(x)
    }

    /// Logits of residual-stream rows (final norm, then the head).
    pub fn logits<O: Ops<Tensor = T>>(&self, ops: &O, h: &T) -> Result<T> {
        let h = ops.rms_norm(h, &self.norm, self.cfg.rms_norm_eps)?;
        ops.table_head(&h, &self.head)
    }
}
