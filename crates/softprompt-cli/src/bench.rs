//! `softprompt bench`: train step (time, tokens/s, FLOP/s against an f32 matmul measured in the
//! same process), rank-classification throughput, KV-cached generation speed and peak memory of
//! every backend asked for, on one fixed batch of real data, with the batch written out so that
//! the PyTorch + PEFT reference (`tools/peft_bench.py`) runs on exactly the same token ids.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use softprompt::train::{clip_grad_norm, AdamW, EncodedSet};
use softprompt::{
    available_backends, generate, load_backbone_with, matmul_flops, Backbone, BackendOptions,
    Batch, BatchRow, GenerationParams, ModelConfig, Optimizer, PromptInit, Rng, SoftPrompt,
};

use crate::args::BenchArgs;
use crate::task::{task_of, Defaults};

/// Median of `xs` (sorted copy).
fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The train batch (context + label tokens as targets) and the eval rows (contexts only), in
/// passes of 16: `(ours, reference)`. Ours go in order of length, as `rank_classify` does; the
/// reference passes keep the data order, as a PEFT evaluation loop does.
type Batches = (Batch, Vec<Batch>, Vec<Batch>);

fn batches(set: &EncodedSet, train_rows: usize, eval_rows: usize) -> Result<Batches> {
    if set.examples.len() < train_rows + eval_rows {
        bail!(
            "{} has {} examples; the bench needs {train_rows} + {eval_rows}",
            set.source.display(),
            set.examples.len()
        );
    }
    let rows: Vec<BatchRow> = set.examples[..train_rows]
        .iter()
        .map(|e| BatchRow::with_continuation(&e.context, &e.target, 0))
        .collect();
    let train = Batch::from_rows(&rows, 0)?;
    let eval: Vec<BatchRow> = set.examples[train_rows..train_rows + eval_rows]
        .iter()
        .map(|e| BatchRow {
            ids: e.context.clone(),
            targets: vec![false; e.context.len()],
            prompt: 0,
        })
        .collect();
    let passes = |rows: &[BatchRow]| {
        rows.chunks(16)
            .map(|c| Batch::from_rows(c, 0))
            .collect::<softprompt::Result<Vec<_>>>()
    };
    let reference = passes(&eval)?;
    let mut sorted = eval;
    sorted.sort_by_key(|r| r.ids.len());
    Ok((train, passes(&sorted)?, reference))
}

/// FLOPs (2 per multiply-add) of one train step on `train` with one prompt of `n` tokens, as
/// softprompt computes it: the prompt's positions once (their keys and values are shared by
/// every row), each row's tokens against prompt + tokens; forward, then the backward to the
/// prompt only (input gradients: the linear layers once more, attention twice more); the output
/// head at target positions only.
fn train_step_flops(config: &ModelConfig, train: &Batch, n: usize) -> f64 {
    let (d, layers, linear, heads_dim, vocab) = match config {
        ModelConfig::Llama(c) => {
            let (q, kv) = (
                c.num_attention_heads * c.head_dim,
                c.num_key_value_heads * c.head_dim,
            );
            let per_layer = c.hidden_size * (q + 2 * kv)
                + q * c.hidden_size
                + 3 * c.hidden_size * c.intermediate_size;
            (
                c.hidden_size,
                c.num_hidden_layers,
                per_layer,
                q,
                c.vocab_size,
            )
        }
        ModelConfig::Gpt2(c) => {
            let per_layer = 4 * c.n_embd * c.n_embd + 2 * c.n_embd * c.n_inner;
            (c.n_embd, c.n_layer, per_layer, c.n_embd, c.vocab_size)
        }
        ModelConfig::Gemma3(c) => {
            let (q, kv) = (
                c.num_attention_heads * c.head_dim,
                c.num_key_value_heads * c.head_dim,
            );
            let per_layer = c.hidden_size * (q + 2 * kv)
                + q * c.hidden_size
                + 3 * c.hidden_size * c.intermediate_size;
            (
                c.hidden_size,
                c.num_hidden_layers,
                per_layer,
                q,
                c.vocab_size,
            )
        }
    };
    let (n, t, rows) = (n as f64, train.seq_len() as f64, train.rows() as f64);
    let positions = n + rows * t;
    let linear = 2.0 * positions * (layers * linear) as f64;
    // scores and weighted values: prompt × prompt once, each row's tokens × (prompt + tokens)
    let pairs = n * n + rows * t * (n + t);
    let attention = 2.0 * 2.0 * pairs * (layers * heads_dim) as f64;
    let head = 2.0 * train.num_targets() as f64 * (d * vocab) as f64;
    2.0 * linear + 3.0 * attention + 2.0 * head
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn batch_json(b: &Batch) -> serde_json::Value {
    let t = b.seq_len();
    let rows: Vec<serde_json::Value> = (0..b.rows())
        .map(|r| {
            let n = b.row_len(r);
            json!({
                "ids": &b.input_ids()[r * t..r * t + n],
                "targets": &b.loss_mask()[r * t..r * t + n],
            })
        })
        .collect();
    json!(rows)
}

fn bench_one(
    b: &dyn Backbone,
    prompt: &SoftPrompt,
    train: &Batch,
    eval: &[Batch],
    candidates: &[u32],
    a: &BenchArgs,
) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    out.insert("backend".into(), json!(b.backend_name()));
    if b.capabilities().gradients {
        let mut p = prompt.clone();
        let mut opt = AdamW::new();
        let mut times = Vec::new();
        let mut losses = Vec::new();
        // every step's loss, warmup included: from the same prompt, PEFT's first steps must match
        let mut all_losses = Vec::new();
        for i in 0..a.warmup + a.repeats {
            let t0 = Instant::now();
            let mut lg = b.loss_and_grad(std::slice::from_ref(&p), train)?;
            clip_grad_norm(&mut lg.grads[0], 1.0);
            opt.step(p.values_mut(), &lg.grads[0], 0.03)?;
            let dt = t0.elapsed().as_secs_f64();
            all_losses.push(lg.loss);
            if i >= a.warmup {
                times.push(dt);
                losses.push(lg.loss);
            }
        }
        out.insert("train_losses_all".into(), json!(all_losses));
        let step = median(&times);
        let tokens = train.rows() * (prompt.num_virtual_tokens() + train.seq_len());
        out.insert("train_step_seconds".into(), json!(step));
        out.insert("train_step_all".into(), json!(times));
        out.insert(
            "train_tokens_per_second".into(),
            json!(tokens as f64 / step),
        );
        out.insert("train_losses".into(), json!(losses));
    } else {
        // forward-only runtimes train with SPSA / CMA-ES: time the loss of the same batch (one
        // SPSA step scores two perturbed copies of it)
        let mut times = Vec::new();
        for i in 0..a.warmup + a.repeats {
            let t0 = Instant::now();
            b.loss(std::slice::from_ref(prompt), train)?;
            if i >= a.warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        out.insert("forward_seconds".into(), json!(median(&times)));
    }
    let examples: usize = eval.iter().map(Batch::rows).sum();
    let mut times = Vec::new();
    for i in 0..a.warmup + a.repeats {
        let t0 = Instant::now();
        for batch in eval {
            let prompts = vec![prompt.clone()];
            b.next_token_logprobs(&prompts, batch, candidates)?;
        }
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let eval_s = median(&times);
    out.insert("eval_seconds".into(), json!(eval_s));
    out.insert(
        "eval_examples_per_second".into(),
        json!(examples as f64 / eval_s),
    );
    if b.capabilities().generation && a.gen_tokens > 0 {
        // greedy decoding of exactly gen_tokens after the first train row
        let context = &train.input_ids()[..train.row_len(0)];
        let params = GenerationParams {
            max_new_tokens: a.gen_tokens,
            ..Default::default()
        };
        let mut times = Vec::new();
        for i in 0..a.warmup + a.repeats {
            let t0 = Instant::now();
            let g = generate(b, prompt, context, &params)?;
            if g.tokens.len() != a.gen_tokens {
                bail!("generation stopped after {} tokens", g.tokens.len());
            }
            if i >= a.warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        out.insert(
            "generate_tokens_per_second".into(),
            json!(a.gen_tokens as f64 / median(&times)),
        );
    }
    Ok(serde_json::Value::Object(out))
}

pub async fn bench(a: BenchArgs) -> Result<()> {
    let names: Vec<String> = match &a.backends {
        Some(list) => list.split(',').map(|s| s.trim().to_string()).collect(),
        None => available_backends().iter().map(|s| s.to_string()).collect(),
    };
    let tok = softprompt::load_tokenizer(&a.model)?;
    let config = softprompt::load_model_config(&a.model)?;
    let task = task_of(&a.task, None, Defaults::Sentiment)?;
    let set = task.load(&a.data, &tok, a.task.max_context)?;
    if set.candidates.iter().any(|c| c.len() != 1) {
        bail!("the bench's rank classification needs single-token labels");
    }
    let candidates: Vec<u32> = set.candidates.iter().map(|c| c[0]).collect();
    let (train, eval, reference_eval) = batches(&set, a.batch_size, a.eval_examples)?;
    let mut results = Vec::new();
    let mut first_prompt: Option<SoftPrompt> = None;
    for name in &names {
        let opts = BackendOptions {
            device: a.device.clone(),
            dtype: a.dtype.clone(),
            threads: a.threads,
        };
        let t0 = Instant::now();
        let b = load_backbone_with(name, &a.model, &opts)
            .with_context(|| format!("loading {} on {name}", a.model.display()))?;
        let load_s = t0.elapsed().as_secs_f64();
        // the same starting values on every backend (and in PEFT, through --batch-out): drawn
        // once from the first backend's vocabulary embeddings (the weights are the same)
        let prompt = match &first_prompt {
            Some(p) => SoftPrompt::clone(p),
            None => {
                let p = SoftPrompt::initialize(
                    &PromptInit::Vocab,
                    a.num_virtual_tokens,
                    b.as_ref(),
                    None,
                    &mut Rng::seed_from_u64(0),
                )?;
                if let Some(path) = &a.batch_out {
                    let prompt = &p;
                    let doc = json!({
                        "model": a.model,
                        "num_virtual_tokens": a.num_virtual_tokens,
                        // the starting prompt every runner takes (PEFT's prompt encoder is set to it)
                        "prompt": prompt.values().chunks(prompt.hidden_size()).collect::<Vec<_>>(),
                        "train": batch_json(&train),
                        "eval": reference_eval.iter().map(batch_json).collect::<Vec<_>>(),
                        "candidates": candidates,
                        "warmup": a.warmup,
                        "gen_tokens": a.gen_tokens,
                        "matmul_size": a.matmul_size,
                        "repeats": a.repeats,
                        "threads": a.threads,
                    });
                    std::fs::write(path, serde_json::to_string(&doc)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                first_prompt = Some(p.clone());
                p
            }
        };
        let mut r = bench_one(b.as_ref(), &prompt, &train, &eval, &candidates, &a)?;
        r["load_seconds"] = json!(load_s);
        if let Some(step) = r.get("train_step_seconds").and_then(|v| v.as_f64()) {
            let flops = train_step_flops(&config, &train, a.num_virtual_tokens);
            let ceiling = matmul_flops(name, &a.device, a.matmul_size, 10)?;
            r["train_step_flops"] = json!(flops);
            r["train_flops_per_second"] = json!(flops / step);
            r["matmul_flops_per_second"] = json!(ceiling);
            r["train_fraction_of_matmul"] = json!(flops / step / ceiling);
        }
        if let Some(rss) = peak_rss_mib() {
            // cumulative over the process: run one backend per process to compare peaks
            r["peak_rss_mib"] = json!(rss);
        }
        tracing::info!("{}", serde_json::to_string(&r)?);
        results.push(r);
    }
    let doc = json!({
        "rows": train.rows(),
        "seq_len": train.seq_len(),
        "num_virtual_tokens": a.num_virtual_tokens,
        "eval_examples": a.eval_examples,
        "threads": a.threads,
        "dtype": a.dtype,
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
