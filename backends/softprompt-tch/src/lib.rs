//! The libtorch backend of softprompt, through `tch`: CPU and CUDA (`cuda:N`, chosen at run
//! time), f32 / f64 / bf16 / f16 frozen weights with the prompt and its gradient in f32.
//!
//! Implements [`Backbone`] with gradients with respect to the prompt only (weights never require
//! a gradient), per-row prompts, rank-classification scores from one pass, full logits and
//! KV-cached decoding. libtorch comes from the pinned `torch==2.13.0` wheel: build with
//! `bash tools/setup-python.sh && source tools/libtorch-env.sh`.
//!
//! `tch::Tensor` is `Send` but not `Sync`; the model sits behind a mutex so that a
//! `TchBackbone` is `Sync` without unsafe code. Calls on one backbone run one at a time, each
//! using libtorch's intra-op threads.

mod model;
mod runtime;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use softprompt_core::backbone::{check_next_token, check_prompts, check_token_ids};
use softprompt_core::decode::check_step;
use softprompt_core::model::ModelSource;
use softprompt_core::{
    causal_bias, input_rows, Backbone, BackboneSpec, Batch, BatchDecoder, BatchRow, Capabilities,
    DecodeSession, Error, LossAndGrad, ModelConfig, Positions, PrefixCache, RowScores, SeqId,
    SoftPrompt, MASKED_BIAS,
};
pub use tch::{Device, Kind};
use tch::{TchError, Tensor};

use crate::model::{LayerCache, Model};

/// Result with softprompt's error type.
pub type Result<T> = softprompt_core::Result<T>;

const BACKEND: &str = "tch";

/// A failure inside the backend: libtorch's own, or softprompt's from the shared model code.
#[derive(Debug)]
pub(crate) enum Fail {
    Tch(TchError),
    Core(Error),
}

impl From<TchError> for Fail {
    fn from(e: TchError) -> Self {
        Fail::Tch(e)
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
            Fail::Tch(e) => Error::backend(BACKEND, e),
            Fail::Core(e) => e,
        }
    }
}

/// Result of code that mixes libtorch calls and the shared model code.
pub(crate) type TResult<T> = std::result::Result<T, Fail>;

pub(crate) fn to_core(e: impl Into<Fail>) -> Error {
    e.into().into()
}

/// Parses `cpu` or `cuda:N` (`cuda` means `cuda:0`); a CUDA device libtorch cannot see is an
/// error, never a silent fall back to the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .map_err(|_| {
                    Error::InvalidArgument(format!("bad CUDA device `{s}`: expected cuda:N"))
                })?;
            let count = tch::Cuda::device_count();
            if ordinal as i64 >= count {
                return Err(Error::InvalidArgument(format!(
                    "CUDA device {ordinal} is not available to libtorch ({count} CUDA devices visible{})",
                    if tch::Cuda::is_available() { "" } else { "; no CUDA driver or GPU found" }
                )));
            }
            Ok(Device::Cuda(ordinal))
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown device `{other}`: expected cpu or cuda:N"
        ))),
    }
}

/// Parses a weight precision: `f32`, `f64`, `bf16` or `f16`.
pub fn parse_kind(name: &str) -> Result<Kind> {
    match name {
        "f32" => Ok(Kind::Float),
        "f64" => Ok(Kind::Double),
        "bf16" => Ok(Kind::BFloat16),
        "f16" => Ok(Kind::Half),
        other => Err(Error::InvalidArgument(format!(
            "unknown dtype `{other}`: expected f32, f64, bf16 or f16"
        ))),
    }
}

/// Sets libtorch's intra-op thread count for the whole process.
pub fn set_num_threads(threads: usize) {
    tch::set_num_threads(threads.max(1) as i32);
}

/// How to load a backbone.
#[derive(Debug, Clone, Copy)]
pub struct TchOptions {
    device: Device,
    kind: Kind,
}

impl Default for TchOptions {
    fn default() -> Self {
        TchOptions {
            device: Device::Cpu,
            kind: Kind::Float,
        }
    }
}

impl TchOptions {
    /// CPU, f32.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs on `device`.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Stores the frozen weights and computes in `kind` (f32 default; f64 for exact gradient
    /// checks; bf16/f16 to save memory and time). Prompts and gradients stay f32.
    pub fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }
}

/// A frozen Llama-family or GPT-2 model on libtorch.
#[derive(Debug)]
pub struct TchBackbone {
    model: Mutex<Model>,
    config: ModelConfig,
    spec: BackboneSpec,
    device: Device,
    kind: Kind,
    /// Keys and values of recently computed prompts (inference only): a prompt seen before is
    /// not run through the model again.
    prefixes: Mutex<PrefixCache<KeyValues>>,
}

/// Each layer's keys and values (`[1, kv, N, hd]` per prompt in the prefix cache).
type KeyValues = Vec<(Tensor, Tensor)>;

/// Prompts kept in the prefix cache (about 0.9 MB each for SmolLM2-135M with 20 tokens, f32).
const PREFIX_CACHE_ENTRIES: usize = 64;

impl TchBackbone {
    /// Loads a Hugging Face model directory.
    pub fn load(path: impl AsRef<Path>, options: TchOptions) -> Result<Self> {
        Self::from_source(ModelSource::load(path)?, options)
    }

    /// Builds the backbone from an already read model description (HF directory or GGUF).
    pub fn from_source(source: ModelSource, options: TchOptions) -> Result<Self> {
        if !matches!(
            options.kind,
            Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half
        ) {
            return Err(Error::InvalidArgument(format!(
                "weights kind {:?} is not a floating-point kind",
                options.kind
            )));
        }
        let ModelSource {
            config,
            weights,
            spec,
            ..
        } = source;
        let model = Model::load(&config, weights, options.device, options.kind)?;
        Ok(TchBackbone {
            model: Mutex::new(model),
            config,
            spec,
            device: options.device,
            kind: options.kind,
            prefixes: Mutex::new(PrefixCache::new(PREFIX_CACHE_ENTRIES)),
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Kind of the frozen weights.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        // the model is never mutated: a panic elsewhere cannot leave it half-updated
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Log-softmax runs in f32, or f64 when the weights are f64.
    fn score_kind(&self) -> Kind {
        if self.kind == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        }
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

    /// The prompts as one f32 tensor `[P, N, d]` on the device.
    fn prompts_tensor(&self, prompts: &[SoftPrompt], n: usize) -> Result<Tensor> {
        let d = self.spec.hidden_size;
        let values: Vec<f32> = prompts
            .iter()
            .flat_map(|p| p.values().iter().copied())
            .collect();
        Tensor::f_from_slice(&values)
            .and_then(|t| t.f_view([prompts.len() as i64, n as i64, d as i64]))
            .and_then(|t| t.f_to_device(self.device))
            .map_err(to_core)
    }

    fn ids_tensor(&self, ids: &[u32]) -> Result<Tensor> {
        let ids: Vec<i64> = ids.iter().map(|i| *i as i64).collect();
        Tensor::f_from_slice(&ids)
            .and_then(|t| t.f_to_device(self.device))
            .map_err(to_core)
    }

    fn index_tensor(&self, idx: impl IntoIterator<Item = usize>) -> Result<Tensor> {
        let idx: Vec<i64> = idx.into_iter().map(|i| i as i64).collect();
        Tensor::f_from_slice(&idx)
            .and_then(|t| t.f_to_device(self.device))
            .map_err(to_core)
    }

    /// `[prompt rows][token embeddings]` in the weights' kind, and the causal + padding mask
    /// `[rows, 1, S, S]`.
    fn inputs(
        &self,
        model: &Model,
        prompts: &Tensor,
        batch: &Batch,
        n: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (rows, t) = (batch.rows(), batch.seq_len());
        let s = n + t;
        let ids = self.ids_tensor(batch.input_ids())?;
        let prompt_rows = self.index_tensor(batch.prompt_index().iter().copied())?;
        let bias = batch.attention_bias(n);
        let run = || -> TResult<(Tensor, Tensor)> {
            let tok =
                model
                    .embed(&ids)?
                    .f_view([rows as i64, t as i64, self.spec.hidden_size as i64])?;
            let x = if n == 0 {
                tok
            } else {
                let p = prompts
                    .f_index_select(0, &prompt_rows)?
                    .f_to_kind(self.kind)?;
                Tensor::f_cat(&[&p, &tok], 1)?
            };
            let bias = Tensor::f_from_slice(&bias)?
                .f_view([rows as i64, 1, s as i64, s as i64])?
                .f_to_kind(self.kind)?
                .f_to_device(self.device)?;
            Ok((x, bias))
        };
        run().map_err(to_core)
    }

    /// Hidden states at the token positions, `[rows, T, d]`, computing each distinct prompt's
    /// keys and values once (one pass of `[P, N, d]`) and letting every row attend to its
    /// prompt's cache: the virtual tokens are not recomputed per row. Exact: the same attention
    /// over the same keys, only the work is shared.
    /// With `host` (inference: the prompts' values, `prompts` not requiring a gradient) the
    /// prompts' keys and values are looked up in, and added to, the prefix cache.
    fn token_hidden(
        &self,
        model: &Model,
        prompts: &Tensor,
        host: Option<&[SoftPrompt]>,
        batch: &Batch,
        n: usize,
    ) -> Result<Tensor> {
        Ok(self.token_hidden_cached(model, prompts, host, batch, n)?.0)
    }

    /// [`Self::token_hidden`] and the cache it leaves (`[rows, kv, N + T, hd]` per layer).
    fn token_hidden_cached(
        &self,
        model: &Model,
        prompts: &Tensor,
        values: Option<&[SoftPrompt]>,
        batch: &Batch,
        n: usize,
    ) -> Result<(Tensor, Vec<LayerCache>)> {
        let (rows, t) = (batch.rows(), batch.seq_len());
        let s = n + t;
        let d = self.spec.hidden_size as i64;
        let ids = self.ids_tensor(batch.input_ids())?;
        let prompt_rows = self.index_tensor(batch.prompt_index().iter().copied())?;
        let bias = batch.token_attention_bias(n);
        let causal = causal_bias(n, n);
        let run = || -> TResult<(Tensor, Vec<LayerCache>)> {
            let host = |v: &[f32], shape: [i64; 4]| -> TResult<Tensor> {
                Ok(Tensor::f_from_slice(v)?
                    .f_view(shape)?
                    .f_to_kind(self.kind)?
                    .f_to_device(self.device)?)
            };
            let mut cache: Vec<LayerCache> = (0..model.num_layers()).map(|_| None).collect();
            if n > 0 {
                let causal = host(&causal, [1, 1, n as i64, n as i64])?;
                let per_layer = self.prompt_kv(model, prompts, values, &causal)?;
                for (slot, (k, v)) in cache.iter_mut().zip(per_layer) {
                    *slot = Some((
                        k.f_index_select(0, &prompt_rows)?,
                        v.f_index_select(0, &prompt_rows)?,
                    ));
                }
            }
            let tok = model.embed(&ids)?.f_view([rows as i64, t as i64, d])?;
            let bias = host(&bias, [rows as i64, 1, t as i64, s as i64])?;
            let hidden = model.forward(&tok, n, Some(&bias), Some(&mut cache))?;
            Ok((hidden, cache))
        };
        run().map_err(to_core)
    }

    /// Each layer's keys and values of the `[P, N, d]` prompts, `[P, kv, N, hd]`, from one pass
    /// with the causal mask `causal`. With `values` (inference) prompts are looked up in the
    /// prefix cache by value and only the others run, then join it.
    fn prompt_kv(
        &self,
        model: &Model,
        prompts: &Tensor,
        values: Option<&[SoftPrompt]>,
        causal: &Tensor,
    ) -> TResult<KeyValues> {
        let layers = model.num_layers();
        let pass = |x: &Tensor| -> TResult<KeyValues> {
            let mut cache: Vec<LayerCache> = (0..layers).map(|_| None).collect();
            // only the keys and values it leaves in the cache are used
            let _ = model.forward(&x.f_to_kind(self.kind)?, 0, Some(causal), Some(&mut cache))?;
            Ok(cache.into_iter().flatten().collect())
        };
        let Some(values) = values else {
            return pass(prompts);
        };
        let mut found: Vec<Option<KeyValues>> = {
            let cache = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
            values
                .iter()
                .map(|p| {
                    cache.get(p).map(|kv| {
                        kv.iter()
                            .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
                            .collect()
                    })
                })
                .collect()
        };
        let missing: Vec<usize> = (0..values.len()).filter(|i| found[*i].is_none()).collect();
        if !missing.is_empty() {
            let sel: Vec<i64> = missing.iter().map(|i| *i as i64).collect();
            let sel = Tensor::f_from_slice(&sel)?.f_to_device(self.device)?;
            let fresh = pass(&prompts.f_index_select(0, &sel)?)?;
            let mut cache = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
            for (j, i) in missing.iter().enumerate() {
                let own = fresh
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            k.f_narrow(0, j as i64, 1)?.f_contiguous()?,
                            v.f_narrow(0, j as i64, 1)?.f_contiguous()?,
                        ))
                    })
                    .collect::<TResult<Vec<_>>>()?;
                let kept = own
                    .iter()
                    .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
                    .collect();
                cache.insert(&values[*i], kept);
                found[*i] = Some(own);
            }
        }
        let found: Vec<KeyValues> = found.into_iter().flatten().collect();
        (0..layers)
            .map(|l| {
                let ks: Vec<&Tensor> = found.iter().map(|kv| &kv[l].0).collect();
                let vs: Vec<&Tensor> = found.iter().map(|kv| &kv[l].1).collect();
                Ok((Tensor::f_cat(&ks, 0)?, Tensor::f_cat(&vs, 0)?))
            })
            .collect()
    }

    /// Log-probabilities of every target token, in `batch.targets()` order (differentiable
    /// with respect to `prompts` when it requires a gradient).
    fn target_logprobs(
        &self,
        prompts: &Tensor,
        values: Option<&[SoftPrompt]>,
        batch: &Batch,
        n: usize,
    ) -> Result<(Tensor, Vec<usize>)> {
        let targets = batch.targets(n)?;
        if targets.is_empty() {
            return Err(Error::InvalidBatch("the batch has no target tokens".into()));
        }
        let (t, s) = (batch.seq_len(), n + batch.seq_len());
        let d = self.spec.hidden_size as i64;
        let model = self.model();
        let ids = self.index_tensor(
            targets
                .iter()
                .map(|(r, t, _)| batch.input_ids()[r * batch.seq_len() + t] as usize),
        )?;
        // every target predicted from a token position: share the prompt pass across rows
        let shared = targets.iter().all(|(_, _, pos)| *pos >= n);
        let flat = if shared {
            let hidden = self.token_hidden(&model, prompts, values, batch, n)?;
            let at = self.index_tensor(targets.iter().map(|(r, _, pos)| r * t + pos - n))?;
            hidden
                .f_reshape([(batch.rows() * t) as i64, d])
                .and_then(|h| h.f_index_select(0, &at))
                .map_err(to_core)?
        } else {
            let (x, bias) = self.inputs(&model, prompts, batch, n)?;
            let at = self.index_tensor(targets.iter().map(|(r, _, pos)| r * s + pos))?;
            let run = || -> TResult<Tensor> {
                let h = model.forward(&x, 0, Some(&bias), None)?;
                Ok(h.f_reshape([(batch.rows() * s) as i64, d])?
                    .f_index_select(0, &at)?)
            };
            run().map_err(to_core)?
        };
        let run = || -> TResult<Tensor> {
            // the head runs only where a target is predicted
            let logp = model.head(&flat)?.f_log_softmax(-1, self.score_kind())?;
            Ok(logp
                .f_gather(1, &ids.f_unsqueeze(1)?, false)?
                .f_squeeze_dim(1)?)
        };
        let rows = targets.iter().map(|(r, _, _)| *r).collect();
        Ok((run().map_err(to_core)?, rows))
    }
}

/// Copies any tensor to host f64 values.
fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.f_to_kind(Kind::Double)
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_view(-1))
        .and_then(|t| Vec::<f64>::try_from(&t))
        .map_err(to_core)
}

/// Copies any tensor to host f32 values.
fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.f_to_kind(Kind::Float)
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_view(-1))
        .and_then(|t| Vec::<f32>::try_from(&t))
        .map_err(to_core)
}

impl Backbone for TchBackbone {
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
        check_token_ids(ids.iter().copied(), self.spec.vocab_size)?;
        let ids = self.ids_tensor(ids)?;
        let _guard = tch::no_grad_guard();
        let e = self.model().embed(&ids).map_err(to_core)?;
        to_f32(&e)
    }

    fn score(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<RowScores> {
        let n = check_prompts(prompts, &self.spec, batch)?;
        self.check_length(n + batch.seq_len())?;
        let _guard = tch::no_grad_guard();
        let p = self.prompts_tensor(prompts, n)?;
        let (logp, rows) = self.target_logprobs(&p, Some(prompts), batch, n)?;
        let logp = to_f64(&logp)?;
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
        let _guard = tch::no_grad_guard();
        let p = self.prompts_tensor(prompts, n)?;
        let (t, s) = (batch.seq_len(), n + batch.seq_len());
        let d = self.spec.hidden_size as i64;
        let model = self.model();
        let cand = self.ids_tensor(candidates)?;
        // only each row's last real position goes through the head
        let last = if (0..batch.rows()).all(|r| batch.row_len(r) > 0) {
            let hidden = self.token_hidden(&model, &p, Some(prompts), batch, n)?;
            let at = self.index_tensor((0..batch.rows()).map(|r| r * t + batch.row_len(r) - 1))?;
            hidden
                .f_reshape([(batch.rows() * t) as i64, d])
                .and_then(|h| h.f_index_select(0, &at))
                .map_err(to_core)?
        } else {
            // a row made of its prompt alone: the full pass
            let (x, bias) = self.inputs(&model, &p, batch, n)?;
            let at =
                self.index_tensor((0..batch.rows()).map(|r| r * s + n + batch.row_len(r) - 1))?;
            let run = || -> TResult<Tensor> {
                let h = model.forward(&x, 0, Some(&bias), None)?;
                Ok(h.f_reshape([(batch.rows() * s) as i64, d])?
                    .f_index_select(0, &at)?)
            };
            run().map_err(to_core)?
        };
        let run = || -> TResult<Tensor> {
            Ok(model
                .head(&last)?
                .f_log_softmax(-1, self.score_kind())?
                .f_index_select(1, &cand)?)
        };
        let flat = to_f64(&run().map_err(to_core)?)?;
        Ok(flat
            .chunks(candidates.len().max(1))
            .map(<[f64]>::to_vec)
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
        // the only tensor of the graph that requires a gradient
        let leaf = self
            .prompts_tensor(prompts, n)?
            .f_requires_grad_(true)
            .map_err(to_core)?;
        let (logp, _) = self.target_logprobs(&leaf, None, batch, n)?;
        let count = batch.num_targets() as f64;
        let loss = logp
            .f_sum(None::<Kind>)
            .and_then(|s| s.f_neg())
            .and_then(|s| s.f_div_scalar(count))
            .map_err(to_core)?;
        loss.f_backward().map_err(to_core)?;
        let grad = leaf.grad();
        if !grad.defined() {
            return Err(Error::backend(BACKEND, "no gradient reached the prompt"));
        }
        let loss = to_f32(&loss.detach())?[0];
        let flat = to_f32(&grad)?;
        let per = n * self.spec.hidden_size;
        Ok(LossAndGrad {
            loss,
            grads: flat.chunks(per).map(<[f32]>::to_vec).collect(),
        })
    }

    fn logits(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<Vec<f32>> {
        let n = check_prompts(prompts, &self.spec, batch)?;
        self.check_length(n + batch.seq_len())?;
        let _guard = tch::no_grad_guard();
        let p = self.prompts_tensor(prompts, n)?;
        let model = self.model();
        let (x, bias) = self.inputs(&model, &p, batch, n)?;
        let s = n + batch.seq_len();
        let run = || -> TResult<Tensor> {
            let hidden = model.forward(&x, 0, Some(&bias), None)?;
            let flat =
                hidden.f_reshape([(batch.rows() * s) as i64, self.spec.hidden_size as i64])?;
            model.head(&flat)
        };
        to_f32(&run().map_err(to_core)?)
    }

    fn start_decode<'a>(
        &'a self,
        prompt: &SoftPrompt,
        ids: &[u32],
    ) -> Result<Box<dyn DecodeSession + 'a>> {
        Ok(Box::new(self.prefill(prompt, ids)?))
    }

    fn batch_decoder(&self) -> Option<Box<dyn BatchDecoder + '_>> {
        Some(Box::new(TchBatchDecoder {
            backbone: self,
            next_id: 0,
            seqs: BTreeMap::new(),
        }))
    }
}

impl TchBackbone {
    /// Runs `[prompt][ids]` through the model, keeping its keys and values.
    fn prefill(&self, prompt: &SoftPrompt, ids: &[u32]) -> Result<TchDecode<'_>> {
        prompt.check_hidden_size(self.spec.hidden_size)?;
        let n = prompt.num_virtual_tokens();
        if n + ids.len() == 0 {
            return Err(Error::InvalidArgument(
                "generation needs a prompt or at least one input token".into(),
            ));
        }
        self.check_length(n + ids.len())?;
        let _guard = tch::no_grad_guard();
        let p = self.prompts_tensor(std::slice::from_ref(prompt), n)?;
        let x = if ids.is_empty() {
            p.f_to_kind(self.kind).map_err(to_core)?
        } else {
            let batch = Batch::from_rows(
                &[BatchRow {
                    ids: ids.to_vec(),
                    targets: vec![false; ids.len()],
                    prompt: 0,
                }],
                0,
            )?;
            batch.validate(1, self.spec.vocab_size)?;
            let model = self.model();
            self.inputs(&model, &p, &batch, n)?.0
        };
        let mut session = TchDecode {
            backbone: self,
            cache: (0..self.model().num_layers()).map(|_| None).collect(),
            position: 0,
            logits: Vec::new(),
        };
        session.run(&x)?;
        Ok(session)
    }
}

/// A prefilled sequence: its cache, its length and the logits of its next token.
type Prefilled = (Vec<LayerCache>, usize, Vec<f32>);

/// Most sequences prefilled in one forward pass by [`TchBatchDecoder`].
const PREFILL_ROWS: usize = 16;

/// Continuous batching on libtorch: every sequence keeps its own cache (`[1, kv, len, hd]` per
/// layer); a step packs the caches of the listed sequences into one right-padded batch (the
/// padding masked out, each row at its own RoPE / position-embedding position), runs one forward
/// pass and appends each row's new keys and values to its sequence.
struct TchBatchDecoder<'a> {
    backbone: &'a TchBackbone,
    next_id: SeqId,
    /// Each live sequence's cache and length.
    seqs: BTreeMap<SeqId, (Vec<LayerCache>, usize)>,
}

impl BatchDecoder for TchBatchDecoder<'_> {
    fn add(&mut self, prompt: &SoftPrompt, ids: &[u32]) -> Result<(SeqId, Vec<f32>)> {
        let s = self.backbone.prefill(prompt, ids)?;
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, (s.cache, s.position));
        Ok((id, s.logits))
    }

    /// Prefills sequences with equal prompt lengths together, up to [`PREFILL_ROWS`] per pass:
    /// each distinct prompt's keys and values are computed once, the right-padded inputs run in
    /// one forward pass and each sequence keeps its own slice of the cache. A sequence without
    /// input tokens (its prompt alone), or alone in its group, is prefilled by itself.
    fn add_many(&mut self, seqs: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqId, Vec<f32>)>> {
        let b = self.backbone;
        for (prompt, ids) in seqs {
            prompt.check_hidden_size(b.spec.hidden_size)?;
            b.check_length(prompt.num_virtual_tokens() + ids.len())?;
            check_token_ids(ids.iter().copied(), b.spec.vocab_size)?;
        }
        let mut done: Vec<Option<Prefilled>> = (0..seqs.len()).map(|_| None).collect();
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, (prompt, ids)) in seqs.iter().enumerate() {
            if ids.is_empty() {
                let s = b.prefill(prompt, ids)?;
                done[i] = Some((s.cache, s.position, s.logits));
            } else {
                groups
                    .entry(prompt.num_virtual_tokens())
                    .or_default()
                    .push(i);
            }
        }
        let _guard = tch::no_grad_guard();
        for (n, members) in groups {
            for chunk in members.chunks(PREFILL_ROWS) {
                if let [i] = chunk {
                    // alone: one pass over prompt and tokens
                    let s = b.prefill(seqs[*i].0, seqs[*i].1)?;
                    done[*i] = Some((s.cache, s.position, s.logits));
                    continue;
                }
                let members: Vec<(&SoftPrompt, &[u32])> = chunk.iter().map(|i| seqs[*i]).collect();
                let (batch, prompts) = input_rows(&members)?;
                let p = b.prompts_tensor(&prompts, n)?;
                let model = b.model();
                let (hidden, cache) =
                    b.token_hidden_cached(&model, &p, Some(&prompts), &batch, n)?;
                let t = batch.seq_len();
                let last =
                    b.index_tensor((0..batch.rows()).map(|r| r * t + batch.row_len(r) - 1))?;
                let d = b.spec.hidden_size as i64;
                let run = || -> TResult<Tensor> {
                    let h = hidden
                        .f_view([(batch.rows() * t) as i64, d])?
                        .f_index_select(0, &last)?;
                    model.head(&h)
                };
                let logits = run().map_err(to_core)?;
                let logits = to_f32(&logits)?;
                for (r, (&i, logits)) in chunk
                    .iter()
                    .zip(logits.chunks(b.spec.vocab_size))
                    .enumerate()
                {
                    let len = n + batch.row_len(r);
                    let own = cache
                        .iter()
                        .map(|slot| {
                            let (k, v) = slot.as_ref().expect("forward fills the cache");
                            let own = |t: &Tensor| {
                                t.f_narrow(0, r as i64, 1)?
                                    .f_narrow(2, 0, len as i64)?
                                    .f_contiguous()
                            };
                            Ok(Some((own(k)?, own(v)?)))
                        })
                        .collect::<TResult<Vec<LayerCache>>>()
                        .map_err(to_core)?;
                    done[i] = Some((own, len, logits.to_vec()));
                }
            }
        }
        Ok(done
            .into_iter()
            .map(|d| {
                let (cache, len, logits) = d.expect("every sequence prefilled");
                let id = self.next_id;
                self.next_id += 1;
                self.seqs.insert(id, (cache, len));
                (id, logits)
            })
            .collect())
    }

    fn step(&mut self, tokens: &[(SeqId, u32)]) -> Result<Vec<Vec<f32>>> {
        check_step(tokens, &self.seqs)?;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let b = self.backbone;
        let starts: Vec<usize> = tokens.iter().map(|(id, _)| self.seqs[id].1).collect();
        for p in &starts {
            b.check_length(p + 1)?;
        }
        let ids: Vec<u32> = tokens.iter().map(|(_, t)| *t).collect();
        check_token_ids(ids.iter().copied(), b.spec.vocab_size)?;
        let ids = b.ids_tensor(&ids)?;
        let (rows, d) = (tokens.len() as i64, b.spec.hidden_size as i64);
        let longest = starts.iter().copied().max().unwrap_or(0);
        let _guard = tch::no_grad_guard();
        let model = b.model();
        let seqs = &self.seqs;
        // every fallible step first; the caches change only once all succeeded
        let run = || -> TResult<(Tensor, Vec<Vec<LayerCache>>)> {
            let x = model.embed(&ids)?.f_view([rows, 1, d])?;
            let pad = |t: &Tensor| -> TResult<Tensor> {
                let size = t.size();
                let extra = longest as i64 - size[2];
                if extra == 0 {
                    return Ok(t.shallow_clone());
                }
                let z =
                    Tensor::f_zeros([size[0], size[1], extra, size[3]], (t.kind(), t.device()))?;
                Ok(Tensor::f_cat(&[t, &z], 2)?)
            };
            let mut packed: Vec<LayerCache> = Vec::with_capacity(model.num_layers());
            for layer in 0..model.num_layers() {
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                for (id, _) in tokens {
                    let (k, v) = seqs[id].0[layer]
                        .as_ref()
                        .expect("a prefilled sequence has a cache in every layer");
                    ks.push(pad(k)?);
                    vs.push(pad(v)?);
                }
                packed.push(Some((Tensor::f_cat(&ks, 0)?, Tensor::f_cat(&vs, 0)?)));
            }
            // row r sees its own `starts[r]` cached keys, not the padding, and its new token
            let width = longest + 1;
            let mut bias = vec![0f32; tokens.len() * width];
            for (r, start) in starts.iter().enumerate() {
                bias[r * width + start..r * width + longest].fill(MASKED_BIAS);
            }
            let bias = Tensor::f_from_slice(&bias)?
                .f_view([rows, 1, 1, width as i64])?
                .f_to_kind(b.kind)?
                .f_to_device(b.device)?;
            let h = model.forward_at(
                &x,
                Positions::PerRow(&starts),
                Some(&bias),
                Some(&mut packed),
            )?;
            let logits = model.head(&h.f_view([rows, d])?)?;
            let fresh: Vec<(Tensor, Tensor)> = packed
                .into_iter()
                .map(|slot| {
                    let (k, v) = slot.expect("forward fills the cache");
                    Ok((
                        k.f_narrow(2, longest as i64, 1)?,
                        v.f_narrow(2, longest as i64, 1)?,
                    ))
                })
                .collect::<TResult<_>>()?;
            let updated = tokens
                .iter()
                .enumerate()
                .map(|(r, (id, _))| {
                    seqs[id]
                        .0
                        .iter()
                        .zip(&fresh)
                        .map(|(slot, (k, v))| {
                            let (pk, pv) = slot.as_ref().expect("prefilled");
                            Ok(Some((
                                Tensor::f_cat(&[pk, &k.f_narrow(0, r as i64, 1)?], 2)?,
                                Tensor::f_cat(&[pv, &v.f_narrow(0, r as i64, 1)?], 2)?,
                            )))
                        })
                        .collect()
                })
                .collect::<TResult<_>>()?;
            Ok((logits, updated))
        };
        let (logits, updated) = run().map_err(to_core)?;
        let logits = to_f32(&logits)?;
        drop(model);
        for ((id, _), cache) in tokens.iter().zip(updated) {
            let seq = self.seqs.get_mut(id).expect("checked above");
            *seq = (cache, seq.1 + 1);
        }
        Ok(logits
            .chunks(b.spec.vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }

    fn remove(&mut self, id: SeqId) {
        self.seqs.remove(&id);
    }

    fn len(&self) -> usize {
        self.seqs.len()
    }

    fn position(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|(_, len)| *len)
    }
}

/// KV-cached decoding of one sequence.
struct TchDecode<'a> {
    backbone: &'a TchBackbone,
    cache: Vec<LayerCache>,
    position: usize,
    logits: Vec<f32>,
}

impl TchDecode<'_> {
    fn run(&mut self, x: &Tensor) -> Result<()> {
        let b = self.backbone;
        let s = x.size()[1] as usize;
        b.check_length(self.position + s)?;
        let _guard = tch::no_grad_guard();
        // causal inside the new chunk; everything cached is visible
        let total = self.position + s;
        let bias = causal_bias(s, total);
        let model = b.model();
        let mut step = || -> TResult<Tensor> {
            let bias = Tensor::f_from_slice(&bias)?
                .f_view([1, 1, s as i64, total as i64])?
                .f_to_kind(b.kind)?
                .f_to_device(b.device)?;
            let h = model.forward(x, self.position, Some(&bias), Some(&mut self.cache))?;
            let last = h
                .f_narrow(1, s as i64 - 1, 1)?
                .f_reshape([1, b.spec.hidden_size as i64])?;
            model.head(&last)
        };
        let logits = step().map_err(to_core)?;
        self.logits = to_f32(&logits)?;
        self.position += s;
        Ok(())
    }
}

impl DecodeSession for TchDecode<'_> {
    fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn advance(&mut self, token: u32) -> Result<()> {
        let b = self.backbone;
        check_token_ids([token], b.spec.vocab_size)?;
        let ids = b.ids_tensor(&[token])?;
        let x = {
            let _guard = tch::no_grad_guard();
            let run = || -> TResult<Tensor> {
                Ok(b.model()
                    .embed(&ids)?
                    .f_view([1, 1, b.spec.hidden_size as i64])?)
            };
            run().map_err(to_core)?
        };
        self.run(&x)
    }

    fn position(&self) -> usize {
        self.position
    }
}

/// Achieved f32 FLOP/s of an `n × n` by `n × n` matrix product on `device`: the practical
/// ceiling of the machine for this runtime (the fastest of `repeats` after one warm-up).
pub fn matmul_flops(device: Device, n: usize, repeats: usize) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let size = [n as i64, n as i64];
    let a = Tensor::f_randn(size, (Kind::Float, device)).map_err(to_core)?;
    let b = Tensor::f_randn(size, (Kind::Float, device)).map_err(to_core)?;
    let mut times = Vec::with_capacity(repeats);
    for i in 0..repeats.max(1) + 1 {
        let t0 = std::time::Instant::now();
        let c = a.f_matmul(&b).map_err(to_core)?;
        if let Device::Cuda(ordinal) = device {
            tch::Cuda::synchronize(ordinal as i64);
        }
        drop(c);
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(2.0 * (n as f64).powi(3) / best)
}
