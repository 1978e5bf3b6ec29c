//! Load test for `softprompt serve` on loopback.
//!
//! `loadtest prepare --model M --store DIR [--count 16] [--from PROMPT_DIR]` fills a store with
//! `count` classification prompts (20 virtual tokens each; the tuned prompt of `--from` first when
//! given, the others initialised from different samples of the vocabulary, with the Rotten
//! Tomatoes template and labels).
//!
//! `loadtest run --url http://127.0.0.1:8080 --data test.jsonl --kind classify|complete
//! [--clients 32] [--requests 400] [--seconds 120] [--max-tokens 16]` sends requests from
//! `clients` concurrent clients, each for a random prompt of the store and a random text of
//! `data`, until `requests` are done or `seconds` pass (both bounds always hold), and prints one
//! JSON line: throughput, latency percentiles and failures.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use softprompt::store::{read_prompt_dir, DirectoryStore};
use softprompt::{PromptConfig, PromptInit, PromptStore, Rng, SoftPrompt, StoredPrompt};

const TEMPLATE: &str = "Review: {text}\nIs this movie review positive or negative? Answer:";

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: usize) -> Result<usize> {
    flag(args, name)
        .map(|v| v.parse().with_context(|| format!("{name} {v}")))
        .transpose()
        .map(|v| v.unwrap_or(default))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("prepare") => prepare(&args).await,
        Some("run") => run(&args).await,
        _ => bail!("usage: loadtest prepare --model M --store DIR [--count 16] [--from PROMPT_DIR]\n       loadtest run --url URL --data JSONL --kind classify|complete [--clients 32] [--requests 400] [--seconds 120] [--max-tokens 16]"),
    }
}

async fn prepare(args: &[String]) -> Result<()> {
    let model = flag(args, "--model").context("--model")?;
    let store = DirectoryStore::new(flag(args, "--store").context("--store")?);
    let count = num(args, "--count", 16)?;
    let backbone = softprompt::load_backbone("candle", &model, "cpu")?;
    let spec = backbone.spec().clone();
    let mut first = 0;
    if let Some(from) = flag(args, "--from") {
        let tuned = read_prompt_dir(std::path::Path::new(&from)).await?;
        tuned.check_backbone(&spec)?;
        store.save("task-00", &tuned).await?;
        first = 1;
    }
    for i in first..count {
        let mut rng = Rng::seed_from_u64(1000 + i as u64);
        let prompt =
            SoftPrompt::initialize(&PromptInit::Vocab, 20, backbone.as_ref(), None, &mut rng)?;
        let mut config = PromptConfig::for_backbone(&prompt, &spec);
        let prov = config.softprompt.as_mut().expect("provenance");
        prov.template = Some(TEMPLATE.into());
        prov.labels = vec![
            ("negative".into(), " negative".into()),
            ("positive".into(), " positive".into()),
        ];
        let stored = StoredPrompt {
            prompt,
            config,
            metadata: Default::default(),
        };
        store.save(&format!("task-{i:02}"), &stored).await?;
    }
    eprintln!("{count} prompts in {}", store.root().display());
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn run(args: &[String]) -> Result<()> {
    let url = flag(args, "--url").unwrap_or_else(|| "http://127.0.0.1:8080".into());
    if !(url.starts_with("http://127.0.0.1:") || url.starts_with("http://localhost:")) {
        bail!("the load test only targets loopback (http://127.0.0.1:PORT), got {url}");
    }
    let kind = flag(args, "--kind").unwrap_or_else(|| "classify".into());
    if kind != "classify" && kind != "complete" {
        bail!("--kind classify|complete");
    }
    let clients = num(args, "--clients", 32)?;
    let requests = num(args, "--requests", 400)?;
    let seconds = num(args, "--seconds", 120)?;
    let max_tokens = num(args, "--max-tokens", 16)?;
    let data = flag(args, "--data").context("--data")?;
    let texts: Vec<String> = std::fs::read_to_string(&data)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            Ok(v["text"].as_str().context("a `text` field")?.to_string())
        })
        .collect::<Result<_>>()?;
    let client = reqwest::Client::new();
    let models: Value = client
        .get(format!("{url}/v1/models"))
        .send()
        .await?
        .json()
        .await?;
    let prompts: Vec<String> = models["data"]
        .as_array()
        .context("model list")?
        .iter()
        .filter(|m| m["ready"] == true)
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect();
    if prompts.is_empty() {
        bail!("the server lists no ready prompts");
    }
    let (texts, prompts) = (Arc::new(texts), Arc::new(prompts));
    let issued = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds as u64);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, url, kind) = (client.clone(), url.clone(), kind.clone());
        let (texts, prompts, issued) = (texts.clone(), prompts.clone(), issued.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::seed_from_u64(c as u64);
            let mut out: Vec<(f64, u16, u64)> = Vec::new();
            while Instant::now() < deadline && issued.fetch_add(1, Ordering::SeqCst) < requests {
                let model = &prompts[rng.below(prompts.len())];
                let text = &texts[rng.below(texts.len())];
                let (path, body) = if kind == "classify" {
                    ("/v1/classify", json!({ "model": model, "input": text }))
                } else {
                    (
                        "/v1/completions",
                        json!({ "model": model, "prompt": TEMPLATE.replace("{text}", text),
                                "max_tokens": max_tokens, "temperature": 0 }),
                    )
                };
                let t = Instant::now();
                let r = client.post(format!("{url}{path}")).json(&body).send().await;
                let (status, tokens) = match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        (
                            status,
                            v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
                        )
                    }
                    Err(_) => (0, 0),
                };
                out.push((t.elapsed().as_secs_f64(), status, tokens));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let wall = started.elapsed().as_secs_f64();
    let ok: Vec<&(f64, u16, u64)> = all.iter().filter(|r| r.1 == 200).collect();
    let mut lat: Vec<f64> = ok.iter().map(|r| r.0).collect();
    lat.sort_by(f64::total_cmp);
    let tokens: u64 = ok.iter().map(|r| r.2).sum();
    let report = json!({
        "kind": kind, "prompts": prompts.len(), "clients": clients,
        "requests": all.len(), "ok": ok.len(), "failed": all.len() - ok.len(),
        "seconds": wall, "requests_per_s": ok.len() as f64 / wall,
        "tokens_per_s": tokens as f64 / wall,
        "latency_p50_s": percentile(&lat, 0.5), "latency_p90_s": percentile(&lat, 0.9),
        "latency_p99_s": percentile(&lat, 0.99),
    });
    println!("{report}");
    Ok(())
}
