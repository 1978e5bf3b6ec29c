//! Evaluation: rank classification accuracy, exact match, mean loss.

use softprompt_core::{
    generate, Backbone, Batch, BatchRow, Error, GenerationParams, Result, SoftPrompt,
};

use crate::data::EncodedSet;

/// Scores of one classification example.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Predicted class (largest log-likelihood).
    pub predicted: usize,
    /// Summed log-probability of each candidate.
    pub logprobs: Vec<f64>,
}

/// Rank classification: every candidate's log-likelihood after each example's context.
/// Single-token candidates are read from one row per example (examples batched in order of
/// length, results returned in the set's order); longer ones take one row per candidate.
/// `batch_size` examples per forward pass.
pub fn rank_classify(
    backbone: &dyn Backbone,
    prompt: &SoftPrompt,
    set: &EncodedSet,
    batch_size: usize,
) -> Result<Vec<Prediction>> {
    if set.candidates.is_empty() {
        return Err(Error::InvalidArgument(
            "rank classification needs label candidates".into(),
        ));
    }
    let c = set.candidates.len();
    let mut out = Vec::with_capacity(set.examples.len());
    // a log-probability may be -inf (an impossible label), never NaN or +inf
    let pick = |logprobs: Vec<f64>| -> Result<Prediction> {
        if logprobs.iter().any(|v| v.is_nan() || *v == f64::INFINITY) {
            return Err(Error::NonFiniteScores {
                what: "label log-probabilities".into(),
            });
        }
        Ok(Prediction {
            predicted: generate::argmax(&logprobs) as usize,
            logprobs,
        })
    };
    if set.candidates.iter().all(|cand| cand.len() == 1) {
        // single-token labels: one row per example, every label read from the same position.
        // Examples go through in order of length so that each pass pads as little as possible.
        let tokens: Vec<u32> = set.candidates.iter().map(|cand| cand[0]).collect();
        let mut order: Vec<usize> = (0..set.examples.len()).collect();
        order.sort_by_key(|i| set.examples[*i].context.len());
        let mut slots: Vec<Option<Prediction>> = vec![None; set.examples.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let rows: Vec<BatchRow> = chunk
                .iter()
                .map(|i| BatchRow {
                    ids: set.examples[*i].context.clone(),
                    targets: vec![false; set.examples[*i].context.len()],
                    prompt: 0,
                })
                .collect();
            let lp = backbone.next_token_logprobs(
                std::slice::from_ref(prompt),
                &Batch::from_rows(&rows, 0)?,
                &tokens,
            )?;
            for (i, logprobs) in chunk.iter().zip(lp) {
                slots[*i] = Some(pick(logprobs)?);
            }
        }
        out.extend(slots.into_iter().flatten());
        return Ok(out);
    }
    for chunk in set.examples.chunks(batch_size.max(1)) {
        let rows: Vec<BatchRow> = chunk
            .iter()
            .flat_map(|ex| {
                set.candidates
                    .iter()
                    .map(|cand| BatchRow::with_continuation(&ex.context, cand, 0))
            })
            .collect();
        let scores = backbone.score(std::slice::from_ref(prompt), &Batch::from_rows(&rows, 0)?)?;
        for e in 0..chunk.len() {
            out.push(pick(scores.logprob_sum[e * c..(e + 1) * c].to_vec())?);
        }
    }
    Ok(out)
}

/// Fraction of examples whose predicted class is the gold label.
pub fn accuracy(
    backbone: &dyn Backbone,
    prompt: &SoftPrompt,
    set: &EncodedSet,
    batch_size: usize,
) -> Result<f64> {
    let (correct, n) = accuracy_counts(backbone, prompt, set, batch_size)?;
    Ok(correct / n.max(1.0))
}

/// Correctly classified examples and examples (the parts of [`accuracy`], to be summed over
/// the shards of a data-parallel evaluation).
pub fn accuracy_counts(
    backbone: &dyn Backbone,
    prompt: &SoftPrompt,
    set: &EncodedSet,
    batch_size: usize,
) -> Result<(f64, f64)> {
    let preds = rank_classify(backbone, prompt, set, batch_size)?;
    let correct = preds
        .iter()
        .zip(&set.examples)
        .filter(|(p, ex)| Some(p.predicted) == ex.label)
        .count();
    Ok((correct as f64, set.examples.len() as f64))
}

/// Fraction of examples whose greedy generation reproduces the target ids exactly.
pub fn exact_match(
    backbone: &dyn Backbone,
    prompt: &SoftPrompt,
    set: &EncodedSet,
    stop: Option<u32>,
) -> Result<f64> {
    let (hits, n) = exact_match_counts(backbone, prompt, set, stop)?;
    Ok(hits / n.max(1.0))
}

/// Exact matches and examples (the parts of [`exact_match`]).
pub fn exact_match_counts(
    backbone: &dyn Backbone,
    prompt: &SoftPrompt,
    set: &EncodedSet,
    stop: Option<u32>,
) -> Result<(f64, f64)> {
    let mut hits = 0;
    for ex in &set.examples {
        let params = GenerationParams {
            max_new_tokens: ex.target.len(),
            stop_tokens: stop.into_iter().collect(),
            ..GenerationParams::default()
        };
        if generate(backbone, prompt, &ex.context, &params)?.tokens == ex.target {
            hits += 1;
        }
    }
    Ok((hits as f64, set.examples.len() as f64))
}

/// Mean negative log-likelihood of the gold targets over the whole set.
pub fn mean_loss(
    backbone: &dyn Backbone,
    prompt: &SoftPrompt,
    set: &EncodedSet,
    batch_size: usize,
) -> Result<f64> {
    let (sum, count) = loss_sums(backbone, prompt, set, batch_size)?;
    Ok(sum / count.max(1.0))
}

/// Summed negative log-likelihood of the gold targets and the number of targets (the parts of
/// [`mean_loss`]).
pub fn loss_sums(
    backbone: &dyn Backbone,
    prompt: &SoftPrompt,
    set: &EncodedSet,
    batch_size: usize,
) -> Result<(f64, f64)> {
    let (mut sum, mut count) = (0.0, 0usize);
    for chunk in set.examples.chunks(batch_size.max(1)) {
        let rows: Vec<BatchRow> = chunk
            .iter()
            .map(|ex| BatchRow::with_continuation(&ex.context, &ex.target, 0))
            .collect();
        let s = backbone.score(std::slice::from_ref(prompt), &Batch::from_rows(&rows, 0)?)?;
        sum -= s.logprob_sum.iter().sum::<f64>();
        count += s.num_targets.iter().sum::<usize>();
    }
    if sum.is_nan() || sum == f64::INFINITY {
        return Err(Error::NonFiniteScores {
            what: "target log-likelihoods".into(),
        });
    }
    Ok((sum, count as f64))
}

/// `counts` (a metric's numerator and denominator, as [`accuracy_counts`] returns them) over this
/// rank's share of `set`, summed over the ranks of `group`: a data-parallel evaluation, each
/// example scored once in the whole group.
pub fn sharded_counts(
    group: &dyn softprompt_core::Collective,
    set: &EncodedSet,
    counts: impl FnOnce(&EncodedSet) -> Result<(f64, f64)>,
) -> Result<(f64, f64)> {
    if group.world_size() == 1 {
        return counts(set);
    }
    let (lo, hi) = softprompt_core::shard(set.examples.len(), group.rank(), group.world_size());
    let part = EncodedSet {
        examples: set.examples[lo..hi].to_vec(),
        candidates: set.candidates.clone(),
        source: set.source.clone(),
    };
    let mut buf = if part.examples.is_empty() {
        [0.0, 0.0]
    } else {
        let (num, den) = counts(&part)?;
        [num, den]
    };
    group.all_reduce_sum(&mut buf)?;
    Ok((buf[0], buf[1]))
}
