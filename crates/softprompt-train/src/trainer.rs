//! The training loop, generic over the backbone and the optimizer.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use softprompt_core::{
    shard, Backbone, Batch, BatchRow, Collective, Error, Optimizer, OptimizerKind, Placement,
    PromptMethod, Result, Rng, SingleProcess, SoftPrompt,
};

use crate::checkpoint::{write_checkpoint, TrainState};
use crate::data::EncodedSet;
use crate::encoder::PromptEncoder;
use crate::eval;
use crate::optim::{clip_grad_norm, Schedule};

/// What the dev set is judged by (higher is better).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Rank-classification accuracy.
    Accuracy,
    /// Greedy exact match of generation targets.
    ExactMatch,
    /// Negative mean loss of the gold targets.
    NegLoss,
}

/// Settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Steps to run in total.
    pub max_steps: u64,
    /// Training rows per step.
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f32,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Gradient-norm clipping (none when `None`).
    pub max_grad_norm: Option<f32>,
    /// Evaluate on the dev set every this many steps (and at the end); 0 disables.
    pub eval_every: u64,
    /// Examples per scoring pass during evaluation.
    pub eval_batch_size: usize,
    /// Dev metric.
    pub metric: Metric,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<usize>,
    /// Return the prompt of the best dev evaluation rather than the last.
    pub keep_best: bool,
    /// Seed of the data order.
    pub seed: u64,
    /// Write `checkpoint.json` every this many steps (and at the end); 0 disables.
    pub checkpoint_every: u64,
    /// Run directory for `checkpoint.json` and `metrics.jsonl`.
    pub run_dir: Option<PathBuf>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// End-of-sequence id for exact-match evaluation.
    pub eos_id: Option<u32>,
    /// What else defines the run, as the caller knows it (data files' hashes, template, labels,
    /// initialisation): recorded in the checkpoint with the trainer's own settings, and a resumed
    /// run must match every field.
    #[serde(default)]
    pub identity: std::collections::BTreeMap<String, String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_steps: 100,
            batch_size: 8,
            lr: 0.03,
            schedule: Schedule::Constant,
            max_grad_norm: Some(1.0),
            eval_every: 0,
            eval_batch_size: 16,
            metric: Metric::Accuracy,
            patience: None,
            keep_best: true,
            seed: 0,
            checkpoint_every: 0,
            run_dir: None,
            progress: false,
            eos_id: None,
            identity: Default::default(),
        }
    }
}

/// One dev evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Step after which it ran.
    pub step: u64,
    /// Metric value.
    pub value: f64,
}

/// Result of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// The best prompt (when `keep_best` and a dev set were given) or the last one.
    pub prompt: SoftPrompt,
    /// Final state (also the last checkpoint).
    pub state: TrainState,
    /// Dev evaluations of this invocation.
    pub evals: Vec<EvalRecord>,
    /// Mean training loss of each step of this invocation.
    pub losses: Vec<f32>,
    /// True when early stopping ended the run.
    pub stopped_early: bool,
}

/// Tunes a prompt on a frozen backbone.
pub struct Trainer<'a> {
    backbone: &'a dyn Backbone,
    optimizer: Box<dyn Optimizer>,
    config: TrainConfig,
    /// The ranks training together (one: this process alone).
    collective: std::sync::Arc<dyn Collective>,
}

impl std::fmt::Debug for Trainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("backend", &self.backbone.backend_name())
            .field("optimizer", &self.optimizer.name())
            .field("config", &self.config)
            .finish()
    }
}

impl<'a> Trainer<'a> {
    /// Checks that the optimizer fits the backend's capabilities and the config is usable.
    pub fn new(
        backbone: &'a dyn Backbone,
        optimizer: Box<dyn Optimizer>,
        config: TrainConfig,
    ) -> Result<Self> {
        if optimizer.kind() == OptimizerKind::Gradient && !backbone.capabilities().gradients {
            return Err(Error::unsupported(
                backbone.backend_name(),
                &format!("gradients, which optimizer `{}` needs", optimizer.name()),
                Some("choose a gradient-free optimizer (spsa, cma-es) for this backend"),
            ));
        }
        if config.batch_size == 0 || config.max_steps == 0 {
            return Err(Error::InvalidArgument(
                "batch_size and max_steps must be positive".into(),
            ));
        }
        if !(config.lr.is_finite() && config.lr > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "learning rate must be positive, got {}",
                config.lr
            )));
        }
        Ok(Trainer {
            backbone,
            optimizer,
            config,
            collective: std::sync::Arc::new(SingleProcess),
        })
    }

    /// Trains data-parallel with the other ranks of `collective`: every rank takes its share of
    /// each global batch (the same global order as one process: `batch_size` stays the global
    /// batch), gradients and losses are summed and averaged by target count, and every rank takes
    /// the same optimizer step; gradient-free optimizers split a step's candidates across the
    /// ranks. Only rank 0 writes checkpoints and metrics. Every rank must call [`Trainer::run`]
    /// with the same data, config and state.
    pub fn with_collective(mut self, collective: std::sync::Arc<dyn Collective>) -> Self {
        self.collective = collective;
        self
    }

    /// A fresh state starting from `prompt`, trained directly (prompt tuning, or prefix tuning
    /// without projection for a key/value prefix).
    pub fn init_state(&self, prompt: &SoftPrompt) -> TrainState {
        let method = match prompt.placement() {
            Placement::KeyValuePrefix => PromptMethod::PrefixTuning { projection: None },
            _ => PromptMethod::PromptTuning,
        };
        self.state_with(
            method,
            prompt.num_virtual_tokens(),
            prompt.hidden_size(),
            prompt.values().to_vec(),
        )
    }

    /// A fresh state training `encoder`'s parameters `theta` ([`PromptEncoder::init`]).
    pub fn init_encoded(&self, encoder: &PromptEncoder, theta: Vec<f32>) -> Result<TrainState> {
        if theta.len() != encoder.num_params() {
            return Err(Error::Shape(format!(
                "the encoder has {} parameters, got {}",
                encoder.num_params(),
                theta.len()
            )));
        }
        Ok(self.state_with(
            *encoder.method(),
            encoder.num_virtual_tokens(),
            encoder.width(),
            theta,
        ))
    }

    /// The run's identity: the caller's fields and the trainer's (optimizer and its
    /// hyper-parameters, batch, schedule, clipping, method and prompt shape).
    fn identity(&self, method: &PromptMethod, n: usize, width: usize) -> BTreeMap<String, String> {
        let mut id = self.config.identity.clone();
        let c = &self.config;
        id.insert("optimizer".into(), self.optimizer.name().to_string());
        id.insert("lr".into(), c.lr.to_string());
        id.insert("batch_size".into(), c.batch_size.to_string());
        id.insert("schedule".into(), format!("{:?}", c.schedule));
        id.insert("max_grad_norm".into(), format!("{:?}", c.max_grad_norm));
        id.insert("seed".into(), c.seed.to_string());
        // the caller's view of the method and shape (what it asks for now) comes first
        id.entry("method".into())
            .or_insert_with(|| serde_json::to_string(method).unwrap_or_default());
        id.entry("prompt_shape".into())
            .or_insert_with(|| format!("[{n}, {width}]"));
        id
    }

    /// Errors unless `state` (read from a checkpoint) was written by this run: every field of
    /// its identity that differs is named with both values.
    pub fn check_resume(&self, state: &TrainState) -> Result<()> {
        if state.identity.is_empty() {
            return Ok(());
        }
        let now = self.identity(&state.method, state.num_virtual_tokens, state.hidden_size);
        let mut diffs = Vec::new();
        for key in state
            .identity
            .keys()
            .chain(now.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let (was, is) = (state.identity.get(key), now.get(key));
            if was != is {
                diffs.push(format!(
                    "{key}: checkpoint {}, now {}",
                    was.map_or("(none)", String::as_str),
                    is.map_or("(none)", String::as_str)
                ));
            }
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "the checkpoint is another run's; it differs in {}",
                diffs.join("; ")
            )))
        }
    }

    fn state_with(
        &self,
        method: PromptMethod,
        num_virtual_tokens: usize,
        hidden_size: usize,
        theta: Vec<f32>,
    ) -> TrainState {
        let identity = self.identity(&method, num_virtual_tokens, hidden_size);
        TrainState {
            identity,
            step: 0,
            epoch: 0,
            cursor: 0,
            num_virtual_tokens,
            hidden_size,
            method,
            prompt: theta,
            optimizer: self.optimizer.state(),
            best_metric: None,
            best_prompt: None,
            best_step: None,
            evals_without_improvement: 0,
            seed: self.config.seed,
            rng: Rng::seed_from_u64(self.config.seed ^ 0x5eed),
            backbone_fingerprint: self.backbone.spec().fingerprint.clone(),
            last_loss: None,
        }
    }

    /// The config.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        Rng::seed_from_u64(seed.wrapping_add(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .shuffle(&mut order);
        order
    }

    fn next_batch(&self, state: &mut TrainState, n: usize) -> Vec<usize> {
        let bs = self.config.batch_size.min(n);
        if state.cursor + bs > n {
            state.epoch += 1;
            state.cursor = 0;
        }
        let order = Self::epoch_order(state.seed, state.epoch, n);
        let picked = order[state.cursor..state.cursor + bs].to_vec();
        state.cursor += bs;
        picked
    }

    fn evaluate(&self, prompt: &SoftPrompt, dev: &EncodedSet) -> Result<f64> {
        if self.collective.world_size() > 1 {
            // each rank its share of the examples; the metric's parts summed over the ranks
            let (b, batch) = (self.backbone, self.config.eval_batch_size);
            let (num, den) =
                eval::sharded_counts(self.collective.as_ref(), dev, |part| {
                    match self.config.metric {
                        Metric::Accuracy => eval::accuracy_counts(b, prompt, part, batch),
                        Metric::ExactMatch => {
                            eval::exact_match_counts(b, prompt, part, self.config.eos_id)
                        }
                        Metric::NegLoss => eval::loss_sums(b, prompt, part, batch),
                    }
                })?;
            let value = num / den.max(1.0);
            return Ok(if self.config.metric == Metric::NegLoss {
                -value
            } else {
                value
            });
        }
        match self.config.metric {
            Metric::Accuracy => {
                eval::accuracy(self.backbone, prompt, dev, self.config.eval_batch_size)
            }
            Metric::ExactMatch => eval::exact_match(self.backbone, prompt, dev, self.config.eos_id),
            Metric::NegLoss => {
                eval::mean_loss(self.backbone, prompt, dev, self.config.eval_batch_size).map(|l| -l)
            }
        }
    }

    fn log(&self, line: serde_json::Value) -> Result<()> {
        if !self.collective.is_root() {
            return Ok(());
        }
        if let Some(dir) = &self.config.run_dir {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            let path = dir.join("metrics.jsonl");
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            writeln!(f, "{line}").map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Drops the lines of `metrics.jsonl` past `step` (a run killed after logging steps its
    /// last checkpoint does not hold, and a torn last line), so that a resumed run logs every
    /// step once. Rewritten through a temporary file and a rename.
    fn trim_metrics(&self, step: u64) -> Result<()> {
        let Some(dir) = &self.config.run_dir else {
            return Ok(());
        };
        if !self.collective.is_root() {
            return Ok(());
        }
        let path = dir.join("metrics.jsonl");
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let mut kept = Vec::with_capacity(text.len());
        let mut dropped = false;
        for line in text.split_inclusive(|b| *b == b'\n') {
            let at = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .filter(|_| line.ends_with(b"\n"))
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
            match at {
                Some(s) if s <= step => kept.extend_from_slice(line),
                _ => dropped = true,
            }
        }
        if !dropped {
            return Ok(());
        }
        let tmp = path.with_extension(format!("jsonl.tmp.{}", std::process::id()));
        std::fs::write(&tmp, &kept).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }

    fn checkpoint(&self, state: &TrainState) -> Result<()> {
        if !self.collective.is_root() {
            return Ok(());
        }
        match &self.config.run_dir {
            Some(dir) => write_checkpoint(&dir.join("checkpoint.json"), state),
            None => Ok(()),
        }
    }

    /// Loss and gradient of the global batch `rows` under `prompt`: on one rank, one call; on
    /// several, each rank's share of the rows, summed over the ranks weighted by target count
    /// (the mean over every target of the global batch, as one process computes it).
    fn loss_and_grad(
        &self,
        prompt: &SoftPrompt,
        rows: &[BatchRow],
        pad: u32,
    ) -> Result<softprompt_core::LossAndGrad> {
        let (ws, rank) = (self.collective.world_size(), self.collective.rank());
        if ws == 1 {
            let batch = Batch::from_rows(rows, pad)?;
            return self
                .backbone
                .loss_and_grad(std::slice::from_ref(prompt), &batch);
        }
        let (lo, hi) = shard(rows.len(), rank, ws);
        // [loss · targets, targets, gradient · targets]: one sum carries all three
        let mut buf = vec![0f64; 2 + prompt.values().len()];
        if lo < hi {
            let batch = Batch::from_rows(&rows[lo..hi], pad)?;
            let count = batch.num_targets() as f64;
            let lg = self
                .backbone
                .loss_and_grad(std::slice::from_ref(prompt), &batch)?;
            buf[0] = lg.loss as f64 * count;
            buf[1] = count;
            if let Some(g) = lg.grads.first() {
                for (b, v) in buf[2..].iter_mut().zip(g) {
                    *b = *v as f64 * count;
                }
            }
        }
        self.collective.all_reduce_sum(&mut buf)?;
        let count = buf[1].max(1.0);
        Ok(softprompt_core::LossAndGrad {
            loss: (buf[0] / count) as f32,
            grads: vec![buf[2..].iter().map(|v| (v / count) as f32).collect()],
        })
    }

    /// Mean cross-entropy of the gold label over the label words, for each candidate prompt on
    /// the examples `picked`: every candidate and example in one `next_token_logprobs` call.
    fn label_losses(
        &self,
        prompts: &[SoftPrompt],
        train: &EncodedSet,
        picked: &[usize],
    ) -> Result<Vec<f32>> {
        let words: Vec<u32> = train.candidates.iter().map(|c| c[0]).collect();
        let rows: Vec<BatchRow> = (0..prompts.len())
            .flat_map(|k| {
                picked.iter().map(move |i| {
                    let ctx = &train.examples[*i].context;
                    BatchRow {
                        ids: ctx.clone(),
                        targets: vec![false; ctx.len()],
                        prompt: k,
                    }
                })
            })
            .collect();
        let lp =
            self.backbone
                .next_token_logprobs(prompts, &Batch::from_rows(&rows, 0)?, &words)?;
        let m = picked.len();
        Ok((0..prompts.len())
            .map(|k| {
                let total: f64 = picked
                    .iter()
                    .enumerate()
                    .map(|(j, i)| {
                        let row = &lp[k * m + j];
                        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                        let gold = train.examples[*i].label.expect("checked: labelled");
                        lse - row[gold]
                    })
                    .sum();
                (total / m.max(1) as f64) as f32
            })
            .collect())
    }

    /// Runs from `state` (fresh or read from a checkpoint) until `max_steps` or early stopping.
    ///
    /// Gradient optimizers take one `loss_and_grad` per step. Gradient-free ones score all
    /// candidates of a step in one batched call (per-row prompts): the batch's mean NLL of the
    /// targets, or on a classification task with single-token label words the cross-entropy
    /// over the label words only (the objective of Black-Box Tuning).
    ///
    /// A non-finite loss or gradient stops the run with [`Error::NonFinite`]; the checkpoint on
    /// disk is then the last good one.
    pub fn run(
        &mut self,
        mut state: TrainState,
        train: &EncodedSet,
        dev: Option<&EncodedSet>,
    ) -> Result<TrainOutcome> {
        let spec = self.backbone.spec();
        if state.backbone_fingerprint != spec.fingerprint {
            return Err(Error::FingerprintMismatch {
                prompt: state.backbone_fingerprint.clone(),
                backbone: spec.fingerprint.clone(),
            });
        }
        self.check_resume(&state)?;
        let encoder = PromptEncoder::new(state.method, state.num_virtual_tokens, spec)?;
        if state.hidden_size != encoder.width() {
            return Err(Error::HiddenSizeMismatch {
                prompt: state.hidden_size,
                backbone: encoder.width(),
            });
        }
        if state.prompt.len() != encoder.num_params() {
            return Err(Error::Shape(format!(
                "the checkpoint holds {} parameters, a {} prompt of {} tokens has {}",
                state.prompt.len(),
                encoder.method().name(),
                state.num_virtual_tokens,
                encoder.num_params()
            )));
        }
        if train.examples.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} holds no training examples",
                train.source.display()
            )));
        }
        self.optimizer.load_state(&state.optimizer)?;
        self.trim_metrics(state.step)?;
        let n = state.num_virtual_tokens;
        let mut theta = state.prompt.clone();
        let mut prompt = encoder.prompt(&theta)?;
        let bar = if self.config.progress && self.collective.is_root() {
            ProgressBar::with_draw_target(Some(self.config.max_steps), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} steps {msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(state.step);
        let mut outcome_evals = Vec::new();
        let mut losses = Vec::new();
        let mut stopped_early = false;
        let pad = 0;
        // gradient-free search on a classifier: the cross-entropy over the label words only
        // (Black-Box Tuning's objective), read from one rank-classification pass
        let label_loss = self.optimizer.kind() == OptimizerKind::GradientFree
            && train.candidates.len() >= 2
            && train.candidates.iter().all(|c| c.len() == 1)
            && train.examples.iter().all(|e| e.label.is_some());
        while state.step < self.config.max_steps {
            let started = Instant::now();
            let picked = self.next_batch(&mut state, train.examples.len());
            let rows: Vec<BatchRow> = picked
                .iter()
                .map(|i| {
                    let ex = &train.examples[*i];
                    BatchRow::with_continuation(&ex.context, &ex.target, 0)
                })
                .collect();
            let tokens: usize = rows.iter().map(|r| r.ids.len() + n).sum();
            let step = state.step + 1;
            let lr = self.config.lr * self.config.schedule.factor(state.step);
            let (loss, grad_norm, candidates) = match self.optimizer.kind() {
                OptimizerKind::Gradient => {
                    let (encoded, tape) = encoder.forward(&theta)?;
                    let lg = self.loss_and_grad(&encoded, &rows, pad)?;
                    if !lg.loss.is_finite() {
                        bar.abandon();
                        return Err(Error::NonFinite {
                            what: "loss".into(),
                            step,
                        });
                    }
                    let grad = lg.grads.into_iter().next().unwrap_or_default();
                    // through the encoder to its parameters (PEFT clips those)
                    let mut grad = if encoder.is_identity() {
                        grad
                    } else {
                        encoder.backward(&theta, &tape, &grad)?
                    };
                    if grad.iter().any(|g| !g.is_finite()) {
                        bar.abandon();
                        return Err(Error::NonFinite {
                            what: "gradient".into(),
                            step,
                        });
                    }
                    let grad_norm = match self.config.max_grad_norm {
                        Some(max) => clip_grad_norm(&mut grad, max),
                        None => grad.iter().map(|g| g * g).sum::<f32>().sqrt(),
                    };
                    self.optimizer.step(&mut theta, &grad, lr)?;
                    (lg.loss, Some(grad_norm), 1)
                }
                OptimizerKind::GradientFree => {
                    // every candidate on the same rows, all in one batched forward pass
                    let prompts = self
                        .optimizer
                        .ask(&theta)?
                        .iter()
                        .map(|v| encoder.prompt(v))
                        .collect::<Result<Vec<_>>>()?;
                    // this rank's share of the candidates; the others' losses come by the sum
                    let (ws, rank) = (self.collective.world_size(), self.collective.rank());
                    let all_prompts = prompts;
                    let (lo, hi) = shard(all_prompts.len(), rank, ws);
                    let prompts = &all_prompts[lo..hi];
                    let mine = if prompts.is_empty() {
                        Vec::new()
                    } else if label_loss {
                        self.label_losses(prompts, train, &picked)?
                    } else {
                        let all: Vec<BatchRow> = (0..prompts.len())
                            .flat_map(|k| {
                                rows.iter().map(move |r| BatchRow {
                                    ids: r.ids.clone(),
                                    targets: r.targets.clone(),
                                    prompt: k,
                                })
                            })
                            .collect();
                        let scores = self
                            .backbone
                            .score(prompts, &Batch::from_rows(&all, pad)?)?;
                        let m = rows.len();
                        (0..prompts.len())
                            .map(|k| {
                                let lp: f64 = scores.logprob_sum[k * m..(k + 1) * m].iter().sum();
                                let c: usize = scores.num_targets[k * m..(k + 1) * m].iter().sum();
                                (-lp / c.max(1) as f64) as f32
                            })
                            .collect()
                    };
                    let losses = if ws == 1 {
                        mine
                    } else {
                        let mut buf = vec![0f64; all_prompts.len()];
                        for (b, l) in buf[lo..hi].iter_mut().zip(&mine) {
                            *b = *l as f64;
                        }
                        self.collective.all_reduce_sum(&mut buf)?;
                        buf.into_iter().map(|v| v as f32).collect()
                    };
                    let prompts = all_prompts;
                    if losses.iter().any(|l| !l.is_finite()) {
                        bar.abandon();
                        return Err(Error::NonFinite {
                            what: "loss".into(),
                            step,
                        });
                    }
                    self.optimizer.tell(&mut theta, &losses, lr)?;
                    let mean = losses.iter().sum::<f32>() / losses.len().max(1) as f32;
                    (mean, None, prompts.len())
                }
            };
            if theta.iter().any(|v| !v.is_finite()) {
                bar.abandon();
                return Err(Error::NonFinite {
                    what: "prompt update".into(),
                    step,
                });
            }
            prompt = encoder.prompt(&theta)?;
            state.step = step;
            state.prompt = theta.clone();
            state.optimizer = self.optimizer.state();
            state.last_loss = Some(loss);
            losses.push(loss);
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            self.log(serde_json::json!({
                "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "candidates": candidates,
                "examples_per_s": (picked.len() * candidates) as f64 / secs,
                "tokens_per_s": (tokens * candidates) as f64 / secs,
            }))?;
            bar.set_position(step);
            bar.set_message(format!(
                "loss {:.4} | {:.1} ex/s",
                loss,
                (picked.len() * candidates) as f64 / secs
            ));

            let eval_now = self.config.eval_every > 0
                && (step % self.config.eval_every == 0 || step == self.config.max_steps);
            if let (true, Some(dev)) = (eval_now, dev) {
                let value = self.evaluate(&prompt, dev)?;
                outcome_evals.push(EvalRecord { step, value });
                self.log(serde_json::json!({"step": step, "dev_metric": value, "metric": self.config.metric}))?;
                // through the tracing subscriber, the bar hidden while the line is written
                bar.suspend(|| {
                    tracing::info!("step {step}: dev {:?} = {value:.4}", self.config.metric)
                });
                if state.best_metric.is_none_or(|b| value > b) {
                    state.best_metric = Some(value);
                    state.best_prompt = Some(theta.clone());
                    state.best_step = Some(step);
                    state.evals_without_improvement = 0;
                } else {
                    state.evals_without_improvement += 1;
                }
                if self
                    .config
                    .patience
                    .is_some_and(|p| state.evals_without_improvement >= p)
                {
                    stopped_early = true;
                }
            }
            let last = step == self.config.max_steps || stopped_early;
            if self.config.checkpoint_every > 0
                && (step % self.config.checkpoint_every == 0 || last)
            {
                self.checkpoint(&state)?;
            }
            if stopped_early {
                bar.suspend(|| tracing::info!("early stopping at step {step}"));
                break;
            }
        }
        bar.finish_and_clear();
        let chosen = match (&state.best_prompt, self.config.keep_best) {
            (Some(best), true) => encoder.prompt(best)?,
            _ => prompt,
        };
        Ok(TrainOutcome {
            prompt: chosen,
            state,
            evals: outcome_evals,
            losses,
            stopped_early,
        })
    }
}
