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
use softprompt_core::model::{
    Gemma3Config, Gpt2Activation, HostTensor, LlamaConfig, ModelConfig, ModelSource, ModelWeights,
};
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
    let content = Content::read(&mut file).map_err(|e| Error::Gguf {
        path: path.to_path_buf(),
        reason: format!("not a readable GGUF file: {e}"),
    })?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    check_tensor_infos(&content, len, path)?;
    Ok((content, file))
}

/// Every tensor's extent is checked before any is read: positive dimensions whose product does
/// not overflow, a whole number of quantization blocks, and bytes that lie inside the file. A
/// corrupt header is then a typed error naming the tensor, never a huge allocation or a read
/// past the end.
fn check_tensor_infos(content: &Content, file_len: u64, path: &Path) -> Result<()> {
    let data = content.tensor_data_offset;
    for (name, info) in &content.tensor_infos {
        let fail = |why: String| {
            Err(Error::Gguf {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}`: {why}"),
            })
        };
        let dims = info.shape.dims();
        if dims.is_empty() || dims.contains(&0) {
            return fail(format!("empty shape {dims:?}"));
        }
        let Some(elements) = dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)) else {
            return fail(format!("shape {dims:?} overflows"));
        };
        let (block, type_size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
        if elements % block != 0 || dims[dims.len() - 1] % block != 0 {
            return fail(format!(
                "shape {dims:?} is not a whole number of {:?} blocks of {block}",
                info.ggml_dtype
            ));
        }
        let bytes = ((elements / block) as u64).checked_mul(type_size as u64);
        let end = bytes.and_then(|bytes| {
            data.checked_add(info.offset)
                .and_then(|start| start.checked_add(bytes))
        });
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return fail(format!(
                    "{} bytes at offset {} lie beyond the file's {file_len} bytes",
                    bytes.map_or("too many".to_string(), |b| b.to_string()),
                    info.offset
                ))
            }
        }
    }
    Ok(())
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

/// The architecture a GGUF file names.
fn arch_of(content: &Content, path: &Path) -> Result<String> {
    match content.metadata.get("general.architecture") {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(bad(path, "missing `general.architecture`")),
    }
}

/// The configuration a GGUF's metadata describes.
fn config_of(content: &Content, path: &Path) -> Result<ModelConfig> {
    let arch = arch_of(content, path)?;
    match arch.as_str() {
        "llama" | "qwen2" | "mistral" => Ok(ModelConfig::Llama(llama_config_of(content, path)?)),
        "gemma3" => Ok(ModelConfig::Gemma3(gemma3_config_of(content, path)?)),
        _ => Err(Error::UnsupportedArchitecture {
            model_type: arch,
            path: path.to_path_buf(),
        }),
    }
}

/// The counts every family has, each checked: a zero head count or layer count is an error
/// naming the key, never a division by zero or an empty model.
struct Counts {
    hidden_size: usize,
    heads: usize,
    kv: usize,
    layers: usize,
    vocab_size: usize,
}

fn counts(content: &Content, m: &Meta<'_>) -> Result<Counts> {
    let positive = |key: &str| -> Result<usize> {
        let n = m.usize(key)?;
        if n == 0 {
            return Err(bad(m.path, format!("`{}.{key}` is 0", m.arch)));
        }
        Ok(n)
    };
    let hidden_size = positive("embedding_length")?;
    let heads = positive("attention.head_count")?;
    let layers = positive("block_count")?;
    let kv = match m.get("attention.head_count_kv") {
        Some(_) => positive("attention.head_count_kv")?,
        None => heads,
    };
    if heads % kv != 0 {
        return Err(bad(
            m.path,
            format!(
                "`{0}.attention.head_count` ({heads}) is not a multiple of `{0}.attention.head_count_kv` ({kv})",
                m.arch
            ),
        ));
    }
    let vocab_size = match m.get("vocab_size") {
        Some(_) => positive("vocab_size")?,
        None => match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(t)) if !t.is_empty() => t.len(),
            _ => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .filter(|n| *n > 0)
                .ok_or_else(|| bad(m.path, "cannot tell the vocabulary size"))?,
        },
    };
    Ok(Counts {
        hidden_size,
        heads,
        kv,
        layers,
        vocab_size,
    })
}

/// A head width: `key` when present (and positive and even, for RoPE), else `hidden / heads`.
fn head_dim(m: &Meta<'_>, key: &str, c: &Counts) -> Result<usize> {
    let hd = match m.get(key) {
        Some(_) => m.usize(key)?,
        None if c.hidden_size % c.heads == 0 => c.hidden_size / c.heads,
        None => {
            return Err(bad(
                m.path,
                format!(
                    "`{}.embedding_length` is not a multiple of the head count",
                    m.arch
                ),
            ))
        }
    };
    if hd == 0 || hd % 2 != 0 {
        return Err(bad(
            m.path,
            format!("head width {hd} must be positive and even"),
        ));
    }
    Ok(hd)
}

/// Gemma 3's configuration from a GGUF's metadata, with the defaults llama.cpp and transformers
/// share for what the file does not state: local RoPE base 10000, every sixth layer global,
/// attention scaled by the head width.
fn gemma3_config_of(content: &Content, path: &Path) -> Result<Gemma3Config> {
    let m = Meta {
        map: &content.metadata,
        arch: "gemma3".into(),
        path,
    };
    let c = counts(content, &m)?;
    let head_dim = head_dim(&m, "attention.key_length", &c)?;
    let sliding_window = m.usize("attention.sliding_window")?;
    if sliding_window == 0 {
        return Err(bad(path, "`gemma3.attention.sliding_window` is 0"));
    }
    Ok(Gemma3Config {
        hidden_size: c.hidden_size,
        intermediate_size: m.usize("feed_forward_length")?,
        num_hidden_layers: c.layers,
        num_attention_heads: c.heads,
        num_key_value_heads: c.kv,
        head_dim,
        vocab_size: c.vocab_size,
        rms_norm_eps: m.f64_or("attention.layer_norm_rms_epsilon", 1e-6)?,
        rope_theta: m.f64_or("rope.freq_base", 1_000_000.0)?,
        rope_local_theta: 10_000.0,
        query_pre_attn_scalar: head_dim as f64,
        sliding_window,
        sliding_layers: (0..c.layers).map(|i| (i + 1) % 6 != 0).collect(),
        max_position_embeddings: m
            .get("context_length")
            .map(|_| m.usize("context_length"))
            .transpose()?
            .unwrap_or(32_768),
        activation: Gpt2Activation::GeluTanh,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
    })
}

/// The Llama-family configuration a GGUF's metadata describes.
fn llama_config_of(content: &Content, path: &Path) -> Result<LlamaConfig> {
    let arch = arch_of(content, path)?;
    let m = Meta {
        map: &content.metadata,
        arch: arch.clone(),
        path,
    };
    let c = counts(content, &m)?;
    let (hidden_size, heads, kv, vocab_size) = (c.hidden_size, c.heads, c.kv, c.vocab_size);
    let head_dim = head_dim(&m, "rope.dimension_count", &c)?;
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
        num_hidden_layers: c.layers,
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
        sliding_window: m
            .get("attention.sliding_window")
            .map(|_| m.usize("attention.sliding_window"))
            .transpose()?
            .filter(|w| *w > 0),
    })
}

/// llama.cpp name → Hugging Face name, for architecture `arch`.
fn hf_name(arch: &str, gguf: &str) -> Option<String> {
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
    let gemma = arch == "gemma3";
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        "attn_q_norm" if gemma => "self_attn.q_norm",
        "attn_k_norm" if gemma => "self_attn.k_norm",
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
    let mut out = vec![0f32; data.len()];
    for (dst, src) in unpermute_order(rows, heads).into_iter().enumerate() {
        out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
    }
    out
}

/// The source row of each row of [`unpermute_rows`]' result.
fn unpermute_order(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads.max(1);
    let half = hd / 2;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                order[h * hd + j * half + i] = h * hd + 2 * i + j;
            }
        }
    }
    order
}

/// The block format a projection matrix keeps in memory, if it is one softprompt computes
/// with in quantized form.
fn kept_kind(dtype: candle_core::quantized::GgmlDType) -> Option<softprompt_core::QuantKind> {
    use candle_core::quantized::GgmlDType as G;
    use softprompt_core::QuantKind as K;
    Some(match dtype {
        G::Q4_0 => K::Q4_0,
        G::Q4_1 => K::Q4_1,
        G::Q5_0 => K::Q5_0,
        G::Q5_1 => K::Q5_1,
        G::Q8_0 => K::Q8_0,
        G::Q4K => K::Q4K,
        G::Q5K => K::Q5K,
        G::Q6K => K::Q6K,
        _ => return None,
    })
}

/// Whether `gguf` names a matrix kept quantized: a decoder block's projection weight
/// (attention q/k/v/output, MLP gate/up/down), the token embeddings or the output head.
fn is_projection(gguf: &str) -> bool {
    [
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_output.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    ]
    .iter()
    .any(|s| gguf.starts_with("blk.") && gguf.ends_with(s))
        || gguf == "token_embd.weight"
        || gguf == "output.weight"
}

/// The raw blocks of a projection matrix, if its type is kept quantized.
fn raw_blocks(
    content: &Content,
    file: &mut std::fs::File,
    name: &str,
    path: &Path,
) -> Result<Option<softprompt_core::QuantMatrix>> {
    let Some(info) = content.tensor_infos.get(name) else {
        return Ok(None);
    };
    let Some(kind) = kept_kind(info.ggml_dtype) else {
        return Ok(None);
    };
    let dims = info.shape.dims();
    let [rows, cols] = dims else {
        return Ok(None);
    };
    let q = read_blocks(content, file, name, path)?;
    let bytes = q
        .data()
        .map_err(|e| Error::backend("gguf", format!("reading `{name}`: {e}")))?
        .into_owned();
    softprompt_core::QuantMatrix::new(kind, *rows, *cols, bytes)
        .map(Some)
        .map_err(|e| Error::Gguf {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}`: {e}"),
        })
}

/// The model configuration of a GGUF file, from its metadata alone.
pub fn load_config(path: impl AsRef<Path>) -> Result<ModelConfig> {
    let path = path.as_ref();
    let (content, _) = read_content(path)?;
    config_of(&content, path)
}

/// One tensor of an open GGUF file as candle reads it (its blocks, unconverted).
fn read_blocks(
    content: &Content,
    file: &mut std::fs::File,
    name: &str,
    path: &Path,
) -> Result<candle_core::quantized::QTensor> {
    content
        .tensor(file, name, &Device::Cpu)
        .map_err(|e| Error::Gguf {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}`: {e}"),
        })
}

/// Dequantizes one tensor of an open GGUF file to f32 (candle's kernels), shape as stored.
fn dequantize(
    content: &Content,
    file: &mut std::fs::File,
    name: &str,
    path: &Path,
) -> Result<HostTensor> {
    let q = read_blocks(content, file, name, path)?;
    let t = q
        .dequantize(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|e| Error::backend("gguf", format!("dequantizing `{name}`: {e}")))?;
    let shape = t.dims().to_vec();
    let data = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| Error::backend("gguf", format!("reading `{name}`: {e}")))?;
    HostTensor::new(shape, data)
}

/// One tensor of a GGUF file by its llama.cpp name, dequantized to f32 as stored (no renaming,
/// no undoing of llama.cpp's conventions): what [`load_model`] starts from.
pub fn read_tensor(path: impl AsRef<Path>, name: &str) -> Result<HostTensor> {
    let path = path.as_ref();
    let (content, mut file) = read_content(path)?;
    if !content.tensor_infos.contains_key(name) {
        return Err(Error::MissingTensor {
            name: name.to_string(),
        });
    }
    dequantize(&content, &mut file, name, path)
}

/// Every tensor of a GGUF file, in name order, dequantized to f32 as stored (see
/// [`read_tensor`]) and handed to `f` one at a time.
pub fn for_each_tensor(
    path: impl AsRef<Path>,
    mut f: impl FnMut(&str, HostTensor) -> Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let (content, mut file) = read_content(path)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        f(name, dequantize(&content, &mut file, name, path)?)?;
    }
    Ok(())
}

/// Reads a GGUF file into a model description with Hugging Face tensor names, every tensor
/// dequantized to f32.
pub fn load_model(path: impl AsRef<Path>) -> Result<ModelSource> {
    load_model_with(path, false)
}

/// [`load_model`]; with `keep_quantized`, the decoder blocks' projection matrices of the types
/// in [`softprompt_core::QuantKind`] stay in their blocks ([`ModelWeights::insert_quantized`]):
/// a runtime that computes with them reads them as they are, any other gets f32 on demand.
/// So do the token embeddings and an untied output head; norms and other types are
/// dequantized as before. The fingerprint is the same.
pub fn load_model_with(path: impl AsRef<Path>, keep_quantized: bool) -> Result<ModelSource> {
    let path = path.as_ref();
    let (content, mut file) = read_content(path)?;
    let config = config_of(&content, path)?;
    let arch = arch_of(&content, path)?;
    // llama.cpp permutes Q/K rows of Llama and Mistral for its interleaved RoPE
    let permuted = arch == "llama" || arch == "mistral";
    // and stores Gemma's norms as `1 + w` (its RMSNorm's scale); Hugging Face stores `w`
    let norms_plus_one = arch == "gemma3";
    let mut weights = ModelWeights::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(&arch, name) else {
            // rope_freqs and other derived tables are recomputed, not loaded
            continue;
        };
        if keep_quantized && is_projection(name) {
            if let Some(mut q) = raw_blocks(&content, &mut file, name, path)? {
                let rows = q.rows();
                if permuted && name.ends_with("attn_q.weight") {
                    q.permute_rows(&unpermute_order(rows, config.num_attention_heads()))?;
                } else if permuted && name.ends_with("attn_k.weight") {
                    q.permute_rows(&unpermute_order(rows, config.num_key_value_heads()))?;
                }
                weights.insert_quantized(hf, q);
                continue;
            }
        }
        let HostTensor { shape, mut data } = dequantize(&content, &mut file, name, path)?;
        if permuted && shape.len() == 2 {
            if name.ends_with("attn_q.weight") {
                data = unpermute_rows(&data, shape[0], shape[1], config.num_attention_heads());
            } else if name.ends_with("attn_k.weight") {
                data = unpermute_rows(&data, shape[0], shape[1], config.num_key_value_heads());
            }
        }
        if norms_plus_one && name.ends_with("norm.weight") {
            data.iter_mut().for_each(|x| *x -= 1.0);
        }
        weights.insert(hf, HostTensor::new(shape, data)?);
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    ModelSource::from_parts(config, weights, name, path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("llama", "blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("llama", "blk.0.attn_q.bias").unwrap(),
            "model.layers.0.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("llama", "blk.12.ffn_norm.weight").unwrap(),
            "model.layers.12.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("llama", "token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("llama", "rope_freqs.weight").is_none());
        assert_eq!(
            hf_name("gemma3", "blk.2.ffn_norm.weight").unwrap(),
            "model.layers.2.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name("gemma3", "blk.2.post_ffw_norm.weight").unwrap(),
            "model.layers.2.post_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name("gemma3", "blk.0.attn_k_norm.weight").unwrap(),
            "model.layers.0.self_attn.k_norm.weight"
        );
        assert!(hf_name("llama", "blk.0.attn_k_norm.weight").is_none());
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

    /// Every kept block format dequantizes exactly as candle's (llama.cpp's) reference code:
    /// random values quantized by candle, read back by softprompt-core's kernels.
    #[test]
    fn kept_block_formats_dequantize_as_candle_does() {
        use candle_core::quantized::{GgmlDType as G, QTensor};
        let (rows, cols) = (3, 512);
        let mut rng = softprompt_core::Rng::seed_from_u64(7);
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.normal() * 0.7) as f32)
            .collect();
        let t = candle_core::Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [
            G::Q4_0,
            G::Q4_1,
            G::Q5_0,
            G::Q5_1,
            G::Q8_0,
            G::Q4K,
            G::Q5K,
            G::Q6K,
        ] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let kind = kept_kind(dtype).unwrap();
            let bytes = q.data().unwrap().into_owned();
            let m = softprompt_core::QuantMatrix::new(kind, rows, cols, bytes).unwrap();
            assert_eq!(m.dequantize(), want, "{dtype:?}");
            let mut two = vec![0f32; 2 * cols];
            m.dequantize_rows(1, 3, &mut two);
            assert_eq!(two, want[cols..], "{dtype:?} rows 1..3");
        }
        assert!(kept_kind(G::F16).is_none());
    }

    #[test]
    fn unpermute_order_matches_unpermute_rows() {
        let (rows, cols, heads) = (8, 2, 2);
        let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let by_rows = unpermute_rows(&data, rows, cols, heads);
        let order = unpermute_order(rows, heads);
        for (dst, src) in order.iter().enumerate() {
            assert_eq!(by_rows[dst * cols], data[src * cols]);
        }
        assert!(is_projection("blk.3.ffn_down.weight"));
        assert!(is_projection("token_embd.weight"));
        assert!(!is_projection("blk.0.attn_norm.weight"));
    }

    #[test]
    fn garbage_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00garbage").unwrap();
        assert!(matches!(load_model(&p), Err(Error::Gguf { .. })));
        std::fs::write(&p, b"not a gguf at all").unwrap();
        assert!(matches!(load_model(&p), Err(Error::Gguf { .. })));
        assert!(matches!(
            load_model(dir.path().join("missing.gguf")),
            Err(Error::Io { .. })
        ));
    }
}
