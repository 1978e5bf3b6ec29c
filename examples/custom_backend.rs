//! Writing a backend plugin against the public traits only, and training it with the shared
//! trainer.
//!
//! `MeanPoolLm` is a deliberately small causal language model in plain Rust: the state at
//! position `i` is the mean of every input vector up to `i` (virtual tokens included), and the
//! next-token logits are `E · state`. Its gradient with respect to the prompt is derived by hand
//! and checked against finite differences below; the conformance contract
//! (`softprompt::conformance`) is run on it, as on every built-in backend; and the shared
//! [`Trainer`] then tunes a prompt on it without knowing anything about it.
//!
//! Run: `cargo run -p softprompt --example custom_backend`

use anyhow::{ensure, Result};
use softprompt::train::data::EncodedExample;
use softprompt::train::{AdamW, EncodedSet, Metric, TrainConfig, Trainer};
use softprompt::{
    Architecture, Backbone, BackboneSpec, Batch, Capabilities, Error, LossAndGrad, Rng, RowScores,
    SoftPrompt,
};

/// One scored target: row, log-probability, predicting position, d(-log p)/d state.
struct Target {
    row: usize,
    logprob: f64,
    pos: usize,
    dstate: Vec<f64>,
}

/// A frozen embedding matrix `E [vocab, d]` used for input and output.
struct MeanPoolLm {
    spec: BackboneSpec,
    embeddings: Vec<f32>,
}

impl MeanPoolLm {
    fn new(vocab: usize, d: usize, seed: u64) -> Self {
        let mut rng = Rng::seed_from_u64(seed);
        let embeddings = (0..vocab * d).map(|_| rng.normal() as f32).collect();
        let spec = BackboneSpec {
            architecture: Architecture::new("mean-pool-lm"),
            hidden_size: d,
            vocab_size: vocab,
            num_layers: 0,
            num_attention_heads: 0,
            num_key_value_heads: 0,
            head_dim: 0,
            fingerprint: format!("mean-pool-lm-{vocab}x{d}-seed{seed}"),
            name: "mean-pool-lm".into(),
        };
        MeanPoolLm { spec, embeddings }
    }

    fn row(&self, id: u32) -> &[f32] {
        let d = self.spec.hidden_size;
        &self.embeddings[id as usize * d..(id as usize + 1) * d]
    }

    /// For every target: (row, log p(target), dloss/dstate), with states as running means.
    fn targets(&self, prompts: &[SoftPrompt], batch: &Batch) -> softprompt::Result<Vec<Target>> {
        let n = softprompt::backbone::check_prompts(self, prompts, batch)?;
        let (d, t, v) = (self.spec.hidden_size, batch.seq_len(), self.spec.vocab_size);
        let mut out = Vec::new();
        for (r, _, pos) in batch.targets(n)? {
            let prompt = prompts[batch.prompt_index()[r]].values();
            // state = mean of inputs 0..=pos
            let mut state = vec![0f64; d];
            for j in 0..=pos {
                let x = if j < n {
                    &prompt[j * d..(j + 1) * d]
                } else {
                    self.row(batch.input_ids()[r * t + j - n])
                };
                state.iter_mut().zip(x).for_each(|(s, x)| *s += *x as f64);
            }
            state.iter_mut().for_each(|s| *s /= (pos + 1) as f64);
            let logits: Vec<f64> = (0..v as u32)
                .map(|id| {
                    self.row(id)
                        .iter()
                        .zip(&state)
                        .map(|(e, s)| *e as f64 * s)
                        .sum()
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            let target = batch.input_ids()[r * t + pos + 1 - n] as usize;
            // d(-log p)/d state = Σ_v (softmax_v - 1[v = target]) E_v
            let mut dstate = vec![0f64; d];
            for (id, l) in logits.iter().enumerate() {
                let w = (l - lse).exp() - if id == target { 1.0 } else { 0.0 };
                dstate
                    .iter_mut()
                    .zip(self.row(id as u32))
                    .for_each(|(g, e)| *g += w * *e as f64);
            }
            out.push(Target {
                row: r,
                logprob: logits[target] - lse,
                pos,
                dstate,
            });
        }
        Ok(out)
    }
}

impl Backbone for MeanPoolLm {
    fn backend_name(&self) -> &str {
        "mean-pool"
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

    fn embed(&self, ids: &[u32]) -> softprompt::Result<Vec<f32>> {
        if let Some(id) = ids.iter().find(|id| **id as usize >= self.spec.vocab_size) {
            return Err(Error::InvalidBatch(format!(
                "token id {id} is outside the vocabulary"
            )));
        }
        Ok(ids.iter().flat_map(|id| self.row(*id).to_vec()).collect())
    }

    fn score(&self, prompts: &[SoftPrompt], batch: &Batch) -> softprompt::Result<RowScores> {
        let mut s = RowScores {
            logprob_sum: vec![0.0; batch.rows()],
            num_targets: vec![0; batch.rows()],
        };
        for t in self.targets(prompts, batch)? {
            s.logprob_sum[t.row] += t.logprob;
            s.num_targets[t.row] += 1;
        }
        Ok(s)
    }

    fn loss_and_grad(
        &self,
        prompts: &[SoftPrompt],
        batch: &Batch,
    ) -> softprompt::Result<LossAndGrad> {
        let targets = self.targets(prompts, batch)?;
        let n = prompts[0].num_virtual_tokens();
        let d = self.spec.hidden_size;
        let count = targets.len() as f64;
        let mut grads = vec![vec![0f32; n * d]; prompts.len()];
        let mut loss = 0.0;
        for Target {
            row: r,
            logprob,
            pos,
            dstate,
        } in targets
        {
            loss -= logprob / count;
            // every virtual token k <= pos enters the mean with weight 1 / (pos + 1)
            let g = &mut grads[batch.prompt_index()[r]];
            for k in 0..n.min(pos + 1) {
                for (gi, ds) in g[k * d..(k + 1) * d].iter_mut().zip(&dstate) {
                    *gi += (ds / (pos + 1) as f64 / count) as f32;
                }
            }
        }
        Ok(LossAndGrad {
            loss: loss as f32,
            grads,
        })
    }
}

/// A task the prompt can learn: after any context, predict token 7.
fn task(rng: &mut Rng, rows: usize, vocab: usize) -> EncodedSet {
    let examples = (0..rows)
        .map(|_| {
            let len = 3 + rng.below(5);
            let context = (0..len).map(|_| rng.below(vocab) as u32).collect();
            EncodedExample {
                context,
                target: vec![7],
                label: None,
            }
        })
        .collect();
    EncodedSet {
        examples,
        candidates: Vec::new(),
        source: "synthetic".into(),
    }
}

fn main() -> Result<()> {
    let lm = MeanPoolLm::new(32, 16, 1);
    let mut rng = Rng::seed_from_u64(2);
    let (train, dev) = (task(&mut rng, 256, 32), task(&mut rng, 64, 32));
    let prompt = SoftPrompt::initialize(&softprompt::PromptInit::Vocab, 4, &lm, None, &mut rng)?;

    // 1. the hand-written gradient agrees with central finite differences
    let rows: Vec<_> = dev.examples[..4]
        .iter()
        .map(|e| softprompt::BatchRow::with_continuation(&e.context, &e.target, 0))
        .collect();
    let batch = Batch::from_rows(&rows, 0)?;
    let lg = lm.loss_and_grad(std::slice::from_ref(&prompt), &batch)?;
    let mut p = prompt.clone();
    for i in [0, 5, 17, 33, 63] {
        let x = p.values()[i];
        p.values_mut()[i] = x + 1e-2;
        let up = lm.loss(std::slice::from_ref(&p), &batch)?;
        p.values_mut()[i] = x - 1e-2;
        let down = lm.loss(std::slice::from_ref(&p), &batch)?;
        p.values_mut()[i] = x;
        let fd = (up - down) / 2e-2;
        ensure!(
            (fd - lg.grads[0][i]).abs() < 1e-3,
            "coordinate {i}: fd {fd} vs grad {}",
            lg.grads[0][i]
        );
    }
    println!("gradient matches finite differences");

    // 2. the conformance contract every backbone meets (it has no generation: those checks are
    //    skipped, after checking that it answers with a typed Unsupported error)
    let load =
        || -> softprompt::Result<Box<dyn Backbone>> { Ok(Box::new(MeanPoolLm::new(32, 16, 1))) };
    let report = softprompt::conformance::run(&load, 3)?;
    println!("{report}");
    ensure!(report.passed(), "the plugin breaks the contract");
    ensure!(
        report.count("skipped") == 2,
        "only the two generation checks should be skipped"
    );

    // 3. the shared trainer tunes the prompt without knowing the backend
    let before = softprompt::train::eval::mean_loss(&lm, &prompt, &dev, 64)?;
    let config = TrainConfig {
        max_steps: 150,
        batch_size: 16,
        lr: 0.1,
        eval_every: 50,
        metric: Metric::NegLoss,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&lm, Box::new(AdamW::new()), config)?;
    let outcome = trainer.run(trainer.init_state(&prompt), &train, Some(&dev))?;
    let after = softprompt::train::eval::mean_loss(&lm, &outcome.prompt, &dev, 64)?;
    println!(
        "dev loss: {before:.4} -> {after:.4} after {} steps",
        outcome.state.step
    );
    ensure!(
        after < 0.5 * before,
        "training did not reduce the loss enough"
    );
    Ok(())
}
