//! The candle [`Backbone`]: scoring, gradients with respect to the prompts, rank
//! classification, full logits; prompts' keys and values shared across rows and cached.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use softprompt_core::backbone::{
    check_next_token, check_prefix_source, check_prompts, pack_key_value_prefix,
};
use softprompt_core::model::ModelSource;
use softprompt_core::{
    prompt_slots, AttentionMask, Backbone, BackboneSpec, Batch, BatchDecoder, Batcher,
    Capabilities, Error, LossAndGrad, ModelConfig, Placement, PrefixCache, RowScores, SoftPrompt,
};

use crate::decoding::{CandleKernels, PREFILL_TOKENS};
use crate::model::{Bias, HostCache, LayerCache, Model};
use crate::{ops, to_core, CResult, CandleOptions, Result, BACKEND};

/// A frozen Llama-family or GPT-2 model on candle.
#[derive(Debug)]
pub struct CandleBackbone {
    pub(crate) model: Model,
    pub(crate) config: ModelConfig,
    pub(crate) spec: BackboneSpec,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    /// Keys and values of recently computed prompts (inference only): a prompt seen before is
    /// not run through the model again.
    prefixes: std::sync::Mutex<PrefixCache<Vec<KeyValue>>>,
}

/// Prompts kept in the prefix cache (about 0.9 MB each for SmolLM2-135M with 20 tokens).
const PREFIX_CACHE_ENTRIES: usize = 64;

/// Embedded inputs of a batch: `[rows, N + seq_len, d]` and the attention biases
/// `[rows, 1, S, S]`.
pub(crate) struct Inputs {
    pub x: Tensor,
    pub bias: Bias,
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
        let mut model = Model::load(&config, weights, &options.device, options.dtype)?;
        model.int8_decode = options.int8_decode;
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

    /// The prompts' values `[P, N, width]` in the model's dtype.
    pub(crate) fn prompts_tensor(&self, prompts: &[SoftPrompt], n: usize) -> Result<Tensor> {
        let d = prompts
            .first()
            .map_or(self.spec.hidden_size, SoftPrompt::hidden_size);
        let values: Vec<f32> = prompts
            .iter()
            .flat_map(|p| p.values().iter().copied())
            .collect();
        Tensor::from_vec(values, (prompts.len(), n, d), &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(to_core)
    }

    /// The biases of a pass, `shape`, from the model's masks: `make(mask)` lays one out.
    pub(crate) fn bias(
        &self,
        shape: &[usize],
        make: impl Fn(AttentionMask) -> Vec<f32>,
    ) -> CResult<Bias> {
        let tensor = |mask: AttentionMask| -> CResult<Tensor> {
            Ok(Tensor::from_vec(make(mask), shape, &self.device)?.to_dtype(self.dtype)?)
        };
        Ok(Bias {
            global: tensor(self.config.attention_mask())?,
            window: self.config.sliding_window_mask().map(tensor).transpose()?,
        })
    }

    /// The biases of one decode step over caches bounded by their layers' masks
    /// ([`AttentionMask::kept_step_bias`]): `starts[r]` positions cached in row `r`.
    pub(crate) fn step_bias(&self, starts: &[usize]) -> CResult<Bias> {
        let tensor = |mask: AttentionMask| -> CResult<Tensor> {
            let (bias, width) = mask.kept_step_bias(starts);
            let shape = (starts.len(), 1, 1, width);
            Ok(Tensor::from_vec(bias, shape, &self.device)?.to_dtype(self.dtype)?)
        };
        Ok(Bias {
            global: tensor(self.config.attention_mask())?,
            window: self.config.sliding_window_mask().map(tensor).transpose()?,
        })
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

    pub(crate) fn check_length(&self, positions: usize) -> Result<()> {
        let max = self.config.max_positions();
        if positions > max {
            return Err(Error::InvalidBatch(format!(
                "{positions} positions (virtual tokens included) exceed the model's maximum of {max}"
            )));
        }
        Ok(())
    }

    /// `[prompt rows][token embeddings]` and the causal + padding bias.
    pub(crate) fn inputs(&self, prompts: &Tensor, batch: &Batch, n: usize) -> CResult<Inputs> {
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
        let bias = self.bias(&[rows, 1, s, s], |m| m.bias(batch, n))?;
        Ok(Inputs { x, bias })
    }

    /// Per-layer keys and values of each row's prompt, `[rows, heads, N, head_dim]`: each
    /// distinct prompt is run once (`[P, N, d]` in one pass) and rows gather their prompt's
    /// cache. With `host` (inference) prompts are looked up in, and added to, the prefix cache.
    /// Key/value prefixes (PEFT's `past_key_values` layout, `[P, N, layers·2·kv·hd]`) are the
    /// keys and values themselves: only reshaped.
    fn prompt_kv(
        &self,
        prompts: &Tensor,
        placement: Placement,
        host: Option<&[SoftPrompt]>,
        idx: &[u32],
        n: usize,
    ) -> CResult<Vec<LayerCache>> {
        let layers = self.model.num_layers();
        if placement == Placement::KeyValuePrefix {
            let idx = Tensor::from_slice(idx, idx.len(), &self.device)?;
            let rows = prompts.index_select(&idx, 0)?;
            return self
                .prefix_kv(&rows, n)?
                .into_iter()
                .map(|kv| Ok(Some(kv)))
                .collect();
        }
        let causal = self.bias(&[1, 1, n, n], |m| m.chunk_bias(n, n))?;
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

    /// Each layer's keys and values `[P, kv, N, hd]` of key/value prefixes `[P, N, layers·2·kv·hd]`
    /// (layer-major, keys before values, then heads: PEFT's `past_key_values` view).
    pub(crate) fn prefix_kv(&self, prompts: &Tensor, n: usize) -> CResult<Vec<KeyValue>> {
        let heads = self.model.heads();
        let layers = self.model.num_layers();
        let p = prompts.dim(0)?;
        let x = prompts.reshape((p, n, layers * 2, heads.kv * heads.dim))?;
        let part = |i: usize| -> CResult<Tensor> {
            Ok(x.narrow(2, i, 1)?
                .reshape((p, n, heads.kv, heads.dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        (0..layers)
            .map(|l| Ok((part(2 * l)?, part(2 * l + 1)?)))
            .collect()
    }

    /// Hidden states at the token positions, `[rows, T, d]`, computing each distinct prompt's
    /// keys and values once (see [`Self::prompt_kv`]) and letting every row attend to its
    /// prompt's cache: the virtual tokens are not recomputed per row. Exact: the same attention
    /// over the same keys, only the work is shared. Returns the cache too (`[rows, heads, N + T,
    /// head_dim]` per layer).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn token_hidden(
        &self,
        prompts: &Tensor,
        placement: Placement,
        host: Option<&[SoftPrompt]>,
        batch: &Batch,
        n: usize,
        extend: bool,
    ) -> CResult<(Tensor, Vec<LayerCache>)> {
        let (rows, t) = (batch.rows(), batch.seq_len());
        let s = n + t;
        let mut cache: Vec<LayerCache> = if n > 0 {
            let idx: Vec<u32> = batch.prompt_index().iter().map(|p| *p as u32).collect();
            self.prompt_kv(prompts, placement, host, &idx, n)?
        } else {
            vec![None; self.model.num_layers()]
        };
        let ids = Tensor::from_slice(batch.input_ids(), rows * t, &self.device)?;
        let tok = self
            .model
            .embed(&ids)?
            .reshape((rows, t, self.spec.hidden_size))?;
        let bias = self.bias(&[rows, 1, t, s], |m| m.token_bias(batch, n))?;
        let hidden = self
            .model
            .forward(&tok, n, Some(&bias), Some((&mut cache, extend)))?;
        Ok((hidden, cache))
    }

    /// Log-probabilities of every target token, in `batch.targets()` order (differentiable).
    fn target_logprobs(
        &self,
        prompts: &Tensor,
        placement: Placement,
        host: Option<&[SoftPrompt]>,
        batch: &Batch,
        n: usize,
    ) -> Result<(Tensor, Vec<usize>)> {
        let targets = match placement {
            Placement::KeyValuePrefix => batch.token_targets(n)?,
            _ => batch.targets(n)?,
        };
        if targets.is_empty() {
            return Err(Error::InvalidBatch("the batch has no target tokens".into()));
        }
        let (t, s) = (batch.seq_len(), n + batch.seq_len());
        let d = self.spec.hidden_size;
        // every target predicted from a token position: share the prompt pass across rows
        let shared = targets.iter().all(|(_, _, pos)| *pos >= n);
        let run = || -> CResult<Tensor> {
            let (flat, at): (Tensor, Vec<u32>) = if shared {
                let (hidden, _) = self.token_hidden(prompts, placement, host, batch, n, false)?;
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
            placements: Capabilities::DECODER,
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
        let n = check_prompts(self, prompts, batch)?;
        self.check_length(n + batch.seq_len())?;
        let p = self.prompts_tensor(prompts, n)?;
        let placement = prompts[0].placement();
        let (logp, rows) = self.target_logprobs(&p, placement, Some(prompts), batch, n)?;
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
        let n = check_next_token(self, prompts, batch, candidates)?;
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
                let placement = prompts[0].placement();
                let (hidden, _) =
                    self.token_hidden(&p, placement, Some(prompts), batch, n, false)?;
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
        let n = check_prompts(self, prompts, batch)?;
        self.check_length(n + batch.seq_len())?;
        if n == 0 {
            return Err(Error::InvalidArgument(
                "a prompt of zero virtual tokens has no gradient".into(),
            ));
        }
        let var = Var::from_tensor(&self.prompts_tensor(prompts, n)?).map_err(to_core)?;
        let placement = prompts[0].placement();
        let (logp, _) = self.target_logprobs(var.as_tensor(), placement, None, batch, n)?;
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
        let per = n * prompts[0].hidden_size();
        let grads = flat.chunks(per).map(<[f32]>::to_vec).collect();
        Ok(LossAndGrad { loss, grads })
    }

    fn logits(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<Vec<f32>> {
        let n = check_prompts(self, prompts, batch)?;
        self.check_length(n + batch.seq_len())?;
        let p = self.prompts_tensor(prompts, n)?;
        let run = || -> CResult<Vec<f32>> {
            let hidden = if prompts[0].placement() == Placement::KeyValuePrefix {
                let placement = Placement::KeyValuePrefix;
                self.token_hidden(&p, placement, Some(prompts), batch, n, false)?
                    .0
            } else {
                let inputs = self.inputs(&p, batch, n)?;
                self.model.forward(&inputs.x, 0, Some(&inputs.bias), None)?
            };
            let (b, s, d) = hidden.dims3()?;
            let logits = self.model.head(&hidden.reshape((b * s, d))?)?;
            Ok(logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        run().map_err(to_core)
    }

    fn key_value_prefix(&self, prompt: &SoftPrompt) -> Result<SoftPrompt> {
        let n = check_prefix_source(self, prompt)?;
        self.check_length(n)?;
        let p = self.prompts_tensor(std::slice::from_ref(prompt), n)?;
        let flat = |t: &Tensor| -> CResult<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let run = || -> CResult<Vec<(Vec<f32>, Vec<f32>)>> {
            self.prompt_kv(&p, Placement::InputEmbeddings, None, &[0], n)?
                .into_iter()
                .flatten()
                .map(|(k, v)| Ok((flat(&k.contiguous()?)?, flat(&v.contiguous()?)?)))
                .collect()
        };
        let layers = run().map_err(to_core)?;
        let heads = self.model.heads();
        pack_key_value_prefix(&layers, n, heads.kv, heads.dim)
    }

    fn batch_decoder(&self) -> Option<Box<dyn BatchDecoder + '_>> {
        Some(Box::new(Batcher::new(CandleKernels {
            backbone: self,
            host: self.model.supports_host_decode(&self.device, self.dtype),
        })))
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
    pub(crate) fn host_prefixes(&self, prompts: &[&SoftPrompt]) -> Result<Vec<HostCache>> {
        let layers = self.model.num_layers();
        let (distinct, prompt_of) = prompt_slots(prompts.iter().copied());
        let mut prefixes: Vec<HostCache> = vec![HostCache::empty(layers); distinct.len()];
        // one pass per length and placement: prefixes and input embeddings mix freely here
        let mut by_len: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
        for (j, p) in distinct.iter().enumerate() {
            if p.num_virtual_tokens() > 0 {
                let key = (p.num_virtual_tokens(), p.placement().as_str());
                by_len.entry(key).or_default().push(j);
            }
        }
        for ((n, _), members) in by_len {
            let group: Vec<SoftPrompt> = members.iter().map(|j| distinct[*j].clone()).collect();
            let p = self.prompts_tensor(&group, n)?;
            let idx: Vec<u32> = (0..group.len() as u32).collect();
            let placement = group[0].placement();
            let kv = self
                .prompt_kv(&p, placement, Some(&group), &idx, n)
                .map_err(to_core)?;
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
    pub(crate) fn host_extend_last(
        &self,
        inputs: &[&[u32]],
        caches: &mut [&mut HostCache],
    ) -> Result<Tensor> {
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
}

/// One layer's keys and values.
type KeyValue = (Tensor, Tensor);
