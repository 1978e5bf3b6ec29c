//! Every backend compiled in computes the same model, and a prompt trained on one runtime is
//! reused unchanged on another (through the PEFT files of the store).

use softprompt::store::DirectoryStore;
use softprompt::{
    available_backends, load_backbone, Backbone, EncoderKind, PromptConfig, PromptMethod,
    PromptStore, StoredPrompt,
};
use softprompt_tests::{
    fixture_model, load_reference, max_abs_diff, train_fixture_method, FIXTURE_MODELS,
};

fn backends(name: &str) -> Vec<Box<dyn Backbone>> {
    available_backends()
        .into_iter()
        .map(|b| load_backbone(b, fixture_model(name), "cpu").unwrap())
        .collect()
}

#[test]
fn logits_agree_across_backends() {
    for name in FIXTURE_MODELS {
        let r = load_reference(name);
        let batch = r.batch(&[1, 0]);
        let all = backends(name);
        let first: Vec<f64> = all[0]
            .logits(&r.prompts, &batch)
            .unwrap()
            .iter()
            .map(|x| *x as f64)
            .collect();
        for b in &all[1..] {
            let other: Vec<f64> = b
                .logits(&r.prompts, &batch)
                .unwrap()
                .iter()
                .map(|x| *x as f64)
                .collect();
            let diff = max_abs_diff(&first, &other);
            eprintln!(
                "{name}: {} vs {}: max |Δlogit| = {diff:e}",
                all[0].backend_name(),
                b.backend_name()
            );
            assert!(
                diff <= 1e-4,
                "{name}: {} vs {}: {diff:e}",
                all[0].backend_name(),
                b.backend_name()
            );
            assert_eq!(
                b.spec(),
                all[0].spec(),
                "one model description, one fingerprint"
            );
        }
    }
}

#[tokio::test]
async fn a_prompt_trained_on_one_runtime_evaluates_the_same_on_every_other() {
    let r = load_reference("tiny-llama");
    let batch = r.batch(&[0, 0]);
    let all = backends("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    let store = DirectoryStore::new(dir.path());
    let methods = [
        PromptMethod::PromptTuning,
        PromptMethod::PrefixTuning { projection: None },
        PromptMethod::PrefixTuning {
            projection: Some(16),
        },
        PromptMethod::PTuning {
            encoder: EncoderKind::Mlp,
            hidden_size: 16,
            num_layers: 2,
            dropout: 0.0,
        },
    ];
    for (trainer, method) in all
        .iter()
        .flat_map(|t| methods.iter().map(move |m| (t, *m)))
    {
        let out = train_fixture_method(trainer.as_ref(), 5, method);
        let name = format!("{}-trained-on-{}", method.name(), trainer.backend_name());
        let stored = StoredPrompt {
            config: PromptConfig::for_method(&out.prompt, trainer.spec(), &method),
            prompt: out.prompt,
            metadata: [(
                "softprompt.backend".to_string(),
                trainer.backend_name().to_string(),
            )]
            .into(),
        };
        store.save(&name, &stored).await.unwrap();
        let own = trainer
            .loss(std::slice::from_ref(&stored.prompt), &batch)
            .unwrap();
        for other in &all {
            let loaded = store.load_for(&name, other.spec()).await.unwrap();
            let loss = other.loss(&[loaded.prompt], &batch).unwrap();
            eprintln!(
                "{name}: loss {own} on {}, {loss} on {}",
                trainer.backend_name(),
                other.backend_name()
            );
            assert!(
                (loss - own).abs() <= 1e-4,
                "{name} on {}: {loss} vs {own}",
                other.backend_name()
            );
        }
    }
}

/// bf16 / f16 frozen weights with an f32 prompt: the loss stays close to f32's and the prompt
/// gradient arrives in f32, pointing the same way.
#[test]
fn half_precision_weights_keep_an_f32_prompt_gradient() {
    let r = load_reference("tiny-llama");
    let batch = r.batch(&[0, 0]);
    let prompts = vec![r.prompts[0].clone()];
    for backend in available_backends() {
        let full = load_backbone(backend, fixture_model("tiny-llama"), "cpu").unwrap();
        if !full.capabilities().gradients {
            // forward-only runtimes export f32 graphs only, and say so
            let opts = softprompt::BackendOptions {
                dtype: "bf16".into(),
                ..Default::default()
            };
            let err = softprompt::load_backbone_with(backend, fixture_model("tiny-llama"), &opts)
                .unwrap_err();
            assert!(err.to_string().contains("f32"), "{backend}: {err}");
            continue;
        }
        let exact = full.loss_and_grad(&prompts, &batch).unwrap();
        for dtype in ["bf16", "f16"] {
            let opts = softprompt::BackendOptions {
                dtype: dtype.into(),
                ..Default::default()
            };
            let half = softprompt::load_backbone_with(backend, fixture_model("tiny-llama"), &opts)
                .unwrap();
            let lg = half.loss_and_grad(&prompts, &batch).unwrap();
            let g = &lg.grads[0];
            assert_eq!(g.len(), exact.grads[0].len());
            assert!(g.iter().all(|x| x.is_finite()), "{backend} {dtype}");
            let dot: f64 = g
                .iter()
                .zip(&exact.grads[0])
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let cosine = dot / (norm(g) * norm(&exact.grads[0]));
            eprintln!(
                "{backend} {dtype}: loss {} vs f32 {}, gradient cosine {cosine:.4}",
                lg.loss, exact.loss
            );
            assert!((lg.loss - exact.loss).abs() < 2e-2 * exact.loss.abs().max(1.0));
            assert!(cosine > 0.98, "{backend} {dtype}: cosine {cosine}");
        }
    }
}

/// Generation that would run past the model's context is refused before the first new token
/// (it used to generate until the context ran out, then fail); exactly the context is allowed.
#[test]
fn generation_past_the_context_is_refused_up_front() {
    let max = 128; // tiny-llama's max_position_embeddings
    for b in backends("tiny-llama") {
        let d = b.spec().hidden_size;
        let prompt = softprompt::SoftPrompt::new(3, d, vec![0.02; 3 * d]).unwrap();
        let ids = [1u32, 5, 9, 4];
        let at = 3 + ids.len();
        let params = |n: usize| softprompt::GenerationParams {
            max_new_tokens: n,
            ..Default::default()
        };
        let fits = max + 1 - at;
        let out = softprompt::generate(b.as_ref(), &prompt, &ids, &params(fits)).unwrap();
        assert_eq!(out.tokens.len(), fits, "{}", b.backend_name());
        let err = softprompt::generate(b.as_ref(), &prompt, &ids, &params(fits + 1)).unwrap_err();
        assert!(
            matches!(err, softprompt::Error::InvalidArgument(_)),
            "{}: {err}",
            b.backend_name()
        );
        assert!(
            err.to_string()
                .contains(&format!("ask for at most {fits} new tokens")),
            "{err}"
        );
    }
}
