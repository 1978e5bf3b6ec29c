//! ONNX Runtime's kernels for continuous batching ([`softprompt_core::Batcher`] does the
//! planning and bookkeeping): every call is one run of the exported graph. A prefill runs
//! sequences whose prompts have the same length together; a step runs all listed sequences,
//! their caches packed into `[rows, kv_heads, longest, head_dim]` with the padding masked in
//! `attention_bias` and each row at its own position.

use softprompt_core::backbone::check_prompts;
use softprompt_core::{
    Batch, BatchRow, Capabilities, DecodeKernels, Error, Placement, PrefillPlan, SoftPrompt,
};

use std::ops::Range;

use crate::{HostOut, Inputs, OrtBackbone, Result};

/// Most sequences prefilled in one graph call.
const PREFILL_ROWS: usize = 16;

/// The cache of one sequence: per layer `(keys, values)`, each `[kv_heads, len, head_dim]`.
#[derive(Debug)]
pub(crate) struct SeqCache {
    past: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

/// The kernels of one backbone.
pub(crate) struct OrtKernels<'a> {
    pub backbone: &'a OrtBackbone,
}

impl OrtKernels<'_> {
    /// Copies row `r`'s positions `keep` (and, if given, position `extra`) of a present output
    /// `[rows, kv_heads, total, head_dim]`.
    fn slice_row(
        &self,
        present: &[f32],
        r: usize,
        total: usize,
        keep: Range<usize>,
        extra: Option<usize>,
    ) -> Vec<f32> {
        let (kv, hd) = (self.backbone.kv_heads, self.backbone.head_dim);
        let len = keep.len() + usize::from(extra.is_some());
        let mut out = Vec::with_capacity(kv * len * hd);
        for h in 0..kv {
            let base = (r * kv + h) * total * hd;
            out.extend_from_slice(&present[base + keep.start * hd..base + keep.end * hd]);
            if let Some(e) = extra {
                out.extend_from_slice(&present[base + e * hd..base + (e + 1) * hd]);
            }
        }
        out
    }

    /// Row `r`'s cache of a sequence of `len` from a call's present outputs (`out[1..]`, each
    /// `[rows, kv_heads, total, head_dim]`): what each layer's mask keeps of positions `0..len`.
    fn own_cache(&self, out: &[HostOut], r: usize, total: usize, len: usize) -> SeqCache {
        let masks = self.backbone.config.layer_masks();
        let past = out
            .chunks(2)
            .zip(&masks)
            .map(|(kv, mask)| {
                let keep = mask.keep_range(0, len).expect("nothing dropped yet");
                (
                    self.slice_row(&kv[0].1, r, total, keep.clone(), None),
                    self.slice_row(&kv[1].1, r, total, keep, None),
                )
            })
            .collect();
        SeqCache { past, len }
    }

    /// Every layer's keys and values `[kv_heads, N, head_dim]` at an input-embedding prompt's own
    /// positions: one call over `[prompt][token 0]`, whose token cannot change the positions
    /// before it (causal attention), read before any layer's window drops a position.
    pub(crate) fn prompt_keys_values(
        &self,
        prompt: &SoftPrompt,
    ) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let n = prompt.num_virtual_tokens();
        let out = self.backbone.run_decode(self.prompt_inputs(prompt, &[0]))?;
        Ok(out[1..]
            .chunks(2)
            .map(|kv| {
                let own = |x: &[f32]| self.slice_row(x, 0, n + 1, 0..n, None);
                (own(&kv[0].1), own(&kv[1].1))
            })
            .collect())
    }

    /// The graph's inputs for `[prompt][ids]` of one sequence (input embeddings), the logits
    /// picked at its last position.
    fn prompt_inputs(&self, prompt: &SoftPrompt, ids: &[u32]) -> Inputs {
        let b = self.backbone;
        let n = prompt.num_virtual_tokens();
        let s = n + ids.len();
        Inputs {
            rows: 1,
            input_ids: ids.iter().map(|i| *i as i64).collect(),
            tokens: ids.len(),
            prompt_embeds: prompt.values().to_vec(),
            virtual_tokens: n,
            position_ids: (0..s as i64).collect(),
            attention_bias: b.bias(|m| m.chunk_bias(s, s)),
            gather_index: vec![(s - 1) as i64],
            picks: 1,
            candidate_ids: vec![0],
            candidates: 1,
            past: Vec::new(),
            past_len: 0,
        }
    }

    /// `[prompt][ids]` of one sequence in one call (no input tokens allowed).
    fn prefill_one(&self, prompt: &SoftPrompt, ids: &[u32]) -> Result<(SeqCache, Vec<f32>)> {
        if prompt.placement() == Placement::KeyValuePrefix {
            if ids.is_empty() {
                return Err(Error::InvalidBatch(
                    "a key/value prefix predicts nothing by itself: give at least one token".into(),
                ));
            }
            let mut one = self.prefill_group(&[(prompt, ids)])?;
            return Ok(one.remove(0));
        }
        let s = prompt.num_virtual_tokens() + ids.len();
        let mut out = self.backbone.run_decode(self.prompt_inputs(prompt, ids))?;
        let logits = std::mem::take(&mut out[0].1);
        Ok((self.own_cache(&out[1..], 0, s, s), logits))
    }

    /// One call for sequences whose prompts have the same length and placement (the batcher
    /// groups them so) and at least one input token each.
    fn prefill_group(&self, group: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqCache, Vec<f32>)>> {
        let b = self.backbone;
        let n = group[0].0.num_virtual_tokens();
        let rows: Vec<BatchRow> = group
            .iter()
            .enumerate()
            .map(|(i, (_, ids))| BatchRow {
                ids: ids.to_vec(),
                targets: vec![false; ids.len()],
                prompt: i,
            })
            .collect();
        let batch = Batch::from_rows(&rows, 0)?;
        let prompts: Vec<SoftPrompt> = group.iter().map(|(p, _)| (*p).clone()).collect();
        check_prompts(b, &prompts, &batch)?;
        let s = n + batch.seq_len();
        let mut inputs = b.full_inputs(&prompts, &batch, n);
        let shift = OrtBackbone::graph_shift(&prompts, n);
        inputs.gather_index = (0..rows.len())
            .map(|r| (n + batch.row_len(r) - 1 - shift) as i64)
            .collect();
        inputs.picks = 1;
        inputs.candidate_ids = vec![0; rows.len()];
        inputs.candidates = 1;
        let out = b.run_decode(inputs)?;
        let vocab = b.spec.vocab_size;
        Ok((0..rows.len())
            .map(|r| {
                let len = n + batch.row_len(r);
                let logits = out[0].1[r * vocab..(r + 1) * vocab].to_vec();
                (self.own_cache(&out[1..], r, s, len), logits)
            })
            .collect())
    }
}

impl DecodeKernels for OrtKernels<'_> {
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

    fn prefill(&self, group: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqCache, Vec<f32>)>> {
        match group {
            [(prompt, ids)] => Ok(vec![self.prefill_one(prompt, ids)?]),
            _ => self.prefill_group(group),
        }
    }

    /// Every cache is replaced only after the call succeeded.
    fn step(&self, caches: &mut [&mut SeqCache], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let b = self.backbone;
        let rows = tokens.len();
        let lens: Vec<usize> = caches.iter().map(|c| c.len).collect();
        let p = lens.iter().copied().max().unwrap_or(0);
        let (kv, hd) = (b.kv_heads, b.head_dim);
        let masks = b.config.layer_masks();
        // each layer's caches (what its mask keeps) packed left-aligned, zero padded to the
        // longest of that layer
        let longest: Vec<usize> = masks
            .iter()
            .map(|m| lens.iter().map(|&l| m.kept(l)).max().unwrap_or(0))
            .collect();
        let mut past = Vec::with_capacity(b.layers);
        for (l, (mask, &p)) in masks.iter().zip(&longest).enumerate() {
            let mut k = vec![0f32; rows * kv * p * hd];
            let mut v = vec![0f32; rows * kv * p * hd];
            for (r, seq) in caches.iter().enumerate() {
                let n = mask.kept(seq.len) * hd;
                for h in 0..kv {
                    let dst = (r * kv + h) * p * hd;
                    k[dst..dst + n].copy_from_slice(&seq.past[l].0[h * n..(h + 1) * n]);
                    v[dst..dst + n].copy_from_slice(&seq.past[l].1[h * n..(h + 1) * n]);
                }
            }
            past.push((k, v));
        }
        let bias = b.step_bias(&lens);
        let inputs = Inputs {
            rows,
            input_ids: tokens.iter().map(|t| *t as i64).collect(),
            tokens: 1,
            prompt_embeds: Vec::new(),
            virtual_tokens: 0,
            position_ids: lens.iter().map(|l| *l as i64).collect(),
            attention_bias: bias,
            gather_index: vec![0; rows],
            picks: 1,
            candidate_ids: vec![0; rows],
            candidates: 1,
            past,
            past_len: p,
        };
        let out = b.run_decode(inputs)?;
        let vocab = b.spec.vocab_size;
        let mut logits = Vec::with_capacity(rows);
        for (r, seq) in caches.iter_mut().enumerate() {
            let len = lens[r];
            seq.past = out[1..]
                .chunks(2)
                .zip(&masks)
                .zip(&longest)
                .map(|((pair, mask), &p)| {
                    // the row held `len - kept(len)..len`; the new token is at `p`; keep what
                    // `len + 1` keeps (it always ends with the new token)
                    let first = len - mask.kept(len);
                    let keep = mask
                        .keep_range(first, len + 1)
                        .expect("a step drops nothing still needed");
                    let old = keep.start..keep.end - 1;
                    (
                        self.slice_row(&pair[0].1, r, p + 1, old.clone(), Some(p)),
                        self.slice_row(&pair[1].1, r, p + 1, old, Some(p)),
                    )
                })
                .collect();
            seq.len = len + 1;
            logits.push(out[0].1[r * vocab..(r + 1) * vocab].to_vec());
        }
        Ok(logits)
    }

    fn cache_len(&self, cache: &SeqCache) -> usize {
        cache.len
    }

    fn truncate(&self, cache: &mut SeqCache, len: usize) -> Result<()> {
        let cur = cache.len;
        if len >= cur {
            return Ok(());
        }
        let (kv, hd) = (self.backbone.kv_heads, self.backbone.head_dim);
        let masks = self.backbone.config.layer_masks();
        let mut kept = Vec::with_capacity(cache.past.len());
        for ((k, v), mask) in cache.past.iter().zip(&masks) {
            // a sliding-window layer may have dropped positions a shorter sequence needs
            let keep = mask.keep_range(cur - mask.kept(cur), len).ok_or_else(|| {
                Error::InvalidBatch(format!(
                    "a sliding-window cache of {cur} positions cannot go back to {len}"
                ))
            })?;
            let stored = mask.kept(cur) * hd;
            let cut = |x: &Vec<f32>| -> Vec<f32> {
                (0..kv)
                    .flat_map(|h| {
                        x[h * stored + keep.start * hd..h * stored + keep.end * hd]
                            .iter()
                            .copied()
                    })
                    .collect()
            };
            kept.push((cut(k), cut(v)));
        }
        cache.past = kept;
        cache.len = len;
        Ok(())
    }
}
