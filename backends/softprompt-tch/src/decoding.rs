//! libtorch's kernels for continuous batching ([`softprompt_core::Batcher`] does the planning
//! and bookkeeping): every sequence keeps its own cache (`[1, kv, len, hd]` per layer); a
//! prefill runs sequences of one prompt length right padded in one pass, each keeping its slice
//! of the cache; a step packs the caches of the listed sequences into one right-padded batch
//! (the padding masked out, each row at its own RoPE / position-embedding position), runs one
//! forward pass and appends each row's new keys and values.

use softprompt_core::{
    input_rows, AttentionMask, Batch, BatchRow, Capabilities, DecodeKernels, Error, Placement,
    Positions, PrefillPlan, SoftPrompt,
};
use tch::Tensor;

use crate::model::LayerCache;
use crate::{to_core, to_f32, Result, TResult, TchBackbone};

/// Most sequences prefilled in one forward pass.
const PREFILL_ROWS: usize = 16;

/// One sequence's cache of every layer and its length.
pub(crate) type SeqCache = (Vec<LayerCache>, usize);

/// Row `r`'s keys and values of every layer from a packed cache `[rows, kv, total, hd]`: the
/// sequence's first `len` positions, of which each layer keeps what its mask says
/// ([`AttentionMask::keep_range`]: a sliding-window layer only the last `window - 1`).
fn own_cache(
    packed: &[LayerCache],
    masks: &[AttentionMask],
    r: usize,
    len: usize,
) -> TResult<Vec<LayerCache>> {
    packed
        .iter()
        .zip(masks)
        .map(|(slot, mask)| {
            let (k, v) = slot.as_ref().expect("forward fills the cache");
            let keep = mask.keep_range(0, len).expect("nothing dropped yet");
            let own = |t: &Tensor| {
                t.f_narrow(0, r as i64, 1)?
                    .f_narrow(2, keep.start as i64, keep.len() as i64)?
                    .f_contiguous()
            };
            Ok(Some((own(k)?, own(v)?)))
        })
        .collect()
}

/// The kernels of one backbone.
pub(crate) struct TchKernels<'a> {
    pub backbone: &'a TchBackbone,
}

impl TchKernels<'_> {
    /// `[prompt][ids]` in one pass (a sequence alone, possibly without input tokens).
    fn prefill_one(&self, prompt: &SoftPrompt, ids: &[u32]) -> Result<(SeqCache, Vec<f32>)> {
        if prompt.placement() == Placement::KeyValuePrefix {
            if ids.is_empty() {
                return Err(Error::InvalidBatch(
                    "a key/value prefix predicts nothing by itself: give at least one token".into(),
                ));
            }
            let mut one = self.prefill_padded(&[(prompt, ids)])?;
            return Ok(one.remove(0));
        }
        let b = self.backbone;
        let n = prompt.num_virtual_tokens();
        let _guard = tch::no_grad_guard();
        let p = b.prompts_tensor(std::slice::from_ref(prompt), n)?;
        let model = b.model();
        let x = if ids.is_empty() {
            p.f_to_kind(b.kind).map_err(to_core)?
        } else {
            let row = BatchRow {
                ids: ids.to_vec(),
                targets: vec![false; ids.len()],
                prompt: 0,
            };
            b.inputs(&model, &p, &Batch::from_rows(&[row], 0)?, n)?.0
        };
        let s = n + ids.len();
        let mut cache: Vec<LayerCache> = (0..model.num_layers()).map(|_| None).collect();
        let mut run = || -> TResult<Tensor> {
            let bias = b.bias(&[1, 1, s as i64, s as i64], |m| m.chunk_bias(s, s))?;
            let h = model.forward(&x, 0, Some(&bias), Some(&mut cache))?;
            let last = h
                .f_narrow(1, s as i64 - 1, 1)?
                .f_reshape([1, b.spec.hidden_size as i64])?;
            model.head(&last)
        };
        let logits = to_f32(&run().map_err(to_core)?)?;
        let masks = b.config.layer_masks();
        let cache = own_cache(&cache, &masks, 0, s).map_err(to_core)?;
        Ok(((cache, s), logits))
    }

    /// Sequences of one prompt length: each distinct prompt's keys and values computed once,
    /// the right-padded inputs in one pass, each sequence keeping its own slice of the cache.
    fn prefill_padded(&self, group: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqCache, Vec<f32>)>> {
        // one prompt length and one placement: the batcher groups them so
        let placement = group[0].0.placement();
        let b = self.backbone;
        let n = group[0].0.num_virtual_tokens();
        let _guard = tch::no_grad_guard();
        let (batch, prompts) = input_rows(group)?;
        let p = b.prompts_tensor(&prompts, n)?;
        let model = b.model();
        let (hidden, cache) =
            b.token_hidden_cached(&model, &p, placement, Some(&prompts), &batch, n)?;
        let t = batch.seq_len();
        let last = b.index_tensor((0..batch.rows()).map(|r| r * t + batch.row_len(r) - 1))?;
        let d = b.spec.hidden_size as i64;
        let run = || -> TResult<Tensor> {
            let h = hidden
                .f_view([(batch.rows() * t) as i64, d])?
                .f_index_select(0, &last)?;
            model.head(&h)
        };
        let logits = to_f32(&run().map_err(to_core)?)?;
        let masks = b.config.layer_masks();
        logits
            .chunks(b.spec.vocab_size)
            .enumerate()
            .map(|(r, logits)| {
                let len = n + batch.row_len(r);
                let own = own_cache(&cache, &masks, r, len).map_err(to_core)?;
                Ok(((own, len), logits.to_vec()))
            })
            .collect()
    }
}

impl DecodeKernels for TchKernels<'_> {
    type Cache = SeqCache;

    fn spec(&self) -> &softprompt_core::BackboneSpec {
        &self.backbone.spec
    }

    fn backend_name(&self) -> &str {
        crate::BACKEND
    }

    fn max_positions(&self) -> usize {
        self.backbone.config.max_positions()
    }

    fn placements(&self) -> &'static [Placement] {
        Capabilities::DECODER
    }

    fn plan(&self) -> PrefillPlan {
        PrefillPlan::EqualPromptLength { rows: PREFILL_ROWS }
    }

    /// A sequence alone runs `[prompt][ids]` in one pass; a group shares its prompts' passes.
    fn prefill(&self, group: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqCache, Vec<f32>)>> {
        match group {
            [(prompt, ids)] => Ok(vec![self.prefill_one(prompt, ids)?]),
            _ => self.prefill_padded(group),
        }
    }

    fn step(&self, caches: &mut [&mut SeqCache], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let b = self.backbone;
        let starts: Vec<usize> = caches.iter().map(|c| c.1).collect();
        let ids = b.ids_tensor(tokens)?;
        let (rows, d) = (tokens.len() as i64, b.spec.hidden_size as i64);
        let masks = b.config.layer_masks();
        // each layer packs what it keeps: sliding-window layers at most `window - 1` per row
        let longest: Vec<usize> = masks
            .iter()
            .map(|m| starts.iter().map(|&s| m.kept(s)).max().unwrap_or(0))
            .collect();
        let _guard = tch::no_grad_guard();
        let model = b.model();
        // every fallible step first; the caches change only once all succeeded
        let run = || -> TResult<(Tensor, Vec<Vec<LayerCache>>)> {
            let x = model.embed(&ids)?.f_view([rows, 1, d])?;
            let pad = |t: &Tensor, longest: usize| -> TResult<Tensor> {
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
            for (layer, &longest) in longest.iter().enumerate() {
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                for cache in caches.iter() {
                    let (k, v) = cache.0[layer]
                        .as_ref()
                        .expect("a prefilled sequence has a cache in every layer");
                    ks.push(pad(k, longest)?);
                    vs.push(pad(v, longest)?);
                }
                packed.push(Some((Tensor::f_cat(&ks, 0)?, Tensor::f_cat(&vs, 0)?)));
            }
            // row r sees its own cached keys, not the padding, and its new token
            let bias = b.step_bias(&starts)?;
            let h = model.forward_at(
                &x,
                Positions::PerRow(&starts),
                Some(&bias),
                Some(&mut packed),
            )?;
            let logits = model.head(&h.f_view([rows, d])?)?;
            let fresh: Vec<(Tensor, Tensor)> = packed
                .into_iter()
                .zip(&longest)
                .map(|(slot, &at)| {
                    let (k, v) = slot.expect("forward fills the cache");
                    Ok((k.f_narrow(2, at as i64, 1)?, v.f_narrow(2, at as i64, 1)?))
                })
                .collect::<TResult<_>>()?;
            let updated = caches
                .iter()
                .enumerate()
                .map(|(r, cache)| {
                    let start = starts[r];
                    cache
                        .0
                        .iter()
                        .zip(&fresh)
                        .zip(&masks)
                        .map(|((slot, (k, v)), mask)| {
                            let (pk, pv) = slot.as_ref().expect("prefilled");
                            // positions `start - kept(start)..=start`, then what `start + 1` keeps
                            let keep = mask
                                .keep_range(start - mask.kept(start), start + 1)
                                .expect("a step drops nothing still needed");
                            let (from, n) = (keep.start as i64, keep.len() as i64);
                            let k = Tensor::f_cat(&[pk, &k.f_narrow(0, r as i64, 1)?], 2)?;
                            let v = Tensor::f_cat(&[pv, &v.f_narrow(0, r as i64, 1)?], 2)?;
                            Ok(Some(if keep.len() == start + 1 {
                                (k, v)
                            } else {
                                (k.f_narrow(2, from, n)?, v.f_narrow(2, from, n)?)
                            }))
                        })
                        .collect()
                })
                .collect::<TResult<_>>()?;
            Ok((logits, updated))
        };
        let (logits, updated) = run().map_err(to_core)?;
        let logits = to_f32(&logits)?;
        drop(model);
        for (cache, layers) in caches.iter_mut().zip(updated) {
            cache.0 = layers;
            cache.1 += 1;
        }
        Ok(logits
            .chunks(b.spec.vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }

    fn cache_len(&self, cache: &SeqCache) -> usize {
        cache.1
    }

    fn truncate(&self, cache: &mut SeqCache, len: usize) -> Result<()> {
        let cur = cache.1;
        if len >= cur {
            return Ok(());
        }
        let masks = self.backbone.config.layer_masks();
        let mut kept = Vec::with_capacity(cache.0.len());
        for (slot, mask) in cache.0.iter().zip(&masks) {
            let Some((k, v)) = slot else {
                kept.push(None);
                continue;
            };
            // a sliding-window layer may have dropped positions a shorter sequence needs
            let keep = mask.keep_range(cur - mask.kept(cur), len).ok_or_else(|| {
                Error::InvalidBatch(format!(
                    "a sliding-window cache of {cur} positions cannot go back to {len}"
                ))
            })?;
            let (from, n) = (keep.start as i64, keep.len() as i64);
            kept.push(Some((
                k.f_narrow(2, from, n).map_err(to_core)?,
                v.f_narrow(2, from, n).map_err(to_core)?,
            )));
        }
        cache.0 = kept;
        cache.1 = len;
        Ok(())
    }
}
