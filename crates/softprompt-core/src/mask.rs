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
}

impl AttentionMask {
    fn hides(self, query: usize, key: usize) -> bool {
        self == AttentionMask::Causal && key > query
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
                for j in 0..t {
                    if self.hides(q, j) || !mask[r * t + j] {
                        bias[(r * t + q) * s + n + j] = MASKED_BIAS;
                    }
                }
            }
        }
        bias
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
    }
}
