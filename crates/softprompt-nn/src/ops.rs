//! The operations model code is written in.
//!
//! A runtime implements [`Ops`] once: a handful of kernels (frozen products, norms, rotary
//! positions, attention, element-wise and shape operations) over its own tensor type. Model
//! families ([`crate::models`]) are written against this trait only, so every runtime runs the
//! same model code: candle and libtorch compute with it, the ONNX graph builder records it.
//!
//! Provided methods are compositions of the required ones (splitting a fused projection into
//! heads, SwiGLU, self-attention over a cache); a runtime may override any of them with a fused
//! kernel that computes the same thing, and may take over a whole decoder block
//! ([`Ops::fused_block`]) or vision-transformer block ([`Ops::fused_vit_block`]).

use softprompt_core::{HostTensor, Positions, Result};

/// A frozen linear layer `y = x · Wᵀ + b`, `W` logically `[out, in]`. The runtime chose how `w`
/// is stored when it was loaded ([`Ops::linear_weight`]).
#[derive(Debug, Clone)]
pub struct Linear<T> {
    /// The weight, in the runtime's layout (for a quantized layer, whatever
    /// [`Ops::quantized_linear_weight`] made of it: its shape, not its values).
    pub w: T,
    /// The bias `[out]`, if any.
    pub b: Option<T>,
    /// The weight in GGUF blocks, when the runtime keeps it so ([`Ops::keeps_quantized`]).
    pub quant: Option<std::sync::Arc<softprompt_core::QuantMatrix>>,
}

/// Attention geometry: query heads, key/value heads (grouped-query attention when fewer) and the
/// width of one head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub q: usize,
    /// Key/value heads (`q` is a multiple of it).
    pub kv: usize,
    /// Width of one head.
    pub dim: usize,
}

impl Heads {
    /// Width of the fused q/k/v projection: `(q + 2·kv)·dim`.
    pub fn qkv_width(&self) -> usize {
        (self.q + 2 * self.kv) * self.dim
    }
}

/// Where the inputs of a pass sit in their sequences.
#[derive(Debug, Clone, Copy)]
pub enum PositionIds<'a, T> {
    /// Known on the host: `tokens` inputs per row starting where `positions` says.
    Host {
        /// Shared start or one start per row.
        positions: Positions<'a>,
        /// Inputs per row.
        tokens: usize,
    },
    /// A tensor of integer positions `[rows, tokens]` (an input of an exported graph).
    Tensor(&'a T),
}

impl<T> PositionIds<'_, T> {
    /// One past the last position, when known on the host.
    pub fn end(&self) -> Option<usize> {
        match self {
            PositionIds::Host { positions, tokens } => Some(positions.end(*tokens)),
            PositionIds::Tensor(_) => None,
        }
    }
}

/// Rotary-embedding tables for the positions of one pass (`cos`, `sin` in the runtime's layout,
/// broadcastable against `[rows, heads, tokens, head_dim]`), and the base they were built with.
#[derive(Debug, Clone)]
pub struct Rope<T> {
    /// `cos(position · inv_freq)`, each frequency twice (Hugging Face's half-split layout).
    pub cos: T,
    /// `sin(position · inv_freq)`.
    pub sin: T,
    /// RoPE base θ.
    pub theta: f64,
    /// Whether each row has its own positions (continuous batching) rather than shared ones.
    pub per_row: bool,
}

/// The two forms of GELU in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    Tanh,
    /// `0.5·x·(1 + erf(x/√2))`.
    Erf,
}

/// A pre-norm decoder block of the Llama family (RMSNorm, fused q/k/v with RoPE, grouped-query
/// attention, fused gate/up SwiGLU), as handed to [`Ops::fused_block`].
#[derive(Debug)]
pub struct PreNormBlock<'a, T> {
    /// RMSNorm before attention.
    pub input_norm: &'a T,
    /// q, k and v side by side.
    pub qkv: &'a Linear<T>,
    /// Attention output projection.
    pub o: &'a Linear<T>,
    /// RMSNorm before the MLP.
    pub post_norm: &'a T,
    /// Gate and up projections side by side.
    pub gate_up: &'a Linear<T>,
    /// Down projection.
    pub down: &'a Linear<T>,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Attention geometry.
    pub heads: Heads,
}

/// Keys and values of one layer, `[rows, kv_heads, positions, head_dim]`.
pub type KeyValue<T> = (T, T);

/// What one forward pass needs besides its input embeddings.
#[derive(Debug)]
pub struct Pass<'a, T> {
    /// Positions of the inputs.
    pub positions: PositionIds<'a, T>,
    /// Additive attention bias broadcastable to `[rows, 1, tokens, past + tokens]` (0 visible,
    /// [`softprompt_core::MASKED_BIAS`] hidden); `None`: every key is visible.
    pub bias: Option<&'a T>,
    /// The bias of sliding-window layers, for models that have them
    /// ([`softprompt_core::ModelConfig::sliding_window_mask`]); `None`: `bias`.
    pub window_bias: Option<&'a T>,
    /// Per-layer keys and values of earlier positions (`None` in a slot: nothing cached yet).
    pub cache: Option<&'a mut [Option<KeyValue<T>>]>,
    /// Whether the pass appends its keys and values to `cache` (inference) or only reads it
    /// (training over a prompt's keys and values, which nothing reads afterwards).
    pub extend_cache: bool,
}

impl<'a, T> Pass<'a, T> {
    /// A pass without cache or bias at `positions`.
    pub fn new(positions: PositionIds<'a, T>) -> Self {
        Pass {
            positions,
            bias: None,
            window_bias: None,
            cache: None,
            extend_cache: true,
        }
    }

    /// With an additive attention bias.
    pub fn with_bias(mut self, bias: &'a T) -> Self {
        self.bias = Some(bias);
        self
    }

    /// Over (and, with `extend`, appending to) `cache`.
    pub fn with_cache(mut self, cache: &'a mut [Option<KeyValue<T>>], extend: bool) -> Self {
        self.cache = Some(cache);
        self.extend_cache = extend;
        self
    }

    /// With the bias of sliding-window layers.
    pub fn with_window_bias(mut self, bias: &'a T) -> Self {
        self.window_bias = Some(bias);
        self
    }

    /// The bias of a layer: the sliding-window one for a local layer (when given).
    pub fn layer_bias(&self, sliding: bool) -> Option<&'a T> {
        if sliding {
            self.window_bias.or(self.bias)
        } else {
            self.bias
        }
    }

    /// The keys and values cached for `layer`, if any.
    pub fn past(&self, layer: usize) -> Option<&KeyValue<T>> {
        self.cache.as_deref().and_then(|c| c.get(layer)?.as_ref())
    }
}

/// The operations of a runtime. `Tensor` is whatever the runtime computes with (a candle or
/// libtorch tensor, or the name of a value in an ONNX graph being built).
///
/// Shapes follow the model code's conventions: activations `[rows, tokens, width]`, heads
/// `[rows, heads, tokens, head_dim]`. `reshape` takes ONNX's conventions (0 keeps that
/// dimension, -1 is inferred) so that a graph builder need not know dimensions.
pub trait Ops {
    /// The runtime's tensor (cheap to clone: a handle).
    type Tensor: Clone;

    /// A frozen weight (norm scales, biases, embedding tables) from the host.
    fn constant(&self, name: &str, value: HostTensor) -> Result<Self::Tensor>;

    /// The weight of a frozen linear layer, `[out, in]` on the host, in whatever layout
    /// [`Ops::linear`] wants (the default keeps `[out, in]`).
    fn linear_weight(&self, name: &str, value: HostTensor) -> Result<Self::Tensor> {
        self.constant(name, value)
    }

    /// Whether this runtime computes with weights kept in quantized blocks: the loader then
    /// hands it [`Linear::quant`] layers (through [`Ops::quantized_linear_weight`]) wherever
    /// the checkpoint has them.
    fn keeps_quantized(&self) -> bool {
        false
    }

    /// The runtime's stand-in for a quantized weight `[out, in]` (its `Linear::w`): what the
    /// layer's shape is read from. Only called when [`Ops::keeps_quantized`].
    fn quantized_linear_weight(
        &self,
        name: &str,
        q: &softprompt_core::QuantMatrix,
    ) -> Result<Self::Tensor> {
        let _ = q;
        Err(softprompt_core::Error::InvalidArgument(format!(
            "`{name}`: this runtime does not compute with quantized weights"
        )))
    }

    /// `x · Wᵀ + b` over the last dimension of `x`. Only the gradient with respect to `x` is
    /// ever needed: weights are frozen.
    fn linear(&self, x: &Self::Tensor, layer: &Linear<Self::Tensor>) -> Result<Self::Tensor>;

    /// `x · tableᵀ` for a table stored `[vocab, width]` (the output head, tied to the input
    /// embedding or not).
    fn head(&self, x: &Self::Tensor, table: &Self::Tensor) -> Result<Self::Tensor>;

    /// Rows of `table` at integer `ids` (any shape): `ids.shape ++ [width]`.
    fn embedding(&self, table: &Self::Tensor, ids: &Self::Tensor) -> Result<Self::Tensor>;

    /// [`Ops::embedding`] of a table that may be held in quantized blocks ([`Linear::quant`]):
    /// a runtime that keeps them overrides this.
    fn table_rows(&self, table: &Linear<Self::Tensor>, ids: &Self::Tensor) -> Result<Self::Tensor> {
        self.embedding(&table.w, ids)
    }

    /// [`Ops::head`] with a table that may be held in quantized blocks.
    fn table_head(&self, x: &Self::Tensor, table: &Linear<Self::Tensor>) -> Result<Self::Tensor> {
        self.head(x, &table.w)
    }

    /// `x / sqrt(mean(x²) + eps) · w` over the last dimension, in f32 or wider.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f64) -> Result<Self::Tensor>;

    /// `(x - mean) / sqrt(var + eps) · w + b` over the last dimension.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: &Self::Tensor,
        eps: f64,
    ) -> Result<Self::Tensor>;

    /// Rotary tables for `positions` (inverse frequencies and angles computed in f32, as
    /// Hugging Face does); `max_positions` bounds the positions a graph may see.
    fn rope_tables(
        &self,
        positions: &PositionIds<'_, Self::Tensor>,
        head_dim: usize,
        theta: f64,
        max_positions: usize,
    ) -> Result<Rope<Self::Tensor>>;

    /// `x·cos + rotate_half(x)·sin` on `[rows, heads, tokens, head_dim]`.
    fn rope(&self, x: &Self::Tensor, rope: &Rope<Self::Tensor>) -> Result<Self::Tensor>;

    /// Learned position embeddings: rows of `table` at `positions`, broadcastable against
    /// `[rows, tokens, width]`.
    fn position_rows(
        &self,
        table: &Self::Tensor,
        positions: &PositionIds<'_, Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// Scaled dot-product attention of `q [rows, h, s, hd]` over `k, v [rows, kv, t, hd]`
    /// (query head `j` reads key/value head `j / (h / kv)`), with an additive bias
    /// broadcastable to `[rows, 1, s, t]`, scaled by `1/√hd`. Returns `[rows, s, h·hd]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        heads: Heads,
    ) -> Result<Self::Tensor>;

    /// `a + b` (broadcasting).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// `a ⊙ b` (broadcasting).
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// `x · sigmoid(x)`.
    fn silu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// GELU of either form.
    fn gelu(&self, x: &Self::Tensor, form: Gelu) -> Result<Self::Tensor>;

    /// `len` entries of dimension `dim` from `start`.
    fn narrow(
        &self,
        x: &Self::Tensor,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Self::Tensor>;

    /// Concatenation along `dim`.
    fn cat(&self, xs: &[&Self::Tensor], dim: usize) -> Result<Self::Tensor>;

    /// Reshape with ONNX's conventions: 0 keeps the input's dimension, -1 is inferred.
    fn reshape(&self, x: &Self::Tensor, shape: &[i64]) -> Result<Self::Tensor>;

    /// Dimensions reordered: output dimension `i` is input dimension `perm[i]`.
    fn permute(&self, x: &Self::Tensor, perm: &[usize]) -> Result<Self::Tensor>;

    /// Splits a fused projection `[rows, s, (h + 2·kv)·hd]` into `q [rows, h, s, hd]` and
    /// `k, v [rows, kv, s, hd]`, rotating `q` and `k` when `rope` is given.
    fn split_heads(
        &self,
        qkv: &Self::Tensor,
        heads: Heads,
        rope: Option<&Rope<Self::Tensor>>,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let hd = heads.dim;
        let part = |from: usize, n: usize| -> Result<Self::Tensor> {
            let x = self.narrow(qkv, 2, from * hd, n * hd)?;
            let x = self.reshape(&x, &[0, 0, n as i64, hd as i64])?;
            self.permute(&x, &[0, 2, 1, 3])
        };
        let q = part(0, heads.q)?;
        let k = part(heads.q, heads.kv)?;
        let v = part(heads.q + heads.kv, heads.kv)?;
        match rope {
            None => Ok((q, k, v)),
            Some(r) => Ok((self.rope(&q, r)?, self.rope(&k, r)?, v)),
        }
    }

    /// `silu(a) ⊙ u` of a fused gate/up projection `[.., 2·i]` (`a` the first half).
    fn swiglu(&self, gate_up: &Self::Tensor, inner: usize) -> Result<Self::Tensor> {
        let a = self.narrow(gate_up, 2, 0, inner)?;
        let u = self.narrow(gate_up, 2, inner, inner)?;
        self.mul(&self.silu(&a)?, &u)
    }

    /// `gelu(a) ⊙ u` of a fused gate/up projection `[.., 2·i]` (`a` the first half): GeGLU.
    fn geglu(&self, gate_up: &Self::Tensor, inner: usize, form: Gelu) -> Result<Self::Tensor> {
        geglu_composed(self, gate_up, inner, form)
    }

    /// Self-attention of block `layer` from its fused projection: heads, rotary positions,
    /// the layer's cached keys and values (appended to when the pass extends its cache), and
    /// attention under the pass's bias. Returns `[rows, s, h·hd]`.
    fn self_attention(
        &self,
        qkv: &Self::Tensor,
        heads: Heads,
        rope: Option<&Rope<Self::Tensor>>,
        layer: usize,
        pass: &mut Pass<'_, Self::Tensor>,
    ) -> Result<Self::Tensor> {
        self_attention_composed(self, qkv, heads, rope, layer, pass)
    }

    /// A whole vision-transformer block ([`crate::models::VitBlock`]: LayerNorm, bidirectional
    /// attention over every row of `x [b, s, d]`, LayerScale, exact-GELU MLP) as one kernel,
    /// when the runtime has one: `Some` with the block's output, or `None` to run the
    /// composition. With `cls_only` (the last block, of which only the class token is read) the
    /// output may be each image's first row alone, `[b, 1, d]`. With `replace` (`[b, n, d]`:
    /// VPT-deep's prompt for this block) rows `1..1 + n` of every image are replaced by it
    /// before the block runs. The default has none.
    fn fused_vit_block(
        &self,
        _block: &crate::models::VitBlock<Self::Tensor>,
        _x: &Self::Tensor,
        _heads: Heads,
        _eps: f64,
        _cls_only: bool,
        _replace: Option<&Self::Tensor>,
    ) -> Result<Option<Self::Tensor>> {
        Ok(None)
    }

    /// A whole pre-norm block as one kernel, when the runtime has one for this pass: `Some`
    /// with the block's output (the residual stream after it), or `None` to run the
    /// composition. The default has none.
    fn fused_block(
        &self,
        _block: &PreNormBlock<'_, Self::Tensor>,
        _x: &Self::Tensor,
        _rope: &Rope<Self::Tensor>,
        _layer: usize,
        _pass: &Pass<'_, Self::Tensor>,
    ) -> Result<Option<Self::Tensor>> {
        Ok(None)
    }
}

/// [`Ops::geglu`] as the composition of [`Ops::narrow`], [`Ops::gelu`] and [`Ops::mul`].
pub fn geglu_composed<O: Ops + ?Sized>(
    ops: &O,
    gate_up: &O::Tensor,
    inner: usize,
    form: Gelu,
) -> Result<O::Tensor> {
    let a = ops.narrow(gate_up, 2, 0, inner)?;
    let u = ops.narrow(gate_up, 2, inner, inner)?;
    ops.mul(&ops.gelu(&a, form)?, &u)
}

/// [`Ops::self_attention`] as the composition of [`Ops::split_heads`] and [`attend_cached`] (for
/// overrides that fall back to it).
pub fn self_attention_composed<O: Ops + ?Sized>(
    ops: &O,
    qkv: &O::Tensor,
    heads: Heads,
    rope: Option<&Rope<O::Tensor>>,
    layer: usize,
    pass: &mut Pass<'_, O::Tensor>,
) -> Result<O::Tensor> {
    let (q, k, v) = ops.split_heads(qkv, heads, rope)?;
    let bias = pass.bias;
    attend_cached(ops, &q, k, v, heads, layer, pass, bias)
}

/// Attention of `q` over layer `layer`'s cached keys and values followed by `k`, `v` (appended
/// to the cache when the pass extends it), under `bias`. Returns `[rows, s, h·hd]`.
#[allow(clippy::too_many_arguments)]
pub fn attend_cached<O: Ops + ?Sized>(
    ops: &O,
    q: &O::Tensor,
    k: O::Tensor,
    v: O::Tensor,
    heads: Heads,
    layer: usize,
    pass: &mut Pass<'_, O::Tensor>,
    bias: Option<&O::Tensor>,
) -> Result<O::Tensor> {
    let (k, v) = match pass.past(layer) {
        Some((pk, pv)) => (ops.cat(&[pk, &k], 2)?, ops.cat(&[pv, &v], 2)?),
        None => (k, v),
    };
    if pass.extend_cache {
        if let Some(slot) = pass.cache.as_deref_mut().and_then(|c| c.get_mut(layer)) {
            *slot = Some((k.clone(), v.clone()));
        }
    }
    ops.attention(q, &k, &v, bias, heads)
}
