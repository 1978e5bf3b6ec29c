//! The libtorch [`Backbone`]: scoring, gradients with respect to the prompts, rank
//! classification, full logits; prompts' keys and values shared across rows and cached.
//!
//! `tch::Tensor` is `Send` but not `Sync`; the model sits behind a mutex so that a
//! `TchBackbone` is `Sync` without unsafe code. Calls on one backbone run one at a time, each
//! using libtorch's intra-op threads.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use softprompt_core::backbone::{
    check_next_token, check_prefix_source, check_prompts, check_token_ids, pack_key_value_prefix,
};
use softprompt_core::model::ModelSource;
use softprompt_core::{
    Backbone, BackboneSpec, Batch, BatchDecoder, Batcher, Capabilities, Error, LossAndGrad,
    ModelConfig, Placement, PrefixCache, RowScores, SoftPrompt,
};
use tch::{Device, Kind, Tensor};

use crate::decoding::TchKernels;
use crate::model::{Bias, LayerCache, Model};
use crate::{to_core, Result, TResult, TchOptions, BACKEND};

/// A frozen Llama-family or GPT-2 model on libtorch.
#[derive(Debug)]
pub struct TchBackbone {
    model: Mutex<Model>,
    pub(crate) config: ModelConfig,
    pub(crate) spec: BackboneSpec,
    pub(crate) device: Device,
    pub(crate) kind: Kind,
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

    pub(crate) fn model(&self) -> MutexGuard<'_, Model> {
        // the model is never mutated: a panic elsewhere cannot leave it half-updated
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The biases of a pass, `shape`, from the model's masks: `make(mask)` lays one out.
    pub(crate) fn bias(
        &self,
        shape: &[i64],
        make: impl Fn(softprompt_core::AttentionMask) -> Vec<f32>,
    ) -> TResult<Bias> {
        let tensor = |mask| -> TResult<Tensor> {
            Ok(Tensor::f_from_slice(&make(mask))?
                .f_view(shape)?
                .f_to_kind(self.kind)?
                .f_to_device(self.device)?)
        };
        Ok(Bias {
            global: tensor(self.config.attention_mask())?,
            window: self.config.sliding_window_mask().map(tensor).transpose()?,
        })
    }

    /// The biases of one decode step over caches bounded by their layers' masks
    /// ([`softprompt_core::AttentionMask::kept_step_bias`]): `starts[r]` positions cached in
    /// row `r`.
    pub(crate) fn step_bias(&self, starts: &[usize]) -> TResult<Bias> {
        let tensor = |mask: softprompt_core::AttentionMask| -> TResult<Tensor> {
            let (bias, width) = mask.kept_step_bias(starts);
            Ok(Tensor::f_from_slice(&bias)?
                .f_view([starts.len() as i64, 1, 1, width as i64])?
                .f_to_kind(self.kind)?
                .f_to_device(self.device)?)
        };
        Ok(Bias {
            global: tensor(self.config.attention_mask())?,
            window: self.config.sliding_window_mask().map(tensor).transpose()?,
        })
    }

    /// Log-softmax runs in f32, or f64 when the weights are f64.
    fn score_kind(&self) -> Kind {
        if self.kind == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        }
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

    /// The prompts as one f32 tensor `[P, N, width]` on the device.
    pub(crate) fn prompts_tensor(&self, prompts: &[SoftPrompt], n: usize) -> Result<Tensor> {
        let d = prompts
            .first()
            .map_or(self.spec.hidden_size, SoftPrompt::hidden_size);
        let values: Vec<f32> = prompts
            .iter()
            .flat_map(|p| p.values().iter().copied())
            .collect();
        Tensor::f_from_slice(&values)
            .and_then(|t| t.f_view([prompts.len() as i64, n as i64, d as i64]))
            .and_then(|t| t.f_to_device(self.device))
            .map_err(to_core)
    }

    pub(crate) fn ids_tensor(&self, ids: &[u32]) -> Result<Tensor> {
        let ids: Vec<i64> = ids.iter().map(|i| *i as i64).collect();
        Tensor::f_from_slice(&ids)
            .and_then(|t| t.f_to_device(self.device))
            .map_err(to_core)
    }

    pub(crate) fn index_tensor(&self, idx: impl IntoIterator<Item = usize>) -> Result<Tensor> {
        let idx: Vec<i64> = idx.into_iter().map(|i| i as i64).collect();
        Tensor::f_from_slice(&idx)
            .and_then(|t| t.f_to_device(self.device))
            .map_err(to_core)
    }

    /// `[prompt rows][token embeddings]` in the weights' kind, and the causal + padding mask
    /// `[rows, 1, S, S]`.
    pub(crate) fn inputs(
        &self,
        model: &Model,
        prompts: &Tensor,
        batch: &Batch,
        n: usize,
    ) -> Result<(Tensor, Bias)> {
        let (rows, t) = (batch.rows(), batch.seq_len());
        let s = n + t;
        let ids = self.ids_tensor(batch.input_ids())?;
        let prompt_rows = self.index_tensor(batch.prompt_index().iter().copied())?;
        let run = || -> TResult<(Tensor, Bias)> {
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
            let bias = self.bias(&[rows as i64, 1, s as i64, s as i64], |m| m.bias(batch, n))?;
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
        placement: Placement,
        host: Option<&[SoftPrompt]>,
        batch: &Batch,
        n: usize,
    ) -> Result<Tensor> {
        Ok(self
            .token_hidden_cached(model, prompts, placement, host, batch, n)?
            .0)
    }

    /// [`Self::token_hidden`] and the cache it leaves (`[rows, kv, N + T, hd]` per layer).
    pub(crate) fn token_hidden_cached(
        &self,
        model: &Model,
        prompts: &Tensor,
        placement: Placement,
        values: Option<&[SoftPrompt]>,
        batch: &Batch,
        n: usize,
    ) -> Result<(Tensor, Vec<LayerCache>)> {
        let (rows, t) = (batch.rows(), batch.seq_len());
        let s = n + t;
        let d = self.spec.hidden_size as i64;
        let ids = self.ids_tensor(batch.input_ids())?;
        let prompt_rows = self.index_tensor(batch.prompt_index().iter().copied())?;
        let run = || -> TResult<(Tensor, Vec<LayerCache>)> {
            let mut cache: Vec<LayerCache> = (0..model.num_layers()).map(|_| None).collect();
            if n > 0 {
                let per_layer = if placement == Placement::KeyValuePrefix {
                    self.prefix_kv(model, prompts, n)?
                } else {
                    let causal = self.bias(&[1, 1, n as i64, n as i64], |m| m.chunk_bias(n, n))?;
                    self.prompt_kv(model, prompts, values, &causal)?
                };
                for (slot, (k, v)) in cache.iter_mut().zip(per_layer) {
                    *slot = Some((
                        k.f_index_select(0, &prompt_rows)?,
                        v.f_index_select(0, &prompt_rows)?,
                    ));
                }
            }
            let tok = model.embed(&ids)?.f_view([rows as i64, t as i64, d])?;
            let bias = self.bias(&[rows as i64, 1, t as i64, s as i64], |m| {
                m.token_bias(batch, n)
            })?;
            let hidden = model.forward(&tok, n, Some(&bias), Some(&mut cache))?;
            Ok((hidden, cache))
        };
        run().map_err(to_core)
    }

    /// Each layer's keys and values `[P, kv, N, hd]` of key/value prefixes `[P, N, layers·2·kv·hd]`
    /// (layer-major, keys before values, then heads: PEFT's `past_key_values` view).
    fn prefix_kv(&self, model: &Model, prompts: &Tensor, n: usize) -> TResult<KeyValues> {
        let heads = model.heads();
        let layers = model.num_layers();
        let p = prompts.size()[0];
        let x = prompts.f_to_kind(self.kind)?.f_view([
            p,
            n as i64,
            (layers * 2) as i64,
            heads.kv as i64,
            heads.dim as i64,
        ])?;
        let part = |i: usize| -> TResult<Tensor> {
            Ok(x.f_select(2, i as i64)?.f_transpose(1, 2)?.f_contiguous()?)
        };
        (0..layers)
            .map(|l| Ok((part(2 * l)?, part(2 * l + 1)?)))
            .collect()
    }

    /// Each layer's keys and values of the `[P, N, d]` prompts, `[P, kv, N, hd]`, from one pass
    /// with the causal mask `causal`. With `values` (inference) prompts are looked up in the
    /// prefix cache by value and only the others run, then join it.
    fn prompt_kv(
        &self,
        model: &Model,
        prompts: &Tensor,
        values: Option<&[SoftPrompt]>,
        causal: &Bias,
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
        placement: Placement,
        values: Option<&[SoftPrompt]>,
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
            let hidden = self.token_hidden(&model, prompts, placement, values, batch, n)?;
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
pub(crate) fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
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
            placements: Capabilities::DECODER,
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
        let n = check_prompts(self, prompts, batch)?;
        self.check_length(n + batch.seq_len())?;
        let _guard = tch::no_grad_guard();
        let p = self.prompts_tensor(prompts, n)?;
        let placement = prompts[0].placement();
        let (logp, rows) = self.target_logprobs(&p, placement, Some(prompts), batch, n)?;
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
        let n = check_next_token(self, prompts, batch, candidates)?;
        self.check_length(n + batch.seq_len())?;
        let _guard = tch::no_grad_guard();
        let p = self.prompts_tensor(prompts, n)?;
        let (t, s) = (batch.seq_len(), n + batch.seq_len());
        let d = self.spec.hidden_size as i64;
        let model = self.model();
        let cand = self.ids_tensor(candidates)?;
        // only each row's last real position goes through the head
        let last = if (0..batch.rows()).all(|r| batch.row_len(r) > 0) {
            let placement = prompts[0].placement();
            let hidden = self.token_hidden(&model, &p, placement, Some(prompts), batch, n)?;
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
        let n = check_prompts(self, prompts, batch)?;
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
        let placement = prompts[0].placement();
        let (logp, _) = self.target_logprobs(&leaf, placement, None, batch, n)?;
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
        let per = n * prompts[0].hidden_size();
        Ok(LossAndGrad {
            loss,
            grads: flat.chunks(per).map(<[f32]>::to_vec).collect(),
        })
    }

    fn key_value_prefix(&self, prompt: &SoftPrompt) -> Result<SoftPrompt> {
        let n = check_prefix_source(self, prompt)?;
        self.check_length(n)?;
        let _guard = tch::no_grad_guard();
        let p = self.prompts_tensor(std::slice::from_ref(prompt), n)?;
        let causal = self
            .bias(&[1, 1, n as i64, n as i64], |m| m.chunk_bias(n, n))
            .map_err(to_core)?;
        let model = self.model();
        let per_layer = self.prompt_kv(&model, &p, None, &causal).map_err(to_core)?;
        let layers = per_layer
            .iter()
            .map(|(k, v)| Ok((to_f32(k)?, to_f32(v)?)))
            .collect::<Result<Vec<_>>>()?;
        let heads = model.heads();
        pack_key_value_prefix(&layers, n, heads.kv, heads.dim)
    }

    fn logits(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<Vec<f32>> {
        let n = check_prompts(self, prompts, batch)?;
        self.check_length(n + batch.seq_len())?;
        let _guard = tch::no_grad_guard();
        let p = self.prompts_tensor(prompts, n)?;
        let model = self.model();
        let d = self.spec.hidden_size as i64;
        if prompts[0].placement() == Placement::KeyValuePrefix {
            // the virtual tokens have no positions: logits of the tokens only
            let placement = Placement::KeyValuePrefix;
            let hidden = self.token_hidden(&model, &p, placement, Some(prompts), batch, n)?;
            let t = batch.seq_len() as i64;
            let run = || -> TResult<Tensor> {
                model.head(&hidden.f_reshape([batch.rows() as i64 * t, d])?)
            };
            return to_f32(&run().map_err(to_core)?);
        }
        let (x, bias) = self.inputs(&model, &p, batch, n)?;
        let s = n + batch.seq_len();
        let run = || -> TResult<Tensor> {
            let hidden = model.forward(&x, 0, Some(&bias), None)?;
            let flat = hidden.f_reshape([(batch.rows() * s) as i64, d])?;
            model.head(&flat)
        };
        to_f32(&run().map_err(to_core)?)
    }

    fn batch_decoder(&self) -> Option<Box<dyn BatchDecoder + '_>> {
        Some(Box::new(Batcher::new(TchKernels { backbone: self })))
    }
}
