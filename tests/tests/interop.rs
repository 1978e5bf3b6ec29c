//! Files from elsewhere: PEFT-saved prompts, sharded checkpoints, tokenizers, malformed models.

use softprompt::store::read_prompt_dir;
use softprompt::{load_backbone, Backbone, Error, HfTokenizer, TextTokenizer};
use softprompt_tests::{fixture_model, fixtures_dir, load_reference, FIXTURE_MODELS};

#[tokio::test]
async fn prompt_saved_by_peft_reproduces_the_reference_loss() {
    for name in FIXTURE_MODELS {
        let r = load_reference(name);
        let b = load_backbone("candle", fixture_model(name), "cpu").unwrap();
        let stored = read_prompt_dir(&fixture_model(name).join("peft-prompt"))
            .await
            .unwrap();
        stored.check_backbone(b.spec()).unwrap();
        assert_eq!(
            stored.prompt, r.prompts[0],
            "{name}: PEFT stored the prompt it was given"
        );
        let loss = b.loss(&[stored.prompt], &r.batch(&[0, 0])).unwrap() as f64;
        assert!(
            (loss - r.loss).abs() <= 1e-4,
            "{name}: {loss} vs {}",
            r.loss
        );
    }
}

#[test]
fn sharded_checkpoint_loads_to_the_same_weights() {
    let single = load_backbone("candle", fixture_model("tiny-llama"), "cpu").unwrap();
    let sharded = load_backbone("candle", fixture_model("tiny-llama-sharded"), "cpu").unwrap();
    assert_eq!(single.spec().fingerprint, sharded.spec().fingerprint);
    let r = load_reference("tiny-llama");
    let batch = r.batch(&[0, 1]);
    assert_eq!(
        single.score(&r.prompts, &batch).unwrap(),
        sharded.score(&r.prompts, &batch).unwrap()
    );
}

#[test]
fn tokenizer_matches_the_python_tokenizer() {
    let text = std::fs::read_to_string(fixtures_dir().join("tokenizer_reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tok = HfTokenizer::from_file(fixtures_dir().join("tokenizer.json")).unwrap();
    let texts = v["texts"].as_array().unwrap();
    assert!(texts.len() > 5);
    for (t, ids) in texts.iter().zip(v["ids"].as_array().unwrap()) {
        let expected: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(t.as_str().unwrap(), true).unwrap(),
            expected,
            "{t}"
        );
    }
    assert_eq!(tok.eos_id(), Some(0));
}

fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture_model(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn truncated_or_corrupt_weights_are_typed_errors() {
    let dir = copy_model("tiny-llama");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_backbone("candle", dir.path(), "cpu").unwrap_err();
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");
    let mut garbage = bytes.clone();
    garbage[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &garbage).unwrap();
    assert!(matches!(
        load_backbone("candle", dir.path(), "cpu"),
        Err(Error::Safetensors { .. })
    ));
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        load_backbone("candle", dir.path(), "cpu"),
        Err(Error::Io { .. })
    ));
}

#[test]
fn config_errors_are_typed() {
    let dir = copy_model("tiny-llama");
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"model_type\": \"llama\"", "\"model_type\": \"t5\""),
    )
    .unwrap();
    let err = load_backbone("candle", dir.path(), "cpu").unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedArchitecture { .. }),
        "{err}"
    );
    insta::assert_snapshot!(
        "unsupported_architecture",
        err.to_string()
            .replace(&dir.path().display().to_string(), "MODEL")
    );
    // a config disagreeing with the weights
    std::fs::write(
        &cfg,
        text.replace("\"intermediate_size\": 64", "\"intermediate_size\": 65"),
    )
    .unwrap();
    let err = load_backbone("candle", dir.path(), "cpu").unwrap_err();
    assert!(matches!(err, Error::TensorShape { .. }), "{err}");
    insta::assert_snapshot!("tensor_shape", err.to_string());
}

#[test]
fn backends_not_compiled_in_name_their_feature() {
    if !softprompt::available_backends().contains(&"tch") {
        let err = load_backbone("tch", fixture_model("tiny-llama"), "cpu").unwrap_err();
        insta::assert_snapshot!("backend_not_compiled", err.to_string());
    } else if !softprompt::tch_cuda_available() {
        // a CUDA device that libtorch cannot see is refused, never replaced by the CPU
        let err = load_backbone("tch", fixture_model("tiny-llama"), "cuda:0").unwrap_err();
        assert!(
            err.to_string().contains("CUDA device 0 is not available"),
            "{err}"
        );
    }
    if !softprompt::available_backends().contains(&"ort") {
        let err = load_backbone("ort", fixture_model("tiny-llama"), "cpu").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("Cargo feature `ort`") && msg.contains("tools/ort-env.sh"),
            "{msg}"
        );
    } else if !cfg!(feature = "ort-cuda") {
        // without the CUDA execution provider compiled in, cuda is refused, never run on the CPU
        let err = load_backbone("ort", fixture_model("tiny-llama"), "cuda:0").unwrap_err();
        assert!(
            matches!(err, Error::Unsupported { .. }) && err.to_string().contains("cuda"),
            "{err}"
        );
    }
    let err = load_backbone("tensorflow", fixture_model("tiny-llama"), "cpu").unwrap_err();
    assert!(err.to_string().contains("unknown backend"), "{err}");
    let err = load_backbone("candle", fixture_model("tiny-llama"), "tpu").unwrap_err();
    assert!(err.to_string().contains("unknown device"), "{err}");
}

#[test]
fn candle_f64_gradient_matches_finite_differences_tightly() {
    use softprompt::candle::{CandleBackbone, CandleOptions, DType};
    for name in FIXTURE_MODELS {
        let b = CandleBackbone::load(
            fixture_model(name),
            CandleOptions::new().with_dtype(DType::F64),
        )
        .unwrap();
        let r = load_reference(name);
        let batch = r.batch(&[0, 0]);
        let mut prompt = r.prompts[0].clone();
        let lg = b
            .loss_and_grad(std::slice::from_ref(&prompt), &batch)
            .unwrap();
        // f64 inside, f32 at the interface: the step must dwarf f32 rounding of the prompt
        let eps = 1e-2f32;
        let mut worst = 0f64;
        for i in 0..prompt.values().len() {
            let x = prompt.values()[i];
            prompt.values_mut()[i] = x + eps;
            let up = b.score(std::slice::from_ref(&prompt), &batch).unwrap();
            prompt.values_mut()[i] = x - eps;
            let down = b.score(std::slice::from_ref(&prompt), &batch).unwrap();
            prompt.values_mut()[i] = x;
            let count: usize = up.num_targets.iter().sum();
            let (lu, ld) = (
                -up.logprob_sum.iter().sum::<f64>(),
                -down.logprob_sum.iter().sum::<f64>(),
            );
            let fd = (lu - ld) / (2.0 * eps as f64) / count as f64;
            worst = worst.max((fd - lg.grads[0][i] as f64).abs());
        }
        assert!(
            worst < 2e-4,
            "{name}: worst |fd - grad| = {worst:e} over every coordinate"
        );
    }
}

#[test]
fn a_gguf_written_like_llama_cpp_loads_to_the_same_model() {
    // tiny-llama.gguf: the fixture converted as llama.cpp does (Q/K rows permuted for its RoPE)
    let r = load_reference("tiny-llama");
    let from_st = load_backbone("candle", fixture_model("tiny-llama"), "cpu").unwrap();
    let from_gguf = load_backbone("candle", fixtures_dir().join("tiny-llama.gguf"), "cpu").unwrap();
    assert_eq!(from_gguf.spec().hidden_size, from_st.spec().hidden_size);
    assert_eq!(from_gguf.spec().vocab_size, from_st.spec().vocab_size);
    let batch = r.batch(&[0, 1]);
    let a = from_st.logits(&r.prompts, &batch).unwrap();
    let b = from_gguf.logits(&r.prompts, &batch).unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-5, "max |Δlogit| {diff:e}");
}
