//! `softprompt bench`: the train step and rank-classification throughput of every backend
//! compiled in, on one fixed batch of real data, with the batch written out so that the
//! PyTorch + PEFT reference (`tools/peft_bench.py`) runs on exactly the same token ids.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use softprompt::train::{clip_grad_norm, AdamW, EncodedSet};
use softprompt::{
    available_backends, load_backbone_with, Backbone, BackendOptions, Batch, BatchRow, Optimizer,
    PromptInit, Rng, SoftPrompt,
};

use crate::args::BenchArgs;
use crate::commands::task_of;

/// Median of `xs` (sorted copy).
fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The train batch (context + label tokens as targets) and the eval rows (contexts only).
fn batches(set: &EncodedSet, train_rows: usize, eval_rows: usize) -> Result<(Batch, Vec<Batch>)> {
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
    let eval = eval
        .chunks(16)
        .map(|c| Batch::from_rows(c, 0))
        .collect::<softprompt::Result<Vec<_>>>()?;
    Ok((train, eval))
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
        for i in 0..a.warmup + a.repeats {
            let t0 = Instant::now();
            let mut lg = b.loss_and_grad(std::slice::from_ref(&p), train)?;
            clip_grad_norm(&mut lg.grads[0], 1.0);
            opt.step(p.values_mut(), &lg.grads[0], 0.03)?;
            let dt = t0.elapsed().as_secs_f64();
            if i >= a.warmup {
                times.push(dt);
                losses.push(lg.loss);
            }
        }
        let step = median(&times);
        let tokens = train.rows() * (prompt.num_virtual_tokens() + train.seq_len());
        out.insert("train_step_seconds".into(), json!(step));
        out.insert("train_step_all".into(), json!(times));
        out.insert(
            "train_tokens_per_second".into(),
            json!(tokens as f64 / step),
        );
        out.insert("train_losses".into(), json!(losses));
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
    Ok(serde_json::Value::Object(out))
}

pub async fn bench(a: BenchArgs) -> Result<()> {
    let names: Vec<String> = match &a.backends {
        Some(list) => list.split(',').map(|s| s.trim().to_string()).collect(),
        None => available_backends().iter().map(|s| s.to_string()).collect(),
    };
    let tok = softprompt::load_tokenizer(&a.model)?;
    let task = task_of(&a.task, None)?;
    let set = task.load(&a.data, &tok, a.task.max_context)?;
    if set.candidates.iter().any(|c| c.len() != 1) {
        bail!("the bench's rank classification needs single-token labels");
    }
    let candidates: Vec<u32> = set.candidates.iter().map(|c| c[0]).collect();
    let (train, eval) = batches(&set, a.batch_size, a.eval_examples)?;
    if let Some(path) = &a.batch_out {
        let doc = json!({
            "model": a.model,
            "num_virtual_tokens": a.num_virtual_tokens,
            "train": batch_json(&train),
            "eval": eval.iter().map(batch_json).collect::<Vec<_>>(),
            "candidates": candidates,
            "warmup": a.warmup,
            "repeats": a.repeats,
            "threads": a.threads,
        });
        std::fs::write(path, serde_json::to_string(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut results = Vec::new();
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
        let prompt = SoftPrompt::initialize(
            &PromptInit::Vocab,
            a.num_virtual_tokens,
            b.as_ref(),
            None,
            &mut Rng::seed_from_u64(0),
        )?;
        let mut r = bench_one(b.as_ref(), &prompt, &train, &eval, &candidates, &a)?;
        r["load_seconds"] = json!(load_s);
        eprintln!("{}", serde_json::to_string(&r)?);
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
