//! The conformance contract: what every [`Backbone`] must do, checked against the backbone
//! itself (separate runs, one sequence at a time, finite differences) so that it needs no
//! reference outputs and runs on any model, including a plugin's own.
//!
//! ```no_run
//! # fn load() -> softprompt_core::Result<Box<dyn softprompt_core::Backbone>> { unimplemented!() }
//! let report = softprompt_conformance::run(&load, 0)?;
//! println!("{report}");
//! assert!(report.passed(), "{report}");
//! # Ok::<(), softprompt_core::Error>(())
//! ```
//!
//! A check of a capability the backbone lacks (gradients, generation) is
//! [`Outcome::Skipped`] — after checking that the backbone answers such a call with a typed
//! [`softprompt_core::Error::Unsupported`] — never silently passed.

mod checks;

use std::fmt;

use softprompt_core::{Backbone, Batch, BatchRow, Placement, Result, Rng, SoftPrompt};

pub use checks::*;

/// How a backbone is obtained: a fresh one per call (some checks compare a fresh backbone with
/// one that served earlier calls).
pub type Load<'a> = &'a dyn Fn() -> Result<Box<dyn Backbone>>;

/// The result of one check.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The backbone did what the contract says.
    Passed,
    /// Not applicable: the backbone lacks the capability (and said so with a typed error).
    Skipped(String),
    /// The backbone did something else.
    Failed(String),
}

impl Outcome {
    /// Panics unless the check passed (for `#[test]` functions).
    pub fn assert_passed(&self, check: &str) {
        match self {
            Outcome::Passed => {}
            Outcome::Skipped(why) => panic!("{check}: skipped ({why}), expected to run"),
            Outcome::Failed(why) => panic!("{check}: {why}"),
        }
    }
}

/// One check and its outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Name of the check (one of [`CHECKS`]).
    pub name: &'static str,
    /// Where the probe's prompts entered the backbone.
    pub placement: Placement,
    /// What happened.
    pub outcome: Outcome,
}

/// Every check's outcome on one backbone.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The runtime's name.
    pub backend: String,
    /// The model's name.
    pub model: String,
    /// In [`CHECKS`] order.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether no check failed (skipped ones do not fail).
    pub fn passed(&self) -> bool {
        !self
            .checks
            .iter()
            .any(|c| matches!(c.outcome, Outcome::Failed(_)))
    }

    /// Checks with this outcome kind: `"passed"`, `"skipped"` or `"failed"`.
    pub fn count(&self, kind: &str) -> usize {
        self.checks
            .iter()
            .filter(|c| {
                matches!(
                    (&c.outcome, kind),
                    (Outcome::Passed, "passed")
                        | (Outcome::Skipped(_), "skipped")
                        | (Outcome::Failed(_), "failed")
                )
            })
            .count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "conformance of {} on {}:", self.backend, self.model)?;
        for c in &self.checks {
            let at = c.placement.as_str();
            match &c.outcome {
                Outcome::Passed => writeln!(f, "  pass  {} [{at}]", c.name)?,
                Outcome::Skipped(why) => writeln!(f, "  skip  {} [{at}] ({why})", c.name)?,
                Outcome::Failed(why) => writeln!(f, "  FAIL  {} [{at}]: {why}", c.name)?,
            }
        }
        write!(
            f,
            "{} passed, {} skipped, {} failed",
            self.count("passed"),
            self.count("skipped"),
            self.count("failed")
        )
    }
}

/// Inputs the checks run on, drawn from the backbone's own vocabulary and embeddings.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Two prompts of three virtual tokens: embeddings of random tokens, slightly perturbed, or
    /// for key/value prefixes `N(0, 0.5²)` keys and values.
    pub prompts: Vec<SoftPrompt>,
    /// Two token rows of different lengths.
    pub rows: Vec<Vec<u32>>,
    /// Context (non-target) tokens of each row; the rest are targets.
    pub context_lens: Vec<usize>,
}

impl Probe {
    /// A probe for `backbone` from `seed`, its prompts prepended to the input embeddings.
    pub fn new(backbone: &dyn Backbone, seed: u64) -> Result<Self> {
        Self::with_placement(backbone, seed, Placement::InputEmbeddings)
    }

    /// A probe whose prompts enter at `placement` (input embeddings or key/value prefixes).
    pub fn with_placement(
        backbone: &dyn Backbone,
        seed: u64,
        placement: Placement,
    ) -> Result<Self> {
        let spec = backbone.spec();
        let (v, d) = (spec.vocab_size, spec.hidden_size);
        let width = placement.width(spec);
        let mut rng = Rng::seed_from_u64(seed);
        let mut prompt = |n: usize| -> Result<SoftPrompt> {
            if placement == Placement::KeyValuePrefix {
                let values = (0..n * width).map(|_| 0.5 * rng.normal() as f32).collect();
                return Ok(SoftPrompt::new(n, width, values)?.with_placement(placement));
            }
            let ids: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
            let mut values = backbone.embed(&ids)?;
            values
                .iter_mut()
                .for_each(|x| *x += 0.05 * rng.normal() as f32);
            Ok(SoftPrompt::new(n, d, values)?.with_placement(placement))
        };
        let prompts = vec![prompt(3)?, prompt(3)?];
        let rows = [6usize, 8]
            .iter()
            .map(|len| (0..*len).map(|_| rng.below(v) as u32).collect())
            .collect();
        Ok(Probe {
            prompts,
            rows,
            context_lens: vec![3, 5],
        })
    }

    /// The rows as a padded batch, row `r` using prompt `prompt_of_row[r]`; targets after each
    /// row's context.
    pub fn batch(&self, prompt_of_row: &[usize]) -> Batch {
        let rows: Vec<BatchRow> = self
            .rows
            .iter()
            .zip(&self.context_lens)
            .zip(prompt_of_row)
            .map(|((ids, ctx), p)| BatchRow::with_continuation(&ids[..*ctx], &ids[*ctx..], *p))
            .collect();
        Batch::from_rows(&rows, 0).expect("the probe's rows are not empty")
    }
}

/// A check: the fresh-backbone loader and the probe in, an outcome out.
pub type CheckFn = fn(Load<'_>, &Probe) -> Outcome;

/// Every check of the contract, by name.
pub const CHECKS: &[(&str, CheckFn)] = &[
    (
        "scores_are_finite_log_probabilities",
        checks::scores_are_finite_log_probabilities,
    ),
    (
        "per_row_prompts_equal_separate_runs",
        checks::per_row_prompts_equal_separate_runs,
    ),
    (
        "loss_counts_only_target_tokens",
        checks::loss_counts_only_target_tokens,
    ),
    (
        "next_token_logprobs_match_scoring",
        checks::next_token_logprobs_match_scoring,
    ),
    (
        "repeated_calls_are_reproducible",
        checks::repeated_calls_are_reproducible,
    ),
    (
        "results_do_not_depend_on_earlier_calls",
        checks::results_do_not_depend_on_earlier_calls,
    ),
    (
        "gradient_matches_finite_differences",
        checks::gradient_matches_finite_differences,
    ),
    (
        "gradients_reach_only_used_prompts",
        checks::gradients_reach_only_used_prompts,
    ),
    (
        "cached_decoding_matches_scoring",
        checks::cached_decoding_matches_scoring,
    ),
    (
        "continuous_batching_matches_one_sequence_at_a_time",
        checks::continuous_batching_matches_one_sequence_at_a_time,
    ),
    (
        "mismatched_prompts_are_typed_errors",
        checks::mismatched_prompts_are_typed_errors,
    ),
    (
        "unsupported_placements_are_refused",
        checks::unsupported_placements_are_refused,
    ),
    (
        "key_value_prefix_acts_as_its_prompt",
        checks::key_value_prefix_acts_as_its_prompt,
    ),
];

/// Runs every check of [`CHECKS`] on backbones from `load` with a probe from `seed`: with
/// prompts prepended to the input embeddings, and again with key/value prefixes when the
/// backbone declares them.
pub fn run(load: Load<'_>, seed: u64) -> Result<Report> {
    let b = load()?;
    let mut checks = Vec::new();
    for placement in [Placement::InputEmbeddings, Placement::KeyValuePrefix] {
        if placement != Placement::InputEmbeddings
            && !b.capabilities().placements.contains(&placement)
        {
            continue;
        }
        let probe = Probe::with_placement(b.as_ref(), seed, placement)?;
        checks.extend(CHECKS.iter().map(|(name, check)| Check {
            name,
            placement,
            outcome: check(load, &probe),
        }));
    }
    Ok(Report {
        backend: b.backend_name().to_string(),
        model: b.spec().name.clone(),
        checks,
    })
}

#[cfg(test)]
mod tests {
    use softprompt_core::backbone::check_prompts;
    use softprompt_core::{
        Architecture, BackboneSpec, Capabilities, Error, LossAndGrad, RowScores,
    };

    use super::*;

    /// What a toy backbone gets wrong.
    #[derive(Clone, Copy, PartialEq)]
    enum Bug {
        None,
        /// Every row scored with prompt 0.
        IgnoresPromptIndex,
        /// The gradient is halved.
        WrongGradient,
        /// Prompts of another width are read anyway.
        NoWidthCheck,
    }

    /// logits at a target = E · (sum of the row's prompt vectors + embedding of the previous
    /// token); gradient by hand.
    struct Toy {
        spec: BackboneSpec,
        e: Vec<f64>,
        bug: Bug,
    }

    impl Toy {
        fn new(bug: Bug) -> Self {
            let (v, d) = (11, 4);
            let mut rng = Rng::seed_from_u64(5);
            Toy {
                spec: BackboneSpec {
                    architecture: Architecture::new("toy"),
                    hidden_size: d,
                    vocab_size: v,
                    num_layers: 0,
                    num_attention_heads: 0,
                    num_key_value_heads: 0,
                    head_dim: 0,
                    fingerprint: "toy".into(),
                    name: "toy".into(),
                },
                e: (0..v * d).map(|_| rng.normal()).collect(),
                bug,
            }
        }

        /// (row, log p, d(log p)/d state) of every target.
        fn targets(
            &self,
            prompts: &[SoftPrompt],
            batch: &Batch,
        ) -> softprompt_core::Result<Vec<(usize, f64, Vec<f64>)>> {
            if self.bug != Bug::NoWidthCheck {
                check_prompts(self, prompts, batch)?;
            }
            let (d, v, t) = (self.spec.hidden_size, self.spec.vocab_size, batch.seq_len());
            let n = prompts[0].num_virtual_tokens();
            let mut out = Vec::new();
            for (r, j, _) in batch.targets(n)? {
                let p = match self.bug {
                    Bug::IgnoresPromptIndex => 0,
                    _ => batch.prompt_index()[r],
                };
                let mut state = vec![0f64; d];
                for (k, x) in prompts[p].values().iter().enumerate() {
                    state[k % d] += *x as f64;
                }
                if j > 0 {
                    let prev = batch.input_ids()[r * t + j - 1] as usize;
                    let row = &self.e[prev * d..(prev + 1) * d];
                    state.iter_mut().zip(row).for_each(|(s, e)| *s += e);
                }
                let logits: Vec<f64> = (0..v)
                    .map(|w| (0..d).map(|k| self.e[w * d + k] * state[k]).sum())
                    .collect();
                let max = logits.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                let target = batch.input_ids()[r * t + j] as usize;
                let logp = logits[target] - max - z.ln();
                let dstate = (0..d)
                    .map(|k| {
                        let expect: f64 = (0..v)
                            .map(|w| (logits[w] - max).exp() / z * self.e[w * d + k])
                            .sum();
                        self.e[target * d + k] - expect
                    })
                    .collect();
                out.push((r, logp, dstate));
            }
            Ok(out)
        }
    }

    impl Backbone for Toy {
        fn backend_name(&self) -> &str {
            "toy"
        }
        fn spec(&self) -> &BackboneSpec {
            &self.spec
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                gradients: true,
                generation: false,
                placements: Capabilities::INPUT_EMBEDDINGS,
            }
        }
        fn embed(&self, ids: &[u32]) -> softprompt_core::Result<Vec<f32>> {
            let d = self.spec.hidden_size;
            softprompt_core::backbone::check_token_ids(ids.iter().copied(), self.spec.vocab_size)?;
            Ok(ids
                .iter()
                .flat_map(|i| self.e[*i as usize * d..(*i as usize + 1) * d].iter())
                .map(|x| *x as f32)
                .collect())
        }
        fn score(
            &self,
            prompts: &[SoftPrompt],
            batch: &Batch,
        ) -> softprompt_core::Result<RowScores> {
            let mut s = RowScores {
                logprob_sum: vec![0.0; batch.rows()],
                num_targets: vec![0; batch.rows()],
            };
            for (r, lp, _) in self.targets(prompts, batch)? {
                s.logprob_sum[r] += lp;
                s.num_targets[r] += 1;
            }
            Ok(s)
        }
        fn loss_and_grad(
            &self,
            prompts: &[SoftPrompt],
            batch: &Batch,
        ) -> softprompt_core::Result<LossAndGrad> {
            let targets = self.targets(prompts, batch)?;
            let d = self.spec.hidden_size;
            let count = targets.len() as f64;
            let mut grads: Vec<Vec<f32>> = prompts
                .iter()
                .map(|p| vec![0.0; p.values().len()])
                .collect();
            let mut loss = 0.0;
            for (r, lp, dstate) in targets {
                loss -= lp / count;
                let g = &mut grads[batch.prompt_index()[r]];
                for (k, gk) in g.iter_mut().enumerate() {
                    let scale = if self.bug == Bug::WrongGradient {
                        0.5
                    } else {
                        1.0
                    };
                    *gk -= (scale * dstate[k % d] / count) as f32;
                }
            }
            Ok(LossAndGrad {
                loss: loss as f32,
                grads,
            })
        }
    }

    fn report(bug: Bug) -> Report {
        run(&|| Ok(Box::new(Toy::new(bug)) as Box<dyn Backbone>), 1).unwrap()
    }

    fn failed(r: &Report) -> Vec<&str> {
        r.checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_correct_backbone_passes_and_lacking_generation_is_skipped() {
        let r = report(Bug::None);
        assert!(r.passed(), "{r}");
        assert_eq!(
            (r.count("passed"), r.count("skipped")),
            (CHECKS.len() - 2, 2),
            "{r}"
        );
    }

    #[test]
    fn each_bug_fails_the_check_that_covers_it() {
        let r = report(Bug::IgnoresPromptIndex);
        assert!(
            failed(&r).contains(&"per_row_prompts_equal_separate_runs"),
            "{r}"
        );
        let r = report(Bug::WrongGradient);
        assert_eq!(
            failed(&r),
            vec!["gradient_matches_finite_differences"],
            "{r}"
        );
        let r = report(Bug::NoWidthCheck);
        assert!(
            failed(&r).contains(&"mismatched_prompts_are_typed_errors"),
            "{r}"
        );
        assert!(!r.passed());
    }

    #[test]
    fn a_backbone_that_cannot_load_is_an_error() {
        let load = || -> softprompt_core::Result<Box<dyn Backbone>> {
            Err(Error::InvalidArgument("no model".into()))
        };
        assert!(run(&load, 0).is_err());
    }
}
