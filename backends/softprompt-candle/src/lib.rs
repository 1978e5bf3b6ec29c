//! The candle backend of softprompt: pure Rust, CPU by default, CUDA behind the `cuda` feature.
//!
//! Implements [`Backbone`] with gradients with respect to the prompt (candle autograd over
//! differentiable ops only), per-row prompts, rank-classification scores and KV-cached decoding.

mod fused;
mod model;
pub mod ops;
mod runtime;

use std::collections::BTreeMap;
use std::path::Path;

pub use candle_core::{DType, Device};
use candle_core::{Tensor, Var};
use softprompt_core::backbone::{check_next_token, check_prompts};
use softprompt_core::decode::check_step;
use softprompt_core::model::ModelSource;
use softprompt_core::{
    causal_bias, input_rows, prompt_slots, Backbone, BackboneSpec, Batch, BatchDecoder,
    Capabilities, DecodeSession, Error, LossAndGrad, ModelConfig, Positions, PrefixCache,
    RowScores, SeqId, SoftPrompt, MASKED_BIAS,
};

use crate::model::{HostCache, LayerCache, Model};

/// Result with softprompt's error type.
pub type Result<T> = softprompt_core::Result<T>;

const BACKEND: &str = "candle";

/// A failure inside the backend: candle's own, or softprompt's from the shared model code.
#[derive(Debug)]
pub(crate) enum Fail {
    Candle(candle_core::Error),
    Core(Error),
}

impl From<candle_core::Error> for Fail {
    fn from(e: candle_core::Error) -> Self {
        Fail::Candle(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Core(e)
    }
}

impl From<Fail> for Error {
    fn from(e: Fail) -> Self {
        match e {
            Fail::Candle(e) => Error::backend(BACKEND, e),
            Fail::Core(e) => e,
        }
    }
}

/// Result of code that mixes candle calls and the shared model code.
pub(crate) type CResult<T> = std::result::Result<T, Fail>;

pub(crate) fn to_core(e: impl Into<Fail>) -> Error {
    e.into().into()
}

/// Parses `cpu` or `cuda:N` (`cuda` means `cuda:0`).
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s.strip_prefix("cuda:").unwrap_or("0");
            let ordinal: usize = ordinal.parse().map_err(|_| {
                Error::InvalidArgument(format!("bad CUDA device `{s}`: expected cuda:N"))
            })?;
            cuda_device(ordinal)
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown device `{other}`: expected cpu or cuda:N"
        ))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(to_core)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    Err(Error::unsupported(
        BACKEND,
        "CUDA devices",
        Some("rebuild with the `cuda` Cargo feature (softprompt/cuda)"),
    ))
}

/// How to load a backbone.
#[derive(Debug, Clone)]
pub struct CandleOptions {
    device: Device,
    dtype: DType,
}

impl Default for CandleOptions {
    fn default() -> Self {
        CandleOptions {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

impl CandleOptions {
    /// CPU, f32.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs on `device`.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Stores the frozen weights and computes in `dtype` (f32 default; f64 for exact
    /// gradient checks; bf16/f16 to save memory). Prompts and gradients stay f32 on the host.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }
}

/// A frozen Llama-family or GPT-2 model on candle.
#[derive(Debug)]
pub struct CandleBackbone {
    model: Model,
    config: ModelConfig,
    spec: BackboneSpec,
    device: Device,
    dtype: DType,
    /// Keys and values of recently computed prompts (inference only): a prompt seen before is
    /// not run through the model again.
    prefixes: std::sync::Mutex<PrefixCache<Vec<KeyValue>>>,
}

/// Prompts kept in the prefix cache (about 0.9 MB each for SmolLM2-135M with 20 tokens).
const PREFIX_CACHE_ENTRIES: usize = 64;

/// Embedded inputs of a batch: `[rows, N + seq_len, d]` and the attention bias `[rows, 1, S, S]`.
struct Inputs {
    x: Tensor,
    bias: Tensor,
}

impl CandleBackbone {
    /// Loads a Hugging Face model directory.
    pub fn load(path: impl AsRef<Path>, options: CandleOptions) -> Result<Self> {
        Self::from_source(ModelSource::load(path)?, options)
    }

    /// Builds the backbone from an already read model description.
    pub fn from_source(source: ModelSource, options: CandleOptions) -> Result<Self> {
        let ModelSource {
            config,
            weights,
            spec,
            ..
        } = source;
        let model = Model::load(&config, weights, &options.device, options.dtype)?;
        Ok(CandleBackbone {
            model,
            config,
            spec,
            device: options.device,
            dtype: options.dtype,
            prefixes: std::sync::Mutex::new(PrefixCache::new(PREFIX_CACHE_ENTRIES)),
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn prompts_tensor(&self, prompts: &[SoftPrompt], n: usize) -> Result<Tensor> {
        let d = self.spec.hidden_size;
        let values: Vec<f32> = prompts
            .iter()
            .flat_map(|p| p.values().iter().copied())
            .collect();
        Tensor::from_vec(values, (prompts.len(), n, d), &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(to_core)
    }

    /// Log-softmax runs in f32, or f64 when the weights are f64 (bf16/f16 logits are upcast).
    fn score_dtype(&self) -> DType {
        if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Errors on the first id outside the vocabulary.
    fn check_ids(&self, ids: impl IntoIterator<Item = u32>) -> Result<()> {
        softprompt_core::backbone::check_token_ids(ids, self.spec.vocab_size)
    }

    fn check_length(&self, positions: usize) -> Result<()> {
        let max = self.config.max_positions();
        if positions > max {
            return Err(Error::InvalidBatch(format!(
                "{positions} positions (virtual tokens included) exceed the model's maximum of {max}"
            )));
        }
        Ok(())
    }

    /// `[prompt rows][token embeddings]` and the causal + padding bias.
    fn inputs(&self, prompts: &Tensor, batch: &Batch, n: usize) -> CResult<Inputs> {
        let (rows, t) = (batch.rows(), batch.seq_len());
        let s = n + t;
        let ids = Tensor::from_slice(batch.input_ids(), rows * t, &self.device)?;
        let tok = self
            .model
            .embed(&ids)?
            .reshape((rows, t, self.spec.hidden_size))?;
        let x = if n == 0 {
            tok
        } else {
            let idx: Vec<u32> = batch.prompt_index().iter().map(|p| *p as u32).collect();
            let idx = Tensor::from_vec(idx, rows, &self.device)?;
            Tensor::cat(&[&prompts.index_select(&idx, 0)?, &tok], 1)?
        };
        let bias = Tensor::from_vec(batch.attention_bias(n), (rows, 1, s, s), &self.device)?
            .to_dtype(self.dtype)?;
        Ok(Inputs { x, bias })
    }

    /// Per-layer keys and values of each row's prompt, `[rows, heads, N, head_dim]`: each
    /// distinct prompt is run once (`[P, N, d]` in one pass) and rows gather their prompt's
    /// cache. With `host` (inference) prompts are looked up in, and added to, the prefix cache.
    fn prompt_kv(
        &self,
        prompts: &Tensor,
        host: Option<&[SoftPrompt]>,
        idx: &[u32],
        n: usize,
    ) -> CResult<Vec<LayerCache>> {
        let layers = self.model.num_layers();
        let causal = Tensor::from_vec(causal_bias(n, n), (1, 1, n, n), &self.device)?
            .to_dtype(self.dtype)?;
        let mut per_prompt: Vec<Option<Vec<KeyValue>>> = vec![None; prompts.dim(0)?];
        if let Some(host) = host {
            let cache = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
            for (slot, p) in per_prompt.iter_mut().zip(host) {
                *slot = cache.get(p).cloned();
            }
        }
        let missing: Vec<usize> = (0..per_prompt.len())
            .filter(|i| per_prompt[*i].is_none())
            .collect();
        if !missing.is_empty() {
            let sel: Vec<u32> = missing.iter().map(|i| *i as u32).collect();
            let sel = Tensor::from_vec(sel, missing.len(), &self.device)?;
            let mut fresh: Vec<LayerCache> = vec![None; layers];
            self.model.forward(
                &prompts.index_select(&sel, 0)?,
                0,
                Some(&causal),
                Some((&mut fresh, true)),
            )?;
            let fresh: Vec<KeyValue> = fresh.into_iter().flatten().collect();
            for (j, i) in missing.iter().enumerate() {
                let kv = fresh
                    .iter()
                    .map(|(k, v)| Ok((k.narrow(0, j, 1)?, v.narrow(0, j, 1)?)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                per_prompt[*i] = Some(kv);
            }
            if let Some(host) = host {
                let mut cache = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
                for i in &missing {
                    let kv: Vec<KeyValue> = per_prompt[*i]
                        .as_ref()
                        .expect("filled above")
                        .iter()
                        .map(|(k, v)| Ok((k.contiguous()?, v.contiguous()?)))
                        .collect::<candle_core::Result<_>>()?;
                    cache.insert(&host[*i], kv);
                }
            }
        }
        let per_prompt: Vec<Vec<KeyValue>> = per_prompt.into_iter().flatten().collect();
        let idx = Tensor::from_slice(idx, idx.len(), &self.device)?;
        (0..layers)
            .map(|l| {
                let ks: Vec<&Tensor> = per_prompt.iter().map(|kv| &kv[l].0).collect();
                let vs: Vec<&Tensor> = per_prompt.iter().map(|kv| &kv[l].1).collect();
                Ok(Some((
                    Tensor::cat(&ks, 0)?.index_select(&idx, 0)?,
                    Tensor::cat(&vs, 0)?.index_select(&idx, 0)?,
                )))
            })
            .collect()
    }

    /// Hidden states at the token positions, `[rows, T, d]`, computing each distinct prompt's
    /// keys and values once (see [`Self::prompt_kv`]) and letting every row attend to its
    /// prompt's cache: the virtual tokens are not recomputed per row. Exact: the same attention
    /// over the same keys, only the work is shared. Returns the cache too (`[rows, heads, N + T,
    /// head_dim]` per layer).
    fn token_hidden(
        &self,
        prompts: &Tensor,
        host: Option<&[SoftPrompt]>,
        batch: &Batch,
        n: usize,
        extend: bool,
    ) -> CResult<(Tensor, Vec<LayerCache>)> {
        let (rows, t) = (batch.rows(), batch.seq_len());
        let s = n + t;
        let mut cache: Vec<LayerCache> = if n > 0 {
            let idx: Vec<u32> = batch.prompt_index().iter().map(|p| *p as u32).collect();
            self.prompt_kv(prompts, host, &idx, n)?
        } else {
            vec![None; self.model.num_layers()]
        };
        let ids = Tensor::from_slice(batch.input_ids(), rows * t, &self.device)?;
        let tok = self
            .model
            .embed(&ids)?
            .reshape((rows, t, self.spec.hidden_size))?;
        let bias = Tensor::from_vec(batch.token_attention_bias(n), (rows, 1, t, s), &self.device)?
            .to_dtype(self.dtype)?;
        let hidden = self
            .model
            .forward(&tok, n, Some(&bias), Some((&mut cache, extend)))?;
        Ok((hidden, cache))
    }

    /// Log-probabilities of every target token, in `batch.targets()` order (differentiable).
    fn target_logprobs(
        &self,
        prompts: &Tensor,
        host: Option<&[SoftPrompt]>,
        batch: &Batch,
        n: usize,
    ) -> Result<(Tensor, Vec<usize>)> {
        let targets = batch.targets(n)?;
        if targets.is_empty() {
            return Err(Error::InvalidBatch("the batch has no target tokens".into()));
        }
        let (t, s) = (batch.seq_len(), n + batch.seq_len());
        let d = self.spec.hidden_size;
        // every target predicted from a token position: share the prompt pass across rows
        let shared = targets.iter().all(|(_, _, pos)| *pos >= n);
        let run = || -> CResult<Tensor> {
            let (flat, at): (Tensor, Vec<u32>) = if shared {
                let (hidden, _) = self.token_hidden(prompts, host, batch, n, false)?;
                let at = targets.iter().map(|(r, _, pos)| (r * t + pos - n) as u32);
                (hidden.reshape((batch.rows() * t, d))?, at.collect())
            } else {
                let inputs = self.inputs(prompts, batch, n)?;
                let hidden = self.model.forward(&inputs.x, 0, Some(&inputs.bias), None)?;
                let at = targets.iter().map(|(r, _, pos)| (r * s + pos) as u32);
                (hidden.reshape((batch.rows() * s, d))?, at.collect())
            };
            // the head runs only where a target is predicted
            let at = Tensor::from_vec(at, targets.len(), &self.device)?;
            let logits = self.model.head(&flat.index_select(&at, 0)?)?;
            let logp = ops::log_softmax_last(&logits.to_dtype(self.score_dtype())?)?;
            let ids: Vec<u32> = targets
                .iter()
                .map(|(r, t, _)| batch.input_ids()[r * batch.seq_len() + t])
                .collect();
            let ids = Tensor::from_vec(ids, (targets.len(), 1), &self.device)?;
            Ok(logp.gather(&ids, 1)?.squeeze(1)?)
        };
        let rows = targets.iter().map(|(r, _, _)| *r).collect();
        Ok((run().map_err(to_core)?, rows))
    }
}

impl Backbone for CandleBackbone {
    fn backend_name(&self) -> &str {
        BACKEND
    }

    fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            gradients: true,
            generation: true,
        }
    }

    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids.iter().copied())?;
        let ids = Tensor::from_slice(ids, ids.len(), &self.device).map_err(to_core)?;
        let run = || -> CResult<Vec<f32>> {
            Ok(self
                .model
                .embed(&ids)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        run().map_err(to_core)
    }

    fn score(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<RowScores> {
        let n = check_prompts(prompts, &self.spec, batch)?;
        self.check_length(n + batch.seq_len())?;
        let p = self.prompts_tensor(prompts, n)?;
        let (logp, rows) = self.target_logprobs(&p, Some(prompts), batch, n)?;
        let logp: Vec<f64> = logp
            .to_dtype(DType::F64)
            .and_then(|t| t.to_vec1())
            .map_err(to_core)?;
        let mut scores = RowScores {
            logprob_sum: vec![0.0; batch.rows()],
            num_targets: vec![0; batch.rows()],
        };
        for (lp, r) in logp.iter().zip(rows) {
            scores.logprob_sum[r] += lp;
            scores.num_targets[r] += 1;
        }
        Ok(scores)
    }

    fn next_token_logprobs(
        &self,
        prompts: &[SoftPrompt],
        batch: &Batch,
        candidates: &[u32],
    ) -> Result<Vec<Vec<f64>>> {
        let n = check_next_token(prompts, &self.spec, batch, candidates)?;
        self.check_length(n + batch.seq_len())?;
        if self.host_path() && (0..batch.rows()).all(|r| batch.row_len(r) > 0) {
            return self.next_token_logprobs_host(prompts, batch, candidates);
        }
        let p = self.prompts_tensor(prompts, n)?;
        let (t, s) = (batch.seq_len(), n + batch.seq_len());
        let d = self.spec.hidden_size;
        let run = || -> CResult<Vec<f32>> {
            // only each row's last real position goes through the head
            let (flat, at): (Tensor, Vec<u32>) = if (0..batch.rows()).all(|r| batch.row_len(r) > 0)
            {
                let (hidden, _) = self.token_hidden(&p, Some(prompts), batch, n, false)?;
                let at = (0..batch.rows()).map(|r| (r * t + batch.row_len(r) - 1) as u32);
                (hidden.reshape((batch.rows() * t, d))?, at.collect())
            } else {
                // a row made of its prompt alone: the full pass
                let inputs = self.inputs(&p, batch, n)?;
                let hidden = self.model.forward(&inputs.x, 0, Some(&inputs.bias), None)?;
                let at = (0..batch.rows()).map(|r| (r * s + n + batch.row_len(r) - 1) as u32);
                (hidden.reshape((batch.rows() * s, d))?, at.collect())
            };
            let at = Tensor::from_vec(at, batch.rows(), &self.device)?;
            let logits = self
                .model
                .head(&flat.index_select(&at, 0)?)?
                .to_dtype(DType::F32)?;
            let logp = ops::log_softmax_last(&logits)?;
            let cand = Tensor::from_slice(candidates, candidates.len(), &self.device)?;
            Ok(logp.index_select(&cand, 1)?.flatten_all()?.to_vec1()?)
        };
        let flat = run().map_err(to_core)?;
        Ok(flat
            .chunks(candidates.len().max(1))
            .map(|c| c.iter().map(|x| *x as f64).collect())
            .collect())
    }

    fn loss_and_grad(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<LossAndGrad> {
        let n = check_prompts(prompts, &self.spec, batch)?;
        self.check_length(n + batch.seq_len())?;
        if n == 0 {
            return Err(Error::InvalidArgument(
                "a prompt of zero virtual tokens has no gradient".into(),
            ));
        }
        let var = Var::from_tensor(&self.prompts_tensor(prompts, n)?).map_err(to_core)?;
        let (logp, _) = self.target_logprobs(var.as_tensor(), None, batch, n)?;
        let count = logp.dim(0).map_err(to_core)?;
        let run = || -> CResult<(f32, Vec<f32>)> {
            let loss = (logp.sum_all()?.neg()? / count as f64)?;
            let grads = loss.backward()?;
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("no gradient reached the prompt".into()))?;
            let loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            Ok((
                loss,
                g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            ))
        };
        let (loss, flat) = run().map_err(to_core)?;
        let per = n * self.spec.hidden_size;
        let grads = flat.chunks(per).map(<[f32]>::to_vec).collect();
        Ok(LossAndGrad { loss, grads })
    }

    fn logits(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<Vec<f32>> {
        let n = check_prompts(prompts, &self.spec, batch)?;
        self.check_length(n + batch.seq_len())?;
        let p = self.prompts_tensor(prompts, n)?;
        let run = || -> CResult<Vec<f32>> {
            let inputs = self.inputs(&p, batch, n)?;
            let hidden = self.model.forward(&inputs.x, 0, Some(&inputs.bias), None)?;
            let (b, s, d) = hidden.dims3()?;
            let logits = self.model.head(&hidden.reshape((b * s, d))?)?;
            Ok(logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        run().map_err(to_core)
    }

    fn start_decode<'a>(
        &'a self,
        prompt: &SoftPrompt,
        ids: &[u32],
    ) -> Result<Box<dyn DecodeSession + 'a>> {
        Ok(Box::new(self.prefill(prompt, ids)?))
    }

    fn batch_decoder(&self) -> Option<Box<dyn BatchDecoder + '_>> {
        Some(Box::new(CandleBatchDecoder {
            backbone: self,
            next_id: 0,
            host: self.model.supports_host_decode(&self.device, self.dtype),
            seqs: BTreeMap::new(),
        }))
    }
}

impl CandleBackbone {
    /// [`Backbone::next_token_logprobs`] on the host path (checked by the caller): every row's
    /// tokens run packed over a copy of its prompt's keys and values, so a batch of rows of
    /// different lengths costs its real tokens, not `rows × longest`.
    fn next_token_logprobs_host(
        &self,
        prompts: &[SoftPrompt],
        batch: &Batch,
        candidates: &[u32],
    ) -> Result<Vec<Vec<f64>>> {
        let t = batch.seq_len();
        let of_row: Vec<&SoftPrompt> = batch.prompt_index().iter().map(|p| &prompts[*p]).collect();
        let mut caches = self.host_prefixes(&of_row)?;
        let inputs: Vec<&[u32]> = (0..batch.rows())
            .map(|r| &batch.input_ids()[r * t..r * t + batch.row_len(r)])
            .collect();
        let mut own: Vec<&mut HostCache> = caches.iter_mut().collect();
        let logits = self.host_extend_last(&inputs, &mut own)?;
        // the same log-softmax and gather as the padded path
        let cand =
            Tensor::from_slice(candidates, candidates.len(), &self.device).map_err(to_core)?;
        let lp: Vec<Vec<f32>> = ops::log_softmax_last(&logits)
            .and_then(|lp| lp.index_select(&cand, 1)?.to_vec2())
            .map_err(to_core)?;
        Ok(lp
            .into_iter()
            .map(|row| row.into_iter().map(f64::from).collect())
            .collect())
    }

    /// Whether inference runs through [`Model::extend_host`] (packed rows over host caches).
    fn host_path(&self) -> bool {
        self.model.supports_host_decode(&self.device, self.dtype)
    }

    /// A [`HostCache`] holding each listed prompt's keys and values (its virtual tokens): from the
    /// prefix cache, or one pass per prompt length over the distinct prompts not in it.
    fn host_prefixes(&self, prompts: &[&SoftPrompt]) -> Result<Vec<HostCache>> {
        let layers = self.model.num_layers();
        let (distinct, prompt_of) = prompt_slots(prompts.iter().copied());
        let mut prefixes: Vec<HostCache> = vec![HostCache::empty(layers); distinct.len()];
        let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (j, p) in distinct.iter().enumerate() {
            if p.num_virtual_tokens() > 0 {
                by_len.entry(p.num_virtual_tokens()).or_default().push(j);
            }
        }
        for (n, members) in by_len {
            let group: Vec<SoftPrompt> = members.iter().map(|j| distinct[*j].clone()).collect();
            let p = self.prompts_tensor(&group, n)?;
            let idx: Vec<u32> = (0..group.len() as u32).collect();
            let kv = self.prompt_kv(&p, Some(&group), &idx, n).map_err(to_core)?;
            for (r, j) in members.iter().enumerate() {
                let own = kv
                    .iter()
                    .map(|slot| {
                        let (k, v) = slot.as_ref().expect("prompt_kv fills every layer");
                        Ok(Some((k.narrow(0, r, 1)?, v.narrow(0, r, 1)?)))
                    })
                    .collect::<candle_core::Result<Vec<LayerCache>>>()
                    .map_err(to_core)?;
                prefixes[*j] = HostCache::from_tensors(&own, n).map_err(to_core)?;
            }
        }
        Ok(prompt_of.iter().map(|j| prefixes[*j].clone()).collect())
    }

    /// Runs each sequence's `inputs` (non-empty) over its cache, packed (no padding), up to
    /// [`PREFILL_TOKENS`] tokens per pass: the logits after each sequence's last input token,
    /// `[sequences, vocab]` f32.
    fn host_extend_last(&self, inputs: &[&[u32]], caches: &mut [&mut HostCache]) -> Result<Tensor> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < inputs.len() {
            // sequences up to the token budget (at least one)
            let mut end = at + 1;
            let mut tokens = inputs[at].len();
            while end < inputs.len() && tokens + inputs[end].len() <= PREFILL_TOKENS {
                tokens += inputs[end].len();
                end += 1;
            }
            let ids: Vec<u32> = inputs[at..end].concat();
            let counts: Vec<usize> = inputs[at..end].iter().map(|i| i.len()).collect();
            let run = |caches: &mut [&mut HostCache]| -> CResult<Tensor> {
                let total = ids.len();
                let x = self
                    .model
                    .embed(&Tensor::from_slice(&ids, total, &self.device)?)?
                    .reshape((total, 1, self.spec.hidden_size))?;
                let h = self.model.extend_host(&x, &counts, caches)?;
                let last: Vec<u32> = counts
                    .iter()
                    .scan(0u32, |end, n| {
                        *end += *n as u32;
                        Some(*end - 1)
                    })
                    .collect();
                let last = Tensor::from_vec(last, counts.len(), &self.device)?;
                Ok(self
                    .model
                    .head(
                        &h.reshape((total, self.spec.hidden_size))?
                            .index_select(&last, 0)?,
                    )?
                    .to_dtype(DType::F32)?)
            };
            out.push(run(&mut caches[at..end]).map_err(to_core)?);
            at = end;
        }
        if out.is_empty() {
            let shape = (0, self.spec.vocab_size);
            return Tensor::zeros(shape, DType::F32, &self.device).map_err(to_core);
        }
        Tensor::cat(&out, 0).map_err(to_core)
    }

    /// Runs `[prompt][ids]` through the model, keeping its keys and values.
    fn prefill(&self, prompt: &SoftPrompt, ids: &[u32]) -> Result<CandleDecode<'_>> {
        prompt.check_hidden_size(self.spec.hidden_size)?;
        let n = prompt.num_virtual_tokens();
        if n + ids.len() == 0 {
            return Err(Error::InvalidArgument(
                "generation needs a prompt or at least one input token".into(),
            ));
        }
        self.check_length(n + ids.len())?;
        let mut session = CandleDecode {
            backbone: self,
            cache: vec![None; self.model.num_layers()],
            position: 0,
            logits: Vec::new(),
        };
        let batch = Batch::from_rows(
            &[softprompt_core::BatchRow {
                ids: ids.to_vec(),
                targets: vec![false; ids.len()],
                prompt: 0,
            }],
            0,
        );
        let p = self.prompts_tensor(std::slice::from_ref(prompt), n)?;
        let x = match batch {
            Ok(batch) => {
                batch.validate(1, self.spec.vocab_size)?;
                self.inputs(&p, &batch, n).map_err(to_core)?.x
            }
            // no input tokens: the prompt alone
            Err(_) => p,
        };
        session.run(&x)?;
        Ok(session)
    }
}

/// One layer's keys and values.
type KeyValue = (Tensor, Tensor);

/// A prefilled sequence: its cache, its length and the logits of its next token.
type Prefilled = (Vec<LayerCache>, usize, Vec<f32>);

/// Most sequences prefilled in one forward pass.
const PREFILL_ROWS: usize = 16;

/// Most input tokens prefilled in one packed pass on the host path (more sequences if short).
const PREFILL_TOKENS: usize = 1024;

/// Continuous batching on candle: every sequence keeps its own cache; a step packs the caches of
/// the listed sequences into one padded batch (padding masked out, each row at its own RoPE /
/// position-embedding position), runs one forward pass and appends each row's new keys and
/// values to its sequence.
///
/// On the CPU in f32 (Llama family) each sequence's keys and values live in host buffers instead
/// ([`HostCache`]): a step appends in place and attends over each row's own buffer, with no
/// per-step packing, padding or copying of the caches.
struct CandleBatchDecoder<'a> {
    backbone: &'a CandleBackbone,
    next_id: SeqId,
    /// Whether sequences keep [`HostCache`]s (decided once, from the model, device and dtype).
    host: bool,
    seqs: BTreeMap<SeqId, SeqCache>,
}

/// A live sequence's keys and values.
enum SeqCache {
    /// Cache of every layer (`[1, heads, len, head_dim]`) and the length.
    Tensors(Vec<LayerCache>, usize),
    Host(HostCache),
}

impl SeqCache {
    fn len(&self) -> usize {
        match self {
            SeqCache::Tensors(_, len) => *len,
            SeqCache::Host(h) => h.len,
        }
    }

    fn tensors(&self) -> &[LayerCache] {
        match self {
            SeqCache::Tensors(c, _) => c,
            SeqCache::Host(_) => &[],
        }
    }
}

impl BatchDecoder for CandleBatchDecoder<'_> {
    fn add(&mut self, prompt: &SoftPrompt, ids: &[u32]) -> Result<(SeqId, Vec<f32>)> {
        let mut out = self.add_many(&[(prompt, ids)])?;
        Ok(out.remove(0))
    }

    /// Prefills sequences with equal prompt lengths together: each distinct prompt's keys and
    /// values come from the prefix cache (or one pass), then the right-padded inputs of up to
    /// [`PREFILL_ROWS`] sequences run in one forward pass and each keeps its own slice of the
    /// cache.
    fn add_many(&mut self, seqs: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqId, Vec<f32>)>> {
        let b = self.backbone;
        for (prompt, ids) in seqs {
            prompt.check_hidden_size(b.spec.hidden_size)?;
            b.check_length(prompt.num_virtual_tokens() + ids.len())?;
            b.check_ids(ids.iter().copied())?;
        }
        if self.host {
            return self.add_many_host(seqs);
        }
        let mut done: Vec<Option<Prefilled>> = vec![None; seqs.len()];
        // a sequence without input tokens is its prompt alone: the single-sequence path
        for (i, (prompt, ids)) in seqs.iter().enumerate() {
            if ids.is_empty() {
                let s = b.prefill(prompt, ids)?;
                done[i] = Some((s.cache, s.position, s.logits));
            }
        }
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, (prompt, ids)) in seqs.iter().enumerate() {
            if !ids.is_empty() {
                groups
                    .entry(prompt.num_virtual_tokens())
                    .or_default()
                    .push(i);
            }
        }
        for (n, members) in groups {
            for chunk in members.chunks(PREFILL_ROWS) {
                let members: Vec<(&SoftPrompt, &[u32])> = chunk.iter().map(|i| seqs[*i]).collect();
                let (batch, prompts) = input_rows(&members)?;
                let p = b.prompts_tensor(&prompts, n)?;
                let run = || -> CResult<Vec<Prefilled>> {
                    let (hidden, cache) = b.token_hidden(&p, Some(&prompts), &batch, n, true)?;
                    let t = batch.seq_len();
                    let last: Vec<u32> = (0..batch.rows())
                        .map(|r| (r * t + batch.row_len(r) - 1) as u32)
                        .collect();
                    let last = Tensor::from_vec(last, batch.rows(), &b.device)?;
                    let hidden = hidden.reshape((batch.rows() * t, b.spec.hidden_size))?;
                    let logits = b
                        .model
                        .head(&hidden.index_select(&last, 0)?)?
                        .to_dtype(DType::F32)?
                        .to_vec2::<f32>()?;
                    logits
                        .into_iter()
                        .enumerate()
                        .map(|(r, logits)| {
                            let len = n + batch.row_len(r);
                            let own = cache
                                .iter()
                                .map(|slot| {
                                    let (k, v) = slot.as_ref().expect("forward fills the cache");
                                    Ok(Some((
                                        k.narrow(0, r, 1)?.narrow(2, 0, len)?.contiguous()?,
                                        v.narrow(0, r, 1)?.narrow(2, 0, len)?.contiguous()?,
                                    )))
                                })
                                .collect::<candle_core::Result<Vec<_>>>()?;
                            Ok((own, len, logits))
                        })
                        .collect()
                };
                for (&i, seq) in chunk.iter().zip(run().map_err(to_core)?) {
                    done[i] = Some(seq);
                }
            }
        }
        done.into_iter()
            .map(|d| {
                let (cache, len, logits) = d.expect("every sequence prefilled");
                let seq = if self.host {
                    SeqCache::Host(HostCache::from_tensors(&cache, len).map_err(to_core)?)
                } else {
                    SeqCache::Tensors(cache, len)
                };
                let id = self.next_id;
                self.next_id += 1;
                self.seqs.insert(id, seq);
                Ok((id, logits))
            })
            .collect()
    }

    fn step(&mut self, tokens: &[(SeqId, u32)]) -> Result<Vec<Vec<f32>>> {
        check_step(tokens, &self.seqs)?;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let b = self.backbone;
        let rows = tokens.len();
        let starts: Vec<usize> = tokens.iter().map(|(id, _)| self.seqs[id].len()).collect();
        for p in &starts {
            b.check_length(p + 1)?;
        }
        b.check_ids(tokens.iter().map(|(_, t)| *t))?;
        if self.host {
            return self.host_step(tokens);
        }
        let longest = starts.iter().copied().max().unwrap_or(0);
        let layers = b.model.num_layers();
        let run = || -> CResult<(Vec<Vec<f32>>, Vec<KeyValue>)> {
            let ids: Vec<u32> = tokens.iter().map(|(_, t)| *t).collect();
            let ids = Tensor::from_vec(ids, rows, &b.device)?;
            let x = b
                .model
                .embed(&ids)?
                .reshape((rows, 1, b.spec.hidden_size))?;
            let pad = |t: &Tensor| -> CResult<Tensor> {
                let (one, heads, len, hd) = t.dims4()?;
                if len == longest {
                    return Ok(t.clone());
                }
                let z = Tensor::zeros((one, heads, longest - len, hd), t.dtype(), t.device())?;
                Ok(Tensor::cat(&[t, &z], 2)?)
            };
            let mut packed: Vec<LayerCache> = Vec::with_capacity(layers);
            for layer in 0..layers {
                let (mut ks, mut vs) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
                for (id, _) in tokens {
                    let (k, v) = self.seqs[id].tensors()[layer]
                        .as_ref()
                        .expect("a prefilled sequence has a cache in every layer");
                    ks.push(pad(k)?);
                    vs.push(pad(v)?);
                }
                packed.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
            }
            // row r sees its own `starts[r]` cached keys, not the padding, and its new token
            let mut bias = vec![0f32; rows * (longest + 1)];
            for (r, start) in starts.iter().enumerate() {
                bias[r * (longest + 1) + start..r * (longest + 1) + longest].fill(MASKED_BIAS);
            }
            let bias =
                Tensor::from_vec(bias, (rows, 1, 1, longest + 1), &b.device)?.to_dtype(b.dtype)?;
            let h = b.model.forward_at(
                &x,
                Positions::PerRow(&starts),
                Some(&bias),
                Some((&mut packed, true)),
            )?;
            let logits = b
                .model
                .head(&h.reshape((rows, b.spec.hidden_size))?)?
                .to_dtype(DType::F32)?
                .to_vec2()?;
            let fresh = packed
                .into_iter()
                .map(|slot| {
                    let (k, v) = slot.expect("forward fills the cache");
                    Ok((k.narrow(2, longest, 1)?, v.narrow(2, longest, 1)?))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((logits, fresh))
        };
        let (logits, fresh) = run().map_err(to_core)?;
        let append = |seqs: &mut BTreeMap<SeqId, SeqCache>| {
            for (r, (id, _)) in tokens.iter().enumerate() {
                let Some(SeqCache::Tensors(cache, len)) = seqs.get_mut(id) else {
                    unreachable!("tensor caches when not on the host path")
                };
                for (slot, (k, v)) in cache.iter_mut().zip(&fresh) {
                    let (pk, pv) = slot.take().expect("prefilled");
                    *slot = Some((
                        Tensor::cat(&[&pk, &k.narrow(0, r, 1)?], 2)?,
                        Tensor::cat(&[&pv, &v.narrow(0, r, 1)?], 2)?,
                    ));
                }
                *len += 1;
            }
            Ok::<(), candle_core::Error>(())
        };
        append(&mut self.seqs).map_err(to_core)?;
        Ok(logits)
    }

    fn remove(&mut self, id: SeqId) {
        self.seqs.remove(&id);
    }

    fn len(&self) -> usize {
        self.seqs.len()
    }

    fn position(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(SeqCache::len)
    }
}

impl CandleBatchDecoder<'_> {
    /// [`BatchDecoder::add_many`] with [`HostCache`]s (inputs checked by the caller): each
    /// sequence's cache starts as a copy of its prompt's keys and values (prefix cache, or one
    /// pass per prompt length for the prompts not in it), then the input tokens of up to
    /// [`PREFILL_TOKENS`] tokens' worth of sequences run as one packed batch through
    /// [`Model::extend_host`]: no padding, whatever the lengths.
    fn add_many_host(&mut self, seqs: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqId, Vec<f32>)>> {
        let b = self.backbone;
        let prompts: Vec<&SoftPrompt> = seqs.iter().map(|(p, _)| *p).collect();
        let mut caches = b.host_prefixes(&prompts)?;
        let mut logits: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
        // a sequence without input tokens is its prompt alone: the single-sequence path
        for (i, (prompt, ids)) in seqs.iter().enumerate() {
            if ids.is_empty() {
                let s = b.prefill(prompt, ids)?;
                caches[i] = HostCache::from_tensors(&s.cache, s.position).map_err(to_core)?;
                logits[i] = s.logits;
            }
        }
        let with_input: Vec<usize> = (0..seqs.len()).filter(|i| !seqs[*i].1.is_empty()).collect();
        let inputs: Vec<&[u32]> = with_input.iter().map(|i| seqs[*i].1).collect();
        let mut own: Vec<&mut HostCache> = caches
            .iter_mut()
            .zip(seqs)
            .filter(|(_, (_, ids))| !ids.is_empty())
            .map(|(c, _)| c)
            .collect();
        let last: Vec<Vec<f32>> = b
            .host_extend_last(&inputs, &mut own)?
            .to_vec2()
            .map_err(to_core)?;
        for (i, l) in with_input.iter().zip(last) {
            logits[*i] = l;
        }
        Ok(caches
            .into_iter()
            .zip(logits)
            .map(|(cache, logits)| {
                let id = self.next_id;
                self.next_id += 1;
                self.seqs.insert(id, SeqCache::Host(cache));
                (id, logits)
            })
            .collect())
    }

    /// [`BatchDecoder::step`] over [`HostCache`]s (checked by the caller).
    fn host_step(&mut self, tokens: &[(SeqId, u32)]) -> Result<Vec<Vec<f32>>> {
        let b = self.backbone;
        let ids: Vec<u32> = tokens.iter().map(|(_, t)| *t).collect();
        // the listed sequences' caches, in the order of `tokens` (distinct: checked)
        let mut by_id: BTreeMap<SeqId, &mut HostCache> = self
            .seqs
            .iter_mut()
            .filter_map(|(id, s)| match s {
                SeqCache::Host(h) => Some((*id, h)),
                SeqCache::Tensors(..) => None,
            })
            .collect();
        let mut caches: Vec<&mut HostCache> = tokens
            .iter()
            .map(|(id, _)| by_id.remove(id).expect("checked above"))
            .collect();
        let run = || -> CResult<Vec<Vec<f32>>> {
            let rows = ids.len();
            let ids = Tensor::from_vec(ids, rows, &b.device)?;
            let x = b
                .model
                .embed(&ids)?
                .reshape((rows, 1, b.spec.hidden_size))?;
            let h = b.model.decode_host(&x, &mut caches)?;
            Ok(b.model
                .head(&h.reshape((rows, b.spec.hidden_size))?)?
                .to_dtype(DType::F32)?
                .to_vec2()?)
        };
        run().map_err(to_core)
    }
}

/// KV-cached decoding of one sequence.
struct CandleDecode<'a> {
    backbone: &'a CandleBackbone,
    cache: Vec<LayerCache>,
    position: usize,
    logits: Vec<f32>,
}

impl CandleDecode<'_> {
    fn run(&mut self, x: &Tensor) -> Result<()> {
        let b = self.backbone;
        let s = x.dim(1).map_err(to_core)?;
        b.check_length(self.position + s)?;
        let mut step = || -> CResult<Vec<f32>> {
            // causal bias inside the new chunk; everything cached is visible
            let total = self.position + s;
            let bias = Tensor::from_vec(causal_bias(s, total), (1, 1, s, total), &b.device)?
                .to_dtype(b.dtype)?;
            let h =
                b.model
                    .forward(x, self.position, Some(&bias), Some((&mut self.cache, true)))?;
            let last = h.narrow(1, s - 1, 1)?.reshape((1, b.spec.hidden_size))?;
            Ok(b.model
                .head(&last)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        let logits = step().map_err(to_core)?;
        self.logits = logits;
        self.position += s;
        Ok(())
    }
}

impl DecodeSession for CandleDecode<'_> {
    fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn advance(&mut self, token: u32) -> Result<()> {
        let b = self.backbone;
        let x = b.embed(&[token])?;
        let x = Tensor::from_vec(x, (1, 1, b.spec.hidden_size), &b.device)
            .and_then(|t| t.to_dtype(b.dtype))
            .map_err(to_core)?;
        self.run(&x)
    }

    fn position(&self) -> usize {
        self.position
    }
}

/// Achieved f32 FLOP/s of an `n × n` by `n × n` matrix product on `device`: the practical
/// ceiling of the machine for this runtime (the fastest of `repeats` after one warm-up).
pub fn matmul_flops(device: &Device, n: usize, repeats: usize) -> Result<f64> {
    let run = || -> CResult<f64> {
        let a = Tensor::randn(0f32, 1f32, (n, n), device)?;
        let b = Tensor::randn(0f32, 1f32, (n, n), device)?;
        let mut times = Vec::with_capacity(repeats);
        for i in 0..repeats.max(1) + 1 {
            let t0 = std::time::Instant::now();
            let c = a.matmul(&b)?;
            device.synchronize()?;
            drop(c);
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        Ok(2.0 * (n as f64).powi(3) / best)
    };
    run().map_err(to_core)
}
