//! `softprompt train --task image-classification`: a linear probe or visual prompt tuning of a
//! frozen vision transformer, over one or several seeds, saved as a prompt folder.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use softprompt::train::vision::{
    accuracy_with, check_classifier, load_digits, load_fashion_mnist, load_image_folder,
    read_classifier, save_classifier, train_classifier_selecting, ImageSet, PromptOptimizer,
    VisionConfig, VisionMethod, VisualClassifier, VptInit,
};
use softprompt::train::Schedule;
use softprompt::{Collective, SingleProcess, VisionBackbone};

use crate::args::{EvalArgs, InitKind, MethodKind, ScheduleKind, TrainArgs};

/// Seed of the fixed test subset (the same whatever the training seed).
const TEST_SEED: u64 = 1234;

/// Fashion-MNIST's folder: $SOFTPROMPT_FASHION_MNIST or Debian's package's.
fn fashion_mnist_dir() -> PathBuf {
    std::env::var_os("SOFTPROMPT_FASHION_MNIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/datasets/fashion-mnist"))
}

/// scikit-learn's digits file: $SOFTPROMPT_DIGITS, else what `tools/fetch_assets.py` writes.
fn digits_file() -> PathBuf {
    std::env::var_os("SOFTPROMPT_DIGITS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let assets = std::env::var_os("SOFTPROMPT_ASSETS")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".cache/assets"));
            assets.join("digits.csv.gz")
        })
}

/// Training and test images of `--images`; a folder's images are read at `size` pixels.
fn data(images: &str, size: usize) -> Result<(ImageSet, ImageSet)> {
    match images {
        "fashion-mnist" => {
            let dir = fashion_mnist_dir();
            let load = |train| {
                load_fashion_mnist(&dir, train).with_context(|| {
                    format!(
                        "reading Fashion-MNIST from {} (install Debian's dataset-fashion-mnist, \
                         or set SOFTPROMPT_FASHION_MNIST)",
                        dir.display()
                    )
                })
            };
            Ok((load(true)?, load(false)?))
        }
        "digits" => {
            let file = digits_file();
            load_digits(&file).with_context(|| {
                format!(
                    "reading scikit-learn's digits from {} (python3 tools/fetch_assets.py \
                     writes it; or set SOFTPROMPT_DIGITS)",
                    file.display()
                )
            })
        }
        folder if std::path::Path::new(folder).is_dir() => {
            load_image_folder(std::path::Path::new(folder), size)
                .with_context(|| format!("reading the image folder {folder}"))
        }
        other => bail!(
            "--images {other}: not `fashion-mnist`, `digits` or a folder of class sub-folders"
        ),
    }
}

/// What `inspect` shows of a visual prompt folder (the text prompts' keys, and the classes,
/// resolution and head).
pub(crate) fn summary(name: &str, dir: &std::path::Path) -> Result<serde_json::Value> {
    let (config, model) = read_classifier(dir)?;
    let p = &model.prompt;
    let width = p.hidden_size().max(1);
    let norms: Vec<f32> = p
        .values()
        .chunks(width)
        .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    Ok(serde_json::json!({
        "name": name,
        "shape": [p.num_virtual_tokens(), p.hidden_size()],
        "placement": p.placement().as_str(),
        "bytes": 4 * (p.values().len() + model.head_w.len() + model.head_b.len()),
        "mean_token_norm": norms.iter().sum::<f32>() / norms.len().max(1) as f32,
        "classes": model.classes,
        "image_size": model.image_size,
        "head": [model.head_b.len(), model.head_w.len() / model.head_b.len().max(1)],
        "config": config,
    }))
}

/// Reads a saved classifier and checks that it was trained on `backbone`.
fn load(dir: &std::path::Path, backbone: &dyn VisionBackbone) -> Result<VisualClassifier> {
    let (cfg, model) =
        read_classifier(dir).with_context(|| format!("reading {}", dir.display()))?;
    check_classifier(&cfg, &model, backbone).with_context(|| format!("{}", dir.display()))?;
    Ok(model)
}

/// `softprompt eval --task image-classification --prompt DIR --data fashion-mnist`.
/// The job's ranks under mpirun / srun (each trains or classifies its share), else this
/// process alone.
fn ranks(device: &str) -> Result<std::sync::Arc<dyn Collective>> {
    Ok(crate::dist::join(device)?.unwrap_or_else(|| std::sync::Arc::new(SingleProcess)))
}

pub(crate) fn evaluate(a: EvalArgs) -> Result<()> {
    let group = ranks(&a.backend.device)?;
    let b = &a.backend;
    let backbone = softprompt::load_vision_backbone(&b.backend, &b.model, &b.device)
        .with_context(|| format!("loading {} on {}", b.model.display(), b.backend))?;
    let dir = a
        .prompt
        .as_ref()
        .context("--task image-classification evaluates a saved --prompt DIR")?;
    let model = load(dir, backbone.as_ref())?;
    let (_, test_set) = data(&a.data.display().to_string(), model.image_size)?;
    if test_set.classes != model.classes {
        bail!(
            "{} was trained on the classes {:?}; {} has {:?}",
            dir.display(),
            model.classes,
            a.data.display(),
            test_set.classes
        );
    }
    let test = test_set.balanced(a.test_per_class, TEST_SEED);
    let acc = accuracy_with(
        backbone.as_ref(),
        &model,
        &test_set,
        &test,
        a.batch_size,
        group.as_ref(),
    )?;
    if !group.is_root() {
        return Ok(());
    }
    let report = serde_json::json!({
        "accuracy": acc, "examples": test.len(), "image_size": model.image_size,
        "placement": model.prompt.placement().as_str(),
        "virtual_tokens": model.prompt.num_virtual_tokens(),
    });
    if a.json {
        println!("{report}");
    } else {
        println!("accuracy {acc:.4} on {} test images", test.len());
    }
    Ok(())
}

pub(crate) fn train(a: TrainArgs) -> Result<()> {
    let method = match a.method {
        MethodKind::Linear => VisionMethod::Linear,
        MethodKind::VptShallow => VisionMethod::VptShallow(a.num_virtual_tokens),
        MethodKind::VptDeep => VisionMethod::VptDeep(a.num_virtual_tokens),
        MethodKind::PixelFrame => VisionMethod::PixelFrame(
            a.frame_width
                .unwrap_or(((30 * a.image_size) as f64 / 224.0).round() as usize),
        ),
        other => bail!(
            "--task image-classification takes --method linear, vpt-shallow, vpt-deep or pixel-frame (not {other:?})"
        ),
    };
    let prompt_optimizer = match a.optimizer.as_str() {
        "adamw" => PromptOptimizer::AdamW,
        "spsa" => PromptOptimizer::Spsa {
            eps: a.spsa_eps,
            perturbations: a.spsa_perturbations,
        },
        other => bail!(
            "--task image-classification trains the prompt with --optimizer adamw or spsa (not {other})"
        ),
    };
    let vpt_init = match a.init {
        None | Some(InitKind::Uniform) => VptInit::Uniform,
        Some(InitKind::Patches) => VptInit::Patches,
        Some(other) => bail!(
            "--task image-classification starts prompt tokens with --init uniform or patches (not {other:?})"
        ),
    };
    let images = a.images.as_deref().context(
        "--task image-classification needs --images (fashion-mnist, digits or a folder)",
    )?;
    // under mpirun: join the job's ranks before the model load; rank 0 alone writes and prints
    let group = ranks(&a.backend.device)?;
    let root = group.is_root();
    let b = &a.backend;
    let backbone = softprompt::load_vision_backbone(&b.backend, &b.model, &b.device)
        .with_context(|| format!("loading {} on {}", b.model.display(), b.backend))?;
    let (train_set, test_set) = data(images, a.image_size)?;
    let test = test_set.balanced(a.test_per_class, TEST_SEED);
    let seeds = if a.seeds.is_empty() {
        vec![a.seed]
    } else {
        a.seeds.clone()
    };
    if root {
        tracing::info!(
            "{} on {} ({} backend): {} shots per class, {} test images, {} px, {} steps{}",
            method.name(),
            b.model.display(),
            backbone.backend_name(),
            a.shots,
            test.len(),
            a.image_size,
            a.steps,
            if group.world_size() > 1 {
                format!(", {} ranks", group.world_size())
            } else {
                String::new()
            }
        );
    }
    let mut scores = Vec::new();
    for &seed in &seeds {
        let config = VisionConfig {
            method,
            steps: a.steps as usize,
            batch_size: a.batch_size,
            lr: a.lr,
            head_lr: a.head_lr,
            image_size: a.image_size,
            seed,
            eval_batch_size: a.eval_batch_size,
            head_warmup: a.head_warmup,
            prompt_optimizer,
            vpt_init,
            schedule: match a.schedule {
                ScheduleKind::Constant => Schedule::Constant,
                ScheduleKind::Linear => Schedule::WarmupLinear {
                    warmup: a.warmup,
                    total: a.steps,
                },
            },
            eval_every: a.eval_every as usize,
        };
        // the shots, and beside them (disjoint) the validation images that pick the kept step
        let (train, val) = train_set.balanced_split(a.shots, a.val_per_class, seed);
        let started = Instant::now();
        let model = train_classifier_selecting(
            backbone.as_ref(),
            &train_set,
            &train,
            &val,
            &config,
            group.as_ref(),
        )?;
        let train_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let acc = accuracy_with(
            backbone.as_ref(),
            &model,
            &test_set,
            &test,
            a.eval_batch_size,
            group.as_ref(),
        )?;
        let eval_secs = started.elapsed().as_secs_f64();
        scores.push(acc);
        if !root {
            continue;
        }
        let out = if seeds.len() > 1 {
            a.output.join(format!("seed-{seed}"))
        } else {
            a.output.clone()
        };
        save_classifier(
            &out,
            &model,
            backbone.as_ref(),
            &b.model.display().to_string(),
        )
        .with_context(|| format!("saving {}", out.display()))?;
        let seen = (config.steps * config.batch_size.min(train.len())) as f64;
        let report = serde_json::json!({
            "seed": seed, "images": images, "method": method.name(), "shots": a.shots,
            "train_images": train.len(), "test_images": test.len(), "image_size": a.image_size,
            "steps": config.steps, "lr": config.lr, "head_lr": config.head_lr,
            "vpt_init": config.vpt_init.name(),
            "schedule": format!("{:?}", a.schedule).to_lowercase(),
            "val_images": val.len(),
            "validation": model.validation.iter().map(|(s, acc)| serde_json::json!([s, acc])).collect::<Vec<_>>(),
            "kept_step": model.kept_step(),
            "optimizer": a.optimizer, "first_train_loss": model.losses.first(),
            "final_train_loss": model.losses.last(),
            "tuned_test": acc, "train_seconds": train_secs,
            "train_images_per_s": if method == VisionMethod::Linear { serde_json::Value::Null } else { (seen / train_secs).into() },
            "eval_images_per_s": test.len() as f64 / eval_secs,
        });
        println!("{report}");
    }
    if scores.len() > 1 && root {
        let mean = scores.iter().sum::<f64>() / scores.len() as f64;
        let sd = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>()
            / (scores.len() - 1) as f64)
            .sqrt();
        tracing::info!(
            "test over {} seeds: {:.2} ± {:.2} (sample sd)",
            scores.len(),
            100.0 * mean,
            100.0 * sd
        );
        println!(
            "{}",
            serde_json::json!({"seeds": seeds, "images": images, "method": method.name(), "shots": a.shots,
                "tuned_test_mean": mean, "tuned_test_sd": sd})
        );
    }
    Ok(())
}

/// `softprompt serve` with a vision transformer: the store's visual prompts over HTTP
/// (`POST /v1/classify` with base64 images).
pub(crate) async fn serve(a: crate::args::ServeArgs, api_key: Option<String>) -> Result<()> {
    let b = &a.backend;
    let backbone = softprompt::load_vision_backbone(&b.backend, &b.model, &b.device)
        .with_context(|| format!("loading {} on {}", b.model.display(), b.backend))?;
    let listener = tokio::net::TcpListener::bind(&a.addr)
        .await
        .with_context(|| format!("listening on {}", a.addr))?;
    // prompts that read and fit this backbone, and those that do not (named, with the reason)
    let mut count = 0;
    let mut names: Vec<_> = std::fs::read_dir(&a.store)
        .with_context(|| format!("reading --store {}", a.store.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(softprompt::store::ADAPTER_CONFIG).is_file())
        .collect();
    names.sort();
    for dir in names {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let checked = read_classifier(&dir)
            .and_then(|(cfg, model)| check_classifier(&cfg, &model, backbone.as_ref()));
        match checked {
            Ok(()) => count += 1,
            Err(e) => tracing::warn!("prompt `{name}` will not be served: {e}"),
        }
    }
    tracing::info!(
        "serving {count} visual prompts from {} on http://{} ({} backend, vision{})",
        a.store.display(),
        listener.local_addr()?,
        backbone.backend_name(),
        if api_key.is_some() {
            ", bearer auth"
        } else {
            ""
        },
    );
    let config = crate::commands::serve_config(&a, api_key)?;
    softprompt::serve::serve_vision(
        listener,
        std::sync::Arc::from(backbone),
        a.store.clone(),
        config,
        crate::commands::shutdown_signal(),
    )
    .await?;
    Ok(())
}
