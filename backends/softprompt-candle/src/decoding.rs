//! candle's kernels for continuous batching ([`softprompt_core::Batcher`] does the planning and
//! bookkeeping): prefill of a group of sequences and one decode step.
//!
//! Off the host path every sequence keeps its own tensor cache; a step packs the caches of the
//! listed sequences into one padded batch (padding masked out, each row at its own RoPE /
//! position-embedding position), runs one forward pass and appends each row's new keys and
//! values. On the CPU in f32 (Llama family) each sequence's keys and values live in host buffers
//! instead ([`HostCache`]): a step appends in place and attends over each row's own buffer, with
//! no per-step packing, padding or copying of the caches, and prefills are packed without
//! padding.

use candle_core::{DType, Tensor};
use softprompt_core::{
    input_rows, AttentionMask, Batch, BatchRow, Capabilities, DecodeKernels, Error, Placement,
    Positions, PrefillPlan, SoftPrompt,
};

use crate::model::{HostCache, LayerCache};
use crate::{to_core, CResult, CandleBackbone, Result};

/// Most sequences prefilled in one padded forward pass.
const PREFILL_ROWS: usize = 16;

/// Most input tokens prefilled in one packed pass on the host path (more sequences if short).
pub(crate) const PREFILL_TOKENS: usize = 1024;

/// One layer's keys and values.
type KeyValue = (Tensor, Tensor);

/// Row `r`'s keys and values of every layer from a packed cache `[rows, kv, total, hd]`: the
/// sequence's first `len` positions, of which each layer keeps what its mask says
/// ([`AttentionMask::keep_range`]: a sliding-window layer only the last `window - 1`).
fn own_cache(
    packed: &[LayerCache],
    masks: &[AttentionMask],
    r: usize,
    len: usize,
) -> candle_core::Result<Vec<LayerCache>> {
    packed
        .iter()
        .zip(masks)
        .map(|(slot, mask)| {
            let (k, v) = slot.as_ref().expect("forward fills the cache");
            let keep = mask.keep_range(0, len).expect("nothing dropped yet");
            Ok(Some((
                k.narrow(0, r, 1)?
                    .narrow(2, keep.start, keep.len())?
                    .contiguous()?,
                v.narrow(0, r, 1)?
                    .narrow(2, keep.start, keep.len())?
                    .contiguous()?,
            )))
        })
        .collect()
}

/// A live sequence's keys and values.
pub(crate) enum SeqCache {
    /// Cache of every layer (`[1, heads, len, head_dim]`) and the length.
    Tensors(Vec<LayerCache>, usize),
    Host(HostCache),
}

/// The kernels of one backbone; `host` is decided once, from the model, device and dtype.
pub(crate) struct CandleKernels<'a> {
    pub backbone: &'a CandleBackbone,
    pub host: bool,
}

impl CandleKernels<'_> {
    /// `[prompt][ids]` in one pass (a sequence alone, possibly without input tokens): its
    /// cache and next-token logits.
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
        let p = b.prompts_tensor(std::slice::from_ref(prompt), n)?;
        let run = || -> CResult<(Vec<LayerCache>, Vec<f32>)> {
            let x = if ids.is_empty() {
                p
            } else {
                let row = BatchRow {
                    ids: ids.to_vec(),
                    targets: vec![false; ids.len()],
                    prompt: 0,
                };
                b.inputs(&p, &Batch::from_rows(&[row], 0)?, n)?.x
            };
            let s = x.dim(1)?;
            let bias = b.bias(&[1, 1, s, s], |m| m.chunk_bias(s, s))?;
            let mut cache: Vec<LayerCache> = vec![None; b.model.num_layers()];
            let h = b
                .model
                .forward(&x, 0, Some(&bias), Some((&mut cache, true)))?;
            let last = h.narrow(1, s - 1, 1)?.reshape((1, b.spec.hidden_size))?;
            let logits = b
                .model
                .head(&last)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            Ok((cache, logits))
        };
        let (cache, logits) = run().map_err(to_core)?;
        let len = n + ids.len();
        let cache = if self.host {
            // the host path serves windowless models only: nothing to drop
            SeqCache::Host(HostCache::from_tensors(&cache, len).map_err(to_core)?)
        } else {
            let masks = self.backbone.config.layer_masks();
            SeqCache::Tensors(own_cache(&cache, &masks, 0, len).map_err(to_core)?, len)
        };
        Ok((cache, logits))
    }

    /// Sequences of one prompt length, right padded in one pass: each distinct prompt's keys
    /// and values come from the prefix cache (or one pass), and each sequence keeps its own
    /// slice of the cache.
    fn prefill_padded(&self, group: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqCache, Vec<f32>)>> {
        // one prompt length and one placement: the batcher groups them so
        let placement = group[0].0.placement();
        let b = self.backbone;
        let n = group[0].0.num_virtual_tokens();
        let (batch, prompts) = input_rows(group)?;
        let p = b.prompts_tensor(&prompts, n)?;
        let masks = b.config.layer_masks();
        let run = || -> CResult<Vec<(SeqCache, Vec<f32>)>> {
            let (hidden, cache) = b.token_hidden(&p, placement, Some(&prompts), &batch, n, true)?;
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
                    let own = own_cache(&cache, &masks, r, len)?;
                    Ok((SeqCache::Tensors(own, len), logits))
                })
                .collect()
        };
        run().map_err(to_core)
    }

    /// Sequences of any prompts packed (no padding) over copies of their prompts' keys and
    /// values ([`crate::model::Model::extend_host`]).
    fn prefill_host(&self, group: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqCache, Vec<f32>)>> {
        let b = self.backbone;
        let prompts: Vec<&SoftPrompt> = group.iter().map(|(p, _)| *p).collect();
        let mut caches = b.host_prefixes(&prompts)?;
        let inputs: Vec<&[u32]> = group.iter().map(|(_, ids)| *ids).collect();
        let mut own: Vec<&mut HostCache> = caches.iter_mut().collect();
        let logits: Vec<Vec<f32>> = b
            .host_extend_last(&inputs, &mut own)?
            .to_vec2()
            .map_err(to_core)?;
        Ok(caches.into_iter().map(SeqCache::Host).zip(logits).collect())
    }

    /// A padded step over tensor caches (appended to only once the pass succeeded). A layer's
    /// caches hold what its mask keeps ([`AttentionMask::kept`]), so sliding-window layers pack
    /// at most `window - 1` positions per row.
    fn step_padded(&self, caches: &mut [&mut SeqCache], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let b = self.backbone;
        let rows = tokens.len();
        let starts: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let layers = b.model.num_layers();
        let masks = b.config.layer_masks();
        // the packed length of each layer: the longest cache it keeps
        let longest: Vec<usize> = masks
            .iter()
            .map(|m| starts.iter().map(|&s| m.kept(s)).max().unwrap_or(0))
            .collect();
        let run = || -> CResult<(Vec<Vec<f32>>, Vec<KeyValue>)> {
            let ids = Tensor::from_slice(tokens, rows, &b.device)?;
            let x = b
                .model
                .embed(&ids)?
                .reshape((rows, 1, b.spec.hidden_size))?;
            let pad = |t: &Tensor, longest: usize| -> CResult<Tensor> {
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
                for cache in caches.iter() {
                    let SeqCache::Tensors(cache, _) = &**cache else {
                        return Err(
                            Error::backend(crate::BACKEND, "host cache off the host path").into(),
                        );
                    };
                    let (k, v) = cache[layer]
                        .as_ref()
                        .expect("a prefilled sequence has a cache in every layer");
                    ks.push(pad(k, longest[layer])?);
                    vs.push(pad(v, longest[layer])?);
                }
                packed.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
            }
            // row r sees its own cached keys, not the padding, and its new token
            let bias = b.step_bias(&starts)?;
            let h = b.model.forward_step(
                &x,
                Positions::PerRow(&starts),
                Some(&bias),
                Some((&mut packed, true)),
            )?;
            let logits = b
                .model
                .head_step(&h.reshape((rows, b.spec.hidden_size))?)?
                .to_dtype(DType::F32)?
                .to_vec2()?;
            let fresh = packed
                .into_iter()
                .zip(&longest)
                .map(|(slot, &at)| {
                    let (k, v) = slot.expect("forward fills the cache");
                    Ok((k.narrow(2, at, 1)?, v.narrow(2, at, 1)?))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((logits, fresh))
        };
        let (logits, fresh) = run().map_err(to_core)?;
        let append = || -> candle_core::Result<Vec<Vec<LayerCache>>> {
            caches
                .iter()
                .enumerate()
                .map(|(r, cache)| {
                    let SeqCache::Tensors(cache, _) = &**cache else {
                        unreachable!("checked above")
                    };
                    let start = starts[r];
                    cache
                        .iter()
                        .zip(&fresh)
                        .zip(&masks)
                        .map(|((slot, (k, v)), mask)| {
                            let (pk, pv) = slot.as_ref().expect("prefilled");
                            // positions `start - kept(start)..=start`, then what `start + 1` keeps
                            let keep = mask
                                .keep_range(start - mask.kept(start), start + 1)
                                .expect("a step drops nothing still needed");
                            let k = Tensor::cat(&[pk, &k.narrow(0, r, 1)?], 2)?;
                            let v = Tensor::cat(&[pv, &v.narrow(0, r, 1)?], 2)?;
                            Ok(Some(if keep.len() == start + 1 {
                                (k, v)
                            } else {
                                (
                                    k.narrow(2, keep.start, keep.len())?.contiguous()?,
                                    v.narrow(2, keep.start, keep.len())?.contiguous()?,
                                )
                            }))
                        })
                        .collect()
                })
                .collect()
        };
        let updated = append().map_err(to_core)?;
        for (cache, layers) in caches.iter_mut().zip(updated) {
            if let SeqCache::Tensors(c, len) = &mut **cache {
                *c = layers;
                *len += 1;
            }
        }
        Ok(logits)
    }

    /// A step over host caches: appends in place ([`crate::model::Model::decode_host`], which
    /// leaves the caches as they were on error).
    fn step_host(&self, caches: &mut [&mut SeqCache], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let b = self.backbone;
        let mut host: Vec<&mut HostCache> = Vec::with_capacity(caches.len());
        for cache in caches.iter_mut() {
            match &mut **cache {
                SeqCache::Host(h) => host.push(h),
                SeqCache::Tensors(..) => {
                    return Err(Error::backend(
                        crate::BACKEND,
                        "tensor cache on the host path",
                    ))
                }
            }
        }
        let mut run = || -> CResult<Vec<Vec<f32>>> {
            let rows = tokens.len();
            let ids = Tensor::from_slice(tokens, rows, &b.device)?;
            let x = b
                .model
                .embed(&ids)?
                .reshape((rows, 1, b.spec.hidden_size))?;
            let h = b.model.decode_host(&x, &mut host)?;
            Ok(b.model
                .head_step(&h.reshape((rows, b.spec.hidden_size))?)?
                .to_dtype(DType::F32)?
                .to_vec2()?)
        };
        run().map_err(to_core)
    }
}

impl SeqCache {
    fn len(&self) -> usize {
        match self {
            SeqCache::Tensors(_, len) => *len,
            SeqCache::Host(h) => h.len,
        }
    }
}

impl DecodeKernels for CandleKernels<'_> {
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
        if self.host {
            PrefillPlan::Packed {
                tokens: PREFILL_TOKENS,
            }
        } else {
            PrefillPlan::EqualPromptLength { rows: PREFILL_ROWS }
        }
    }

    fn prefill(&self, group: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqCache, Vec<f32>)>> {
        crate::in_pool(|| match group {
            [(prompt, ids)] if ids.is_empty() => Ok(vec![self.prefill_one(prompt, ids)?]),
            _ if self.host => self.prefill_host(group),
            _ => self.prefill_padded(group),
        })
    }

    fn step(&self, caches: &mut [&mut SeqCache], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        crate::in_pool(|| {
            if self.host {
                self.step_host(caches, tokens)
            } else {
                self.step_padded(caches, tokens)
            }
        })
    }

    fn cache_len(&self, cache: &SeqCache) -> usize {
        cache.len()
    }

    fn truncate(&self, cache: &mut SeqCache, len: usize) -> Result<()> {
        match cache {
            SeqCache::Host(h) => {
                let heads = self.backbone.model.heads();
                h.len = h.len.min(len);
                h.truncate(heads.kv * heads.dim);
                Ok(())
            }
            SeqCache::Tensors(layers, l) => {
                if len >= *l {
                    return Ok(());
                }
                let masks = self.backbone.config.layer_masks();
                let mut kept = Vec::with_capacity(layers.len());
                for (slot, mask) in layers.iter().zip(&masks) {
                    let Some((k, v)) = slot else {
                        kept.push(None);
                        continue;
                    };
                    // a sliding-window layer may have dropped positions a shorter sequence needs
                    let keep = mask.keep_range(*l - mask.kept(*l), len).ok_or_else(|| {
                        Error::InvalidBatch(format!(
                            "a sliding-window cache of {} positions cannot go back to {len}",
                            *l
                        ))
                    })?;
                    let cut = |t: &Tensor| t.narrow(2, keep.start, keep.len()).map_err(to_core);
                    kept.push(Some((cut(k)?, cut(v)?)));
                }
                *layers = kept;
                *l = len;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CandleOptions;

    /// Sliding-window layers keep `window - 1` positions through prefill and steps; full
    /// layers keep everything.
    #[test]
    fn sliding_window_layers_keep_a_bounded_cache() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tiny-gemma3"
        );
        let b = CandleBackbone::load(dir, CandleOptions::default()).unwrap();
        let k = CandleKernels {
            backbone: &b,
            host: false,
        };
        let masks = b.config.layer_masks();
        assert_eq!(masks[2], AttentionMask::Causal);
        assert_eq!(masks[0], AttentionMask::SlidingWindow(4));
        let d = b.spec.hidden_size;
        let prompt = SoftPrompt::new(2, d, vec![0.01; 2 * d]).unwrap();
        let ids = [5u32, 6, 7, 8, 9];
        let other = [11u32];
        let mut out = k
            .prefill(&[(&prompt, &ids[..]), (&prompt, &other[..])])
            .unwrap();
        let stored = |c: &SeqCache| -> Vec<usize> {
            let SeqCache::Tensors(layers, _) = c else {
                panic!("tensor caches off the host path")
            };
            layers
                .iter()
                .map(|s| s.as_ref().unwrap().0.dim(2).unwrap())
                .collect()
        };
        let (mut a, _) = out.remove(0);
        let (mut c, _) = out.remove(0);
        assert_eq!(stored(&a), vec![3, 3, 7, 3]);
        assert_eq!(stored(&c), vec![3, 3, 3, 3]);
        for step in 0..3 {
            k.step(&mut [&mut a, &mut c], &[12, 13]).unwrap();
            let (la, lc) = (7 + step + 1, 3 + step + 1);
            assert_eq!(stored(&a), vec![3, 3, la, 3]);
            assert_eq!(stored(&c), vec![3, 3, lc, 3]);
        }
        // a rollback to the length it has changes nothing; further back the window layers
        // have dropped what a shorter sequence would see: refused, not wrong
        k.truncate(&mut a, 10).unwrap();
        assert_eq!((a.len(), stored(&a)), (10, vec![3, 3, 10, 3]));
        assert!(k.truncate(&mut a, 9).is_err());
        assert_eq!(a.len(), 10);
    }
}
