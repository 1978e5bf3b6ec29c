//! The `softprompt` binary end to end on the fixture model.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_softprompt"))
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_texts() {
    for sub in ["", "train", "eval", "generate", "inspect", "bench", "serve"] {
        let mut args: Vec<&str> = vec![];
        if !sub.is_empty() {
            args.push(sub);
        }
        args.push("--help");
        let o = run(&args);
        assert!(o.status.success());
        let name = if sub.is_empty() {
            "help".to_string()
        } else {
            format!("help_{sub}")
        };
        insta::assert_snapshot!(name, stdout(&o));
    }
}

#[test]
fn train_eval_inspect_generate_resume() {
    let f = fixtures();
    let model = f.join("tiny-llama");
    let (train, dev) = (
        f.join("data/sentiment-train.jsonl"),
        f.join("data/sentiment-dev.jsonl"),
    );
    let out = tempfile::tempdir().unwrap();
    let prompt = out.path().join("prompt");
    let s = |p: &std::path::Path| p.display().to_string();
    let common = [
        "train",
        "--model",
        &s(&model),
        "--train",
        &s(&train),
        "--dev",
        &s(&dev),
        "--test",
        &s(&dev),
        "--output",
        &s(&prompt),
        "--num-virtual-tokens",
        "8",
        "--init-text",
        "Classify the review",
        "--lr",
        "0.1",
        "--eval-every",
        "10",
        "--checkpoint-every",
        "10",
        "--template",
        "Review: {text}\nSentiment:",
        "--labels",
        "negative= negative,positive= positive",
        "--quiet",
    ];
    let mut args = common.to_vec();
    args.extend(["--steps", "20"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(report["steps"], 20);
    // the trainer's evaluations are logged through the same subscriber
    assert!(
        stderr(&o).contains(" INFO step 20: dev Accuracy = "),
        "{}",
        stderr(&o)
    );
    let tuned = report["tuned_test"].as_f64().unwrap();
    assert!(
        tuned > report["zero_shot_test"].as_f64().unwrap(),
        "{report}"
    );

    // the saved prompt evaluates to the reported accuracy
    let o = run(&[
        "eval",
        "--model",
        &s(&model),
        "--prompt",
        &s(&prompt),
        "--data",
        &s(&dev),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ev: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!((ev["accuracy"].as_f64().unwrap() - tuned).abs() < 1e-12);

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(prompt.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            cfg["num_attention_heads"].as_u64(),
            cfg["num_layers"].as_u64()
        ),
        (Some(4), Some(2))
    );
    let o = run(&["inspect", &s(&prompt)]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(
        text.contains("[8, 32] f32") && text.contains("negative→\" negative\""),
        "{text}"
    );
    let o = run(&["inspect", &s(out.path()), "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(listed[0]["name"], "prompt");

    let o = run(&[
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        &s(&prompt),
        "--text",
        "the film was great",
        "--max-new-tokens",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // continue the same run to 30 steps from its checkpoint
    let mut args = common.to_vec();
    args.extend(["--steps", "30", "--resume"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("resuming from step 20"),
        "{}",
        stderr(&o)
    );
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(report["steps"], 30);
    let final_loss = |p: &std::path::Path| -> Option<f64> {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
                .unwrap();
        cfg["softprompt"]["metrics"]["final_train_loss"].as_f64()
    };
    let loss = final_loss(&prompt).expect("a trained prompt records its last loss");

    // resuming the finished run takes no step and keeps the last loss it recorded
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(final_loss(&prompt), Some(loss));
}

#[test]
fn bad_inputs_give_clear_errors() {
    let f = fixtures();
    let model = f.join("tiny-llama").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\":\"ok\",\"label\":\"positive\"}\n{\"text\": oops}\n",
    )
    .unwrap();
    let out = dir.path().join("p").display().to_string();
    let o = run(&[
        "train",
        "--model",
        &model,
        "--train",
        &bad.display().to_string(),
        "--output",
        &out,
        "--template",
        "Review: {text}\nSentiment:",
        "--labels",
        "negative= negative,positive= positive",
        "--quiet",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("bad.jsonl:2: not valid JSON"), "{err}");

    // quantized weights: a GGUF file's blocks, on candle only
    for (backend, says) in [
        ("candle", "not a .gguf file"),
        ("tch", "quantized frozen weights"),
    ] {
        let o = run(&[
            "eval",
            "--model",
            &model,
            "--backend",
            backend,
            "--dtype",
            "quantized",
            "--data",
            &bad.display().to_string(),
            "--template",
            "Review: {text}\nSentiment:",
            "--labels",
            "negative= negative,positive= positive",
        ]);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains(says), "{backend}: {err}");
    }

    let o = run(&[
        "eval",
        "--model",
        &model,
        "--backend",
        "ort",
        "--data",
        &bad.display().to_string(),
        "--template",
        "Review: {text}\nSentiment:",
        "--labels",
        "negative= negative,positive= positive",
    ]);
    assert!(!o.status.success());
    // the test binary cannot see the CLI's features: either ort is not compiled in (and the
    // message names the feature), or it is and the bad data line is what fails
    let err = stderr(&o);
    assert!(
        (err.contains("backend `ort` is not compiled into this build")
            && err.contains("Cargo feature `ort`"))
            || err.contains("bad.jsonl:2: not valid JSON"),
        "{err}"
    );

    // a prompt for another backbone is refused
    let gpt2 = f.join("tiny-gpt2").display().to_string();
    let peft_llama = f.join("tiny-llama/peft-prompt");
    let o = run(&[
        "generate",
        "--model",
        &gpt2,
        "--prompt",
        &peft_llama.display().to_string(),
        "--text",
        "x",
    ]);
    assert!(
        o.status.success(),
        "same hidden size and no fingerprint: PEFT prompts are accepted"
    );
    let trained = dir.path().join("t");
    let o = run(&[
        "train",
        "--model",
        &model,
        "--train",
        &f.join("data/sentiment-train.jsonl").display().to_string(),
        "--output",
        &trained.display().to_string(),
        "--steps",
        "2",
        "--num-virtual-tokens",
        "2",
        "--template",
        "Review: {text}\nSentiment:",
        "--labels",
        "negative= negative,positive= positive",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        "generate",
        "--model",
        &gpt2,
        "--prompt",
        &trained.display().to_string(),
        "--text",
        "x",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("prompt was trained for backbone"),
        "{}",
        stderr(&o)
    );

    // an empty key file would start a server that refuses every request: refused at start
    let keys = dir.path().join("empty-key");
    std::fs::write(&keys, " \n").unwrap();
    let o = run(&[
        "serve",
        "--model",
        &f.join("tiny-llama").display().to_string(),
        "--store",
        &dir.path().display().to_string(),
        "--api-key-file",
        &keys.display().to_string(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("holds no key"), "{}", stderr(&o));
}

/// The same stored prompt evaluated on every backend of this build gives the same loss and
/// accuracy; a backend not compiled in is refused with the feature that enables it.
#[test]
fn eval_agrees_across_backends() {
    let f = fixtures();
    let s = |p: PathBuf| p.display().to_string();
    let mut results = Vec::new();
    for backend in ["candle", "tch"] {
        let o = run(&[
            "eval",
            "--model",
            &s(f.join("tiny-llama")),
            "--backend",
            backend,
            "--prompt",
            &s(f.join("tiny-llama/peft-prompt")),
            "--data",
            &s(f.join("data/sentiment-dev.jsonl")),
            // a PEFT prompt records no task
            "--template",
            "Review: {text}\nSentiment:",
            "--labels",
            "negative= negative,positive= positive",
            "--json",
        ]);
        if !o.status.success() {
            assert!(
                stderr(&o).contains("rebuild with the Cargo feature `tch`"),
                "{}",
                stderr(&o)
            );
            continue;
        }
        let ev: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        results.push((
            ev["loss"].as_f64().unwrap(),
            ev["accuracy"].as_f64().unwrap(),
        ));
    }
    for (loss, acc) in &results[1..] {
        assert!((loss - results[0].0).abs() < 1e-4, "{results:?}");
        assert_eq!(*acc, results[0].1);
    }
}

#[test]
fn bench_times_every_backend_and_writes_the_batch() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("batch.json");
    let o = run(&[
        "bench",
        "--model",
        &f.join("tiny-llama").display().to_string(),
        "--data",
        &f.join("data/sentiment-train.jsonl").display().to_string(),
        "--batch-size",
        "4",
        "--num-virtual-tokens",
        "5",
        "--eval-examples",
        "16",
        "--warmup",
        "0",
        "--repeats",
        "2",
        "--threads",
        "1",
        "--batch-out",
        &batch.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let results = report["results"].as_array().unwrap();
    assert!(!results.is_empty());
    assert_eq!(results[0]["backend"], "candle");
    for r in results {
        if r["backend"] == "ort" {
            // forward only: the loss of the train batch is timed instead of a train step
            assert!(r.get("train_step_seconds").is_none(), "{r}");
            assert!(r["forward_seconds"].as_f64().unwrap() > 0.0, "{r}");
        } else {
            assert!(r["train_step_seconds"].as_f64().unwrap() > 0.0, "{r}");
            assert_eq!(r["train_losses"].as_array().unwrap().len(), 2);
        }
        assert!(r["eval_examples_per_second"].as_f64().unwrap() > 0.0);
    }
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&batch).unwrap()).unwrap();
    assert_eq!(written["train"].as_array().unwrap().len(), 4);
    assert_eq!(written["eval"][0].as_array().unwrap().len(), 16);
    assert_eq!(written["num_virtual_tokens"], 5);
}

#[test]
fn prefix_and_p_tuning_train_resume_and_run_over_seeds() {
    let f = fixtures();
    let model = f.join("tiny-llama");
    let (train, dev) = (
        f.join("data/sentiment-train.jsonl"),
        f.join("data/sentiment-dev.jsonl"),
    );
    let out = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.display().to_string();
    let train_args = |prompt: &std::path::Path, method: &[&str], steps: &str| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--model",
            &s(&model),
            "--train",
            &s(&train),
            "--test",
            &s(&dev),
            "--output",
            &s(prompt),
            "--num-virtual-tokens",
            "4",
            "--lr",
            "0.05",
            "--checkpoint-every",
            "5",
            "--steps",
            steps,
            "--template",
            "Review: {text}\nSentiment:",
            "--labels",
            "negative= negative,positive= positive",
            "--quiet",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(method.iter().map(|x| x.to_string()));
        v
    };
    let go = |args: &[String]| -> serde_json::Value {
        let o = bin().args(args).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap()
    };
    for method in [
        vec!["--method", "prefix"],
        vec!["--method", "prefix", "--init-text", "Classify the review"],
        vec!["--method", "prefix", "--prefix-projection", "8"],
        vec!["--method", "p-tuning", "--encoder-hidden-size", "8"],
        vec![
            "--method",
            "p-tuning",
            "--encoder",
            "lstm",
            "--encoder-hidden-size",
            "4",
        ],
    ] {
        // ten steps straight, and five steps then a resumed run to ten: the same prompt
        let straight = out.path().join("straight");
        go(&train_args(&straight, &method, "10"));
        let split = out.path().join("split");
        go(&train_args(&split, &method, "5"));
        let mut resumed = train_args(&split, &method, "10");
        resumed.push("--resume".into());
        go(&resumed);
        // the tensor bytes (after the JSON header, whose key order is not fixed)
        let data = |dir: &std::path::Path| -> Vec<u8> {
            let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
            let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            bytes[8 + header..].to_vec()
        };
        assert!(
            data(&straight) == data(&split),
            "{method:?}: a resumed run differs from a straight one"
        );
        // inspect names the method and where it enters
        let o = run(&["inspect", &s(&straight)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = stdout(&o);
        let peft = if method[1] == "prefix" {
            "PREFIX_TUNING"
        } else {
            "P_TUNING"
        };
        assert!(text.contains(peft), "{text}");
        let placement = if method[1] == "prefix" {
            "key_value_prefix"
        } else {
            "input_embeddings"
        };
        assert!(text.contains(placement), "{text}");
        std::fs::remove_dir_all(&straight).unwrap();
        std::fs::remove_dir_all(&split).unwrap();
    }
    // several seeds: one folder per seed and the spread of the test accuracy
    let many = out.path().join("many");
    let mut args = train_args(&many, &["--method", "prefix"], "5");
    args.extend(["--seeds".to_string(), "0,1,2".to_string()]);
    let summary = go(&args);
    assert_eq!(summary["runs"], 3, "{summary}");
    let mean = summary["tuned_test_mean"].as_f64().unwrap();
    let (lo, hi) = (
        summary["tuned_test_min"].as_f64().unwrap(),
        summary["tuned_test_max"].as_f64().unwrap(),
    );
    assert!(lo <= mean && mean <= hi, "{summary}");
    assert!(summary["tuned_test_sd"].as_f64().unwrap() >= 0.0);
    for seed in 0..3 {
        assert!(many
            .join(format!("seed-{seed}"))
            .join("adapter_model.safetensors")
            .is_file());
    }
}

/// `--method prefix --init-text T` starts the prefix at the keys and values that T's prompt
/// produces at every layer (Li & Liang): its first step's loss is prompt tuning's from the same
/// text, on the same batch (to 1e-4), where PEFT's N(0, 1) prefix starts elsewhere. The
/// projected prefix and P-tuning refuse an initialisation they cannot take.
#[test]
fn prefix_starts_at_the_keys_and_values_of_its_init_text() {
    let f = fixtures();
    let out = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.display().to_string();
    let args = |dir: &std::path::Path, method: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--model",
            &s(&f.join("tiny-llama")),
            "--train",
            &s(&f.join("data/sentiment-train.jsonl")),
            "--output",
            &s(dir),
            "--num-virtual-tokens",
            "6",
            "--steps",
            "1",
            "--batch-size",
            "8",
            "--template",
            "Review: {text}\nSentiment:",
            "--labels",
            "negative= negative,positive= positive",
            "--quiet",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(method.iter().map(|x| x.to_string()));
        v
    };
    let first_loss = |method: &[&str], name: &str| -> f64 {
        let dir = out.path().join(name);
        let o = bin().args(args(&dir, method)).output().unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
        let line: serde_json::Value =
            serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        line["loss"].as_f64().unwrap()
    };
    let text = ["--init-text", "Classify the movie review"];
    let prompt = first_loss(&[&["--method", "prompt"][..], &text].concat(), "prompt");
    let prefix = first_loss(&[&["--method", "prefix"][..], &text].concat(), "prefix");
    let noise = first_loss(&["--method", "prefix"], "noise");
    assert!(
        (prefix - prompt).abs() <= 1e-4 * prompt.abs().max(1.0),
        "prefix from the text {prefix} vs prompt from the text {prompt}"
    );
    assert!(
        (noise - prompt).abs() > 1e-2,
        "an N(0, 1) prefix starts where the text does: {noise} vs {prompt}"
    );
    for method in [
        &["--method", "prefix", "--prefix-projection", "8"][..],
        &["--method", "p-tuning"][..],
    ] {
        let o = bin()
            .args(args(&out.path().join("refused"), &[method, &text].concat()))
            .output()
            .unwrap();
        assert!(!o.status.success(), "{method:?} took --init-text");
        assert!(stderr(&o).contains("--init/--init-text"), "{}", stderr(&o));
    }
}

#[test]
fn resume_refuses_another_runs_checkpoint_naming_each_difference() {
    let f = fixtures();
    let model = f.join("tiny-llama");
    let (train, dev) = (
        f.join("data/sentiment-train.jsonl"),
        f.join("data/sentiment-dev.jsonl"),
    );
    let out = tempfile::tempdir().unwrap();
    let prompt = out.path().join("fr");
    let s = |p: &std::path::Path| p.display().to_string();
    let o = run(&[
        "train",
        "--model",
        &s(&model),
        "--train",
        &s(&train),
        "--output",
        &s(&prompt),
        "--num-virtual-tokens",
        "5",
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
        "--template",
        "Review: {text}\nSentiment:",
        "--labels",
        "negative= negative,positive= positive",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // other data, template and length against the same run directory
    let o = run(&[
        "train",
        "--model",
        &s(&model),
        "--train",
        &s(&dev),
        "--output",
        &s(&prompt),
        "--num-virtual-tokens",
        "7",
        "--steps",
        "8",
        "--template",
        "Text: {text}\nLabel:",
        "--resume",
        "--labels",
        "negative= negative,positive= positive",
        "--quiet",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    for field in ["train_data_sha256", "template", "prompt_shape"] {
        assert!(err.contains(field), "{field} not named: {err}");
    }
    assert!(err.contains("[5, 32]") && err.contains("[7, 32]"), "{err}");
    // the prompt of the first run is untouched
    let o = run(&["inspect", &s(&prompt), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["shape"], serde_json::json!([5, 32]));
    // the same run resumes
    let o = run(&[
        "train",
        "--model",
        &s(&model),
        "--train",
        &s(&train),
        "--output",
        &s(&prompt),
        "--num-virtual-tokens",
        "5",
        "--steps",
        "6",
        "--checkpoint-every",
        "2",
        "--template",
        "Review: {text}\nSentiment:",
        "--resume",
        "--labels",
        "negative= negative,positive= positive",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn inspect_shows_every_readable_prompt_of_a_store_and_names_the_broken_ones() {
    let f = fixtures();
    let store = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let dst = store.path().join(name);
        std::fs::create_dir(&dst).unwrap();
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(f.join("tiny-llama/peft-prompt").join(file), dst.join(file)).unwrap();
        }
    };
    copy("a-good");
    copy("b-broken");
    copy("c-good");
    std::fs::write(
        store.path().join("b-broken/adapter_model.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let o = run(&["inspect", &store.path().display().to_string()]);
    assert!(!o.status.success());
    let out = stdout(&o);
    assert!(out.contains("a-good") && out.contains("c-good"), "{out}");
    let err = stderr(&o);
    assert!(
        err.contains("1 of the store's prompts") && err.contains("b-broken"),
        "{err}"
    );
}

#[test]
fn train_needs_the_tasks_template_and_labels_and_derives_its_init_text() {
    let f = fixtures();
    let out = tempfile::tempdir().unwrap();
    let s = |p: PathBuf| p.display().to_string();
    let base = [
        "train".to_string(),
        "--model".into(),
        s(f.join("tiny-llama")),
        "--train".into(),
        s(f.join("data/sentiment-train.jsonl")),
        "--output".into(),
        s(out.path().join("p")),
        "--steps".into(),
        "2".into(),
        "--quiet".into(),
    ];
    let o = bin().args(&base).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--template"), "{}", stderr(&o));
    let mut args = base.to_vec();
    args.extend(["--template".into(), "Review: {text}\nSentiment:".into()]);
    let o = bin().args(&args).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--labels"), "{}", stderr(&o));
    args.extend([
        "--labels".into(),
        "negative= negative,positive= positive".into(),
    ]);
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let config = std::fs::read_to_string(out.path().join("p/adapter_config.json")).unwrap();
    assert!(
        config.contains("\"prompt_tuning_init_text\": \"Classify as negative or positive\""),
        "{config}"
    );
    // the progress lines go through the tracing subscriber: levelled, no colour codes in a
    // pipe, and RUST_LOG=warn keeps them out
    let err = stderr(&o);
    assert!(err.contains(" INFO training 20 virtual tokens"), "{err}");
    assert!(!err.contains('\u{1b}'), "{err:?}");
    let o = bin().args(&args).env("RUST_LOG", "warn").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("training"), "{}", stderr(&o));
}

/// `serve --log-format json` writes one JSON line per request (id, method, path, status,
/// latency, and the error of a refused one) and a line per prompt load.
#[test]
fn serve_logs_requests_and_prompt_loads_as_json_lines() {
    use std::io::{BufRead, Read, Write};
    let f = fixtures();
    let store = tempfile::tempdir().unwrap();
    let dst = store.path().join("p");
    std::fs::create_dir(&dst).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(f.join("tiny-llama/peft-prompt").join(file), dst.join(file)).unwrap();
    }
    // a free port: bind, read it, release
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = bin()
        .args([
            "serve",
            "--model",
            &f.join("tiny-llama").display().to_string(),
            "--store",
            &store.path().display().to_string(),
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    // the banner comes once the server listens
    for line in lines.by_ref() {
        if line.unwrap().contains("serving") {
            break;
        }
    }
    let ask = |req: &str| -> String {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    };
    let ok = ask("GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.contains("x-request-id"),
        "{ok}"
    );
    let missing = ask("GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let _ = child.kill();
    let _ = child.wait();
    let logged: Vec<serde_json::Value> = lines
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let request = |path: &str| {
        logged
            .iter()
            .find(|v| v["fields"]["path"] == path)
            .unwrap_or_else(|| panic!("no log line for {path}: {logged:?}"))
            .clone()
    };
    let models = request("/v1/models");
    assert_eq!(models["fields"]["status"], 200);
    assert!(models["fields"]["request_id"].is_u64());
    assert!(models["fields"]["ms"].is_f64());
    let nowhere = request("/nowhere");
    assert_eq!(nowhere["fields"]["status"], 404);
    assert_eq!(nowhere["level"], "WARN");
    assert!(nowhere["fields"]["error"]
        .as_str()
        .unwrap()
        .contains("no such route"));
    assert!(
        logged
            .iter()
            .any(|v| v["fields"]["message"] == "prompt loaded" && v["fields"]["prompt"] == "p"),
        "{logged:?}"
    );
}

/// Writes gzip-compressed IDX files of `n` synthetic 28×28 images in two classes (bright or
/// dark, with pixel noise) in Fashion-MNIST's layout.
fn synthetic_fashion_mnist(dir: &std::path::Path, prefix: &str, n: usize, seed: u64) {
    use std::io::Write;
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let label = (i % 2) as u8;
        let base = if label == 0 { 180 } else { 30 };
        for _ in 0..28 * 28 {
            pixels.push(base + (next() % 40) as u8);
        }
        labels.push(label);
    }
    let write = |name: &str, magic: u32, dims: &[u32], data: &[u8]| {
        let f = std::fs::File::create(dir.join(name)).unwrap();
        let mut z = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        z.write_all(&magic.to_be_bytes()).unwrap();
        for d in dims {
            z.write_all(&d.to_be_bytes()).unwrap();
        }
        z.write_all(data).unwrap();
        z.finish().unwrap();
    };
    write(
        &format!("{prefix}-images-idx3-ubyte.gz"),
        0x803,
        &[n as u32, 28, 28],
        &pixels,
    );
    write(
        &format!("{prefix}-labels-idx1-ubyte.gz"),
        0x801,
        &[n as u32],
        &labels,
    );
}

/// `train --task image-classification` end to end on the tiny ViT: a linear probe and
/// VPT-shallow/-deep over two seeds on synthetic striped images, saved as prompt folders.
#[test]
fn image_classification_trains_a_linear_probe_and_visual_prompts() {
    let f = fixtures();
    let data = tempfile::tempdir().unwrap();
    synthetic_fashion_mnist(data.path(), "train", 64, 1);
    synthetic_fashion_mnist(data.path(), "t10k", 40, 2);
    let out = tempfile::tempdir().unwrap();
    let model = f.join("tiny-dinov2").display().to_string();
    for method in ["linear", "vpt-shallow", "vpt-deep", "pixel-frame"] {
        let dir = out.path().join(method);
        let o = bin()
            .args([
                "train",
                "--task",
                "image-classification",
                "--images",
                "fashion-mnist",
                "--model",
                &model,
                "--method",
                method,
                "--num-virtual-tokens",
                "2",
                "--shots",
                "8",
                "--test-per-class",
                "20",
                "--image-size",
                "16",
                "--steps",
                "150",
                "--batch-size",
                "8",
                "--lr",
                "0.05",
                "--head-lr",
                "0.1",
                "--seeds",
                "0,1",
                "--output",
                &dir.display().to_string(),
            ])
            .env("SOFTPROMPT_FASHION_MNIST", data.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let lines: Vec<serde_json::Value> = stdout(&o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "two runs and a summary");
        let mean = lines[2]["tuned_test_mean"].as_f64().unwrap();
        assert!(
            mean >= 0.9,
            "{method}: bright and dark are told apart: {mean}"
        );
        assert_eq!(lines[0]["test_images"], 40);
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("seed-1/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "VISUAL_PROMPT_TUNING");
        let n = match method {
            "linear" => 0,
            "pixel-frame" => 1,
            _ => 2,
        };
        assert_eq!(cfg["num_virtual_tokens"], n);
        assert_eq!(cfg["classes"].as_array().unwrap().len(), 10);
        let init = match method {
            "linear" => serde_json::Value::Null,
            "pixel-frame" => "ZEROS".into(),
            _ => "UNIFORM".into(),
        };
        assert_eq!(cfg["prompt_tuning_init"], init, "{method}");
        // the saved folder evaluates to the accuracy the run reported
        let prompt_dir = dir.join("seed-1").display().to_string();
        let eval = |extra: &[&str]| {
            let mut args = vec![
                "eval",
                "--task",
                "image-classification",
                "--model",
                &model,
                "--prompt",
                &prompt_dir,
                "--data",
                "fashion-mnist",
                "--test-per-class",
                "20",
            ];
            args.extend(extra);
            bin()
                .args(&args)
                .env("SOFTPROMPT_FASHION_MNIST", data.path())
                .output()
                .unwrap()
        };
        let o = eval(&["--json"]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let ev: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(ev["accuracy"], lines[1]["tuned_test"], "{method}");
        // a folder whose weights were replaced is refused
        if method == "vpt-shallow" {
            let w = dir.join("seed-1/adapter_model.safetensors");
            let mut bytes = std::fs::read(&w).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            std::fs::write(&w, bytes).unwrap();
            let o = eval(&[]);
            assert!(!o.status.success());
            assert!(stderr(&o).contains("weights_sha256"), "{}", stderr(&o));
        }
    }
    // validation images beside the shots: evaluated at the start, every 50 steps and at the
    // end, on a linear schedule; the report names the kept step
    let dir = out.path().join("validated");
    let o = bin()
        .args([
            "train",
            "--task",
            "image-classification",
            "--images",
            "fashion-mnist",
            "--model",
            &model,
            "--method",
            "vpt-deep",
            "--num-virtual-tokens",
            "2",
            "--shots",
            "4",
            "--val-per-class",
            "2",
            "--eval-every",
            "50",
            "--schedule",
            "linear",
            "--warmup",
            "10",
            "--test-per-class",
            "20",
            "--image-size",
            "16",
            "--steps",
            "120",
            "--batch-size",
            "8",
            "--lr",
            "0.05",
            "--head-lr",
            "0.1",
            "--output",
            &dir.display().to_string(),
        ])
        .env("SOFTPROMPT_FASHION_MNIST", data.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // the synthetic set has images of two of the ten classes: 2 each
    assert_eq!(report["val_images"], 4, "{report}");
    assert_eq!(report["train_images"], 8, "{report}");
    assert_eq!(report["schedule"], "linear");
    let steps: Vec<u64> = report["validation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 50, 100, 120], "{report}");
    assert!(steps.contains(&report["kept_step"].as_u64().unwrap()));
    // a text method with images, and images without a vision model, are refused by name
    let o = bin()
        .args([
            "train",
            "--task",
            "image-classification",
            "--images",
            "fashion-mnist",
            "--model",
            &model,
            "--method",
            "prompt",
            "--output",
            "/nonexistent/x",
        ])
        .env("SOFTPROMPT_FASHION_MNIST", data.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("vpt-deep or pixel-frame"),
        "{}",
        stderr(&o)
    );
}

/// `--images DIR` (one sub-folder of PNG/JPEG images per class, any sizes) and `--images
/// digits` (scikit-learn's CSV, here a synthetic one): trained, saved, evaluated; a prompt
/// evaluated on data with other classes is refused.
#[test]
fn image_classification_reads_image_folders_and_digits() {
    let f = fixtures();
    let model = f.join("tiny-dinov2").display().to_string();
    let data = tempfile::tempdir().unwrap();
    let folder = data.path().join("shapes");
    // "dark" images are near black, "light" near white, of varied sizes; a README is skipped
    for i in 0..10u32 {
        for (class, base) in [("dark", 20u8), ("light", 230u8)] {
            let dir = folder.join(class);
            std::fs::create_dir_all(&dir).unwrap();
            let img = image::RgbImage::from_fn(12 + i, 20 - i, |x, y| {
                let v = base.wrapping_add(((x * 7 + y * 3 + i) % 11) as u8);
                image::Rgb([v, v, v])
            });
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            img.save(dir.join(format!("{i}.{ext}"))).unwrap();
        }
    }
    std::fs::write(folder.join("dark/README.md"), "dark images").unwrap();
    // 40 digit rows: even digits dark, odd ones bright (pixel values 0..=16)
    let digits = data.path().join("digits.csv");
    let rows: Vec<String> = (0..40)
        .map(|r| {
            let digit = r % 10;
            let v = if digit % 2 == 0 { 1 } else { 15 };
            let mut row: Vec<String> = (0..64).map(|_| v.to_string()).collect();
            row.push(digit.to_string());
            row.join(",")
        })
        .collect();
    std::fs::write(&digits, rows.join("\n")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let train = |images: &str, method: &str, dir: &std::path::Path| {
        bin()
            .args([
                "train",
                "--task",
                "image-classification",
                "--images",
                images,
                "--model",
                &model,
                "--method",
                method,
                "--num-virtual-tokens",
                "2",
                "--shots",
                "8",
                "--image-size",
                "16",
                "--steps",
                "100",
                "--batch-size",
                "8",
                "--lr",
                "0.05",
                "--head-lr",
                "0.1",
                "--output",
                &dir.display().to_string(),
            ])
            .env("SOFTPROMPT_DIGITS", &digits)
            .output()
            .unwrap()
    };
    let eval = |images: &str, dir: &std::path::Path| {
        bin()
            .args([
                "eval",
                "--task",
                "image-classification",
                "--model",
                &model,
                "--prompt",
                &dir.display().to_string(),
                "--data",
                images,
                "--json",
            ])
            .env("SOFTPROMPT_DIGITS", &digits)
            .output()
            .unwrap()
    };
    let folder_arg = folder.display().to_string();
    for method in ["linear", "vpt-shallow"] {
        let dir = out.path().join(format!("folder-{method}"));
        let o = train(&folder_arg, method, &dir);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        // 8 of each class's 10 train, every fifth (2 per class) held out
        assert_eq!(report["train_images"], 16, "{report}");
        assert_eq!(report["test_images"], 4, "{report}");
        assert_eq!(
            report["tuned_test"], 1.0,
            "{method}: dark and light told apart"
        );
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["classes"], serde_json::json!(["dark", "light"]));
        let o = eval(&folder_arg, &dir);
        assert!(o.status.success(), "{}", stderr(&o));
        let ev: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(ev["accuracy"], report["tuned_test"]);
        assert_eq!(ev["examples"], 4);
    }
    let dir = out.path().join("digits");
    let o = train("digits", "linear", &dir);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // 40 rows: 32 train (at most 8 per class: 4 here), 8 held out
    assert_eq!(report["train_images"], 32, "{report}");
    assert_eq!(report["test_images"], 8, "{report}");
    // the digits prompt on the folder's classes, and the folder's prompt on digits: refused
    let o = eval(&folder_arg, &dir);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("trained on the classes"),
        "{}",
        stderr(&o)
    );
    let o = eval("digits", &out.path().join("folder-linear"));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("trained on the classes"),
        "{}",
        stderr(&o)
    );
    // serve: the store's visual prompts over HTTP; a light training image is called light
    {
        use base64::Engine;
        use std::io::{BufRead, Read, Write};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = bin()
            .args([
                "serve",
                "--model",
                &model,
                "--store",
                &out.path().display().to_string(),
                "--addr",
                &format!("127.0.0.1:{port}"),
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut banner = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.contains("serving") {
                banner = line;
                break;
            }
        }
        assert!(banner.contains("serving 3 visual prompts"), "{banner}");
        let png = std::fs::read(folder.join("light/0.png")).unwrap();
        let body = serde_json::json!({
            "model": "folder-vpt-shallow",
            "input": [base64::engine::general_purpose::STANDARD.encode(&png)],
        })
        .to_string();
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            c,
            "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        let json: serde_json::Value =
            serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["results"][0]["label"], "light", "{json}");
    }
    // inspect: one visual prompt folder, and a store of them
    let o = bin()
        .args([
            "inspect",
            &out.path().join("folder-vpt-shallow").display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("after_class_token"), "{text}");
    assert!(text.contains("classes          dark, light"), "{text}");
    assert!(text.contains("VISUAL_PROMPT_TUNING"), "{text}");
    let o = bin()
        .args(["inspect", &out.path().display().to_string(), "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let items: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let by_name = |n: &str| {
        items
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} not in {items}"))
    };
    assert_eq!(by_name("folder-linear")["shape"][0], 0);
    assert_eq!(by_name("folder-vpt-shallow")["shape"][0], 2);
    assert_eq!(by_name("digits")["classes"].as_array().unwrap().len(), 10);
    assert_eq!(by_name("digits")["image_size"], 16);
    // a visual folder whose weights were replaced is named as broken
    let w = out.path().join("digits/adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    let o = bin()
        .args(["inspect", &out.path().display().to_string()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("digits:"), "{}", stderr(&o));
    assert!(stderr(&o).contains("weights_sha256"), "{}", stderr(&o));
    // neither a data set name nor a folder
    let o = train("/nonexistent/images", "linear", &out.path().join("x"));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not `fashion-mnist`, `digits`"),
        "{}",
        stderr(&o)
    );
}

/// `mpirun -np 2 softprompt train …` (a build with the `mpi` feature): two ranks, each taking
/// half of every global batch, end at the prompt one process trains and the same test scores
/// (each rank scoring half of the rows); rank 0 alone prints and writes. The halves' sums round
/// differently, and AdamW divides each gradient element by its own RMS, so an element whose
/// gradient is a near-cancelling sum carries that rounding into its update almost undamped: the
/// prompts agree within 1e-5 of the largest value element by element (measured 1.9e-6 and 3.1e-6
/// with gemm's AVX-512 kernels, on 8 of 256 elements above 1e-6) and within 1e-6 on average
/// (measured 2.7e-7); training on half of each batch instead (`--batch-size 4`, one process)
/// ends 0.29 away on average. One rank failing ends the job. A run refused
/// before training (a missing file) ends every rank with the error, not a hang.
#[cfg(feature = "mpi")]
#[test]
fn mpirun_ranks_train_the_prompt_one_process_trains() {
    let f = fixtures();
    let out = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.display().to_string();
    let model = s(&f.join("tiny-llama"));
    let train = s(&f.join("data/sentiment-train.jsonl"));
    let test = s(&f.join("data/sentiment-dev.jsonl"));
    let args = |output: &str| -> Vec<String> {
        [
            "train",
            "--model",
            &model,
            "--train",
            &train,
            "--test",
            &test,
            "--output",
            output,
            "--num-virtual-tokens",
            "8",
            "--init-text",
            "Classify the review",
            "--lr",
            "0.1",
            "--steps",
            "10",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--template",
            "Review: {text}\nSentiment:",
            "--labels",
            "negative= negative,positive= positive",
            "--quiet",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let mpirun = |args: &[String]| {
        Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
            .arg(env!("CARGO_BIN_EXE_softprompt"))
            .args(args)
            .output()
            .expect("mpirun runs (Open MPI: openmpi-bin)")
    };
    let single = out.path().join("single");
    let o = bin().args(args(&s(&single))).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let alone: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let ranks = out.path().join("ranks");
    let o = mpirun(&args(&s(&ranks)));
    assert!(o.status.success(), "{}", stderr(&o));
    // one report, from rank 0
    let printed = stdout(&o);
    let reports: Vec<&str> = printed.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(reports.len(), 1, "{}", stdout(&o));
    let report: serde_json::Value = serde_json::from_str(reports[0]).unwrap();
    assert_eq!(report["steps"], 10);
    // the test scores, each rank scoring half of the rows, are one process's
    assert_eq!(report["zero_shot_test"], alone["zero_shot_test"]);
    assert_eq!(report["tuned_test"], alone["tuned_test"]);
    assert!(stderr(&o).contains("rank 1 of 2 (MPI)"), "{}", stderr(&o));
    let values = |dir: &std::path::Path| -> Vec<f32> {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("prompt_embeddings")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let (a, b) = (values(&single), values(&ranks));
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diffs: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).collect();
    let d = diffs.iter().copied().fold(0f32, f32::max);
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    assert!(
        d <= 1e-5 * scale && mean <= 1e-6 * scale,
        "ranks vs one process: largest {d}, mean {mean}"
    );
    // `eval` under mpirun: each rank scores half, rank 0 prints one process's figures
    let eval_args: Vec<String> = [
        "eval",
        "--model",
        &model,
        "--prompt",
        &s(&ranks),
        "--data",
        &test,
        "--json",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let o = bin().args(&eval_args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let alone: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let o = mpirun(&eval_args);
    assert!(o.status.success(), "{}", stderr(&o));
    let printed = stdout(&o);
    let lines: Vec<&str> = printed.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 1, "{printed}");
    let both: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(both["accuracy"], alone["accuracy"]);
    assert_eq!(both["examples"], alone["examples"]);
    let (l1, l2) = (
        both["loss"].as_f64().unwrap(),
        alone["loss"].as_f64().unwrap(),
    );
    assert!((l1 - l2).abs() <= 1e-6 * l2.abs(), "{l1} vs {l2}");
    // one rank failing (rank 1's data file is missing; rank 0 is ready to train) ends the whole
    // job with the error, never a hang: launched MPMD under a 120 s guard
    let mut broken = args(&s(&out.path().join("one-fails")));
    let at = broken.iter().position(|x| x == &train).unwrap();
    broken[at] = "/nonexistent/rank1.jsonl".into();
    let started = std::time::Instant::now();
    let o = Command::new("timeout")
        .args([
            "120",
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "1",
        ])
        .arg(env!("CARGO_BIN_EXE_softprompt"))
        .args(args(&s(&out.path().join("one-fails"))))
        .args([":", "-np", "1"])
        .arg(env!("CARGO_BIN_EXE_softprompt"))
        .args(&broken)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_ne!(o.status.code(), Some(124), "the job hung: {}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/rank1.jsonl"),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
    // a refused run ends every rank with the error
    let mut bad = args(&s(&out.path().join("bad")));
    let at = bad.iter().position(|x| x == &train).unwrap();
    bad[at] = "/nonexistent/train.jsonl".into();
    let o = mpirun(&bad);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/train.jsonl"),
        "{}",
        stderr(&o)
    );
}

/// `mpirun -np 2 softprompt train --task image-classification …`: two ranks, each taking its
/// share of every batch of images, save the visual prompt and head one process saves (to float
/// rounding of the summed shares) and print one report with the same test accuracy; `eval`
/// under mpirun classifies half the images per rank and prints one process's accuracy.
#[cfg(feature = "mpi")]
#[test]
fn mpirun_ranks_train_a_visual_prompt_one_process_trains() {
    let f = fixtures();
    let model = f.join("tiny-dinov2").display().to_string();
    let data = tempfile::tempdir().unwrap();
    // 40 synthetic digit rows: even digits dark, odd ones bright, with a per-row pattern
    let digits = data.path().join("digits.csv");
    let rows: Vec<String> = (0..40)
        .map(|r| {
            let digit = r % 10;
            let base = if digit % 2 == 0 { 1 } else { 12 };
            let mut row: Vec<String> = (0..64).map(|p| (base + (p + r) % 5).to_string()).collect();
            row.push(digit.to_string());
            row.join(",")
        })
        .collect();
    std::fs::write(&digits, rows.join("\n")).unwrap();
    let s = |p: &std::path::Path| p.display().to_string();
    let args = |output: &std::path::Path| -> Vec<String> {
        [
            "train",
            "--task",
            "image-classification",
            "--images",
            "digits",
            "--model",
            &model,
            "--method",
            "vpt-deep",
            "--num-virtual-tokens",
            "2",
            "--shots",
            "3",
            "--image-size",
            "16",
            "--steps",
            "8",
            "--batch-size",
            "10",
            "--lr",
            "0.05",
            "--head-lr",
            "0.1",
            "--head-warmup",
            "5",
            "--output",
            &s(output),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let mpirun = |args: &[String]| {
        Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
            .args(["-x", "SOFTPROMPT_DIGITS"])
            .arg(env!("CARGO_BIN_EXE_softprompt"))
            .args(args)
            .env("SOFTPROMPT_DIGITS", &digits)
            .output()
            .expect("mpirun runs (Open MPI: openmpi-bin)")
    };
    let single = data.path().join("single");
    let o = bin()
        .args(args(&single))
        .env("SOFTPROMPT_DIGITS", &digits)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let alone: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let ranks = data.path().join("ranks");
    let o = mpirun(&args(&ranks));
    assert!(o.status.success(), "{}", stderr(&o));
    let printed = stdout(&o);
    let reports: Vec<&str> = printed.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(reports.len(), 1, "{printed}");
    let report: serde_json::Value = serde_json::from_str(reports[0]).unwrap();
    assert_eq!(report["tuned_test"], alone["tuned_test"]);
    assert_eq!(
        report["train_images"], 24,
        "3 of each digit held in training"
    );
    assert!(stderr(&o).contains("2 ranks"), "{}", stderr(&o));
    let tensors = |dir: &std::path::Path| -> Vec<(String, Vec<f32>)> {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let v = st
                    .tensor(&n)
                    .unwrap()
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                (n, v)
            })
            .collect()
    };
    let (a, b) = (tensors(&single), tensors(&ranks));
    assert_eq!(a.len(), 3, "prompt, head weight and bias");
    for ((name, x), (other, y)) in a.iter().zip(&b) {
        assert_eq!(name, other);
        assert_eq!(x.len(), y.len());
        let scale = x.iter().fold(1f32, |m, v| m.max(v.abs()));
        let d = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(d <= 2e-6 * scale, "{name}: ranks vs one process: {d}");
    }
    let eval: Vec<String> = [
        "eval",
        "--task",
        "image-classification",
        "--model",
        &model,
        "--prompt",
        &s(&ranks),
        "--data",
        "digits",
        "--json",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let o = bin()
        .args(&eval)
        .env("SOFTPROMPT_DIGITS", &digits)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let alone: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let o = mpirun(&eval);
    assert!(o.status.success(), "{}", stderr(&o));
    let printed = stdout(&o);
    let lines: Vec<&str> = printed.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 1, "{printed}");
    let both: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(both["accuracy"], alone["accuracy"]);
    assert_eq!(both["examples"], 8);
}
