//! Gemma 3 (text): embeddings scaled by `√hidden`, RMSNorm with `1 + w` before and after both
//! attention and MLP, query/key RMSNorms, grouped-query attention scaled by
//! `query_pre_attn_scalar^-1/2`, sliding-window layers (their own RoPE base) among global ones,
//! GeGLU with tanh-GELU, tied head.

use softprompt_core::model::Gpt2Activation;
use softprompt_core::model::{LLAMA_EMBED, LLAMA_FINAL_NORM, LM_HEAD};
use softprompt_core::{Gemma3Config, HostTensor, Result};

use crate::loader::Loader;
use crate::ops::{attend_cached, Gelu, Heads, Linear, Ops, Pass};

/// One decoder block, q/k/v and gate/up each fused into one projection at load. Every norm
/// holds `1 + w` (Gemma's RMSNorm scales by one plus its weight).
#[derive(Debug, Clone)]
pub struct Block<T> {
    /// RMSNorm before attention.
    pub input_norm: T,
    /// q, k and v side by side: `[(h + 2·kv)·hd, d]`.
    pub qkv: Linear<T>,
    /// RMSNorm of each query head.
    pub q_norm: T,
    /// RMSNorm of each key head.
    pub k_norm: T,
    /// Attention output projection.
    pub o: Linear<T>,
    /// RMSNorm of the attention output.
    pub post_attention_norm: T,
    /// RMSNorm before the MLP.
    pub pre_feedforward_norm: T,
    /// gate and up side by side: `[2·intermediate, d]`.
    pub gate_up: Linear<T>,
    /// Down projection.
    pub down: Linear<T>,
    /// RMSNorm of the MLP output.
    pub post_feedforward_norm: T,
    /// Whether the block attends over the sliding window.
    pub sliding: bool,
}

/// A Gemma 3 decoder.
#[derive(Debug, Clone)]
pub struct Gemma3<T> {
    /// Hyper-parameters.
    pub cfg: Gemma3Config,
    /// Token embeddings `[vocab, d]` (unscaled, as stored).
    pub embed: Linear<T>,
    /// `√hidden` (in f32), the embeddings' scale.
    pub embed_scale: T,
    /// `√head_dim / √query_pre_attn_scalar`, applied to the queries when it is not 1.
    pub query_scale: Option<T>,
    /// Decoder blocks.
    pub blocks: Vec<Block<T>>,
    /// Final RMSNorm (`1 + w`).
    pub norm: T,
    /// Output head `[vocab, d]` (the embeddings when tied).
    pub head: Linear<T>,
}

impl<T: Clone> Gemma3<T> {
    /// Loads the weights under Hugging Face names (`model.layers.N.…`).
    pub fn load<O: Ops<Tensor = T>>(cfg: &Gemma3Config, l: &mut Loader<'_, O>) -> Result<Self> {
        let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (qo, kvo) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let embed = l.table(LLAMA_EMBED, &[cfg.vocab_size, d])?;
        let scalar = |l: &mut Loader<'_, O>, name: &str, v: f32| -> Result<T> {
            l.constant(name, HostTensor::new(vec![1], vec![v])?)
        };
        let embed_scale = scalar(l, "model.embed_scale", (d as f32).sqrt())?;
        let q = (hd as f64).sqrt() / cfg.query_pre_attn_scalar.sqrt();
        let query_scale = if (q - 1.0).abs() > 0.0 {
            Some(scalar(l, "model.query_scale", q as f32)?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for layer in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            blocks.push(Block {
                input_norm: l.norm_plus_one(&format!("{p}.input_layernorm.weight"), d)?,
                qkv: l.linear_cat(
                    &format!("{a}.qkv_proj"),
                    &[
                        (&format!("{a}.q_proj"), qo),
                        (&format!("{a}.k_proj"), kvo),
                        (&format!("{a}.v_proj"), kvo),
                    ],
                    d,
                    false,
                )?,
                q_norm: l.norm_plus_one(&format!("{a}.q_norm.weight"), hd)?,
                k_norm: l.norm_plus_one(&format!("{a}.k_norm.weight"), hd)?,
                o: l.linear(&format!("{a}.o_proj"), d, qo, false)?,
                post_attention_norm: l
                    .norm_plus_one(&format!("{p}.post_attention_layernorm.weight"), d)?,
                pre_feedforward_norm: l
                    .norm_plus_one(&format!("{p}.pre_feedforward_layernorm.weight"), d)?,
                gate_up: l.linear_cat(
                    &format!("{m}.gate_up_proj"),
                    &[(&format!("{m}.gate_proj"), i), (&format!("{m}.up_proj"), i)],
                    d,
                    false,
                )?,
                down: l.linear(&format!("{m}.down_proj"), d, i, false)?,
                post_feedforward_norm: l
                    .norm_plus_one(&format!("{p}.post_feedforward_layernorm.weight"), d)?,
                sliding: cfg.sliding_layers[layer],
            });
        }
        let norm = l.norm_plus_one(LLAMA_FINAL_NORM, d)?;
        let head = l.head_table(
            LM_HEAD,
            cfg.tie_word_embeddings,
            &embed,
            &[cfg.vocab_size, d],
        )?;
        Ok(Gemma3 {
            cfg: cfg.clone(),
            embed,
            embed_scale,
            query_scale,
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

    /// Input embeddings of integer `ids`: rows of the table times `√hidden`.
    pub fn embed<O: Ops<Tensor = T>>(&self, ops: &O, ids: &T) -> Result<T> {
        ops.mul(&ops.table_rows(&self.embed, ids)?, &self.embed_scale)
    }

    /// The residual stream after every block, `[rows, tokens, d]`, for input embeddings `x`.
    pub fn forward<O: Ops<Tensor = T>>(&self, ops: &O, x: &T, pass: &mut Pass<'_, T>) -> Result<T> {
        let c = &self.cfg;
        let (eps, heads) = (c.rms_norm_eps, self.heads());
        let max = c.max_position_embeddings;
        let global = ops.rope_tables(&pass.positions, c.head_dim, c.rope_theta, max)?;
        let local = ops.rope_tables(&pass.positions, c.head_dim, c.rope_local_theta, max)?;
        let act = match c.activation {
            Gpt2Activation::GeluTanh => Gelu::Tanh,
            Gpt2Activation::GeluErf => Gelu::Erf,
        };
        let mut x = x.clone();
        for (layer, b) in self.blocks.iter().enumerate() {
            let rope = if b.sliding { &local } else { &global };
            let h = ops.rms_norm(&x, &b.input_norm, eps)?;
            let (q, k, v) = ops.split_heads(&ops.linear(&h, &b.qkv)?, heads, None)?;
            let q = ops.rope(&ops.rms_norm(&q, &b.q_norm, eps)?, rope)?;
            let k = ops.rope(&ops.rms_norm(&k, &b.k_norm, eps)?, rope)?;
            let q = match &self.query_scale {
                Some(s) => ops.mul(&q, s)?,
                None => q,
            };
            let bias = pass.layer_bias(b.sliding);
            let att = attend_cached(ops, &q, k, v, heads, layer, pass, bias)?;
            let o = ops.rms_norm(&ops.linear(&att, &b.o)?, &b.post_attention_norm, eps)?;
            x = ops.add(&x, &o)?;
            let h = ops.rms_norm(&x, &b.pre_feedforward_norm, eps)?;
            let act = ops.geglu(&ops.linear(&h, &b.gate_up)?, c.intermediate_size, act)?;
            let mlp = ops.linear(&act, &b.down)?;
            x = ops.add(&x, &ops.rms_norm(&mlp, &b.post_feedforward_norm, eps)?)?;
        }
        Ok(x)
    }

    /// Logits of residual-stream rows (final norm, then the head).
    pub fn logits<O: Ops<Tensor = T>>(&self, ops: &O, h: &T) -> Result<T> {
        let h = ops.rms_norm(h, &self.norm, self.cfg.rms_norm_eps)?;
        ops.table_head(&h, &self.head)
    }
}
