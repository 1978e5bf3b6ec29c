//! `config.json` of the supported architectures.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// Model family, by name: `llama` (Llama, SmolLM, Mistral, Qwen2), `gpt2`, or whatever a
/// plugin backend names its own. Open on purpose: a third-party backend states its family
/// instead of pretending to be one of ours.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Architecture(String);

impl Architecture {
    /// A family named `name` (stored lower-case).
    pub fn new(name: impl Into<String>) -> Self {
        Architecture(name.into().to_lowercase())
    }

    /// The Llama family.
    pub fn llama() -> Self {
        Architecture::new("llama")
    }

    /// GPT-2.
    pub fn gpt2() -> Self {
        Architecture::new("gpt2")
    }

    /// Lower-case name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Llama-family hyper-parameters (RMSNorm, RoPE, grouped-query attention, SwiGLU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Width `d`.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Longest supported sequence.
    pub max_position_embeddings: usize,
    /// Output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection carries a bias (Llama's `attention_bias`).
    pub o_bias: bool,
    /// MLP projections carry biases (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Every layer attends over this many positions only (Mistral's `sliding_window`; Qwen2's
    /// with `use_sliding_window`); `None`: over everything.
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

/// GPT-2 activation in the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gpt2Activation {
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
}

/// GPT-2 hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Width `d`.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// MLP inner width.
    pub n_inner: usize,
    /// Learned positions available.
    pub n_positions: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// MLP activation.
    pub activation: Gpt2Activation,
    /// Output head shares `wte`.
    pub tie_word_embeddings: bool,
}

/// Gemma 3 text hyper-parameters (RMSNorm with `1 + w`, pre- and post-norms around attention and
/// MLP, query/key norms, GeGLU, sliding-window layers among global ones, embeddings scaled by
/// `√hidden`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gemma3Config {
    /// Width `d`.
    pub hidden_size: usize,
    /// GeGLU inner width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base of the global (full-attention) layers.
    pub rope_theta: f64,
    /// RoPE base of the sliding-window layers.
    pub rope_local_theta: f64,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f64,
    /// Keys a sliding-window layer's query sees: its own position and the `sliding_window - 1`
    /// before it.
    pub sliding_window: usize,
    /// Per layer: whether it attends over the sliding window (otherwise over everything).
    pub sliding_layers: Vec<bool>,
    /// Longest supported sequence.
    pub max_position_embeddings: usize,
    /// The MLP's gate activation.
    pub activation: Gpt2Activation,
    /// Output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// A supported model configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModelConfig {
    /// Llama family.
    Llama(LlamaConfig),
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// Gemma 3 (text).
    Gemma3(Gemma3Config),
}

struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, reason: String) -> Error {
        Error::InvalidConfig {
            path: self.path.to_path_buf(),
            reason,
        }
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .filter(|n| *n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{key}` must be a positive integer, found {x}"))),
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(format!("missing `{key}`")))
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| self.err(format!("`{key}` must be a number, found {x}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` must be a boolean, found {x}"))),
        }
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses `config.json` text; `path` is used in messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let f = Fields { v: &v, path };
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" => Self::llama(&f, model_type),
            "gpt2" => Self::gpt2(&f),
            "gemma3_text" => Self::gemma3(&f),
            _ => Err(Error::UnsupportedArchitecture {
                model_type,
                path: PathBuf::from(path),
            }),
        }
    }

    fn llama(f: &Fields<'_>, model_type: String) -> Result<Self> {
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(h) => h,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(f.err("hidden_size is not a multiple of num_attention_heads".into()))
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err(format!("head_dim {head_dim} must be even for RoPE")));
        }
        // transformers < 5 writes `rope_theta` + `rope_scaling`; transformers 5 writes `rope_parameters`.
        let rope =
            f.v.get("rope_parameters")
                .filter(|r| !r.is_null())
                .or_else(|| f.v.get("rope_scaling"));
        let mut rope_theta = f.f64_or("rope_theta", 10_000.0)?;
        if let Some(r) = rope.filter(|r| !r.is_null()) {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(f.err(format!(
                    "RoPE scaling `{kind}` is not supported (only the default RoPE)"
                )));
            }
            if let Some(t) = r.get("rope_theta").and_then(Value::as_f64) {
                rope_theta = t;
            }
        }
        let qwen = model_type == "qwen2";
        let attention_bias = f.bool_or("attention_bias", false)?;
        // Mistral's window applies when set; Qwen2's only with `use_sliding_window` (and then
        // from `max_window_layers` on, which softprompt does not split: refused unless it covers
        // every layer)
        let sliding_window = match model_type.as_str() {
            "mistral" => f.usize_opt("sliding_window")?,
            "qwen2" if f.bool_or("use_sliding_window", false)? => {
                let layers = f.usize("num_hidden_layers")?;
                if f.usize_opt("max_window_layers")?
                    .is_some_and(|m| m > 0 && m < layers)
                {
                    return Err(f.err(
                        "a sliding window on only some layers (max_window_layers) is not supported"
                            .into(),
                    ));
                }
                f.usize_opt("sliding_window")?
            }
            _ => None,
        };
        Ok(ModelConfig::Llama(LlamaConfig {
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias: qwen || attention_bias,
            o_bias: !qwen && attention_bias,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            sliding_window,
            model_type,
        }))
    }

    fn gpt2(f: &Fields<'_>) -> Result<Self> {
        let n_embd = f.usize("n_embd")?;
        let n_head = f.usize("n_head")?;
        if n_embd % n_head != 0 {
            return Err(f.err(format!(
                "n_embd ({n_embd}) is not a multiple of n_head ({n_head})"
            )));
        }
        if f.bool_or("scale_attn_by_inverse_layer_idx", false)? {
            return Err(f.err("scale_attn_by_inverse_layer_idx is not supported".into()));
        }
        if !f.bool_or("scale_attn_weights", true)? {
            return Err(f.err("scale_attn_weights = false is not supported".into()));
        }
        let act =
            f.v.get("activation_function")
                .and_then(Value::as_str)
                .unwrap_or("gelu_new");
        let activation = match act {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Gpt2Activation::GeluTanh,
            "gelu" => Gpt2Activation::GeluErf,
            other => return Err(f.err(format!("activation_function `{other}` is not supported"))),
        };
        Ok(ModelConfig::Gpt2(Gpt2Config {
            n_embd,
            n_layer: f.usize("n_layer")?,
            n_head,
            n_inner: f.usize_opt("n_inner")?.unwrap_or(4 * n_embd),
            n_positions: f.usize_opt("n_positions")?.unwrap_or(1024),
            vocab_size: f.usize("vocab_size")?,
            layer_norm_epsilon: f.f64_or("layer_norm_epsilon", 1e-5)?,
            activation,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
        }))
    }

    fn gemma3(f: &Fields<'_>) -> Result<Self> {
        let layers = f.usize("num_hidden_layers")?;
        let heads = f.usize("num_attention_heads")?;
        let kv = f.usize_opt("num_key_value_heads")?.unwrap_or(heads);
        if heads % kv != 0 {
            return Err(f.err(format!(
                "num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})"
            )));
        }
        let head_dim = f.usize_opt("head_dim")?.unwrap_or(256);
        if head_dim % 2 != 0 {
            return Err(f.err(format!("head_dim {head_dim} must be even for RoPE")));
        }
        for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if f.v.get(key).is_some_and(|v| !v.is_null()) {
                return Err(f.err(format!("`{key}` is not supported (Gemma 3 has none)")));
            }
        }
        if f.bool_or("use_bidirectional_attention", false)? {
            return Err(f.err("use_bidirectional_attention is not supported".into()));
        }
        // transformers < 5: rope_theta + rope_local_base_freq (+ rope_scaling); transformers 5:
        // rope_parameters per layer type
        let mut theta = f.f64_or("rope_theta", 1_000_000.0)?;
        let mut local = f.f64_or("rope_local_base_freq", 10_000.0)?;
        let check_default = |r: &Value| -> Result<()> {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(f.err(format!(
                    "RoPE scaling `{kind}` is not supported (only the default RoPE)"
                )));
            }
            Ok(())
        };
        if let Some(r) = f.v.get("rope_scaling").filter(|r| !r.is_null()) {
            check_default(r)?;
        }
        if let Some(p) = f.v.get("rope_parameters").filter(|r| !r.is_null()) {
            for (kind, slot) in [
                ("full_attention", &mut theta),
                ("sliding_attention", &mut local),
            ] {
                if let Some(r) = p.get(kind) {
                    check_default(r)?;
                    if let Some(t) = r.get("rope_theta").and_then(Value::as_f64) {
                        *slot = t;
                    }
                }
            }
        }
        let sliding_layers = match f.v.get("layer_types").filter(|v| !v.is_null()) {
            Some(Value::Array(types)) => types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(f.err(format!("unknown layer type {t}"))),
                })
                .collect::<Result<Vec<bool>>>()?,
            Some(other) => {
                return Err(f.err(format!("`layer_types` must be a list, found {other}")))
            }
            None => {
                let pattern = f.usize_opt("sliding_window_pattern")?.unwrap_or(6);
                (0..layers).map(|i| (i + 1) % pattern != 0).collect()
            }
        };
        if sliding_layers.len() != layers {
            return Err(f.err(format!(
                "{} layer types for {layers} layers",
                sliding_layers.len()
            )));
        }
        let act =
            f.v.get("hidden_activation")
                .and_then(Value::as_str)
                .unwrap_or("gelu_pytorch_tanh");
        let activation = match act {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Gpt2Activation::GeluTanh,
            "gelu" => Gpt2Activation::GeluErf,
            other => return Err(f.err(format!("hidden_activation `{other}` is not supported"))),
        };
        Ok(ModelConfig::Gemma3(Gemma3Config {
            hidden_size: f.usize("hidden_size")?,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta: theta,
            rope_local_theta: local,
            query_pre_attn_scalar: f.f64_or("query_pre_attn_scalar", 256.0)?,
            sliding_window: f.usize_opt("sliding_window")?.unwrap_or(4096),
            sliding_layers,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(131_072),
            activation,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
        }))
    }

    /// Model family.
    pub fn architecture(&self) -> Architecture {
        match self {
            ModelConfig::Llama(_) => Architecture::llama(),
            ModelConfig::Gpt2(_) => Architecture::gpt2(),
            ModelConfig::Gemma3(_) => Architecture::new("gemma3"),
        }
    }

    /// Width `d`.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.hidden_size,
            ModelConfig::Gpt2(c) => c.n_embd,
            ModelConfig::Gemma3(c) => c.hidden_size,
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Gemma3(c) => c.vocab_size,
        }
    }

    /// Number of blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.num_hidden_layers,
            ModelConfig::Gpt2(c) => c.n_layer,
            ModelConfig::Gemma3(c) => c.num_hidden_layers,
        }
    }

    /// Number of attention (query) heads.
    pub fn num_attention_heads(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.num_attention_heads,
            ModelConfig::Gpt2(c) => c.n_head,
            ModelConfig::Gemma3(c) => c.num_attention_heads,
        }
    }

    /// Which keys a query sees in full-attention layers: every family here is a decoder.
    pub fn attention_mask(&self) -> crate::AttentionMask {
        crate::AttentionMask::Causal
    }

    /// The mask of the sliding-window layers, when the model has any.
    pub fn sliding_window_mask(&self) -> Option<crate::AttentionMask> {
        match self {
            ModelConfig::Gemma3(c) if c.sliding_layers.iter().any(|s| *s) => {
                Some(crate::AttentionMask::SlidingWindow(c.sliding_window))
            }
            ModelConfig::Llama(c) => c.sliding_window.map(crate::AttentionMask::SlidingWindow),
            _ => None,
        }
    }

    /// The mask of every layer, in order: [`Self::sliding_window_mask`] for sliding-window
    /// layers, [`Self::attention_mask`] for the others.
    pub fn layer_masks(&self) -> Vec<crate::AttentionMask> {
        let layers = self.num_layers();
        match (self, self.sliding_window_mask()) {
            (ModelConfig::Gemma3(c), Some(w)) => c
                .sliding_layers
                .iter()
                .map(|&s| if s { w } else { self.attention_mask() })
                .collect(),
            (_, Some(w)) => vec![w; layers],
            (_, None) => vec![self.attention_mask(); layers],
        }
    }

    /// Key/value heads of every block.
    pub fn num_key_value_heads(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.num_key_value_heads,
            ModelConfig::Gpt2(c) => c.n_head,
            ModelConfig::Gemma3(c) => c.num_key_value_heads,
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.head_dim,
            ModelConfig::Gpt2(c) => c.n_embd / c.n_head,
            ModelConfig::Gemma3(c) => c.head_dim,
        }
    }

    /// Longest sequence (virtual tokens included) the model supports.
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.max_position_embeddings,
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Gemma3(c) => c.max_position_embeddings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, Path::new("config.json"))
    }

    #[test]
    fn qwen2_gets_qkv_bias_and_gqa() {
        let c = parse(r#"{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,"rms_norm_eps":1e-6,"rope_theta":1000000.0}"#)
        .unwrap();
        let ModelConfig::Llama(c) = c else {
            panic!("not llama")
        };
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(
            (c.head_dim, c.num_key_value_heads, c.rope_theta),
            (16, 2, 1e6)
        );
    }

    #[test]
    fn rope_parameters_of_transformers_5_are_read() {
        let c = parse(r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"vocab_size":100,"rope_parameters":{"rope_type":"default","rope_theta":500.0}}"#)
        .unwrap();
        let ModelConfig::Llama(c) = c else {
            panic!("not llama")
        };
        assert_eq!(c.rope_theta, 500.0);
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        assert!(matches!(
            parse(r#"{"model_type":"bert"}"#),
            Err(Error::UnsupportedArchitecture { .. })
        ));
        assert!(matches!(parse("{not json"), Err(Error::Json { .. })));
        let e = parse(r#"{"model_type":"llama","hidden_size":64}"#).unwrap_err();
        assert!(
            e.to_string().contains("missing `num_attention_heads`"),
            "{e}"
        );
        let e = parse(r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"vocab_size":100,"rope_scaling":{"rope_type":"yarn","factor":4.0}}"#)
        .unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        let e = parse(r#"{"model_type":"gpt2","n_embd":10,"n_head":3,"n_layer":1,"vocab_size":5}"#)
            .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
    }
}
