//! Reading and writing one prompt directory in PEFT's layout, atomically.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use softprompt_core::{Error, Placement, PromptConfig, Result, SoftPrompt, StoredPrompt};

/// PEFT's config file name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's weights file name.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The tensor PEFT stores a prompt-tuning adapter under.
pub const PROMPT_TENSOR: &str = "prompt_embeddings";

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidPrompt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader sees the old file or the new one, never a torn one.
async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = path.with_file_name(format!(".{file}.{}.{nanos}.tmp", std::process::id()));
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(|e| Error::io(&tmp, e))?;
    let f = tokio::fs::File::open(&tmp)
        .await
        .map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().await.map_err(|e| Error::io(&tmp, e))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| Error::io(path, e))
}

/// Serializes a prompt's safetensors file (f32 `prompt_embeddings` `[N, d]`).
pub fn prompt_safetensors(stored: &StoredPrompt) -> Result<Vec<u8>> {
    let p = &stored.prompt;
    let bytes: Vec<u8> = p.values().iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = TensorView::new(
        Dtype::F32,
        vec![p.num_virtual_tokens(), p.hidden_size()],
        &bytes,
    )
    .map_err(|e| Error::Shape(e.to_string()))?;
    let mut meta: std::collections::HashMap<String, String> =
        stored.metadata.clone().into_iter().collect();
    meta.insert("format".into(), "pt".into());
    safetensors::serialize(vec![(PROMPT_TENSOR, view)], Some(meta))
        .map_err(|e| Error::Shape(e.to_string()))
}

/// Writes `stored` into `dir` (created if needed): weights first, then the config, each atomically.
pub async fn write_prompt_dir(dir: &Path, stored: &StoredPrompt) -> Result<()> {
    let mut config = stored.config.clone();
    let method = config.method()?;
    let placement = stored.prompt.placement();
    if placement != method.placement() {
        return Err(invalid(
            dir,
            format!(
                "a {} config for a prompt placed at `{}`",
                config.peft_type,
                placement.as_str()
            ),
        ));
    }
    config.num_virtual_tokens = stored.prompt.num_virtual_tokens();
    config.token_dim = match placement {
        Placement::KeyValuePrefix => {
            let layers = config.num_layers.unwrap_or(0);
            let width = stored.prompt.hidden_size();
            if layers == 0 || width % (2 * layers) != 0 {
                return Err(invalid(
                    dir,
                    format!("a key/value prefix of width {width} does not split into {layers} layers' keys and values"),
                ));
            }
            width / (2 * layers)
        }
        _ => stored.prompt.hidden_size(),
    };
    let json = serde_json::to_vec_pretty(&config).map_err(|e| Error::Json {
        path: dir.join(ADAPTER_CONFIG),
        reason: e.to_string(),
    })?;
    let weights = prompt_safetensors(stored)?;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Error::io(dir, e))?;
    write_atomic(&dir.join(ADAPTER_WEIGHTS), &weights).await?;
    write_atomic(&dir.join(ADAPTER_CONFIG), &json).await
}

/// Reads a prompt directory written by softprompt or by PEFT's `save_pretrained`.
pub async fn read_prompt_dir(dir: &Path) -> Result<StoredPrompt> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = tokio::fs::read_to_string(&cfg_path)
        .await
        .map_err(|e| Error::io(&cfg_path, e))?;
    let config: PromptConfig = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    let method = config
        .method()
        .map_err(|e| invalid(&cfg_path, e.to_string()))?;
    if config.num_transformer_submodules.unwrap_or(1) != 1 {
        return Err(invalid(
            &cfg_path,
            "num_transformer_submodules != 1 (encoder-decoder prompts) is not supported",
        ));
    }
    let w_path = dir.join(ADAPTER_WEIGHTS);
    if !w_path.is_file() && dir.join("adapter_model.bin").is_file() {
        return Err(invalid(
            dir,
            "only adapter_model.bin (pickle) found: re-save with safe_serialization=True",
        ));
    }
    let bytes = tokio::fs::read(&w_path)
        .await
        .map_err(|e| Error::io(&w_path, e))?;
    let (prompt, metadata) = parse_prompt_safetensors(&bytes, &w_path)?;
    let prompt = prompt.with_placement(method.placement());
    // PEFT stores a prefix as `[N, layers · 2 · token_dim]`
    let (width, what) = match method.placement() {
        Placement::KeyValuePrefix => {
            let layers = config
                .num_layers
                .ok_or_else(|| invalid(&cfg_path, "a PREFIX_TUNING config without num_layers"))?;
            (
                layers * 2 * config.token_dim,
                format!("num_layers {layers} × 2 × token_dim {}", config.token_dim),
            )
        }
        _ => (config.token_dim, format!("token_dim {}", config.token_dim)),
    };
    if prompt.num_virtual_tokens() != config.num_virtual_tokens || prompt.hidden_size() != width {
        return Err(invalid(
            dir,
            format!(
                "{PROMPT_TENSOR} is [{}, {}] but {ADAPTER_CONFIG} says num_virtual_tokens {} and {what}",
                prompt.num_virtual_tokens(),
                prompt.hidden_size(),
                config.num_virtual_tokens,
            ),
        ));
    }
    Ok(StoredPrompt {
        prompt,
        config,
        metadata,
    })
}

/// Parses `adapter_model.safetensors`: the prompt and the header metadata (without `format`).
pub fn parse_prompt_safetensors(
    bytes: &[u8],
    path: &Path,
) -> Result<(SoftPrompt, BTreeMap<String, String>)> {
    let st_err = |e: safetensors::SafeTensorError| Error::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(st_err)?;
    let st = SafeTensors::deserialize(bytes).map_err(st_err)?;
    let view = st
        .tensor(PROMPT_TENSOR)
        .map_err(|_| invalid(path, format!("no `{PROMPT_TENSOR}` tensor")))?;
    let shape = view.shape();
    if shape.len() != 2 {
        return Err(invalid(
            path,
            format!("{PROMPT_TENSOR} has shape {shape:?}, expected [N, d]"),
        ));
    }
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half_f16(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        other => {
            return Err(invalid(
                path,
                format!("{PROMPT_TENSOR} has dtype {other:?}, expected F32"),
            ))
        }
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(invalid(
            path,
            format!("{PROMPT_TENSOR} holds a non-finite value at index {i}"),
        ));
    }
    let prompt = SoftPrompt::new(shape[0], shape[1], values)?;
    let mut metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    metadata.remove("format");
    Ok((prompt, metadata))
}

/// IEEE half → f32 without a dependency.
fn half_f16(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal
            let v = f as f32 * 2f32.powi(-24);
            return if sign != 0 { -v } else { v };
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | (((e - 15 + 127) as u32) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversion() {
        assert_eq!(half_f16(0x3c00), 1.0);
        assert_eq!(half_f16(0xc000), -2.0);
        assert_eq!(half_f16(0x0001), 2f32.powi(-24));
    }
}
