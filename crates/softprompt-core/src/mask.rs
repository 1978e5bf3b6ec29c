//! Attention masks, built from what the model is (causal or bidirectional) and what the batch
//! holds (padding), as additive biases.

use serde::{Deserialize, Serialize};

use crate::Batch;

/// Additive attention bias for a key a query may not see: finite, so that f16/bf16 stay NaN-free.
pub const MASKED_BIAS: f32 = -1e9;

/// Which keys a query sees, besides padding: a property of the model, not of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionMask {
    /// A query sees its own and earlier positions (decoders).
    Causal,
    /// A query sees every position (encoders, vision transformers).
    Bidirectional,
    /// A query sees its own position and the `window - 1` before it (a decoder's local layers).
    SlidingWindow(usize),
}

impl AttentionMask {
    /// Whether a query at `query` may not see the key at `key` (absolute positions).
    pub fn hides(self, query: usize, key: usize) -> bool {
        match self {
            AttentionMask::Causal => key > query,
            AttentionMask::Bidirectional => false,
            AttentionMask::SlidingWindow(w) => key > query || query - key >= w,
        }
    }

    /// Bias `[rows, N + T, N + T]` over `[prompt][tokens]` of `batch`: padding keys hidden, the
    /// `N` virtual tokens never padding.
    pub fn bias(self, batch: &Batch, n: usize) -> Vec<f32> {
        let (rows, t) = (batch.rows(), batch.seq_len());
        let s = n + t;
        let mask = batch.attention_mask();
        let mut bias = vec![0f32; rows * s * s];
        for r in 0..rows {
            for q in 0..s {
                for k in 0..s {
                    if self.hides(q, k) || (k >= n && !mask[r * t + k - n]) {
                        bias[(r * s + q) * s + k] = MASKED_BIAS;
                    }
                }
            }
        }
        bias
    }

    /// Bias `[rows, T, N + T]` of the token positions only, over the `N` virtual tokens (their
    /// keys and values computed beforehand, e.g. a prompt's cache) and the row's own real tokens.
    /// Only a causal model can compute the virtual tokens without the tokens after them.
    pub fn token_bias(self, batch: &Batch, n: usize) -> Vec<f32> {
        let (rows, t) = (batch.rows(), batch.seq_len());
        let s = n + t;
        let mask = batch.attention_mask();
        let mut bias = vec![0f32; rows * t * s];
        for r in 0..rows {
            for q in 0..t {
                for k in 0..s {
                    if self.hides(n + q, k) || (k >= n && !mask[r * t + k - n]) {
                        bias[(r * t + q) * s + k] = MASKED_BIAS;
                    }
                }
            }
        }
        bias
    }

    /// Bias `[rows, past + 1]` of one decode step over caches packed left-aligned to the
    /// longest, `past = max(lens)`: row `r` holds `lens[r]` cached positions (the rest is
    /// padding, hidden) and its new token at position `lens[r]`, stored last.
    pub fn step_bias(self, lens: &[usize]) -> Vec<f32> {
        let past = lens.iter().copied().max().unwrap_or(0);
        let width = past + 1;
        let mut bias = vec![0f32; lens.len() * width];
        for (r, &len) in lens.iter().enumerate() {
            for k in 0..past {
                if k >= len || self.hides(len, k) {
                    bias[r * width + k] = MASKED_BIAS;
                }
            }
        }
        bias
    }

    /// How many of a sequence's `len` positions a later query can still see: all of them, or
    /// in a sliding-window layer the last `window - 1` (a decode cache drops the rest).
    pub fn kept(self, len: usize) -> usize {
        match self {
            AttentionMask::SlidingWindow(w) => len.min(w.saturating_sub(1)),
            AttentionMask::Causal | AttentionMask::Bidirectional => len,
        }
    }

    /// Where, in a cache holding positions `first..`, the [`Self::kept`] positions of a
    /// sequence of `len` lie (those ending at `len`); `None` when some were already dropped.
    pub fn keep_range(self, first: usize, len: usize) -> Option<std::ops::Range<usize>> {
        let k = self.kept(len);
        let start = (len - k).checked_sub(first)?;
        Some(start..start + k)
    }

    /// [`Self::step_bias`] over caches bounded by [`Self::kept`]: row `r` holds the last
    /// `kept(lens[r])` positions of a sequence of `lens[r]`. The bias `[rows, width]` and its
    /// `width` (the longest kept cache plus the new token).
    pub fn kept_step_bias(self, lens: &[usize]) -> (Vec<f32>, usize) {
        let kept: Vec<usize> = lens.iter().map(|&l| self.kept(l)).collect();
        let width = kept.iter().copied().max().unwrap_or(0) + 1;
        // every kept key is inside the window of the new query: only padding is hidden
        (self.step_bias(&kept), width)
    }

    /// Bias `[len, total]` for `len` new queries at the last positions of a sequence of `total`
    /// (the earlier `total - len` positions, e.g. a KV cache, are visible to all of them).
    pub fn chunk_bias(self, len: usize, total: usize) -> Vec<f32> {
        let start = total - len;
        let mut bias = vec![0f32; len * total];
        for q in 0..len {
            for k in 0..total {
                if self.hides(start + q, k) {
                    bias[q * total + k] = MASKED_BIAS;
                }
            }
        }
        bias
    }
}

/// [`AttentionMask::chunk_bias`] of a causal model.
pub fn causal_bias(len: usize, total: usize) -> Vec<f32> {
    AttentionMask::Causal.chunk_bias(len, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BatchRow;

    #[test]
    fn biases_hide_future_and_padding_keys() {
        let b = Batch::from_rows(
            &[
                BatchRow::with_continuation(&[1], &[2], 0),
                BatchRow::with_continuation(&[3, 4], &[5], 0),
            ],
            0,
        )
        .unwrap();
        let m = MASKED_BIAS;
        // row 0: one virtual token, tokens [1, 2, pad]
        let full = AttentionMask::Causal.bias(&b, 1);
        assert_eq!(
            &full[..16],
            &[0., m, m, m, 0., 0., m, m, 0., 0., 0., m, 0., 0., 0., m]
        );
        let tokens = AttentionMask::Causal.token_bias(&b, 1);
        assert_eq!(&tokens[..12], &full[4..16]);
        assert_eq!(causal_bias(2, 3), vec![0., 0., m, 0., 0., 0.]);
        assert_eq!(causal_bias(1, 4), vec![0.; 4]);
        // bidirectional: only padding is hidden
        let both = AttentionMask::Bidirectional.bias(&b, 1);
        assert_eq!(
            &both[..16],
            &[0., 0., 0., m, 0., 0., 0., m, 0., 0., 0., m, 0., 0., 0., m]
        );
        assert_eq!(AttentionMask::Bidirectional.chunk_bias(2, 3), vec![0.; 6]);
        // a window of 2: a query sees itself and the one position before it
        let w = AttentionMask::SlidingWindow(2);
        assert_eq!(w.chunk_bias(3, 3), vec![0., m, m, 0., 0., m, m, 0., 0.]);
        // tokens after one virtual token: token 1 (position 2) no longer sees the prompt
        let tw = w.token_bias(&b, 1);
        assert_eq!(&tw[..12], &[0., 0., m, m, m, 0., 0., m, m, m, 0., m]);
        // a step: row 0 has 3 cached positions, row 1 one (then padding)
        assert_eq!(
            AttentionMask::Causal.step_bias(&[3, 1]),
            vec![0., 0., 0., 0., 0., m, m, 0.]
        );
        assert_eq!(w.step_bias(&[3, 1]), vec![m, m, 0., 0., 0., m, m, 0.]);
    }

    #[test]
    fn window_caches_keep_what_later_queries_see() {
        let w = AttentionMask::SlidingWindow(3);
        assert_eq!((w.kept(0), w.kept(1), w.kept(2), w.kept(9)), (0, 1, 2, 2));
        assert_eq!(AttentionMask::Causal.kept(9), 9);
        // a prefill of 5 (positions 0..5): keep 3..5
        assert_eq!(w.keep_range(0, 5), Some(3..5));
        // a cache of positions 2..4 plus a new token at 4: keep 3..5, i.e. stored 1..3
        assert_eq!(w.keep_range(2, 5), Some(1..3));
        // rolled back to 3 from a cache of 3..5: position 1 was dropped
        assert_eq!(w.keep_range(3, 3), None);
        assert_eq!(AttentionMask::Causal.keep_range(0, 4), Some(0..4));
        // the bounded step bias equals the full one over the positions kept
        let m = MASKED_BIAS;
        let (bias, width) = w.kept_step_bias(&[5, 1]);
        assert_eq!(width, 3);
        assert_eq!(bias, vec![0., 0., 0., 0., m, 0.]);
        let full = w.step_bias(&[5, 1]);
        assert_eq!(&full[3..6], &bias[..3]);
        let (causal, width) = AttentionMask::Causal.kept_step_bias(&[3, 1]);
        assert_eq!(
            (causal, width),
            (AttentionMask::Causal.step_bias(&[3, 1]), 4)
        );
    }
}
