//! What each subcommand does.

use std::path::Path;

use anyhow::{bail, Context, Result};
use softprompt::store::{read_prompt_dir, write_prompt_dir, DirectoryStore, ADAPTER_CONFIG};
use softprompt::train::data::Template;
use softprompt::train::{
    eval, read_checkpoint, Metric, OptimizerChoice, PromptEncoder, Schedule, Task, TrainConfig,
    Trainer,
};
use softprompt::{
    generate, load_backbone_with, Backbone, BackendOptions, EncoderKind, GenerationParams,
    HfTokenizer, PromptConfig, PromptInit, PromptMethod, PromptStore, Rng, SingleProcess,
    SoftPrompt, StoredPrompt, TextTokenizer,
};

use crate::args::{
    BackendArgs, BatchingKind, EncoderArg, EvalArgs, ExportArgs, GenerateArgs, InitKind,
    InspectArgs, MethodKind, ScheduleKind, ServeArgs, TrainArgs,
};
use crate::task::{task_of, Defaults};

fn load(b: &BackendArgs) -> Result<(Box<dyn Backbone>, HfTokenizer)> {
    let opts = BackendOptions {
        device: b.device.clone(),
        dtype: b.dtype.clone(),
        threads: b.threads,
    };
    let backbone = load_backbone_with(&b.backend, &b.model, &opts)
        .with_context(|| format!("loading {} on {}", b.model.display(), b.backend))?;
    let tok = softprompt::load_tokenizer(&b.model)?;
    Ok((backbone, tok))
}

fn metric_name(task: &Task) -> (&'static str, Metric) {
    match task {
        Task::Classification { .. } => ("accuracy", Metric::Accuracy),
        Task::Generation { .. } => ("exact_match", Metric::ExactMatch),
    }
}

fn score(
    b: &dyn Backbone,
    prompt: &SoftPrompt,
    task: &Task,
    set: &softprompt::train::EncodedSet,
    bs: usize,
    eos: Option<u32>,
) -> Result<f64> {
    // under mpirun each rank scores its share of the rows
    let group = crate::dist::group()?.unwrap_or_else(|| std::sync::Arc::new(SingleProcess));
    let (num, den) = eval::sharded_counts(group.as_ref(), set, |part| match task {
        Task::Classification { .. } => eval::accuracy_counts(b, prompt, part, bs),
        Task::Generation { .. } => eval::exact_match_counts(b, prompt, part, eos),
    })?;
    Ok(num / den.max(1.0))
}

pub(crate) async fn train(mut a: TrainArgs) -> Result<()> {
    a.backend.device = crate::dist::device_for_rank(&a.backend.device);
    if a.task.task == crate::args::TaskKind::ImageClassification {
        return crate::vision::train(a);
    }
    // under mpirun: join the job's ranks before the (long) model load
    crate::dist::join(&a.backend.device)?;
    let (backbone, tok) = load(&a.backend)?;
    let b = backbone.as_ref();
    let root = crate::dist::is_root();
    if a.seeds.is_empty() {
        let report = train_one(&a, b, &tok).await?;
        if root {
            println!("{report}");
        }
        return Ok(());
    }
    // one run per seed on the one loaded backbone, then the spread of the test metric
    let mut tuned = Vec::new();
    let mut runs = Vec::new();
    for &seed in &a.seeds {
        let mut one = a.clone();
        one.seed = seed;
        one.seeds.clear();
        one.output = a.output.join(format!("seed-{seed}"));
        let mut report = train_one(&one, b, &tok).await?;
        report["seed"] = seed.into();
        if root {
            println!("{report}");
        }
        if let Some(t) = report["tuned_test"].as_f64() {
            tuned.push(t);
        }
        runs.push(report);
    }
    let mut summary = serde_json::json!({ "seeds": a.seeds, "runs": runs.len() });
    if !tuned.is_empty() {
        let mean = tuned.iter().sum::<f64>() / tuned.len() as f64;
        let var = tuned.iter().map(|t| (t - mean).powi(2)).sum::<f64>()
            / (tuned.len().saturating_sub(1).max(1)) as f64;
        summary["tuned_test_mean"] = mean.into();
        summary["tuned_test_sd"] = var.sqrt().into();
        summary["tuned_test_min"] = tuned.iter().copied().fold(f64::INFINITY, f64::min).into();
        summary["tuned_test_max"] = tuned
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
            .into();
        tracing::info!(
            "test over {} seeds: {:.2} ± {:.2} (sample sd), {:.2}–{:.2}",
            tuned.len(),
            100.0 * mean,
            100.0 * var.sqrt(),
            100.0 * summary["tuned_test_min"].as_f64().unwrap_or(0.0),
            100.0 * summary["tuned_test_max"].as_f64().unwrap_or(0.0)
        );
    }
    if root {
        println!("{summary}");
    }
    Ok(())
}

/// One training run; returns its report (what `train` prints).
async fn train_one(
    a: &TrainArgs,
    b: &dyn Backbone,
    tok: &HfTokenizer,
) -> Result<serde_json::Value> {
    let task = task_of(&a.task, None, Defaults::Refuse)?;
    let train_path = a
        .train
        .as_ref()
        .context("--train FILE.jsonl is required for text tasks")?;
    let train_set = task.load(train_path, tok, a.task.max_context)?;
    let dev_set = a
        .dev
        .as_deref()
        .map(|p| task.load(p, tok, a.task.max_context))
        .transpose()?;
    let test_set = a
        .test
        .as_deref()
        .map(|p| task.load(p, tok, a.task.max_context))
        .transpose()?;
    let spec = b.spec().clone();
    let n = a.num_virtual_tokens;
    let init = match a.init.unwrap_or(InitKind::Text) {
        InitKind::Text => PromptInit::Text {
            // without --init-text: a description of the task from its own words
            text: a.init_text.clone().unwrap_or_else(|| match &task {
                Task::Classification { verbalizer, .. } => format!(
                    "Classify as {}",
                    verbalizer
                        .labels()
                        .iter()
                        .map(|(_, w)| w.trim())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
                Task::Generation { template } => template.render("").trim().to_string(),
            }),
        },
        InitKind::Vocab => PromptInit::Vocab,
        InitKind::Uniform => PromptInit::Uniform { range: 0.5 },
        InitKind::Labels => match &task {
            Task::Classification { verbalizer, .. } => PromptInit::Labels {
                labels: verbalizer.labels().iter().map(|(_, w)| w.clone()).collect(),
            },
            Task::Generation { .. } => bail!("--init labels needs a classification task"),
        },
        InitKind::Patches => {
            bail!("--init patches starts visual prompt tokens (--task image-classification)")
        }
    };
    let method = match a.method {
        MethodKind::Prompt => PromptMethod::PromptTuning,
        MethodKind::Prefix => PromptMethod::PrefixTuning {
            projection: (a.prefix_projection > 0).then_some(a.prefix_projection),
        },
        MethodKind::Linear
        | MethodKind::VptShallow
        | MethodKind::VptDeep
        | MethodKind::PixelFrame => bail!(
            "--method linear/vpt-shallow/vpt-deep/pixel-frame train images: add --task image-classification"
        ),
        MethodKind::PTuning => PromptMethod::PTuning {
            encoder: match a.encoder {
                EncoderArg::Mlp => EncoderKind::Mlp,
                EncoderArg::Lstm => EncoderKind::Lstm,
            },
            hidden_size: a.encoder_hidden_size.unwrap_or(spec.hidden_size),
            num_layers: a.encoder_num_layers,
            dropout: 0.0,
        },
    };
    // an input-embedding prompt to start from: prompt tuning's, or a prefix's source
    let init_given = a.init.is_some() || a.init_text.is_some();
    let from_prompt = match method {
        PromptMethod::PromptTuning => true,
        PromptMethod::PrefixTuning { projection: None } => init_given,
        _ if init_given => bail!(
            "--init/--init-text start --method prompt and --method prefix without \
             --prefix-projection; P-tuning and the projected prefix start as PEFT's do"
        ),
        _ => false,
    };
    let encoder = PromptEncoder::new(method, n, &spec)?;
    let optimizer: OptimizerChoice = a.optimizer.parse()?;
    let (metric_label, metric) = metric_name(&task);
    let run_dir = a.run_dir.clone().unwrap_or_else(|| a.output.join("run"));
    // what defines this run beyond the trainer's settings: a --resume must match it
    let mut identity = std::collections::BTreeMap::new();
    for (key, path) in [
        ("train_data", a.train.as_ref()),
        ("dev_data", a.dev.as_ref()),
    ] {
        if let Some(path) = path {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            identity.insert(
                format!("{key}_sha256"),
                softprompt::store::sha256_hex(&bytes),
            );
        }
    }
    identity.insert("template".into(), task.template().pattern().to_string());
    if let Task::Classification { verbalizer, .. } = &task {
        identity.insert(
            "labels".into(),
            serde_json::to_string(verbalizer.labels()).unwrap_or_default(),
        );
    }
    identity.insert("max_context".into(), a.task.max_context.to_string());
    if from_prompt {
        identity.insert("init".into(), format!("{init:?}"));
    }
    identity.insert("method".into(), serde_json::to_string(&method)?);
    identity.insert("prompt_shape".into(), format!("[{n}, {}]", encoder.width()));
    let config = TrainConfig {
        identity,
        max_steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        schedule: match a.schedule {
            ScheduleKind::Constant => Schedule::Constant,
            ScheduleKind::Linear => Schedule::WarmupLinear {
                warmup: a.warmup,
                total: a.steps,
            },
        },
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        eval_every: if dev_set.is_some() {
            if a.eval_every == 0 {
                a.steps
            } else {
                a.eval_every
            }
        } else {
            0
        },
        eval_batch_size: a.eval_batch_size,
        metric,
        patience: a.patience,
        keep_best: true,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        run_dir: Some(run_dir.clone()),
        progress: !a.quiet,
        eos_id: tok.eos_id(),
    };
    let built: Box<dyn softprompt::Optimizer> = match optimizer {
        OptimizerChoice::Spsa => {
            let mut o = softprompt::train::Spsa::new(a.spsa_eps, a.seed);
            o.perturbations = a.spsa_perturbations;
            Box::new(o)
        }
        OptimizerChoice::CmaEs => {
            let mut o = softprompt::train::CmaEs::new(a.seed);
            o.population = a.population;
            o.intrinsic_dim = a.intrinsic_dim;
            o.sigma0 = a.sigma0;
            Box::new(o)
        }
        other if encoder.is_identity() => {
            other.build_seeded(n, encoder.width(), a.weight_decay, a.seed)
        }
        other => other.build_seeded(1, encoder.num_params(), a.weight_decay, a.seed),
    };
    let mut trainer = Trainer::new(b, built, config)?;
    if let Some(group) = crate::dist::group()? {
        trainer = trainer.with_collective(group);
    }
    let state = if a.resume {
        let path = run_dir.join("checkpoint.json");
        let s = read_checkpoint(&path)
            .with_context(|| format!("--resume: reading {}", path.display()))?;
        tracing::info!("resuming from step {} ({})", s.step, path.display());
        s
    } else if from_prompt {
        let prompt =
            SoftPrompt::initialize(&init, n, b, Some(tok), &mut Rng::seed_from_u64(a.seed))?;
        if method == PromptMethod::PromptTuning {
            trainer.init_state(&prompt)
        } else {
            // Li & Liang: the prefix starts as the keys and values of that prompt
            trainer.init_state(&b.key_value_prefix(&prompt)?)
        }
    } else {
        let theta = encoder.init(None, &mut Rng::seed_from_u64(a.seed))?;
        trainer.init_encoded(&encoder, theta)?
    };
    tracing::info!(
        "training {n} virtual tokens × {} ({}, {} parameters) on {} ({} backend, {}), {} train rows, {} steps",
        encoder.width(),
        method.name(),
        encoder.num_params(),
        spec.name,
        b.backend_name(),
        a.backend.device,
        train_set.examples.len(),
        a.steps
    );
    let zero_shot = match &test_set {
        Some(t) => Some(score(
            b,
            &SoftPrompt::empty(spec.hidden_size),
            &task,
            t,
            a.eval_batch_size,
            tok.eos_id(),
        )?),
        None => None,
    };
    let started = std::time::Instant::now();
    let outcome = trainer.run(state, &train_set, dev_set.as_ref())?;
    let secs = started.elapsed().as_secs_f64();

    let mut config = PromptConfig::for_method(&outcome.prompt, &spec, &method);
    config.base_model_name_or_path = Some(a.backend.model.display().to_string());
    if method == PromptMethod::PromptTuning {
        config.prompt_tuning_init = Some(init.peft_name().to_string());
        if let PromptInit::Text { text } = &init {
            config.prompt_tuning_init_text = Some(text.clone());
            config.tokenizer_name_or_path = Some(a.backend.model.display().to_string());
        }
    } else {
        config.prompt_tuning_init = None;
    }
    let prov = config
        .softprompt
        .as_mut()
        .expect("for_backbone sets provenance");
    prov.template = Some(task.template().pattern().to_string());
    if let Task::Classification { verbalizer, .. } = &task {
        prov.labels = verbalizer.labels().to_vec();
    }
    // a resumed finished run takes no step: the checkpoint remembers the last loss
    if let Some(l) = outcome.losses.last().copied().or(outcome.state.last_loss) {
        prov.metrics.insert("final_train_loss".into(), l as f64);
    }
    if let Some(best) = outcome.state.best_metric {
        prov.metrics.insert(format!("dev_{metric_label}"), best);
    }
    let mut report = serde_json::json!({
        "steps": outcome.state.step, "seconds": secs, "stopped_early": outcome.stopped_early,
        "best_dev": outcome.state.best_metric, "best_step": outcome.state.best_step,
    });
    if !outcome.losses.is_empty() {
        // the steps this process took (a resumed run's earlier ones are not timed here)
        report["seconds_per_step"] = (secs / outcome.losses.len() as f64).into();
    }
    if let (Some(t), Some(z)) = (&test_set, zero_shot) {
        let tuned = score(
            b,
            &outcome.prompt,
            &task,
            t,
            a.eval_batch_size,
            tok.eos_id(),
        )?;
        prov.metrics.insert(format!("test_{metric_label}"), tuned);
        prov.metrics
            .insert(format!("zero_shot_test_{metric_label}"), z);
        report["zero_shot_test"] = z.into();
        report["tuned_test"] = tuned.into();
        tracing::info!(
            "test {metric_label}: zero-shot {:.4} -> tuned {:.4} ({} examples)",
            z,
            tuned,
            t.examples.len()
        );
    }
    let metadata = [
        (
            "softprompt.steps".to_string(),
            outcome.state.step.to_string(),
        ),
        (
            "softprompt.backend".to_string(),
            b.backend_name().to_string(),
        ),
    ]
    .into();
    let stored = StoredPrompt {
        prompt: outcome.prompt,
        config,
        metadata,
    };
    if !crate::dist::is_root() {
        // rank 0 writes the prompt; the others hold the same values
        return Ok(report);
    }
    write_prompt_dir(&a.output, &stored).await?;
    tracing::info!(
        "saved {} (PEFT layout) after {:.1} s",
        a.output.display(),
        secs
    );
    if let Some(rss) = crate::bench::peak_rss_mib() {
        // the process's peak so far (with --seeds, over the runs before this one too)
        report["peak_rss_mib"] = rss.into();
    }
    Ok(report)
}

async fn load_prompt(path: &Path, backbone: &dyn Backbone) -> Result<StoredPrompt> {
    let stored = read_prompt_dir(path)
        .await
        .with_context(|| format!("reading prompt {}", path.display()))?;
    stored.check_backbone(backbone.spec())?;
    Ok(stored)
}

pub(crate) async fn evaluate(mut a: EvalArgs) -> Result<()> {
    a.backend.device = crate::dist::device_for_rank(&a.backend.device);
    if a.task.task == crate::args::TaskKind::ImageClassification {
        return crate::vision::evaluate(a);
    }
    crate::dist::join(&a.backend.device)?;
    let (backbone, tok) = load(&a.backend)?;
    let b = backbone.as_ref();
    let stored = match &a.prompt {
        Some(p) => Some(load_prompt(p, b).await?),
        None => None,
    };
    let task = task_of(&a.task, stored.as_ref(), Defaults::Refuse)?;
    let set = task.load(&a.data, &tok, a.task.max_context)?;
    let prompt = stored
        .as_ref()
        .map(|s| s.prompt.clone())
        .unwrap_or_else(|| SoftPrompt::empty(b.spec().hidden_size));
    let (name, _) = metric_name(&task);
    // under mpirun each rank scores its share of the rows and rank 0 prints
    let value = score(b, &prompt, &task, &set, a.batch_size, tok.eos_id())?;
    let group = crate::dist::group()?.unwrap_or_else(|| std::sync::Arc::new(SingleProcess));
    let (sum, targets) = eval::sharded_counts(group.as_ref(), &set, |part| {
        eval::loss_sums(b, &prompt, part, a.batch_size)
    })?;
    let loss = sum / targets.max(1.0);
    if !group.is_root() {
        return Ok(());
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ name: value, "loss": loss, "examples": set.examples.len() })
        );
    } else {
        println!(
            "{name}: {value:.4}\nloss: {loss:.6}\nexamples: {}",
            set.examples.len()
        );
    }
    Ok(())
}

pub(crate) async fn generate_text(a: GenerateArgs) -> Result<()> {
    let (backbone, tok) = load(&a.backend)?;
    let b = backbone.as_ref();
    let stored = match &a.prompt {
        Some(p) => Some(load_prompt(p, b).await?),
        None => None,
    };
    let template = stored
        .as_ref()
        .and_then(|s| s.config.softprompt.as_ref())
        .and_then(|p| p.template.clone());
    let text = match (&template, a.raw) {
        (Some(t), false) => Template::new(t.clone())?.render(&a.text),
        _ => a.text.clone(),
    };
    let ids = tok.encode(&text, true)?;
    let prompt = stored
        .map(|s| s.prompt)
        .unwrap_or_else(|| SoftPrompt::empty(b.spec().hidden_size));
    let mut stop = a.stop.clone();
    stop.extend(tok.eos_id());
    let params = GenerationParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        stop_tokens: stop,
        seed: a.seed,
    };
    let out = generate(b, &prompt, &ids, &params)?;
    println!("{}", tok.decode(&out.tokens)?);
    Ok(())
}

fn summary(name: &str, s: &StoredPrompt) -> serde_json::Value {
    let v = s.prompt.values();
    let norm = |row: &[f32]| row.iter().map(|x| x * x).sum::<f32>().sqrt();
    let d = s.prompt.hidden_size().max(1);
    let norms: Vec<f32> = v.chunks(d).map(norm).collect();
    serde_json::json!({
        "name": name,
        "shape": [s.prompt.num_virtual_tokens(), s.prompt.hidden_size()],
        "placement": s.prompt.placement().as_str(),
        "bytes": v.len() * 4,
        "mean_token_norm": norms.iter().sum::<f32>() / norms.len().max(1) as f32,
        "config": s.config,
        "metadata": s.metadata,
    })
}

/// A positive, finite number of seconds.
fn seconds(flag: &str, value: f64) -> Result<std::time::Duration> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{flag} must be a positive number of seconds, got {value}");
    }
    Ok(std::time::Duration::from_secs_f64(value))
}

pub(crate) fn export(a: ExportArgs) -> Result<()> {
    let start = std::time::Instant::now();
    let bytes = softprompt::export_onnx(&a.model, &a.out)
        .with_context(|| format!("exporting {} to ONNX", a.model.display()))?;
    println!(
        "wrote {} ({:.1} MB, opset 17) in {:.1} s",
        a.out.display(),
        bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub(crate) async fn inspect(a: InspectArgs) -> Result<()> {
    let mut broken: Vec<String> = Vec::new();
    let mut items = Vec::new();
    if a.path.join(ADAPTER_CONFIG).is_file() {
        let name = a.path.display().to_string();
        if softprompt::train::vision::is_visual_folder(&a.path) {
            items.push(crate::vision::summary(&name, &a.path)?);
        } else {
            let s = read_prompt_dir(&a.path).await?;
            items.push(summary(&name, &s));
        }
    } else if a.path.is_dir() {
        let store = DirectoryStore::new(&a.path);
        // every prompt that reads is shown; the broken ones are named with their reason
        for name in store.names().await? {
            let visual = a.path.join(&name);
            let loaded = if softprompt::train::vision::is_visual_folder(&visual) {
                crate::vision::summary(&name, &visual).map_err(|e| format!("{e:#}"))
            } else {
                store
                    .load(&name)
                    .await
                    .map(|s| summary(&name, &s))
                    .map_err(|e| e.to_string())
            };
            match loaded {
                Ok(item) => items.push(item),
                Err(e) => {
                    broken.push(format!("{name}: {e}"));
                    items.push(serde_json::json!({ "name": name, "error": e }));
                }
            }
        }
        if items.is_empty() {
            bail!(
                "{} holds no prompts (no {ADAPTER_CONFIG} found)",
                a.path.display()
            );
        }
    } else {
        bail!("{} is not a prompt directory or a store", a.path.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        for item in items.iter().filter(|i| i.get("error").is_none()) {
            print_summary(item);
        }
    }
    if !broken.is_empty() {
        bail!(
            "{} of the store's prompts cannot be read:\n  {}",
            broken.len(),
            broken.join("\n  ")
        );
    }
    Ok(())
}

fn print_summary(v: &serde_json::Value) {
    let c = &v["config"];
    println!("{}", v["name"].as_str().unwrap_or(""));
    println!(
        "  shape            [{}, {}] f32 ({} bytes)",
        v["shape"][0], v["shape"][1], v["bytes"]
    );
    println!(
        "  placement        {}",
        v["placement"].as_str().unwrap_or("?")
    );
    println!(
        "  mean token norm  {:.4}",
        v["mean_token_norm"].as_f64().unwrap_or(0.0)
    );
    if let Some(classes) = v["classes"].as_array() {
        let names: Vec<&str> = classes.iter().filter_map(|c| c.as_str()).collect();
        println!(
            "  head             [{}, {}] over {} px images",
            v["head"][0], v["head"][1], v["image_size"]
        );
        println!("  classes          {}", names.join(", "));
    }
    println!(
        "  peft             {} / {}",
        c["peft_type"].as_str().unwrap_or("?"),
        c["task_type"].as_str().unwrap_or("?")
    );
    println!(
        "  base model       {}",
        c["base_model_name_or_path"].as_str().unwrap_or("-")
    );
    println!(
        "  init             {}",
        c["prompt_tuning_init"].as_str().unwrap_or("-")
    );
    if let Some(p) = c.get("softprompt").filter(|p| p.is_object()) {
        println!(
            "  backbone         {} ({})",
            p["backbone_fingerprint"].as_str().unwrap_or("-"),
            p["architecture"].as_str().unwrap_or("-")
        );
        if let Some(t) = p["template"].as_str() {
            println!("  template         {t:?}");
        }
        if let Some(labels) = p["labels"].as_array() {
            let l: Vec<String> = labels
                .iter()
                .map(|x| {
                    format!(
                        "{}→{:?}",
                        x[0].as_str().unwrap_or(""),
                        x[1].as_str().unwrap_or("")
                    )
                })
                .collect();
            println!("  labels           {}", l.join(", "));
        }
        if let Some(m) = p["metrics"].as_object() {
            for (k, x) in m {
                println!("  {k:<16} {x}");
            }
        }
    } else {
        println!("  backbone         not recorded (saved by PEFT?)");
    }
}

pub(crate) async fn serve(a: ServeArgs) -> Result<()> {
    use std::sync::Arc;

    let api_key = match &a.api_key_file {
        Some(p) => {
            let key = std::fs::read_to_string(p)
                .with_context(|| format!("reading --api-key-file {}", p.display()))?
                .trim()
                .to_string();
            // an empty key would start a server that refuses every request
            if key.is_empty() {
                bail!(
                    "--api-key-file {} holds no key (empty or only whitespace)",
                    p.display()
                );
            }
            Some(key)
        }
        None => std::env::var("SOFTPROMPT_API_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
    };
    if !a.store.is_dir() {
        bail!("--store {} is not a directory", a.store.display());
    }
    let model = &a.backend.model;
    if softprompt::is_vision_model(model) {
        return crate::vision::serve(a, api_key).await;
    }
    let config = if softprompt::gguf::is_gguf(model) {
        softprompt::gguf::load_config(model)?
    } else {
        softprompt::ModelConfig::from_file(model.join("config.json"))?
    };
    let (backbone, tok) = load(&a.backend)?;
    let listener = tokio::net::TcpListener::bind(&a.addr)
        .await
        .with_context(|| format!("listening on {}", a.addr))?;
    let store = DirectoryStore::new(&a.store);
    // prompts that read and fit this backbone, and those that do not (named, with the reason)
    let mut count = 0;
    for name in store.names().await? {
        match store.load_for(&name, backbone.spec()).await {
            Ok(_) => count += 1,
            Err(e) => tracing::warn!("prompt `{name}` will not be served: {e}"),
        }
    }
    tracing::info!(
        "serving {count} prompts from {} on http://{} ({} backend, {} batching{})",
        a.store.display(),
        listener.local_addr()?,
        backbone.backend_name(),
        match a.batching {
            BatchingKind::Mixed => "mixed",
            BatchingKind::PerPrompt => "per-prompt",
        },
        if api_key.is_some() {
            ", bearer auth"
        } else {
            ""
        },
    );
    let serve_config = softprompt::serve::ServeConfig {
        context_length: Some(config.max_positions()),
        ..serve_config(&a, api_key)?
    };
    softprompt::serve::serve(
        listener,
        Arc::from(backbone),
        Arc::new(tok),
        Arc::new(store),
        serve_config,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// The limits `serve` takes from its flags (text and vision servers).
pub(crate) fn serve_config(
    a: &ServeArgs,
    api_key: Option<String>,
) -> Result<softprompt::serve::ServeConfig> {
    Ok(softprompt::serve::ServeConfig {
        queue_capacity: a.queue_capacity,
        max_batch_rows: a.max_batch_rows,
        max_active_sequences: a.max_active,
        max_new_tokens: a.max_new_tokens,
        max_input_tokens: a.max_input_tokens,
        max_body_bytes: a.max_body_bytes,
        batching: match a.batching {
            BatchingKind::Mixed => softprompt::serve::Batching::Mixed,
            BatchingKind::PerPrompt => softprompt::serve::Batching::PerPrompt,
        },
        api_key,
        header_read_timeout: seconds("--header-read-timeout", a.header_read_timeout)?,
        body_read_timeout: seconds("--body-read-timeout", a.body_read_timeout)?,
        max_connections: a.max_connections,
        shutdown_timeout: seconds("--shutdown-timeout", a.shutdown_timeout)?,
        ..Default::default()
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    {
        let term = async {
            #[cfg(unix)]
            {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            }
            #[cfg(not(unix))]
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutting down: finishing in-flight requests");
    }
}
