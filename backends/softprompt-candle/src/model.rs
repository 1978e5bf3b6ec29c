//! Llama-family and GPT-2 decoders on candle tensors.

use candle_core::{DType, Device, Tensor};
use softprompt_core::model::{
    gpt2_names, llama_names, Gpt2Activation, Gpt2Config, LlamaConfig, ModelConfig, ModelWeights,
    GPT2_LN_F, GPT2_WPE, GPT2_WTE, LLAMA_EMBED, LLAMA_FINAL_NORM, LM_HEAD,
};
use softprompt_core::Positions;

use crate::ops::{attention, layer_norm, rms_norm, rope_tables, split_heads, swiglu, Linear};
use crate::{fused, to_core, Result};

/// Cached keys and values of one layer, `[b, kv_heads, t, head_dim]` (after RoPE).
pub type LayerCache = Option<(Tensor, Tensor)>;

/// One sequence's keys and values in host memory for continuous batching (f32, CPU): per layer
/// `(k, v)`, each token-major `[len, kv_heads, head_dim]`, so a decode step appends its token's
/// keys/values in place and attention reads them where they are (no per-step packing).
#[derive(Debug, Clone)]
pub struct HostCache {
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
    pub len: usize,
}

impl HostCache {
    /// No tokens yet, `layers` layers.
    pub fn empty(layers: usize) -> Self {
        HostCache {
            layers: vec![(Vec::new(), Vec::new()); layers],
            len: 0,
        }
    }

    /// Drops whatever a failed pass appended past `len` (each layer's buffers hold
    /// `len · width` values).
    fn truncate(&mut self, width: usize) {
        let keep = self.len * width;
        for (k, v) in &mut self.layers {
            k.truncate(keep);
            v.truncate(keep);
        }
    }

    /// From a prefilled cache (`[1, kv, len, hd]` per layer).
    pub fn from_tensors(cache: &[LayerCache], len: usize) -> candle_core::Result<Self> {
        let token_major = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            t.squeeze(0)?
                .transpose(0, 1)?
                .contiguous()?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()
        };
        let layers = cache
            .iter()
            .map(|slot| {
                let (k, v) = slot
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("prefill left a layer empty".into()))?;
                Ok((token_major(k)?, token_major(v)?))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(HostCache { layers, len })
    }
}

/// Appends this step's keys and values to a layer's cache; returns everything cached.
fn extend_cache(
    slot: &mut LayerCache,
    k: Tensor,
    v: Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (k, v) = match slot.take() {
        Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        None => (k, v),
    };
    *slot = Some((k.clone(), v.clone()));
    Ok((k, v))
}

struct Loader<'a> {
    weights: &'a mut ModelWeights,
    device: &'a Device,
    dtype: DType,
}

impl Loader<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.weights.take(name, shape)?;
        self.host(t.data, shape)
    }
    fn host(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_vec(data, shape, self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(to_core)
    }
    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.tensor(&format!("{prefix}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(w, b))
    }
    /// GPT-2's Conv1D stores `[in, out]`; transpose once on the host.
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
        let w = self.host(t, &[out, inp])?;
        let b = self.tensor(&format!("{prefix}.bias"), &[out])?;
        Ok(Linear::new(w, Some(b)))
    }
}

struct LlamaLayer {
    input_norm: Tensor,
    /// q, k and v side by side: `[(h + 2·kv)·hd, d]`
    qkv: Linear,
    o: Linear,
    post_norm: Tensor,
    /// gate and up side by side: `[2·intermediate, d]`
    gate_up: Linear,
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
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut l = Loader {
            weights: &mut weights,
            device,
            dtype,
        };
        match config {
            ModelConfig::Llama(c) => Ok(Model::Llama(Box::new(Llama::load(c, &mut l)?))),
            ModelConfig::Gpt2(c) => Ok(Model::Gpt2(Box::new(Gpt2::load(c, &mut l)?))),
        }
    }

    /// Token embeddings of `ids` (u32, `[n]`) as `[n, d]`.
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Model::Llama(m) => m.embed.index_select(ids, 0),
            Model::Gpt2(m) => m.wte.index_select(ids, 0),
        }
    }

    /// Final-normed hidden states of input embeddings `x [b, s, d]` at positions `start..`.
    pub fn forward(
        &self,
        x: &Tensor,
        start: usize,
        bias: Option<&Tensor>,
        cache: Option<&mut Vec<LayerCache>>,
    ) -> candle_core::Result<Tensor> {
        self.forward_at(x, Positions::From(start), bias, cache)
    }

    /// [`Model::forward`] with each row at its own positions.
    pub fn forward_at(
        &self,
        x: &Tensor,
        pos: Positions<'_>,
        bias: Option<&Tensor>,
        cache: Option<&mut Vec<LayerCache>>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Model::Llama(m) => m.forward(x, pos, bias, cache),
            Model::Gpt2(m) => m.forward(x, pos, bias, cache),
        }
    }

    /// Logits `[n, vocab]` of hidden states `[n, d]`.
    pub fn head(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let w = match self {
            Model::Llama(m) => &m.head,
            Model::Gpt2(m) => &m.head,
        };
        // the frozen-weight product (fused on the CPU: the input read in place, few-row kernels)
        Linear::new(w.clone(), None).forward(h)
    }

    /// Whether [`Model::decode_host`] runs this model on `device` in `dtype`.
    pub fn supports_host_decode(&self, device: &Device, dtype: DType) -> bool {
        matches!(self, Model::Llama(_)) && device.is_cpu() && dtype == DType::F32
    }

    /// One decode step of `rows` sequences, `x [rows, 1, d]` (each row's next input embedding,
    /// at position `caches[r].len`): [`Model::extend_host`] with one token per sequence.
    pub fn decode_host(
        &self,
        x: &Tensor,
        caches: &mut [&mut HostCache],
    ) -> candle_core::Result<Tensor> {
        let counts = vec![1; caches.len()];
        self.extend_host(x, &counts, caches)
    }

    /// Runs new tokens of several sequences over their [`HostCache`]s: `x [total, 1, d]` holds
    /// `counts[s]` consecutive rows for `caches[s]` (positions `caches[s].len..`, in order).
    /// Projections and MLP run over all rows as one batch (no padding); each row's keys and
    /// values are appended to its sequence's cache and the row attends causally over that
    /// cache where it is. Final-normed hidden states `[total, 1, d]`. On error every cache is
    /// left as it was. Llama, f32, CPU (see [`Model::supports_host_decode`]).
    pub fn extend_host(
        &self,
        x: &Tensor,
        counts: &[usize],
        caches: &mut [&mut HostCache],
    ) -> candle_core::Result<Tensor> {
        match self {
            Model::Llama(m) => m.extend_host(x, counts, caches),
            Model::Gpt2(_) => candle_core::bail!("host decoding runs Llama-family models only"),
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Model::Llama(m) => m.layers.len(),
            Model::Gpt2(m) => m.layers.len(),
        }
    }
}

impl LlamaLayer {
    fn weights(&self, c: &LlamaConfig) -> fused::LayerWeights {
        let owned = |l: &Linear| {
            let (w, b) = l.weights();
            (w.clone(), b.cloned())
        };
        fused::LayerWeights {
            input_norm: self.input_norm.clone(),
            qkv: owned(&self.qkv),
            o: owned(&self.o),
            post_norm: self.post_norm.clone(),
            gate_up: owned(&self.gate_up),
            down: owned(&self.down),
            eps: c.rms_norm_eps,
            heads: (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
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
        let head = head.unwrap_or_else(|| embed.clone());
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let n = llama_names(i);
            let (qo, kvo) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
            layers.push(LlamaLayer {
                input_norm: l.tensor(&n.input_norm, &[d])?,
                qkv: Linear::concat(&[
                    l.linear(&n.q, qo, d, c.qkv_bias)?,
                    l.linear(&n.k, kvo, d, c.qkv_bias)?,
                    l.linear(&n.v, kvo, d, c.qkv_bias)?,
                ])
                .map_err(to_core)?,
                o: l.linear(&n.o, d, qo, c.o_bias)?,
                post_norm: l.tensor(&n.post_norm, &[d])?,
                gate_up: Linear::concat(&[
                    l.linear(&n.gate, c.intermediate_size, d, c.mlp_bias)?,
                    l.linear(&n.up, c.intermediate_size, d, c.mlp_bias)?,
                ])
                .map_err(to_core)?,
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
        bias: Option<&Tensor>,
        mut cache: Option<&mut Vec<LayerCache>>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let (b, s, _) = x.dims3()?;
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (cos, sin) = rope_tables(&pos.ids(s), hd, c.rope_theta, x.dtype(), x.device())?;
        let (cos, sin) = match pos {
            Positions::From(_) => (cos, sin),
            Positions::PerRow(_) => (cos.reshape((b, s, hd))?, sin.reshape((b, s, hd))?),
        };
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            // training: token rows over the prompt's (tracked) cached keys/values run as one op
            // per layer; the cache is read, not extended (nothing reads it after a train step)
            let past = cache.as_deref().and_then(|c| c[i].clone());
            if let (Some((pk, pv)), Some(bias), Positions::From(_)) = (&past, bias, pos) {
                if pk.track_op() && fused::supported(pk) && pk.dtype() == x.dtype() {
                    let op = fused::TokenLayer {
                        w: layer.weights(c),
                        rope: (cos.clone(), sin.clone()),
                        bias: bias.contiguous()?,
                        saved: Default::default(),
                    };
                    x = x
                        .contiguous()?
                        .apply_op3(&pk.contiguous()?, &pv.contiguous()?, op)?;
                    continue;
                }
            }
            let hn = rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
            let qkv = layer.qkv.forward(&hn)?;
            let (q, mut k, mut v) = split_heads(&qkv, (h, kvh, hd), Some((&cos, &sin)))?;
            if let Some(cache) = cache.as_deref_mut() {
                (k, v) = extend_cache(&mut cache[i], k, v)?;
            }
            let att = attention(&q, &k, &v, bias)?;
            x = (x + layer.o.forward(&att)?)?;
            let hn = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
            let gu = layer.gate_up.forward(&hn)?;
            let mlp = swiglu(&gu)?;
            x = (x + layer.down.forward(&mlp)?)?;
        }
        rms_norm(&x, &self.norm, c.rms_norm_eps)
    }
}

impl Llama {
    fn extend_host(
        &self,
        x: &Tensor,
        counts: &[usize],
        caches: &mut [&mut HostCache],
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let (rows, one, _) = x.dims3()?;
        if one != 1 || counts.len() != caches.len() || counts.iter().sum::<usize>() != rows {
            candle_core::bail!(
                "extend_host: {rows} rows of {one} tokens for {} caches ({counts:?} tokens)",
                caches.len()
            );
        }
        let (kv, hd) = (c.num_key_value_heads, c.head_dim);
        if caches
            .iter()
            .any(|cache| cache.layers.len() != self.layers.len())
        {
            candle_core::bail!("extend_host: a cache for another number of layers");
        }
        let positions: Vec<usize> = caches
            .iter()
            .zip(counts)
            .flat_map(|(cache, &n)| cache.len..cache.len + n)
            .collect();
        let (cos, sin) = rope_tables(&positions, hd, c.rope_theta, DType::F32, x.device())?;
        let (cos, sin): (Vec<f32>, Vec<f32>) =
            (cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?);
        let result = self.extend_layers(x, counts, caches, (&cos, &sin));
        for (cache, n) in caches.iter_mut().zip(counts) {
            match result {
                Ok(_) => cache.len += n,
                Err(_) => cache.truncate(kv * hd),
            }
        }
        result
    }

    /// The layers of [`Llama::extend_host`]; `cos`/`sin` hold one `[hd]` row per input row.
    fn extend_layers(
        &self,
        x: &Tensor,
        counts: &[usize],
        caches: &mut [&mut HostCache],
        (cos, sin): (&[f32], &[f32]),
    ) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let c = &self.cfg;
        let rows = x.dim(0)?;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let width = (h + 2 * kv) * hd;
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let hn = rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
            let qkv: Vec<f32> = layer.qkv.forward(&hn)?.flatten_all()?.to_vec1()?;
            let mut att = vec![0f32; rows * h * hd];
            // each sequence's rows, in order (a row attends to the rows before it)
            let mut jobs = Vec::with_capacity(caches.len());
            let (mut q_rest, mut a_rest, mut first) = (qkv.as_slice(), att.as_mut_slice(), 0);
            for (cache, &n) in caches.iter_mut().zip(counts) {
                let (q, qr) = q_rest.split_at(n * width);
                let (a, ar) = std::mem::take(&mut a_rest).split_at_mut(n * h * hd);
                (q_rest, a_rest) = (qr, ar);
                jobs.push((&mut cache.layers[i], q, a, first));
                first += n;
            }
            jobs.into_par_iter().for_each(|((kc, vc), q, a, first)| {
                for (j, (row, out)) in q.chunks(width).zip(a.chunks_mut(h * hd)).enumerate() {
                    let t = (first + j) * hd;
                    let tables = (&cos[t..t + hd], &sin[t..t + hd]);
                    fused::decode_attention_row(row, (h, kv, hd), tables, (kc, vc), out);
                }
            });
            let att = Tensor::from_vec(att, (rows, 1, h * hd), x.device())?;
            x = (x + layer.o.forward(&att)?)?;
            let hn = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
            x = (x + layer.down.forward(&swiglu(&layer.gate_up.forward(&hn)?)?)?)?;
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
        let head = head.unwrap_or_else(|| wte.clone());
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
        bias: Option<&Tensor>,
        mut cache: Option<&mut Vec<LayerCache>>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let (b, s, d) = x.dims3()?;
        if pos.end(s) > c.n_positions {
            candle_core::bail!(
                "sequence of {} positions exceeds GPT-2's n_positions {}",
                pos.end(s),
                c.n_positions
            );
        }
        let (h, hd) = (c.n_head, d / c.n_head);
        let eps = c.layer_norm_epsilon;
        let mut x = match pos {
            Positions::From(start) => x.broadcast_add(&self.wpe.narrow(0, start, s)?)?,
            Positions::PerRow(_) => {
                let ids: Vec<u32> = pos.ids(s).iter().map(|p| *p as u32).collect();
                let ids = Tensor::from_vec(ids, b * s, x.device())?;
                (x + self.wpe.index_select(&ids, 0)?.reshape((b, s, d))?)?
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let hn = layer_norm(&x, &layer.ln_1.0, &layer.ln_1.1, eps)?;
            let qkv = layer.c_attn.forward(&hn)?;
            let (q, mut k, mut v) = split_heads(&qkv, (h, h, hd), None)?;
            if let Some(cache) = cache.as_deref_mut() {
                (k, v) = extend_cache(&mut cache[i], k, v)?;
            }
            let att = attention(&q, &k, &v, bias)?;
            x = (x + layer.c_proj.forward(&att)?)?;
            let hn = layer_norm(&x, &layer.ln_2.0, &layer.ln_2.1, eps)?;
            let up = layer.c_fc.forward(&hn)?;
            let act = match c.activation {
                Gpt2Activation::GeluTanh => up.gelu()?,
                Gpt2Activation::GeluErf => up.gelu_erf()?,
            };
            x = (x + layer.mlp_proj.forward(&act)?)?;
        }
        layer_norm(&x, &self.ln_f.0, &self.ln_f.1, eps)
    }
}
