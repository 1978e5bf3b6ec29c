//! One prompt, every runtime: train a soft prompt on candle, save it in PEFT's layout, load it
//! on libtorch (tch) and evaluate it there; then the reverse. The eval loss and the predictions
//! agree across runtimes because both compute the same frozen model from the same weights.
//!
//! Run (needs the pinned libtorch: `bash tools/setup-python.sh && source tools/libtorch-env.sh`):
//! `cargo run -p softprompt --features tch --example cross_runtime [MODEL [TRAIN.jsonl DEV.jsonl]]`
//! Defaults: the `tiny-llama` fixture and the fixture sentiment data. MODEL may be a `.gguf`.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use softprompt::store::DirectoryStore;
use softprompt::train::eval::{mean_loss, rank_classify};
use softprompt::train::{AdamW, Task, Template, TrainConfig, Trainer, Verbalizer};
use softprompt::{
    load_backbone, load_tokenizer, Backbone, PromptConfig, PromptInit, PromptStore, Rng,
    SoftPrompt, StoredPrompt,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let model = args.first().cloned().unwrap_or(root.join("tiny-llama"));
    let train_path = args
        .get(1)
        .cloned()
        .unwrap_or(root.join("data/sentiment-train.jsonl"));
    let dev_path = args
        .get(2)
        .cloned()
        .unwrap_or(root.join("data/sentiment-dev.jsonl"));

    let tok = load_tokenizer(&model)?;
    let task = Task::Classification {
        template: Template::new("Review: {text}\nSentiment:")?,
        verbalizer: Verbalizer::parse("negative= negative,positive= positive")?,
    };
    let train = task.load(&train_path, &tok, 64)?;
    let dev = task.load(&dev_path, &tok, 64)?;
    let runtimes: Vec<Box<dyn Backbone>> = ["candle", "tch"]
        .iter()
        .map(|b| load_backbone(b, &model, "cpu").with_context(|| format!("loading on {b}")))
        .collect::<Result<_>>()?;

    let dir = tempfile::tempdir()?;
    let store = DirectoryStore::new(dir.path());
    for trainer in &runtimes {
        let init = PromptInit::Text {
            text: "Classify the review".into(),
        };
        let p0 = SoftPrompt::initialize(
            &init,
            8,
            trainer.as_ref(),
            Some(&tok),
            &mut Rng::seed_from_u64(0),
        )?;
        let config = TrainConfig {
            max_steps: 30,
            batch_size: 8,
            lr: 0.1,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(trainer.as_ref(), Box::new(AdamW::new()), config)?;
        let out = t.run(t.init_state(&p0), &train, None)?;
        let name = format!("sentiment-{}", trainer.backend_name());
        let stored = StoredPrompt {
            config: PromptConfig::for_backbone(&out.prompt, trainer.spec()),
            prompt: out.prompt,
            metadata: Default::default(),
        };
        store.save(&name, &stored).await?;
        println!(
            "trained on {:6}: {} steps, train loss {:.4} -> {:.4}, saved as {}",
            trainer.backend_name(),
            out.losses.len(),
            out.losses[0],
            out.losses[out.losses.len() - 1],
            dir.path().join(&name).display()
        );

        let mut first: Option<(f64, Vec<usize>)> = None;
        for runtime in &runtimes {
            // the store checks the prompt's backbone fingerprint against this runtime's model
            let loaded = store.load_for(&name, runtime.spec()).await?;
            let loss = mean_loss(runtime.as_ref(), &loaded.prompt, &dev, 16)?;
            let preds: Vec<usize> = rank_classify(runtime.as_ref(), &loaded.prompt, &dev, 16)?
                .iter()
                .map(|p| p.predicted)
                .collect();
            println!(
                "    evaluated on {:6}: dev loss {loss:.6}, {} dev predictions",
                runtime.backend_name(),
                preds.len()
            );
            match &first {
                None => first = Some((loss, preds)),
                Some((l0, p0)) => {
                    ensure!(
                        (loss - l0).abs() <= 1e-4,
                        "dev loss differs: {loss} vs {l0}"
                    );
                    ensure!(&preds == p0, "predictions differ across runtimes");
                }
            }
        }
    }
    println!("every runtime gives the same dev loss (within 1e-4) and the same predictions");
    Ok(())
}
