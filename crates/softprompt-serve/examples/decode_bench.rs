//! Cost of one continuous-batching decode step against the number of sequences in it.
//!
//! `decode_bench --model M [--backend candle] [--rows 1,2,4,8,16,32] [--steps 8] [--input 40]`
//! adds `rows` sequences (16 distinct 20-token prompts, `input` random tokens each) in one
//! batched prefill, then times
//! `steps` decode steps; prints one JSON line per row count: prefill seconds per sequence,
//! milliseconds per step, and decoded tokens per second.

use std::time::Instant;

use anyhow::{Context, Result};
use softprompt::{batch_decoder, PromptInit, Rng, SoftPrompt};

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = flag(&args, "--model").context("--model")?;
    let backend = flag(&args, "--backend").unwrap_or_else(|| "candle".into());
    let rows: Vec<usize> = flag(&args, "--rows")
        .unwrap_or_else(|| "1,2,4,8,16,32".into())
        .split(',')
        .map(|r| r.parse().context("--rows"))
        .collect::<Result<_>>()?;
    let steps: usize = flag(&args, "--steps")
        .unwrap_or_else(|| "8".into())
        .parse()?;
    let input: usize = flag(&args, "--input")
        .unwrap_or_else(|| "40".into())
        .parse()?;
    let backbone = softprompt::load_backbone(&backend, &model, "cpu")?;
    let b = backbone.as_ref();
    let prompts: Vec<SoftPrompt> = (0..16)
        .map(|i| {
            SoftPrompt::initialize(&PromptInit::Vocab, 20, b, None, &mut Rng::seed_from_u64(i))
        })
        .collect::<softprompt::Result<_>>()?;
    let vocab = b.spec().vocab_size;
    // a serving process has seen its prompts before: warm the backend's prefix cache (and its
    // allocator) so that the timings below are of the steady state
    {
        let mut dec = batch_decoder(b);
        let ids: Vec<u32> = (0..input as u32).collect();
        let seqs: Vec<(&SoftPrompt, &[u32])> =
            prompts.iter().map(|p| (p, ids.as_slice())).collect();
        for (id, _) in dec.add_many(&seqs)? {
            dec.remove(id);
        }
    }
    for &n in &rows {
        let mut rng = Rng::seed_from_u64(n as u64);
        let mut dec = batch_decoder(b);
        let t = Instant::now();
        let inputs: Vec<Vec<u32>> = (0..n)
            .map(|_| (0..input).map(|_| rng.below(vocab) as u32).collect())
            .collect();
        let seqs: Vec<(&SoftPrompt, &[u32])> = inputs
            .iter()
            .enumerate()
            .map(|(r, ids)| (&prompts[r % prompts.len()], ids.as_slice()))
            .collect();
        // one batched prefill (prompts' keys/values may come from the backend's prefix cache)
        let mut live: Vec<(u64, u32)> = dec
            .add_many(&seqs)?
            .into_iter()
            .map(|(id, logits)| (id, softprompt::generate::argmax(&logits)))
            .collect();
        let prefill = t.elapsed().as_secs_f64() / n as f64;
        let t = Instant::now();
        for _ in 0..steps {
            let out = dec.step(&live)?;
            for (l, logits) in live.iter_mut().zip(out) {
                l.1 = softprompt::generate::argmax(&logits);
            }
        }
        let step = t.elapsed().as_secs_f64() / steps as f64;
        println!(
            "{}",
            serde_json::json!({
                "backend": backend, "rows": n, "prefill_s_per_seq": prefill,
                "step_ms": step * 1e3, "tokens_per_s": n as f64 / step,
            })
        );
    }
    Ok(())
}
