//! The shared model code ([`softprompt_nn::Model`]) on candle tensors, and the per-sequence
//! host caches of continuous batching on the CPU.

use candle_core::{DType, Device, Tensor};
use softprompt_core::{ModelConfig, ModelWeights, Positions};
use softprompt_nn::{Pass, PositionIds};

use crate::runtime::{CandleOps, HostPass};
use crate::{CResult, Result};

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
    pub(crate) fn truncate(&mut self, width: usize) {
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

/// The additive attention biases of a pass: the full-attention layers', and the sliding-window
/// layers' when the model has them.
#[derive(Debug, Clone)]
pub struct Bias {
    pub global: Tensor,
    pub window: Option<Tensor>,
}

/// A frozen decoder of any family on one device in one dtype.
pub struct Model {
    nn: softprompt_nn::Model<Tensor>,
    device: Device,
    dtype: DType,
    /// Decode steps round their activations to 8 bits before quantized weights (see
    /// [`crate::CandleOptions::with_int8_decode`]).
    pub(crate) int8_decode: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Model({} layers)", self.nn.num_layers())
    }
}

impl Model {
    pub fn load(
        config: &ModelConfig,
        mut weights: ModelWeights,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut ops = CandleOps::new(device, dtype);
        // projection weights a GGUF file's loader kept in blocks stay so where the kernels run
        ops.quantized = weights.quantized_bytes() > 0;
        Ok(Model {
            nn: softprompt_nn::Model::load(&ops, config, &mut weights)?,
            device: device.clone(),
            dtype,
            int8_decode: false,
        })
    }

    fn ops(&self) -> CandleOps<'static> {
        CandleOps::new(&self.device, self.dtype)
    }

    /// The ops of a decode step (one new token per sequence).
    fn step_ops(&self) -> CandleOps<'static> {
        let mut ops = self.ops();
        ops.int8_rows = self.int8_decode;
        ops
    }

    /// Token embeddings of `ids` (u32, any shape) as `ids.shape ++ [d]`.
    pub fn embed(&self, ids: &Tensor) -> CResult<Tensor> {
        Ok(self.nn.embed(&self.ops(), ids)?)
    }

    /// The residual stream after every block for input embeddings `x [b, s, d]` at positions
    /// `start..`, over (and, with `extend`, appending to) `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        start: usize,
        bias: Option<&Bias>,
        cache: Option<(&mut [LayerCache], bool)>,
    ) -> CResult<Tensor> {
        self.forward_at(x, Positions::From(start), bias, cache)
    }

    /// [`Model::forward`] with each row at its own positions.
    pub fn forward_at(
        &self,
        x: &Tensor,
        positions: Positions<'_>,
        bias: Option<&Bias>,
        cache: Option<(&mut [LayerCache], bool)>,
    ) -> CResult<Tensor> {
        self.forward_with(&self.ops(), x, positions, bias, cache)
    }

    /// [`Model::forward_at`] for a decode step: one new token per row.
    pub fn forward_step(
        &self,
        x: &Tensor,
        positions: Positions<'_>,
        bias: Option<&Bias>,
        cache: Option<(&mut [LayerCache], bool)>,
    ) -> CResult<Tensor> {
        self.forward_with(&self.step_ops(), x, positions, bias, cache)
    }

    fn forward_with(
        &self,
        ops: &CandleOps<'_>,
        x: &Tensor,
        positions: Positions<'_>,
        bias: Option<&Bias>,
        cache: Option<(&mut [LayerCache], bool)>,
    ) -> CResult<Tensor> {
        let tokens = x.dim(1)?;
        let mut pass = Pass::new(PositionIds::Host { positions, tokens });
        pass.bias = bias.map(|b| &b.global);
        pass.window_bias = bias.and_then(|b| b.window.as_ref());
        if let Some((cache, extend)) = cache {
            pass = pass.with_cache(cache, extend);
        }
        Ok(self.nn.forward(ops, x, &mut pass)?)
    }

    /// Logits `[n, vocab]` of residual-stream rows `[n, d]` (final norm and head).
    pub fn head(&self, h: &Tensor) -> CResult<Tensor> {
        Ok(self.nn.logits(&self.ops(), h)?)
    }

    /// [`Model::head`] for a decode step's rows.
    pub fn head_step(&self, h: &Tensor) -> CResult<Tensor> {
        Ok(self.nn.logits(&self.step_ops(), h)?)
    }

    /// Whether [`Model::extend_host`] runs this model on `device` in `dtype`.
    pub fn supports_host_decode(&self, device: &Device, dtype: DType) -> bool {
        // the host caches' attention has no sliding window
        matches!(&self.nn, softprompt_nn::Model::Llama(m) if m.cfg.sliding_window.is_none())
            && device.is_cpu()
            && dtype == DType::F32
    }

    /// One decode step of `rows` sequences, `x [rows, 1, d]` (each row's next input embedding,
    /// at position `caches[r].len`): [`Model::extend_host`] with one token per sequence.
    pub fn decode_host(&self, x: &Tensor, caches: &mut [&mut HostCache]) -> CResult<Tensor> {
        let counts = vec![1; caches.len()];
        self.extend_host_with(x, &counts, caches, self.int8_decode)
    }

    /// Runs new tokens of several sequences over their [`HostCache`]s: `x [total, 1, d]` holds
    /// `counts[s]` consecutive rows for `caches[s]` (positions `caches[s].len..`, in order).
    /// Projections and MLP run over all rows as one batch (no padding); each row's keys and
    /// values are appended to its sequence's cache and the row attends causally over that
    /// cache where it is. The residual stream `[total, 1, d]`. On error every cache is left as
    /// it was. Llama family, f32, CPU (see [`Model::supports_host_decode`]).
    pub fn extend_host(
        &self,
        x: &Tensor,
        counts: &[usize],
        caches: &mut [&mut HostCache],
    ) -> CResult<Tensor> {
        self.extend_host_with(x, counts, caches, false)
    }

    fn extend_host_with(
        &self,
        x: &Tensor,
        counts: &[usize],
        caches: &mut [&mut HostCache],
        int8_rows: bool,
    ) -> CResult<Tensor> {
        let (rows, one, _) = x.dims3()?;
        if one != 1 || counts.len() != caches.len() || counts.iter().sum::<usize>() != rows {
            return Err(candle_core::Error::Msg(format!(
                "extend_host: {rows} rows of {one} tokens for {} caches ({counts:?} tokens)",
                caches.len()
            ))
            .into());
        }
        if !self.supports_host_decode(&self.device, self.dtype) {
            return Err(candle_core::Error::Msg(
                "host decoding runs Llama-family models in f32 on the CPU only".into(),
            )
            .into());
        }
        let layers = self.nn.num_layers();
        if caches.iter().any(|cache| cache.layers.len() != layers) {
            return Err(candle_core::Error::Msg(
                "extend_host: a cache for another number of layers".into(),
            )
            .into());
        }
        let heads = self.nn.heads();
        let positions: Vec<usize> = caches
            .iter()
            .zip(counts)
            .flat_map(|(cache, &n)| cache.len..cache.len + n)
            .collect();
        let result = {
            let own: Vec<&mut HostCache> = caches.iter_mut().map(|c| &mut **c).collect();
            let mut ops = CandleOps::with_host(
                &self.device,
                self.dtype,
                HostPass::new(own, counts.to_vec()),
            );
            ops.int8_rows = int8_rows;
            let mut pass = Pass::new(PositionIds::Host {
                positions: Positions::PerRow(&positions),
                tokens: 1,
            });
            self.nn.forward(&ops, x, &mut pass)
        };
        for (cache, n) in caches.iter_mut().zip(counts) {
            match result {
                Ok(_) => cache.len += n,
                Err(_) => cache.truncate(heads.kv * heads.dim),
            }
        }
        Ok(result?)
    }

    pub fn num_layers(&self) -> usize {
        self.nn.num_layers()
    }

    /// Attention geometry of every block.
    pub fn heads(&self) -> softprompt_nn::Heads {
        self.nn.heads()
    }
}
