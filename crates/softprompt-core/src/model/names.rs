//! Hugging Face tensor names, spelled once for every backend.

/// Names of one Llama-family decoder block.
#[derive(Debug, Clone)]
pub struct LlamaLayerNames {
    /// Pre-attention RMSNorm weight.
    pub input_norm: String,
    /// Query projection (weight; `.bias` appended for Qwen2).
    pub q: String,
    /// Key projection.
    pub k: String,
    /// Value projection.
    pub v: String,
    /// Output projection.
    pub o: String,
    /// Pre-MLP RMSNorm weight.
    pub post_norm: String,
    /// SwiGLU gate projection.
    pub gate: String,
    /// SwiGLU up projection.
    pub up: String,
    /// SwiGLU down projection.
    pub down: String,
}

/// Names of the Llama block `i` (prefix `model.layers.i`, without `.weight`).
pub fn llama_names(i: usize) -> LlamaLayerNames {
    let p = format!("model.layers.{i}");
    LlamaLayerNames {
        input_norm: format!("{p}.input_layernorm.weight"),
        q: format!("{p}.self_attn.q_proj"),
        k: format!("{p}.self_attn.k_proj"),
        v: format!("{p}.self_attn.v_proj"),
        o: format!("{p}.self_attn.o_proj"),
        post_norm: format!("{p}.post_attention_layernorm.weight"),
        gate: format!("{p}.mlp.gate_proj"),
        up: format!("{p}.mlp.up_proj"),
        down: format!("{p}.mlp.down_proj"),
    }
}

/// Llama token embedding matrix.
pub const LLAMA_EMBED: &str = "model.embed_tokens.weight";
/// Llama final RMSNorm.
pub const LLAMA_FINAL_NORM: &str = "model.norm.weight";
/// Untied output head.
pub const LM_HEAD: &str = "lm_head.weight";
/// GPT-2 token embeddings (after stripping `transformer.`).
pub const GPT2_WTE: &str = "wte.weight";
/// GPT-2 position embeddings.
pub const GPT2_WPE: &str = "wpe.weight";
/// GPT-2 final LayerNorm prefix.
pub const GPT2_LN_F: &str = "ln_f";

/// Names of one GPT-2 block (prefixes without `.weight` / `.bias`).
#[derive(Debug, Clone)]
pub struct Gpt2LayerNames {
    /// First LayerNorm.
    pub ln_1: String,
    /// Fused QKV projection (Conv1D: weight `[in, out]`).
    pub c_attn: String,
    /// Attention output projection.
    pub c_proj: String,
    /// Second LayerNorm.
    pub ln_2: String,
    /// MLP up projection.
    pub c_fc: String,
    /// MLP down projection.
    pub mlp_proj: String,
}

/// Names of GPT-2 block `i`.
pub fn gpt2_names(i: usize) -> Gpt2LayerNames {
    let p = format!("h.{i}");
    Gpt2LayerNames {
        ln_1: format!("{p}.ln_1"),
        c_attn: format!("{p}.attn.c_attn"),
        c_proj: format!("{p}.attn.c_proj"),
        ln_2: format!("{p}.ln_2"),
        c_fc: format!("{p}.mlp.c_fc"),
        mlp_proj: format!("{p}.mlp.c_proj"),
    }
}
