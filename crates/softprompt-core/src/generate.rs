//! Sampling loop shared by every backend: greedy, temperature, top-p, stop tokens.

use serde::{Deserialize, Serialize};

use crate::{Backbone, Error, Result, Rng, SoftPrompt};

/// Decoding settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// 0 means greedy; otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Nucleus sampling mass in `(0, 1]`; 1 disables it.
    pub top_p: f32,
    /// Generation stops after any of these tokens (which are kept in the output).
    pub stop_tokens: Vec<u32>,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            stop_tokens: Vec::new(),
            seed: 0,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// This stop token was produced.
    StopToken(u32),
}

/// Generated tokens and why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationOutput {
    /// New tokens only.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
}

/// Generates after `[prompt][ids]` with the backbone's KV-cached decoder.
pub fn generate(
    backbone: &dyn Backbone,
    prompt: &SoftPrompt,
    ids: &[u32],
    params: &GenerationParams,
) -> Result<GenerationOutput> {
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "top_p must be in (0, 1], got {}",
            params.top_p
        )));
    }
    if !(params.temperature >= 0.0 && params.temperature.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "temperature must be finite and >= 0, got {}",
            params.temperature
        )));
    }
    let mut rng = Rng::seed_from_u64(params.seed);
    let mut session = backbone.start_decode(prompt, ids)?;
    // the last new token is never fed back: `max_new_tokens - 1` more positions
    if let Some(max) = session.max_positions() {
        let at = session.position();
        let need = at + params.max_new_tokens.saturating_sub(1);
        if need > max {
            return Err(Error::InvalidArgument(format!(
                "{} new tokens after {at} positions (virtual tokens included) need {need} \
                 positions; the model holds {max}: ask for at most {} new tokens",
                params.max_new_tokens,
                (max + 1).saturating_sub(at)
            )));
        }
    }
    let mut tokens = Vec::new();
    while tokens.len() < params.max_new_tokens {
        let next = sample(session.logits(), params, &mut rng);
        tokens.push(next);
        if params.stop_tokens.contains(&next) {
            return Ok(GenerationOutput {
                tokens,
                stop: StopReason::StopToken(next),
            });
        }
        if tokens.len() < params.max_new_tokens {
            session.advance(next)?;
        }
    }
    Ok(GenerationOutput {
        tokens,
        stop: StopReason::MaxTokens,
    })
}

/// Picks the next token from `logits` as `params` say.
pub fn sample(logits: &[f32], params: &GenerationParams, rng: &mut Rng) -> u32 {
    if params.temperature == 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, (((l - max) / params.temperature) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    if params.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut mass = 0.0;
        let mut keep = 0;
        for (i, p) in probs.iter().enumerate() {
            mass += p.1;
            keep = i + 1;
            if mass >= params.top_p as f64 {
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * total;
    for (id, p) in &probs {
        if u < *p {
            return *id;
        }
        u -= p;
    }
    probs.last().map(|p| p.0).unwrap_or(0)
}

/// Index of the largest value (first on ties; 0 when empty): greedy decoding's next token,
/// rank classification's predicted class.
pub fn argmax<T: PartialOrd>(values: &[T]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_top_p_restricts_support() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let mut rng = Rng::seed_from_u64(0);
        assert_eq!(sample(&logits, &GenerationParams::default(), &mut rng), 1);
        let p = GenerationParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        // the top token alone holds < 0.5 of the mass, so exactly tokens 1 and 3 remain
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample(&logits, &p, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2], 0, "{seen:?}");
        assert!(seen[1] > 800 && seen[3] > 700, "{seen:?}");
    }

    #[test]
    fn temperature_sampling_follows_softmax() {
        let logits = [0.0f32, (3.0f32).ln()];
        let p = GenerationParams {
            temperature: 1.0,
            ..Default::default()
        };
        let mut rng = Rng::seed_from_u64(3);
        let ones = (0..20_000)
            .filter(|_| sample(&logits, &p, &mut rng) == 1)
            .count();
        let frac = ones as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.015, "{frac}");
    }
}
