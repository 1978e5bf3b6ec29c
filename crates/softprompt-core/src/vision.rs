//! Vision transformers: their configuration (Hugging Face `Dinov2Model`), weights and names,
//! images as patch rows, the bicubic resizing of position tables, and the backbone trait of
//! image models (visual prompt tuning).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::model::{HostTensor, ModelWeights};
use crate::{Architecture, BackboneSpec, Error, Result, SoftPrompt};

/// A DINOv2-style vision transformer (`model_type: "dinov2"`): patch embedding, class token,
/// learned positions for a `grid × grid` pretraining grid, pre-norm blocks with LayerScale and an
/// exact-GELU MLP, final LayerNorm.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Side of a square patch, in pixels.
    pub patch_size: usize,
    /// Pretraining resolution: its grid (`image_size / patch_size`) sizes the position table.
    pub image_size: usize,
    /// Input channels.
    pub num_channels: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Whether blocks scale their branches (`layer_scale{1,2}.lambda1`).
    pub layerscale: bool,
    /// Whether q, k and v have biases.
    pub qkv_bias: bool,
}

/// Hugging Face names of a ViT's weights.
pub mod vit_names {
    /// Class token `[1, 1, d]`.
    pub const CLS: &str = "embeddings.cls_token";
    /// Position table `[1, 1 + grid², d]` (the class token's first).
    pub const POSITIONS: &str = "embeddings.position_embeddings";
    /// Patch projection (a convolution `[d, channels, p, p]` with stride `p`).
    pub const PATCH: &str = "embeddings.patch_embeddings.projection";
    /// Final LayerNorm.
    pub const FINAL_NORM: &str = "layernorm";

    /// Prefix of block `i`.
    pub fn layer(i: usize) -> String {
        format!("encoder.layer.{i}")
    }
}

impl VitConfig {
    /// From a Hugging Face `config.json` value (`Dinov2Model`, `Dinov2ForImageClassification`).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "dinov2" {
            return Err(bad(format!(
                "model_type {model_type:?} is not a vision transformer this build reads (dinov2)"
            )));
        }
        let int = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("`{k}` missing or not an integer")))
        };
        let hidden_size = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        let patch_size = int("patch_size")?;
        let image_size = int("image_size")?;
        let mlp_ratio = v.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0);
        if v.get("use_swiglu_ffn").and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                "SwiGLU feed-forward ViTs (DINOv2 giant) are not supported".into(),
            ));
        }
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(bad(format!("hidden_act {act:?} (only gelu)")));
        }
        let c = VitConfig {
            hidden_size,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: heads,
            intermediate_size: (hidden_size as f64 * mlp_ratio) as usize,
            patch_size,
            image_size,
            num_channels: v.get("num_channels").and_then(Value::as_u64).unwrap_or(3) as usize,
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            layerscale: v
                .get("layerscale_value")
                .and_then(Value::as_f64)
                .is_some_and(|s| s != 0.0),
            qkv_bias: v.get("qkv_bias").and_then(Value::as_bool).unwrap_or(true),
        };
        c.check().map_err(|e| bad(e.to_string()))?;
        Ok(c)
    }

    /// Errors on a count that divides or sizes something and is zero or does not divide.
    pub fn check(&self) -> Result<()> {
        let zero = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("patch_size", self.patch_size),
            ("image_size", self.image_size),
            ("num_channels", self.num_channels),
        ];
        if let Some((k, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return Err(Error::InvalidArgument(format!("`{k}` is 0")));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::InvalidArgument(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.image_size < self.patch_size {
            return Err(Error::InvalidArgument(format!(
                "image_size {} is smaller than a patch ({})",
                self.image_size, self.patch_size
            )));
        }
        Ok(())
    }

    /// Side of the pretraining grid of patches (the position table's).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Values of one flattened patch (`channels · p · p`).
    pub fn patch_dim(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }
}

/// A vision transformer on disk, read into host memory.
#[derive(Debug)]
pub struct VisionSource {
    /// Configuration.
    pub config: VitConfig,
    /// Weights under Hugging Face `Dinov2Model` names (no `dinov2.` prefix).
    pub weights: ModelWeights,
    /// Identity (`vocab_size` 0).
    pub spec: BackboneSpec,
    /// Where it was read from.
    pub path: PathBuf,
}

impl VisionSource {
    /// Reads a Hugging Face model directory (`config.json` + safetensors).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?;
        let config = VitConfig::from_json(&v, &cfg_path)?;
        let mut weights = ModelWeights::load_dir(dir)?;
        weights.strip_prefix("dinov2.");
        // transformers 5 spells the attention modules as q/k/v/o projections; the hub's
        // checkpoints (and this crate) use transformers 4's names
        for (v5, v4) in [
            (".attention.q_proj.", ".attention.attention.query."),
            (".attention.k_proj.", ".attention.attention.key."),
            (".attention.v_proj.", ".attention.attention.value."),
            (".attention.o_proj.", ".attention.output.dense."),
        ] {
            weights.rename_part(v5, v4);
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self::from_parts(config, weights, name, dir.to_path_buf()))
    }

    /// From a parsed configuration and weights (other file formats, tests).
    pub fn from_parts(
        config: VitConfig,
        weights: ModelWeights,
        name: String,
        path: PathBuf,
    ) -> Self {
        let spec = BackboneSpec {
            architecture: Architecture::new("dinov2"),
            hidden_size: config.hidden_size,
            vocab_size: 0,
            num_layers: config.num_hidden_layers,
            num_attention_heads: config.num_attention_heads,
            num_key_value_heads: config.num_attention_heads,
            head_dim: config.head_dim(),
            fingerprint: weights.fingerprint(),
            name,
        };
        VisionSource {
            config,
            weights,
            spec,
            path,
        }
    }
}

/// PyTorch's bicubic kernel (`A = -0.75`) at distance `t ∈ [0, 1)`: the weights of the taps at
/// `-1, 0, 1, 2`.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Resizes a `[grid, grid, d]` table to `[h, w, d]` as PyTorch's
/// `interpolate(mode="bicubic", align_corners=False, antialias=False)` does (half-pixel centres,
/// taps clamped at the borders), computed in f64.
pub fn resize_bicubic(table: &[f32], grid: usize, d: usize, h: usize, w: usize) -> Vec<f32> {
    let taps = |out: usize, inp: usize| -> Vec<([usize; 4], [f64; 4])> {
        let scale = inp as f64 / out as f64;
        (0..out)
            .map(|o| {
                let src = (o as f64 + 0.5) * scale - 0.5;
                let f = src.floor();
                let t = src - f;
                let i = f as i64;
                let idx = [i - 1, i, i + 1, i + 2].map(|k| k.clamp(0, inp as i64 - 1) as usize);
                (idx, cubic_weights(t))
            })
            .collect()
    };
    let (ty, tx) = (taps(h, grid), taps(w, grid));
    let mut out = vec![0f32; h * w * d];
    let mut acc = vec![0f64; d];
    for (y, (iy, wy)) in ty.iter().enumerate() {
        for (x, (ix, wx)) in tx.iter().enumerate() {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (a, &yy) in iy.iter().enumerate() {
                for (b, &xx) in ix.iter().enumerate() {
                    let wgt = wy[a] * wx[b];
                    let row = &table[(yy * grid + xx) * d..(yy * grid + xx + 1) * d];
                    for (s, v) in acc.iter_mut().zip(row) {
                        *s += wgt * *v as f64;
                    }
                }
            }
            let dst = &mut out[(y * w + x) * d..(y * w + x + 1) * d];
            for (o, s) in dst.iter_mut().zip(&acc) {
                *o = *s as f32;
            }
        }
    }
    out
}

/// The patch positions of a ViT for a `gh × gw` grid from its stored table `[1, 1 + grid², d]`:
/// the class token's row, and the patch rows resized when the grid differs (Hugging Face's
/// `interpolate_pos_encoding`).
pub fn positions_for(
    table: &HostTensor,
    grid: usize,
    gh: usize,
    gw: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let d = *table.shape.last().unwrap_or(&0);
    if table.shape != [1, 1 + grid * grid, d] {
        return Err(Error::TensorShape {
            name: vit_names::POSITIONS.into(),
            expected: vec![1, 1 + grid * grid, d],
            actual: table.shape.clone(),
        });
    }
    let cls = table.data[..d].to_vec();
    let patches = &table.data[d..];
    let rows = if gh == grid && gw == grid {
        patches.to_vec()
    } else {
        resize_bicubic(patches, grid, d, gh, gw)
    };
    Ok((cls, rows))
}

/// Images ready for a vision transformer: `[rows, channels, size, size]`, already resized and
/// normalised as the model expects.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// Number of images.
    pub rows: usize,
    /// Channels.
    pub channels: usize,
    /// Side in pixels.
    pub size: usize,
    /// Pixel values, row-major.
    pub pixels: Vec<f32>,
}

impl Images {
    /// Checks the length of `pixels`.
    pub fn new(rows: usize, channels: usize, size: usize, pixels: Vec<f32>) -> Result<Self> {
        if pixels.len() != rows * channels * size * size {
            return Err(Error::Shape(format!(
                "{} pixel values for {rows} images of {channels} × {size} × {size}",
                pixels.len()
            )));
        }
        Ok(Images {
            rows,
            channels,
            size,
            pixels,
        })
    }

    /// Non-overlapping `p × p` patches, `[rows, (size / p)², channels · p · p]`, grid row-major,
    /// each patch in a convolution weight's `(channel, y, x)` order; pixels past the last whole
    /// patch are dropped (as a stride-`p` convolution does).
    pub fn patches(&self, p: usize) -> Vec<f32> {
        let g = self.size / p;
        let (c, s) = (self.channels, self.size);
        let mut out = Vec::with_capacity(self.rows * g * g * c * p * p);
        for r in 0..self.rows {
            let img = &self.pixels[r * c * s * s..(r + 1) * c * s * s];
            for gy in 0..g {
                for gx in 0..g {
                    for ch in 0..c {
                        for y in 0..p {
                            let at = ch * s * s + (gy * p + y) * s + gx * p;
                            out.extend_from_slice(&img[at..at + p]);
                        }
                    }
                }
            }
        }
        out
    }

    /// Side of the patch grid for patches of `p`.
    pub fn grid(&self, p: usize) -> usize {
        self.size / p
    }
}

/// A loss computed on the host from class-token features `[rows, d]`: its value and its
/// gradient with respect to the features.
pub type FeatureLoss<'a> = dyn FnMut(&[f32]) -> Result<(f32, Vec<f32>)> + 'a;

/// A frozen image model that takes visual prompts: the class token's features after the final
/// norm, for prompt tokens inserted after the class token (VPT-shallow, `width = d`) or fresh
/// at every block (VPT-deep, `width = layers · d`), a pattern added to the pixels (visual
/// prompting, one row of `channels · size · size`), or none (a linear probe).
pub trait VisionBackbone: Send + Sync {
    /// Short name of the runtime.
    fn backend_name(&self) -> &str;

    /// Identity and shape.
    fn spec(&self) -> &BackboneSpec;

    /// The architecture.
    fn config(&self) -> &VitConfig;

    /// Class-token features `[rows, d]`; image `r` takes `prompts[prompt_index[r]]` (one length
    /// and placement for all; zero virtual tokens: no prompt).
    fn features(
        &self,
        prompts: &[SoftPrompt],
        prompt_index: &[usize],
        images: &Images,
    ) -> Result<Vec<f32>>;

    /// The features, a loss the host computes from them (`loss(features)` returns the loss and
    /// its gradient with respect to the features) and that loss's gradient with respect to each
    /// prompt: one forward and one backward pass. Backends without gradients answer
    /// [`Error::Unsupported`].
    fn features_grad(
        &self,
        _prompts: &[SoftPrompt],
        _prompt_index: &[usize],
        _images: &Images,
        _loss: &mut FeatureLoss<'_>,
    ) -> Result<(f32, Vec<Vec<f32>>)> {
        Err(Error::unsupported(self.backend_name(), "gradients", None))
    }

    /// The input of every block without a prompt, `[layers, rows, 1 + patches, d]` in one
    /// vector: the embeddings (class token and patches, with their positions), then each block's
    /// output but the last's, as transformers' `hidden_states[..layers]`. What visual prompt
    /// tokens can start from (real patches' hidden states). Backends that cannot answer say
    /// [`Error::Unsupported`].
    fn block_inputs(&self, _images: &Images) -> Result<Vec<f32>> {
        Err(Error::unsupported(
            self.backend_name(),
            "hidden states of every block",
            None,
        ))
    }
}

/// Checks one call of a [`VisionBackbone`]: images of the model's channels and at least one
/// patch, one prompt index per image, prompts of one length and placement after the class token
/// (none: zero virtual tokens) and of the width that placement needs. Returns the length and
/// placement.
pub fn check_call(
    c: &VitConfig,
    prompts: &[SoftPrompt],
    prompt_index: &[usize],
    images: &Images,
) -> Result<(usize, crate::Placement)> {
    use crate::Placement;
    if images.channels != c.num_channels || images.size < c.patch_size {
        return Err(Error::InvalidBatch(format!(
            "images of {} channels × {} px for a model of {} channels and {} px patches",
            images.channels, images.size, c.num_channels, c.patch_size
        )));
    }
    if prompt_index.len() != images.rows {
        return Err(Error::InvalidBatch(format!(
            "{} prompt indices for {} images",
            prompt_index.len(),
            images.rows
        )));
    }
    if let Some(bad) = prompt_index.iter().find(|i| **i >= prompts.len()) {
        return Err(Error::InvalidBatch(format!(
            "prompt index {bad} of {} prompts",
            prompts.len()
        )));
    }
    let first = prompts.first().ok_or_else(|| {
        Error::InvalidBatch("no prompt (give an empty one for a linear probe)".into())
    })?;
    let (n, placement) = (first.num_virtual_tokens(), first.placement());
    for p in prompts {
        if p.num_virtual_tokens() != n || p.placement() != placement {
            return Err(Error::InvalidBatch(
                "prompts of one call share their length and placement".into(),
            ));
        }
        if placement == Placement::Pixels && n != 1 {
            return Err(Error::InvalidBatch(format!(
                "a pixel prompt is one row (the pattern), not {n}"
            )));
        }
        if placement == Placement::Pixels && images.size % c.patch_size != 0 {
            return Err(Error::InvalidBatch(format!(
                "a pixel prompt needs images of whole patches: {} px is not a multiple of {}",
                images.size, c.patch_size
            )));
        }
        if n > 0 {
            let want = match placement {
                Placement::AfterClassToken => c.hidden_size,
                Placement::DeepAfterClassToken => c.hidden_size * c.num_hidden_layers,
                Placement::Pixels => images.channels * images.size * images.size,
                other => {
                    return Err(Error::InvalidBatch(format!(
                        "a vision transformer takes prompts after its class token, not at `{}`",
                        other.as_str()
                    )))
                }
            };
            p.check_hidden_size(want)?;
        }
    }
    Ok((n, placement))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_keeps_a_same_size_table_and_constants() {
        // resizing to the same grid is the identity (weights at t = 0 are 0, 1, 0, 0)
        let table: Vec<f32> = (0..2 * 2 * 3).map(|x| x as f32).collect();
        let same = resize_bicubic(&table, 2, 3, 2, 2);
        assert!(same.iter().zip(&table).all(|(a, b)| (a - b).abs() < 1e-6));
        // the taps' weights sum to 1: a constant table stays constant at any size
        let flat = vec![0.5f32; 5 * 5];
        for (h, w) in [(3, 3), (7, 4), (1, 1)] {
            assert!(resize_bicubic(&flat, 5, 1, h, w)
                .iter()
                .all(|v| (v - 0.5).abs() < 1e-6));
        }
    }

    #[test]
    fn patches_follow_the_convolution_weight_order() {
        // one 2-channel 4×4 image, pixel value = c·100 + y·10 + x
        let mut px = Vec::new();
        for c in 0..2 {
            for y in 0..4 {
                for x in 0..4 {
                    px.push((c * 100 + y * 10 + x) as f32);
                }
            }
        }
        let img = Images::new(1, 2, 4, px).unwrap();
        let p = img.patches(2);
        assert_eq!(p.len(), 4 * 8);
        // patch (0, 1): channel 0 rows 0..2, columns 2..4, then channel 1
        assert_eq!(&p[8..16], &[2., 3., 12., 13., 102., 103., 112., 113.]);
        assert!(Images::new(1, 3, 4, vec![0.0; 5]).is_err());
    }
}
