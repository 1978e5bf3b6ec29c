//! `softprompt train --task image-classification`: a linear probe or visual prompt tuning of a
//! frozen vision transformer, over one or several seeds, saved as a prompt folder.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use softprompt::train::vision::{
    accuracy, load_digits, load_fashion_mnist, load_image_folder, train_classifier, ImageSet,
    PromptOptimizer, VisionConfig, VisionMethod, VisualClassifier,
};
use softprompt::VisionBackbone;

use crate::args::{EvalArgs, MethodKind, TrainArgs};

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

/// The prompt folder of a trained classifier: `adapter_model.safetensors` (`prompt_embeddings
/// [N, width]`, `head.weight [classes, d]`, `head.bias [classes]`) and `adapter_config.json`
/// (PEFT's field names where they apply).
fn save(
    dir: &std::path::Path,
    model: &VisualClassifier,
    backbone: &dyn VisionBackbone,
    model_path: &std::path::Path,
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let d = backbone.spec().hidden_size;
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (p, w, b) = (
        bytes(model.prompt.values()),
        bytes(&model.head_w),
        bytes(&model.head_b),
    );
    let n = model.prompt.num_virtual_tokens();
    let width = model.prompt.hidden_size();
    let c = model.head_b.len();
    let tensors = vec![
        (
            "prompt_embeddings",
            TensorView::new(Dtype::F32, vec![n, width], &p)?,
        ),
        ("head.weight", TensorView::new(Dtype::F32, vec![c, d], &w)?),
        ("head.bias", TensorView::new(Dtype::F32, vec![c], &b)?),
    ];
    let weights = safetensors::serialize(tensors, None)?;
    let config = serde_json::json!({
        "peft_type": "VISUAL_PROMPT_TUNING",
        "task_type": "IMAGE_CLASSIFICATION",
        "base_model_name_or_path": model_path.display().to_string(),
        "num_virtual_tokens": n,
        "token_dim": d,
        "num_layers": backbone.config().num_hidden_layers,
        "placement": model.prompt.placement().as_str(),
        "image_size": model.image_size,
        "classes": model.classes,
        "softprompt": {
            "backbone_fingerprint": backbone.spec().fingerprint,
            "weights_sha256": softprompt::store::sha256_hex(&weights),
        },
    });
    let json = serde_json::to_vec_pretty(&config)?;
    softprompt::store::write_folder(
        dir,
        &[
            (softprompt::store::ADAPTER_WEIGHTS, &weights),
            (softprompt::store::ADAPTER_CONFIG, &json),
        ],
    )?;
    Ok(())
}

/// Whether `dir` holds a visual prompt (its config's `peft_type` says so).
pub(crate) fn is_visual(dir: &std::path::Path) -> bool {
    std::fs::read(dir.join(softprompt::store::ADAPTER_CONFIG))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|c| c["peft_type"] == "VISUAL_PROMPT_TUNING")
}

/// What `inspect` shows of a visual prompt folder (the text prompts' keys, and the classes,
/// resolution and head).
pub(crate) fn summary(name: &str, dir: &std::path::Path) -> Result<serde_json::Value> {
    let (config, model) = read_folder(dir)?;
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

/// Reads a folder [`save`] wrote, checking that it was trained on `backbone`.
fn load(dir: &std::path::Path, backbone: &dyn VisionBackbone) -> Result<VisualClassifier> {
    let (cfg, model) = read_folder(dir)?;
    let fp = cfg["softprompt"]["backbone_fingerprint"]
        .as_str()
        .unwrap_or("");
    if fp != backbone.spec().fingerprint {
        bail!(
            "{} was trained for backbone {fp}, this one is {}",
            dir.display(),
            backbone.spec().fingerprint
        );
    }
    let d = backbone.spec().hidden_size;
    if model.head_w.len() != model.classes.len() * d {
        bail!(
            "{}: a head of width {} for a backbone of width {d}",
            dir.display(),
            model.head_w.len() / model.classes.len().max(1)
        );
    }
    Ok(model)
}

/// Reads a folder [`save`] wrote without a backbone: its config and classifier, checking that
/// its weights are the ones its config names and that their shapes agree.
fn read_folder(dir: &std::path::Path) -> Result<(serde_json::Value, VisualClassifier)> {
    use softprompt::{Placement, SoftPrompt};
    let cfg_path = dir.join(softprompt::store::ADAPTER_CONFIG);
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?,
    )
    .with_context(|| format!("parsing {}", cfg_path.display()))?;
    if cfg["peft_type"] != "VISUAL_PROMPT_TUNING" {
        bail!(
            "{} is a {} prompt, not a visual one",
            dir.display(),
            cfg["peft_type"]
        );
    }
    let weights_path = dir.join(softprompt::store::ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&weights_path)
        .with_context(|| format!("reading {}", weights_path.display()))?;
    let sha = softprompt::store::sha256_hex(&bytes);
    if cfg["softprompt"]["weights_sha256"].as_str() != Some(sha.as_str()) {
        bail!(
            "{} does not hold the weights its config names (weights_sha256 differs)",
            weights_path.display()
        );
    }
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("parsing {}", weights_path.display()))?;
    let tensor = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let t = st
            .tensor(name)
            .with_context(|| format!("{} has no `{name}`", weights_path.display()))?;
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((t.shape().to_vec(), v))
    };
    let placement = match cfg["placement"].as_str() {
        Some("after_class_token") => Placement::AfterClassToken,
        Some("deep_after_class_token") => Placement::DeepAfterClassToken,
        Some("pixels") => Placement::Pixels,
        other => bail!("unknown visual prompt placement {other:?}"),
    };
    let (shape, values) = tensor("prompt_embeddings")?;
    let [n, width] = shape[..] else {
        bail!("prompt_embeddings of shape {shape:?}")
    };
    let prompt = SoftPrompt::new(n, width, values)?.with_placement(placement);
    let (_, head_w) = tensor("head.weight")?;
    let (_, head_b) = tensor("head.bias")?;
    let classes: Vec<String> = cfg["classes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let d = cfg["token_dim"].as_u64().context("no token_dim")? as usize;
    if head_b.len() != classes.len() || head_w.len() != classes.len() * d {
        bail!(
            "a head of {} values and {} biases for {} classes of width {d}",
            head_w.len(),
            head_b.len(),
            classes.len()
        );
    }
    let image_size = cfg["image_size"].as_u64().context("no image_size")? as usize;
    let model = VisualClassifier {
        prompt,
        head_w,
        head_b,
        classes,
        image_size,
        losses: Vec::new(),
    };
    Ok((cfg, model))
}

/// `softprompt eval --task image-classification --prompt DIR --data fashion-mnist`.
pub(crate) fn evaluate(a: EvalArgs) -> Result<()> {
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
    let acc = accuracy(backbone.as_ref(), &model, &test_set, &test, a.batch_size)?;
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
    let images = a.images.as_deref().context(
        "--task image-classification needs --images (fashion-mnist, digits or a folder)",
    )?;
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
    tracing::info!(
        "{} on {} ({} backend): {} shots per class, {} test images, {} px, {} steps",
        method.name(),
        b.model.display(),
        backbone.backend_name(),
        a.shots,
        test.len(),
        a.image_size,
        a.steps
    );
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
        };
        let train = train_set.balanced(a.shots, seed);
        let started = Instant::now();
        let model = train_classifier(backbone.as_ref(), &train_set, &train, &config)?;
        let train_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let acc = accuracy(
            backbone.as_ref(),
            &model,
            &test_set,
            &test,
            a.eval_batch_size,
        )?;
        let eval_secs = started.elapsed().as_secs_f64();
        let out = if seeds.len() > 1 {
            a.output.join(format!("seed-{seed}"))
        } else {
            a.output.clone()
        };
        save(&out, &model, backbone.as_ref(), &b.model)?;
        let seen = (config.steps * config.batch_size.min(train.len())) as f64;
        let report = serde_json::json!({
            "seed": seed, "method": method.name(), "shots": a.shots,
            "train_images": train.len(), "test_images": test.len(), "image_size": a.image_size,
            "steps": config.steps, "final_train_loss": model.losses.last(),
            "tuned_test": acc, "train_seconds": train_secs,
            "train_images_per_s": if method == VisionMethod::Linear { serde_json::Value::Null } else { (seen / train_secs).into() },
            "eval_images_per_s": test.len() as f64 / eval_secs,
        });
        println!("{report}");
        scores.push(acc);
    }
    if scores.len() > 1 {
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
            serde_json::json!({"seeds": seeds, "method": method.name(), "shots": a.shots,
                "tuned_test_mean": mean, "tuned_test_sd": sd})
        );
    }
    Ok(())
}
