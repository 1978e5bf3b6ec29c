//! GGUF files (llama.cpp) as softprompt model descriptions.
//!
//! [`load_model`] reads the metadata and every tensor, dequantizes to f32 (F32, F16, BF16, Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants, as far as candle's kernels go), and renames the
//! tensors to Hugging Face names — undoing llama.cpp's Q/K row permutation for RoPE — so that
//! every backend loads a GGUF exactly like a `model.safetensors`. [`load_tokenizer`] rebuilds the
//! tokenizer from the embedded vocabulary and merges the way transformers does for the same file.

mod tokenizer;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device};
use softprompt_core::model::{HostTensor, LlamaConfig, ModelConfig, ModelSource, ModelWeights};
use softprompt_core::{Error, Result};

pub use tokenizer::{load_tokenizer, tokenizer_from_metadata};

/// True when `path` names a GGUF file (by extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

pub(crate) fn read_content(path: &Path) -> Result<(Content, std::fs::File)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        reason: format!("not a readable GGUF file: {e}"),
    })?;
    Ok((content, file))
}

struct Meta<'a> {
    map: &'a HashMap<String, Value>,
    arch: String,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(&format!("{}.{key}", self.arch))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self
            .get(key)
            .ok_or_else(|| bad(self.path, format!("missing `{}.{key}`", self.arch)))?;
        v.to_u64()
            .map(|n| n as usize)
            .or_else(|_| v.to_u32().map(|n| n as usize))
            .map_err(|e| bad(self.path, format!("`{}.{key}`: {e}", self.arch)))
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .to_f32()
                .map(f64::from)
                .map_err(|e| bad(self.path, format!("`{}.{key}`: {e}", self.arch))),
        }
    }
}

/// The Llama-family configuration a GGUF's metadata describes.
fn config_of(content: &Content, path: &Path) -> Result<LlamaConfig> {
    let arch = match content.metadata.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(bad(path, "missing `general.architecture`")),
    };
    if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
        return Err(Error::UnsupportedArchitecture {
            model_type: arch,
            path: path.to_path_buf(),
        });
    }
    let m = Meta {
        map: &content.metadata,
        arch: arch.clone(),
        path,
    };
    let hidden_size = m.usize("embedding_length")?;
    let heads = m.usize("attention.head_count")?;
    let kv = m
        .get("attention.head_count_kv")
        .map(|_| m.usize("attention.head_count_kv"))
        .transpose()?
        .unwrap_or(heads);
    let head_dim = m
        .get("rope.dimension_count")
        .map(|_| m.usize("rope.dimension_count"))
        .transpose()?
        .unwrap_or(hidden_size / heads);
    let vocab_size = match m.get("vocab_size") {
        Some(_) => m.usize("vocab_size")?,
        None => match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(t)) => t.len(),
            _ => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| bad(path, "cannot tell the vocabulary size"))?,
        },
    };
    if content
        .metadata
        .contains_key(&format!("{arch}.rope.scaling.type"))
    {
        if let Some(Value::String(t)) = content.metadata.get(&format!("{arch}.rope.scaling.type")) {
            if t != "none" {
                return Err(bad(path, format!("RoPE scaling `{t}` is not supported")));
            }
        }
    }
    Ok(LlamaConfig {
        model_type: arch.clone(),
        hidden_size,
        intermediate_size: m.usize("feed_forward_length")?,
        num_hidden_layers: m.usize("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        vocab_size,
        rms_norm_eps: m.f64_or("attention.layer_norm_rms_epsilon", 1e-6)?,
        rope_theta: m.f64_or("rope.freq_base", 10_000.0)?,
        max_position_embeddings: m
            .get("context_length")
            .map(|_| m.usize("context_length"))
            .transpose()?
            .unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: content.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
    })
}

/// llama.cpp name → Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's RoPE permutation of Q/K rows: within each head, GGUF row `2i + j`
/// holds Hugging Face row `j·half + i`.
fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

/// The model configuration of a GGUF file, from its metadata alone.
pub fn load_config(path: impl AsRef<Path>) -> Result<ModelConfig> {
    let path = path.as_ref();
    let (content, _) = read_content(path)?;
    Ok(ModelConfig::Llama(config_of(&content, path)?))
}

/// Reads a GGUF file into a model description with Hugging Face tensor names.
pub fn load_model(path: impl AsRef<Path>) -> Result<ModelSource> {
    let path = path.as_ref();
    let (content, mut file) = read_content(path)?;
    let config = config_of(&content, path)?;
    let permuted = config.model_type == "llama" || config.model_type == "mistral";
    let mut weights = ModelWeights::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else {
            // rope_freqs and other derived tables are recomputed, not loaded
            continue;
        };
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}`: {e}"),
            })?;
        let t = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| Error::backend("gguf", format!("dequantizing `{name}`: {e}")))?;
        let shape = t.dims().to_vec();
        let mut data = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| Error::backend("gguf", format!("reading `{name}`: {e}")))?;
        if permuted && shape.len() == 2 {
            if name.ends_with("attn_q.weight") {
                data = unpermute_rows(&data, shape[0], shape[1], config.num_attention_heads);
            } else if name.ends_with("attn_k.weight") {
                data = unpermute_rows(&data, shape[0], shape[1], config.num_key_value_heads);
            }
        }
        weights.insert(hf, HostTensor::new(shape, data)?);
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    ModelSource::from_parts(
        ModelConfig::Llama(config),
        weights,
        name,
        path.to_path_buf(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_q.bias").unwrap(),
            "model.layers.0.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("blk.12.ffn_norm.weight").unwrap(),
            "model.layers.12.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, half, cols).swapaxes(1, 2)
        let (heads, hd, cols) = (2, 4, 3);
        let rows = heads * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = (h * hd + j * (hd / 2) + i) * cols;
                    let dst = (h * hd + i * 2 + j) * cols;
                    gguf[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, rows, cols, heads), hf);
    }

    #[test]
    fn garbage_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00garbage").unwrap();
        assert!(matches!(load_model(&p), Err(Error::Safetensors { .. })));
        std::fs::write(&p, b"not a gguf at all").unwrap();
        assert!(matches!(load_model(&p), Err(Error::Safetensors { .. })));
        assert!(matches!(
            load_model(dir.path().join("missing.gguf")),
            Err(Error::Io { .. })
        ));
    }
}
