//! The checks of the contract. Each takes a loader of fresh backbones and a [`Probe`] and says
//! what happened; none panics on a misbehaving backbone.

use softprompt_core::generate::argmax;
use softprompt_core::{
    batch_decoder, Backbone, Batch, BatchRow, Error, GenerationParams, Placement, SoftPrompt,
};

use crate::{Load, Outcome, Probe};

/// Log-probabilities compared between two ways of computing them (f32 backbones).
const TOL: f64 = 1e-4;

/// Runs a check body; an `Err` is the failure's description.
fn outcome(body: impl FnOnce() -> Result<Outcome, String>) -> Outcome {
    match body() {
        Ok(o) => o,
        Err(why) => Outcome::Failed(why),
    }
}

/// `Err` describing `e` in `what`.
fn call<T>(what: &str, r: softprompt_core::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn load(l: Load<'_>) -> Result<Box<dyn Backbone>, String> {
    call("loading the backbone", l())
}

fn ensure(cond: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(why())
    }
}

fn close(a: f64, b: f64, what: impl FnOnce() -> String) -> Result<(), String> {
    ensure((a - b).abs() <= TOL * (1.0 + b.abs()), || {
        format!("{}: {a} vs {b}", what())
    })
}

/// Skipped unless the backbone has gradients; when it lacks them, `loss_and_grad` must say so
/// with a typed error.
fn needs_gradients(b: &dyn Backbone, probe: &Probe) -> Result<Option<Outcome>, String> {
    if b.capabilities().gradients {
        return Ok(None);
    }
    match b.loss_and_grad(&probe.prompts[..1], &probe.batch(&[0, 0])) {
        Err(Error::Unsupported { .. }) => Ok(Some(Outcome::Skipped(
            "no gradients (loss_and_grad answers Unsupported)".into(),
        ))),
        other => Err(format!(
            "declares no gradients but loss_and_grad gave {:?}",
            other.map(|g| g.loss)
        )),
    }
}

/// Skipped unless the backbone generates; when it does not, `start_decode` must say so.
fn needs_generation(b: &dyn Backbone, probe: &Probe) -> Result<Option<Outcome>, String> {
    if b.capabilities().generation {
        return Ok(None);
    }
    match b.start_decode(&probe.prompts[0], &probe.rows[0]) {
        Err(Error::Unsupported { .. }) => Ok(Some(Outcome::Skipped(
            "no generation (start_decode answers Unsupported)".into(),
        ))),
        Err(e) => Err(format!("declares no generation; start_decode gave {e}")),
        Ok(_) => Err("declares no generation but start_decode worked".into()),
    }
}

/// Scores are finite, non-positive log-probabilities, one count per target.
pub fn scores_are_finite_log_probabilities(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        let s = call("score", b.score(&probe.prompts, &probe.batch(&[0, 1])))?;
        let want: Vec<usize> = probe
            .rows
            .iter()
            .zip(&probe.context_lens)
            .map(|(r, c)| r.len() - c)
            .collect();
        ensure(s.num_targets == want, || {
            format!("targets {:?}, expected {want:?}", s.num_targets)
        })?;
        ensure(
            s.logprob_sum.iter().all(|x| x.is_finite() && *x <= 0.0),
            || format!("log-probabilities {:?}", s.logprob_sum),
        )?;
        let loss = call("loss", b.loss(&probe.prompts, &probe.batch(&[0, 1])))? as f64;
        let mean = -s.logprob_sum.iter().sum::<f64>() / want.iter().sum::<usize>() as f64;
        close(loss, mean, || "loss vs mean of the scores".into())?;
        Ok(Outcome::Passed)
    })
}

/// A row of a mixed batch scores as it does alone with its own prompt.
pub fn per_row_prompts_equal_separate_runs(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        let mixed = call(
            "mixed batch",
            b.score(&probe.prompts, &probe.batch(&[1, 0])),
        )?;
        for (row, p) in [(0usize, 1usize), (1, 0)] {
            let ctx = probe.context_lens[row];
            let ids = &probe.rows[row];
            let single = call(
                "batch",
                Batch::from_rows(
                    &[BatchRow::with_continuation(&ids[..ctx], &ids[ctx..], 0)],
                    0,
                ),
            )?;
            let alone = call(
                "row alone",
                b.score(std::slice::from_ref(&probe.prompts[p]), &single),
            )?;
            ensure(alone.num_targets[0] == mixed.num_targets[row], || {
                format!("row {row}: target counts differ")
            })?;
            close(alone.logprob_sum[0], mixed.logprob_sum[row], || {
                format!("row {row} alone vs in a mixed batch")
            })?;
        }
        Ok(Outcome::Passed)
    })
}

/// Tokens after the targets and padding change nothing; the context token before the targets
/// does.
pub fn loss_counts_only_target_tokens(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        let v = b.spec().vocab_size as u32;
        let base = call("score", b.score(&probe.prompts, &probe.batch(&[0, 0])))?;
        let mut rows: Vec<BatchRow> = (0..2)
            .map(|i| {
                let c = probe.context_lens[i];
                BatchRow::with_continuation(&probe.rows[i][..c], &probe.rows[i][c..], 0)
            })
            .collect();
        let extra = (rows[0].ids[0] + 1) % v;
        rows[0].ids.push(extra);
        rows[0].targets.push(false);
        let longer = call("batch", Batch::from_rows(&rows, v - 1))?;
        let s = call("score", b.score(&probe.prompts, &longer))?;
        for row in 0..2 {
            close(s.logprob_sum[row], base.logprob_sum[row], || {
                format!("row {row} with a token after its targets / other padding")
            })?;
        }
        // the last context token, which the first target is predicted from
        let last = probe.context_lens[0] - 1;
        rows[0].ids[last] = (rows[0].ids[last] + 1) % v;
        let changed = call(
            "score",
            b.score(&probe.prompts, &call("batch", Batch::from_rows(&rows, 0))?),
        )?;
        ensure(
            (changed.logprob_sum[0] - base.logprob_sum[0]).abs() > 1e-7,
            || "changing a context token left the score unchanged".into(),
        )?;
        Ok(Outcome::Passed)
    })
}

/// Rank classification in one pass equals scoring each candidate as a continuation.
pub fn next_token_logprobs_match_scoring(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        let v = b.spec().vocab_size as u32;
        let rows: Vec<BatchRow> = probe
            .rows
            .iter()
            .enumerate()
            .map(|(i, ids)| BatchRow {
                ids: ids.clone(),
                targets: vec![false; ids.len()],
                prompt: i,
            })
            .collect();
        let batch = call("batch", Batch::from_rows(&rows, 0))?;
        let candidates = [0, v / 3, v - 1];
        let fast = call(
            "next_token_logprobs",
            b.next_token_logprobs(&probe.prompts, &batch, &candidates),
        )?;
        for (row, ids) in probe.rows.iter().enumerate() {
            for (k, c) in candidates.iter().enumerate() {
                let one = call(
                    "batch",
                    Batch::from_rows(&[BatchRow::with_continuation(ids, &[*c], 0)], 0),
                )?;
                let slow = call(
                    "score",
                    b.score(std::slice::from_ref(&probe.prompts[row]), &one),
                )?
                .logprob_sum[0];
                close(fast[row][k], slow, || {
                    format!("row {row}, candidate {c}: one pass vs scoring it")
                })?;
            }
        }
        Ok(Outcome::Passed)
    })
}

/// The same call twice gives the same bits.
pub fn repeated_calls_are_reproducible(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        let batch = probe.batch(&[0, 1]);
        let a = call("score", b.score(&probe.prompts, &batch))?;
        let c = call("score", b.score(&probe.prompts, &batch))?;
        ensure(a == c, || format!("{a:?} then {c:?}"))?;
        if b.capabilities().gradients {
            let a = call("loss_and_grad", b.loss_and_grad(&probe.prompts, &batch))?;
            let c = call("loss_and_grad", b.loss_and_grad(&probe.prompts, &batch))?;
            ensure(a == c, || "two loss_and_grad calls differ".into())?;
        }
        Ok(Outcome::Passed)
    })
}

/// What an inference call returns does not depend on which prompts earlier calls saw (a
/// backend may keep prompts' keys and values between calls).
pub fn results_do_not_depend_on_earlier_calls(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let v = probe.prompts[1].values().iter().map(|x| -0.5 * x).collect();
        let third = call(
            "prompt",
            SoftPrompt::new(3, probe.prompts[1].hidden_size(), v),
        )?
        .with_placement(probe.prompts[1].placement());
        let later = vec![probe.prompts[1].clone(), third, probe.prompts[0].clone()];
        let batch = probe.batch(&[2, 0]);
        let fresh = load(l)?;
        let v = fresh.spec().vocab_size as u32;
        let candidates = [1, v / 2, v - 2];
        let want = call("score", fresh.score(&later, &batch))?;
        let want_next = call(
            "next_token_logprobs",
            fresh.next_token_logprobs(&later, &batch, &candidates),
        )?;
        let warm = load(l)?;
        call("score", warm.score(&probe.prompts, &probe.batch(&[0, 1])))?;
        call(
            "next_token_logprobs",
            warm.next_token_logprobs(&probe.prompts, &probe.batch(&[1, 0]), &candidates),
        )?;
        let got = call("score", warm.score(&later, &batch))?;
        let got_next = call(
            "next_token_logprobs",
            warm.next_token_logprobs(&later, &batch, &candidates),
        )?;
        for (g, w) in got.logprob_sum.iter().zip(&want.logprob_sum) {
            close(*g, *w, || "score after earlier calls vs fresh".into())?;
        }
        for (g, w) in got_next.iter().flatten().zip(want_next.iter().flatten()) {
            close(*g, *w, || {
                "next-token log-probability after earlier calls".into()
            })?;
        }
        Ok(Outcome::Passed)
    })
}

/// The gradient with respect to the prompt matches central finite differences of the loss.
pub fn gradient_matches_finite_differences(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        if let Some(skip) = needs_gradients(b.as_ref(), probe)? {
            return Ok(skip);
        }
        let batch = probe.batch(&[0, 0]);
        let mut prompt = probe.prompts[0].clone();
        let lg = call(
            "loss_and_grad",
            b.loss_and_grad(std::slice::from_ref(&prompt), &batch),
        )?;
        let loss = call("loss", b.loss(std::slice::from_ref(&prompt), &batch))?;
        close(lg.loss as f64, loss as f64, || {
            "loss of loss_and_grad vs loss".into()
        })?;
        let d = prompt.values().len();
        let eps = 1e-2f32;
        for i in (0..d).step_by((d / 9).max(1)) {
            let x = prompt.values()[i];
            prompt.values_mut()[i] = x + eps;
            let up = call("loss", b.loss(std::slice::from_ref(&prompt), &batch))? as f64;
            prompt.values_mut()[i] = x - eps;
            let down = call("loss", b.loss(std::slice::from_ref(&prompt), &batch))? as f64;
            prompt.values_mut()[i] = x;
            let fd = (up - down) / (2.0 * eps as f64);
            let g = lg.grads[0][i] as f64;
            ensure((fd - g).abs() <= 2e-3 + 2e-2 * g.abs(), || {
                format!("coordinate {i}: finite difference {fd} vs gradient {g}")
            })?;
        }
        Ok(Outcome::Passed)
    })
}

/// In a mixed batch each prompt gets the gradient of the rows that used it, and a prompt no row
/// used gets zeros.
pub fn gradients_reach_only_used_prompts(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        if let Some(skip) = needs_gradients(b.as_ref(), probe)? {
            return Ok(skip);
        }
        let lg = call(
            "loss_and_grad",
            b.loss_and_grad(&probe.prompts, &probe.batch(&[1, 1])),
        )?;
        ensure(lg.grads.len() == 2, || {
            format!("{} gradients for 2 prompts", lg.grads.len())
        })?;
        ensure(lg.grads[0].iter().all(|g| *g == 0.0), || {
            "an unused prompt got a gradient".into()
        })?;
        ensure(lg.grads[1].iter().any(|g| *g != 0.0), || {
            "the used prompt got no gradient".into()
        })?;
        Ok(Outcome::Passed)
    })
}

/// Greedy KV-cached generation picks, at every step, the argmax of the next-token
/// log-probabilities of the whole sequence so far (no cache); stop tokens end it.
pub fn cached_decoding_matches_scoring(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        if let Some(skip) = needs_generation(b.as_ref(), probe)? {
            return Ok(skip);
        }
        let vocab: Vec<u32> = (0..b.spec().vocab_size as u32).collect();
        let prompt = &probe.prompts[0];
        let ids = &probe.rows[0][..4];
        let params = GenerationParams {
            max_new_tokens: 5,
            ..Default::default()
        };
        let out = call(
            "generate",
            softprompt_core::generate(b.as_ref(), prompt, ids, &params),
        )?;
        ensure(out.tokens.len() == 5, || {
            format!("{} tokens of 5", out.tokens.len())
        })?;
        let mut seq = ids.to_vec();
        for (step, expected) in out.tokens.iter().enumerate() {
            let row = BatchRow {
                ids: seq.clone(),
                targets: vec![false; seq.len()],
                prompt: 0,
            };
            let batch = call("batch", Batch::from_rows(&[row], 0))?;
            let lp = call(
                "next_token_logprobs",
                b.next_token_logprobs(std::slice::from_ref(prompt), &batch, &vocab),
            )?;
            let best = argmax(&lp[0]);
            // a near tie may fall either way in f32
            let gap = lp[0][best as usize] - lp[0][*expected as usize];
            ensure(best == *expected || gap <= TOL, || {
                format!("step {step}: generated {expected}, argmax of scoring {best} (gap {gap})")
            })?;
            seq.push(*expected);
        }
        let stop = out.tokens[2];
        let first = out.tokens.iter().position(|t| *t == stop).unwrap_or(2);
        let stopped = call(
            "generate",
            softprompt_core::generate(
                b.as_ref(),
                prompt,
                ids,
                &GenerationParams {
                    max_new_tokens: 5,
                    stop_tokens: vec![stop],
                    ..Default::default()
                },
            ),
        )?;
        ensure(stopped.tokens == out.tokens[..=first], || {
            format!("with stop token {stop}: {:?}", stopped.tokens)
        })?;
        Ok(Outcome::Passed)
    })
}

/// Sequences with different prompts (and lengths, and none) advanced together, joining at
/// different times, give the logits each gives alone.
pub fn continuous_batching_matches_one_sequence_at_a_time(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        if let Some(skip) = needs_generation(b.as_ref(), probe)? {
            return Ok(skip);
        }
        let d = b.spec().hidden_size;
        let short = call(
            "prompt",
            SoftPrompt::new(2, d, probe.prompts[1].values()[..2 * d].to_vec()),
        )?;
        let seqs: Vec<(SoftPrompt, Vec<u32>)> = vec![
            (probe.prompts[0].clone(), probe.rows[0][..4].to_vec()),
            (short, probe.rows[1][..2].to_vec()),
            (SoftPrompt::empty(d), probe.rows[0][..5].to_vec()),
            (probe.prompts[1].clone(), probe.rows[1][..6].to_vec()),
        ];
        let steps = 4;
        let mut alone: Vec<Vec<Vec<f32>>> = Vec::new();
        for (p, ids) in &seqs {
            let mut s = call("start_decode", b.start_decode(p, ids))?;
            let mut out = vec![s.logits().to_vec()];
            for _ in 0..steps {
                call("advance", s.advance(argmax(s.logits())))?;
                out.push(s.logits().to_vec());
            }
            alone.push(out);
        }
        let mut dec = batch_decoder(b.as_ref());
        // (sequence, id, logits, step)
        let mut live: Vec<(usize, u64, Vec<f32>, usize)> = Vec::new();
        for round in 0..steps + 3 {
            if round == 0 {
                let added = call(
                    "add_many",
                    dec.add_many(&[
                        (&seqs[0].0, seqs[0].1.as_slice()),
                        (&seqs[1].0, seqs[1].1.as_slice()),
                        (&seqs[3].0, seqs[3].1.as_slice()),
                    ]),
                )?;
                for (k, (id, logits)) in [0, 1, 3].into_iter().zip(added) {
                    live.push((k, id, logits, 0));
                }
            }
            if round == 2 {
                let (id, logits) = call("add", dec.add(&seqs[2].0, &seqs[2].1))?;
                live.push((2, id, logits, 0));
            }
            for (k, _, logits, step) in &live {
                let want = &alone[*k][*step];
                let diff = logits
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs() as f64)
                    .fold(0.0, f64::max);
                ensure(diff <= TOL * 10.0, || {
                    format!("sequence {k} step {step}: max |Δlogit| {diff:e}")
                })?;
            }
            live.retain(|(_, id, _, step)| {
                if *step == steps {
                    dec.remove(*id);
                }
                *step < steps
            });
            let tokens: Vec<(u64, u32)> =
                live.iter().map(|(_, id, l, _)| (*id, argmax(l))).collect();
            let next = call("step", dec.step(&tokens))?;
            for (entry, logits) in live.iter_mut().zip(next) {
                entry.2 = logits;
                entry.3 += 1;
            }
        }
        ensure(live.is_empty() && dec.is_empty(), || {
            format!("{} sequences left", dec.len())
        })?;
        let (id, _) = call("add", dec.add(&seqs[0].0, &seqs[0].1))?;
        ensure(dec.step(&[(id, 1), (id, 1)]).is_err(), || {
            "a sequence listed twice in a step was accepted".into()
        })?;
        ensure(dec.step(&[(id + 100, 1)]).is_err(), || {
            "an unknown sequence was accepted".into()
        })?;
        ensure(dec.position(id) == Some(3 + 4), || {
            format!("position {:?}, expected 7", dec.position(id))
        })?;
        Ok(Outcome::Passed)
    })
}

/// A prompt of another width, prompts of unequal lengths, an out-of-range prompt index or token
/// are typed errors, and a failed batched prefill adds no sequence.
pub fn mismatched_prompts_are_typed_errors(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        // widths of the probe's placement (the hidden size, or a key/value prefix's)
        let placement = probe.prompts[0].placement();
        let (d, v) = (probe.prompts[0].hidden_size(), b.spec().vocab_size);
        let batch = probe.batch(&[0, 0]);
        let wrong = call("prompt", SoftPrompt::new(3, d + 1, vec![0.0; 3 * (d + 1)]))?
            .with_placement(placement);
        match b.loss(std::slice::from_ref(&wrong), &batch) {
            Err(Error::HiddenSizeMismatch { prompt, backbone })
                if prompt == d + 1 && backbone == d => {}
            other => return Err(format!("a prompt of width {}: {other:?}", d + 1)),
        }
        let short =
            call("prompt", SoftPrompt::new(2, d, vec![0.0; 2 * d]))?.with_placement(placement);
        ensure(
            matches!(
                b.score(&[probe.prompts[0].clone(), short], &probe.batch(&[0, 1])),
                Err(Error::InvalidBatch(_))
            ),
            || "prompts of unequal lengths in one batch were accepted".into(),
        )?;
        ensure(
            matches!(
                b.score(&probe.prompts[..1], &probe.batch(&[0, 1])),
                Err(Error::InvalidBatch(_))
            ),
            || "a row naming a missing prompt was accepted".into(),
        )?;
        if placement == Placement::KeyValuePrefix {
            // a prefix has no position of its own to predict a row's first token from
            let row = BatchRow::with_continuation(&[], &probe.rows[0], 0);
            let first = call("batch", Batch::from_rows(&[row], 0))?;
            ensure(
                matches!(
                    b.score(&probe.prompts[..1], &first),
                    Err(Error::InvalidBatch(_))
                ),
                || "a prefix predicted a row's first token".into(),
            )?;
        }
        ensure(
            matches!(
                b.next_token_logprobs(&probe.prompts, &probe.batch(&[0, 1]), &[v as u32]),
                Err(Error::InvalidBatch(_))
            ),
            || "a candidate outside the vocabulary was accepted".into(),
        )?;
        if b.capabilities().generation {
            let mut dec = batch_decoder(b.as_ref());
            let ids = &probe.rows[0][..3];
            ensure(
                matches!(
                    dec.add_many(&[(&probe.prompts[0], ids), (&wrong, ids)]),
                    Err(Error::HiddenSizeMismatch { .. })
                ),
                || "a batched prefill with a prompt of another width".into(),
            )?;
            let bad = [1, v as u32];
            ensure(
                matches!(
                    dec.add_many(&[(&probe.prompts[0], ids), (&probe.prompts[1], &bad[..])]),
                    Err(Error::InvalidBatch(_))
                ),
                || "a batched prefill with a token outside the vocabulary".into(),
            )?;
            ensure(dec.is_empty(), || {
                "a failed batched prefill left sequences behind".into()
            })?;
        }
        Ok(Outcome::Passed)
    })
}

/// A placement the backbone does not declare is refused by name, never read as input
/// embeddings of the same width.
pub fn unsupported_placements_are_refused(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        let batch = probe.batch(&[0, 0]);
        let supported = b.capabilities().placements;
        ensure(supported.contains(&Placement::InputEmbeddings), || {
            "every backbone takes prompts prepended to its input embeddings".into()
        })?;
        for placement in [Placement::KeyValuePrefix, Placement::AfterClassToken] {
            if supported.contains(&placement) {
                continue;
            }
            let placed = probe.prompts[0].clone().with_placement(placement);
            match b.loss(std::slice::from_ref(&placed), &batch) {
                Err(Error::Unsupported { .. }) => {}
                other => {
                    return Err(format!(
                        "a prompt placed at {} (not declared): {:?}",
                        placement.as_str(),
                        other
                    ))
                }
            }
            if b.capabilities().generation {
                ensure(
                    matches!(
                        batch_decoder(b.as_ref()).add(&placed, &probe.rows[0]),
                        Err(Error::Unsupported { .. })
                    ),
                    || format!("the decoder took a prompt placed at {}", placement.as_str()),
                )?;
            }
        }
        Ok(Outcome::Passed)
    })
}

/// [`Backbone::key_value_prefix`]: a backbone that takes key/value prefixes turns each
/// input-embedding prompt into the prefix that scores every row as the prompt does (two prompts,
/// one per row, in one call), of the prompt's length and the prefix width, and refuses a prompt
/// that is already a prefix with a typed error; a backbone that does not take prefixes answers
/// `Unsupported`. Skipped when a backbone takes prefixes but cannot make them.
pub fn key_value_prefix_acts_as_its_prompt(l: Load<'_>, probe: &Probe) -> Outcome {
    outcome(|| {
        let b = load(l)?;
        let takes = b
            .capabilities()
            .placements
            .contains(&Placement::KeyValuePrefix);
        let shape = |r: &softprompt_core::Result<SoftPrompt>| {
            r.as_ref()
                .map(|p| (p.num_virtual_tokens(), p.hidden_size()))
                .map_err(ToString::to_string)
        };
        if probe.prompts[0].placement() != Placement::InputEmbeddings {
            let r = b.key_value_prefix(&probe.prompts[0]);
            return match r {
                Err(Error::InvalidArgument(_)) | Err(Error::Unsupported { .. }) => {
                    Ok(Outcome::Passed)
                }
                _ => Err(format!("a prefix taken as a source: {:?}", shape(&r))),
            };
        }
        if !takes {
            let r = b.key_value_prefix(&probe.prompts[0]);
            return match r {
                Err(Error::Unsupported { .. }) => Ok(Outcome::Passed),
                _ => Err(format!(
                    "takes no key/value prefixes, yet made one: {:?}",
                    shape(&r)
                )),
            };
        }
        let mut prefixes = Vec::new();
        for p in &probe.prompts {
            match b.key_value_prefix(p) {
                Err(Error::Unsupported { .. }) => {
                    return Ok(Outcome::Skipped(
                        "takes key/value prefixes but cannot make one from a prompt".into(),
                    ))
                }
                r => prefixes.push(call("key_value_prefix", r)?),
            }
        }
        let width = Placement::KeyValuePrefix.width(b.spec());
        for (p, q) in probe.prompts.iter().zip(&prefixes) {
            ensure(
                q.placement() == Placement::KeyValuePrefix
                    && q.num_virtual_tokens() == p.num_virtual_tokens()
                    && q.hidden_size() == width,
                || {
                    format!(
                        "a prefix {}×{} at `{}`, not {}×{width} at `key_value_prefix`",
                        q.num_virtual_tokens(),
                        q.hidden_size(),
                        q.placement().as_str(),
                        p.num_virtual_tokens()
                    )
                },
            )?;
        }
        let batch = probe.batch(&[0, 1]);
        let want = call(
            "scoring behind the prompts",
            b.score(&probe.prompts, &batch),
        )?;
        let got = call("scoring behind their prefixes", b.score(&prefixes, &batch))?;
        for (r, (g, w)) in got.logprob_sum.iter().zip(&want.logprob_sum).enumerate() {
            close(*g, *w, || {
                format!("row {r}: log p behind the prefix vs behind its prompt")
            })?;
        }
        Ok(Outcome::Passed)
    })
}
