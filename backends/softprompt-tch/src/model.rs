//! Llama-family and GPT-2 decoders on libtorch tensors.
//!
//! Every weight is created with `requires_grad = false`; only the prompt leaf passed by the
//! caller may require a gradient, so autograd never computes or stores a weight gradient.

use softprompt_core::model::{
    gpt2_names, llama_names, Gpt2Activation, Gpt2Config, LlamaConfig, ModelConfig, ModelWeights,
    GPT2_LN_F, GPT2_WPE, GPT2_WTE, LLAMA_EMBED, LLAMA_FINAL_NORM, LM_HEAD,
};
use softprompt_core::Positions;
use tch::{Device, Kind, TchError, Tensor};

use crate::{to_core, Result};

type TResult<T> = std::result::Result<T, TchError>;

/// Cached keys and values of one layer, `[b, kv_heads, t, head_dim]` (after RoPE).
pub type LayerCache = Option<(Tensor, Tensor)>;

fn extend_cache(slot: &mut LayerCache, k: Tensor, v: Tensor) -> TResult<(Tensor, Tensor)> {
    let (k, v) = match slot.take() {
        Some((pk, pv)) => (Tensor::f_cat(&[&pk, &k], 2)?, Tensor::f_cat(&[&pv, &v], 2)?),
        None => (k, v),
    };
    *slot = Some((k.shallow_clone(), v.shallow_clone()));
    Ok((k, v))
}

struct Loader<'a> {
    weights: &'a mut ModelWeights,
    device: Device,
    kind: Kind,
}

impl Loader<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.weights.take(name, shape)?;
        self.host(&t.data, shape)
    }

    fn host(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let dims: Vec<i64> = shape.iter().map(|d| *d as i64).collect();
        Tensor::f_from_slice(data)
            .and_then(|t| t.f_view(dims.as_slice()))
            .and_then(|t| t.f_to_kind(self.kind))
            .and_then(|t| t.f_to_device(self.device))
            .map_err(to_core)
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.tensor(&format!("{prefix}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }

    /// GPT-2's Conv1D stores `[in, out]`; transposed once at load to `[out, in]`.
    fn conv1d(&mut self, prefix: &str, inp: usize, out: usize) -> Result<Linear> {
        let w = self
            .weights
            .take(&format!("{prefix}.weight"), &[inp, out])?;
        let mut t = vec![0f32; inp * out];
        for i in 0..inp {
            for o in 0..out {
                t[o * inp + i] = w.data[i * out + o];
            }
        }
        let w = self.host(&t, &[out, inp])?;
        let b = Some(self.tensor(&format!("{prefix}.bias"), &[out])?);
        Ok(Linear { w, b })
    }
}

/// `x · Wᵀ + b` with `W` stored `[out, in]` (one fused `addmm`).
pub struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> TResult<Tensor> {
        x.f_linear(&self.w, self.b.as_ref())
    }
}

/// Hugging Face's `LlamaRMSNorm`: in f32, `x · rsqrt(mean(x²) + eps)`, back to the input kind,
/// times the weight.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> TResult<Tensor> {
    let kind = x.kind();
    let xf = upcast(x)?;
    let var = xf.f_square()?.f_mean_dim(-1, true, None::<Kind>)?;
    let y = xf.f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?;
    y.f_to_kind(kind)?.f_mul(w)
}

fn upcast(x: &Tensor) -> TResult<Tensor> {
    match x.kind() {
        Kind::Half | Kind::BFloat16 => x.f_to_kind(Kind::Float),
        _ => Ok(x.shallow_clone()),
    }
}

/// `x·cos + rotate_half(x)·sin` on `[b, h, s, hd]`, tables `[s, hd]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> TResult<Tensor> {
    let hd = x.size()[3];
    let x1 = x.f_narrow(-1, 0, hd / 2)?;
    let x2 = x.f_narrow(-1, hd / 2, hd / 2)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
    x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)
}

/// RoPE tables `[positions.len(), hd]` for `positions`, computed as transformers does (inverse
/// frequencies and angles in f32).
fn rope_tables(
    positions: &[usize],
    head_dim: usize,
    theta: f64,
    kind: Kind,
    device: Device,
) -> TResult<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let len = positions.len();
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for &p in positions {
        let row: Vec<f64> = (0..half)
            .map(|i| {
                let inv = 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
                (p as f32 * inv) as f64
            })
            .collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos()));
            sin.extend(row.iter().map(|a| a.sin()));
        }
    }
    let shape = [len as i64, head_dim as i64];
    let cos = Tensor::f_from_slice(&cos)?
        .f_view(shape)?
        .f_to_kind(kind)?
        .f_to_device(device)?;
    let sin = Tensor::f_from_slice(&sin)?
        .f_view(shape)?
        .f_to_kind(kind)?
        .f_to_device(device)?;
    Ok((cos, sin))
}

/// libtorch's scaled dot-product attention (fused kernels where the device has them) with an
/// additive mask broadcastable to `[b, h, s, t]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> TResult<Tensor> {
    Tensor::f_scaled_dot_product_attention(q, k, v, mask, 0.0, false, None, false)
}

/// `[b, kv, t, hd]` → `[b, kv·rep, t, hd]`, each key/value head repeated for its query group.
fn repeat_kv(x: &Tensor, rep: i64) -> TResult<Tensor> {
    if rep == 1 {
        return Ok(x.shallow_clone());
    }
    x.f_repeat_interleave_self_int(rep, 1, None)
}

struct LlamaLayer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<LlamaLayer>,
    norm: Tensor,
    head: Tensor,
}

struct Gpt2Layer {
    ln_1: (Tensor, Tensor),
    c_attn: Linear,
    c_proj: Linear,
    ln_2: (Tensor, Tensor),
    c_fc: Linear,
    mlp_proj: Linear,
}

pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    layers: Vec<Gpt2Layer>,
    ln_f: (Tensor, Tensor),
    head: Tensor,
}

/// A decoder of either family.
pub enum Model {
    Llama(Box<Llama>),
    Gpt2(Box<Gpt2>),
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Model::Llama(m) => write!(f, "Llama({} layers)", m.layers.len()),
            Model::Gpt2(m) => write!(f, "Gpt2({} layers)", m.layers.len()),
        }
    }
}

impl Model {
    pub fn load(
        config: &ModelConfig,
        mut weights: ModelWeights,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let mut l = Loader {
            weights: &mut weights,
            device,
            kind,
        };
        match config {
            ModelConfig::Llama(c) => Ok(Model::Llama(Box::new(Llama::load(c, &mut l)?))),
            ModelConfig::Gpt2(c) => Ok(Model::Gpt2(Box::new(Gpt2::load(c, &mut l)?))),
        }
    }

    /// Token embeddings of `ids` (int64, `[n]`) as `[n, d]`.
    pub fn embed(&self, ids: &Tensor) -> TResult<Tensor> {
        let table = match self {
            Model::Llama(m) => &m.embed,
            Model::Gpt2(m) => &m.wte,
        };
        table.f_index_select(0, ids)
    }

    /// Final-normed hidden states of input embeddings `x [b, s, d]` at positions `start..`.
    pub fn forward(
        &self,
        x: &Tensor,
        start: usize,
        mask: Option<&Tensor>,
        cache: Option<&mut Vec<LayerCache>>,
    ) -> TResult<Tensor> {
        self.forward_at(x, Positions::From(start), mask, cache)
    }

    /// [`Model::forward`] with each row at its own positions.
    pub fn forward_at(
        &self,
        x: &Tensor,
        pos: Positions<'_>,
        mask: Option<&Tensor>,
        cache: Option<&mut Vec<LayerCache>>,
    ) -> TResult<Tensor> {
        match self {
            Model::Llama(m) => m.forward(x, pos, mask, cache),
            Model::Gpt2(m) => m.forward(x, pos, mask, cache),
        }
    }

    /// Logits `[n, vocab]` of hidden states `[n, d]`.
    pub fn head(&self, h: &Tensor) -> TResult<Tensor> {
        let w = match self {
            Model::Llama(m) => &m.head,
            Model::Gpt2(m) => &m.head,
        };
        h.f_linear(w, None::<&Tensor>)
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Model::Llama(m) => m.layers.len(),
            Model::Gpt2(m) => m.layers.len(),
        }
    }
}

impl Llama {
    fn load(c: &LlamaConfig, l: &mut Loader<'_>) -> Result<Self> {
        let (d, hd) = (c.hidden_size, c.head_dim);
        let head = if c.tie_word_embeddings || !l.weights.contains(LM_HEAD) {
            None
        } else {
            Some(l.tensor(LM_HEAD, &[c.vocab_size, d])?)
        };
        let embed = l.tensor(LLAMA_EMBED, &[c.vocab_size, d])?;
        let head = head.unwrap_or_else(|| embed.shallow_clone());
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let n = llama_names(i);
            let (qo, kvo) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
            layers.push(LlamaLayer {
                input_norm: l.tensor(&n.input_norm, &[d])?,
                q: l.linear(&n.q, qo, d, c.qkv_bias)?,
                k: l.linear(&n.k, kvo, d, c.qkv_bias)?,
                v: l.linear(&n.v, kvo, d, c.qkv_bias)?,
                o: l.linear(&n.o, d, qo, c.o_bias)?,
                post_norm: l.tensor(&n.post_norm, &[d])?,
                gate: l.linear(&n.gate, c.intermediate_size, d, c.mlp_bias)?,
                up: l.linear(&n.up, c.intermediate_size, d, c.mlp_bias)?,
                down: l.linear(&n.down, d, c.intermediate_size, c.mlp_bias)?,
            });
        }
        let norm = l.tensor(LLAMA_FINAL_NORM, &[d])?;
        Ok(Llama {
            cfg: c.clone(),
            embed,
            layers,
            norm,
            head,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        pos: Positions<'_>,
        mask: Option<&Tensor>,
        mut cache: Option<&mut Vec<LayerCache>>,
    ) -> TResult<Tensor> {
        let c = &self.cfg;
        let size = x.size();
        let (b, s) = (size[0], size[1]);
        let (h, kvh, hd) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim as i64,
        );
        let (cos, sin) = rope_tables(
            &pos.ids(s as usize),
            c.head_dim,
            c.rope_theta,
            x.kind(),
            x.device(),
        )?;
        // `[s, hd]` broadcasts over rows and heads; per-row tables are `[b, 1, s, hd]`
        let (cos, sin) = match pos {
            Positions::From(_) => (cos, sin),
            Positions::PerRow(_) => (cos.f_view([b, 1, s, hd])?, sin.f_view([b, 1, s, hd])?),
        };
        let mut x = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let hn = rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
            let q = layer
                .q
                .forward(&hn)?
                .f_view([b, s, h, hd])?
                .f_transpose(1, 2)?;
            let k = layer
                .k
                .forward(&hn)?
                .f_view([b, s, kvh, hd])?
                .f_transpose(1, 2)?;
            let mut v = layer
                .v
                .forward(&hn)?
                .f_view([b, s, kvh, hd])?
                .f_transpose(1, 2)?;
            let q = rope(&q, &cos, &sin)?;
            let mut k = rope(&k, &cos, &sin)?;
            if let Some(cache) = cache.as_deref_mut() {
                (k, v) = extend_cache(&mut cache[i], k, v)?;
            }
            let k = repeat_kv(&k, h / kvh)?;
            let v = repeat_kv(&v, h / kvh)?;
            let att = attention(&q, &k, &v, mask)?
                .f_transpose(1, 2)?
                .f_reshape([b, s, h * hd])?;
            x = x.f_add(&layer.o.forward(&att)?)?;
            let hn = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
            let mlp = layer
                .gate
                .forward(&hn)?
                .f_silu()?
                .f_mul(&layer.up.forward(&hn)?)?;
            x = x.f_add(&layer.down.forward(&mlp)?)?;
        }
        rms_norm(&x, &self.norm, c.rms_norm_eps)
    }
}

impl Gpt2 {
    fn load(c: &Gpt2Config, l: &mut Loader<'_>) -> Result<Self> {
        let d = c.n_embd;
        let ln = |l: &mut Loader<'_>, p: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                l.tensor(&format!("{p}.weight"), &[d])?,
                l.tensor(&format!("{p}.bias"), &[d])?,
            ))
        };
        let head = if !c.tie_word_embeddings && l.weights.contains(LM_HEAD) {
            Some(l.tensor(LM_HEAD, &[c.vocab_size, d])?)
        } else {
            None
        };
        let wte = l.tensor(GPT2_WTE, &[c.vocab_size, d])?;
        let head = head.unwrap_or_else(|| wte.shallow_clone());
        let wpe = l.tensor(GPT2_WPE, &[c.n_positions, d])?;
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = gpt2_names(i);
            layers.push(Gpt2Layer {
                ln_1: ln(l, &n.ln_1)?,
                c_attn: l.conv1d(&n.c_attn, d, 3 * d)?,
                c_proj: l.conv1d(&n.c_proj, d, d)?,
                ln_2: ln(l, &n.ln_2)?,
                c_fc: l.conv1d(&n.c_fc, d, c.n_inner)?,
                mlp_proj: l.conv1d(&n.mlp_proj, c.n_inner, d)?,
            });
        }
        let ln_f = ln(l, GPT2_LN_F)?;
        Ok(Gpt2 {
            cfg: c.clone(),
            wte,
            wpe,
            layers,
            ln_f,
            head,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        pos: Positions<'_>,
        mask: Option<&Tensor>,
        mut cache: Option<&mut Vec<LayerCache>>,
    ) -> TResult<Tensor> {
        let c = &self.cfg;
        let size = x.size();
        let (b, s, d) = (size[0], size[1], size[2]);
        let end = pos.end(s as usize);
        if end > c.n_positions {
            return Err(TchError::Shape(format!(
                "sequence of {end} positions exceeds GPT-2's n_positions {}",
                c.n_positions
            )));
        }
        let h = c.n_head as i64;
        let hd = d / h;
        let eps = c.layer_norm_epsilon;
        let ln = |x: &Tensor, p: &(Tensor, Tensor)| {
            x.f_layer_norm([d], Some(&p.0), Some(&p.1), eps, false)
        };
        let wpe = match pos {
            Positions::From(start) => self.wpe.f_narrow(0, start as i64, s)?,
            Positions::PerRow(_) => {
                let ids: Vec<i64> = pos.ids(s as usize).iter().map(|p| *p as i64).collect();
                let ids = Tensor::f_from_slice(&ids)?.f_to_device(x.device())?;
                self.wpe.f_index_select(0, &ids)?.f_view([b, s, d])?
            }
        };
        let mut x = x.f_add(&wpe)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let hn = ln(&x, &layer.ln_1)?;
            let qkv = layer.c_attn.forward(&hn)?;
            let split = |j: i64| -> TResult<Tensor> {
                qkv.f_narrow(2, j * d, d)?
                    .f_reshape([b, s, h, hd])?
                    .f_transpose(1, 2)
            };
            let (q, mut k, mut v) = (split(0)?, split(1)?, split(2)?);
            if let Some(cache) = cache.as_deref_mut() {
                (k, v) = extend_cache(&mut cache[i], k, v)?;
            }
            let att = attention(&q, &k, &v, mask)?
                .f_transpose(1, 2)?
                .f_reshape([b, s, d])?;
            x = x.f_add(&layer.c_proj.forward(&att)?)?;
            let hn = ln(&x, &layer.ln_2)?;
            let up = layer.c_fc.forward(&hn)?;
            let act = match c.activation {
                Gpt2Activation::GeluTanh => up.f_gelu("tanh")?,
                Gpt2Activation::GeluErf => up.f_gelu("none")?,
            };
            x = x.f_add(&layer.mlp_proj.forward(&act)?)?;
        }
        ln(&x, &self.ln_f)
    }
}
