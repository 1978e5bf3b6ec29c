//! Bounded mutation fuzzing of every reader of untrusted bytes: the PEFT prompt files
//! (`adapter_model.safetensors`, `adapter_config.json`), JSONL data rows and the server's
//! request bodies. Each target starts from valid inputs, applies seeded random mutations (bit
//! flips, interesting bytes, truncation, duplication, insertion, deletion) and requires a typed
//! error or a result — never a panic, and from the server never a 5xx.
//!
//! `SOFTPROMPT_FUZZ_ITERS` sets the mutations per target (default 1500, what CI runs);
//! `SOFTPROMPT_FUZZ_SEED` the generator's seed. Inputs that once failed live in
//! `tests/fuzz-corpus/<target>/` and are replayed first, as regression tests; a failing input
//! is written to `target/fuzz-failures/<target>-<n>` for adding there.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use softprompt::store::{parse_prompt_safetensors, prompt_safetensors, read_prompt_dir};
use softprompt::train::data::{Task, Template, Verbalizer};
use softprompt::{PromptConfig, Rng, SoftPrompt, StoredPrompt};
use softprompt_tests::{fixture_model, fixtures_dir};

fn iterations() -> usize {
    std::env::var("SOFTPROMPT_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

fn rng() -> Rng {
    let seed = std::env::var("SOFTPROMPT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Rng::seed_from_u64(seed)
}

/// One random mutation of `input`.
fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    const INTERESTING: &[u8] = b"\x00\xff\x7f\x80\"{}[],:-0123456789eE.\\\n ";
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = v.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => v.truncate(rng.below(len + 1)),
            3 if len > 0 => {
                let (a, b) = (rng.below(len), rng.below(len));
                let (a, b) = (a.min(b), a.max(b).min(a + 64));
                let chunk = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            4 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
                v.splice(at..at, bytes);
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16)).min(len);
                v.drain(a..b);
            }
            _ if len >= 8 => {
                // a length or count field: a little-endian u64 set to an extreme
                let i = rng.below(len - 7);
                let x: u64 = [0, 1, u32::MAX as u64, u64::MAX, 1 << 40][rng.below(5)];
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            _ => {}
        }
    }
    v
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = fixtures_dir().join("..").join("fuzz-corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Runs `check` on the corpus, then on `iterations()` mutations of the seeds; panics listing the
/// inputs that made `check` panic or return `Err`.
fn fuzz(
    target: &str,
    seeds: &[Vec<u8>],
    iters: usize,
    mut check: impl FnMut(&[u8]) -> Result<(), String>,
) {
    let mut rng = rng();
    let mut failures = Vec::new();
    let mut run = |input: &[u8], failures: &mut Vec<(Vec<u8>, String)>| match catch_unwind(
        AssertUnwindSafe(|| check(input)),
    ) {
        Ok(Ok(())) => {}
        Ok(Err(why)) => failures.push((input.to_vec(), why)),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push((input.to_vec(), format!("panic: {why}")));
        }
    };
    for input in corpus(target).iter().chain(seeds) {
        run(input, &mut failures);
    }
    for _ in 0..iters {
        let seed = &seeds[rng.below(seeds.len())];
        let input = mutate(seed, &mut rng);
        run(&input, &mut failures);
        if failures.len() >= 5 {
            break;
        }
    }
    if !failures.is_empty() {
        let out = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("fuzz-failures");
        std::fs::create_dir_all(&out).unwrap();
        for (k, (input, _)) in failures.iter().enumerate() {
            std::fs::write(out.join(format!("{target}-{k}")), input).unwrap();
        }
        let list: Vec<String> = failures
            .iter()
            .map(|(input, why)| format!("{} bytes: {why}", input.len()))
            .collect();
        panic!(
            "{target}: {} failing inputs (written to {}):\n{}",
            failures.len(),
            out.display(),
            list.join("\n")
        );
    }
}

fn stored_prompt(n: usize, d: usize) -> StoredPrompt {
    let prompt = SoftPrompt::new(n, d, (0..n * d).map(|i| i as f32 * 0.01).collect()).unwrap();
    let spec = softprompt::BackboneSpec {
        architecture: softprompt::Architecture::llama(),
        hidden_size: d,
        vocab_size: 64,
        num_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 2,
        fingerprint: "f".into(),
        name: "fuzz".into(),
    };
    let mut config = PromptConfig::for_backbone(&prompt, &spec);
    config.softprompt.as_mut().unwrap().template = Some("Q: {text}\nA:".into());
    StoredPrompt {
        prompt,
        config,
        metadata: [("k".to_string(), "v".to_string())].into(),
    }
}

#[test]
fn prompt_safetensors_reader() {
    let seeds = vec![
        prompt_safetensors(&stored_prompt(3, 4)).unwrap(),
        prompt_safetensors(&stored_prompt(1, 8)).unwrap(),
    ];
    fuzz("prompt_safetensors", &seeds, iterations(), |bytes| {
        // a typed error or a prompt whose values are all there and finite
        if let Ok((p, _)) = parse_prompt_safetensors(bytes, Path::new("fuzz")) {
            if p.values().len() != p.num_virtual_tokens() * p.hidden_size()
                || p.values().iter().any(|v| !v.is_finite())
            {
                return Err("an inconsistent prompt was accepted".into());
            }
        }
        Ok(())
    });
}

#[test]
fn adapter_config_reader() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("p");
    let mut seeds = Vec::new();
    for s in [stored_prompt(3, 4), stored_prompt(2, 6)] {
        rt.block_on(softprompt::store::write_prompt_dir(&folder, &s))
            .unwrap();
        seeds.push(std::fs::read(folder.join("adapter_config.json")).unwrap());
    }
    // the weights of the last seed stay; configs are mutated beside them
    fuzz("adapter_config", &seeds, iterations(), |bytes| {
        std::fs::write(folder.join("adapter_config.json"), bytes).unwrap();
        if let Ok(s) = rt.block_on(read_prompt_dir(&folder)) {
            // what was accepted is self-consistent
            if s.prompt.num_virtual_tokens() != s.config.num_virtual_tokens {
                return Err("a config disagreeing with the weights was accepted".into());
            }
            s.config
                .method()
                .map_err(|e| format!("accepted, then {e}"))?;
        }
        Ok(())
    });
}

#[test]
fn jsonl_data_rows() {
    let tok = softprompt::load_tokenizer(fixture_model("tiny-llama")).unwrap();
    let task = Task::Classification {
        template: Template::new("Review: {text}\nSentiment:").unwrap(),
        verbalizer: Verbalizer::parse("negative= negative,positive= positive").unwrap(),
    };
    let generation = Task::Generation {
        template: Template::new("Q: {input}\nA:").unwrap(),
    };
    let text = std::fs::read_to_string(fixtures_dir().join("data/sentiment-dev.jsonl")).unwrap();
    let head: String = text.lines().take(6).map(|l| format!("{l}\n")).collect();
    let seeds = vec![
        head.into_bytes(),
        b"{\"input\": \"two plus two\", \"target\": \"four\"}\n{\"input\": \"x\", \"target\": \"y\"}\n"
            .to_vec(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.jsonl");
    fuzz("jsonl_rows", &seeds, iterations(), |bytes| {
        std::fs::write(&path, bytes).unwrap();
        for t in [&task, &generation] {
            if let Ok(set) = t.load(&path, &tok, 64) {
                if set.examples.iter().any(|e| e.target.is_empty()) {
                    return Err("an example without a target was accepted".into());
                }
            }
        }
        Ok(())
    });
}

#[test]
fn gguf_reader() {
    let seed = std::fs::read(fixtures_dir().join("tiny-llama.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    // metadata and tensor infos sit in the first bytes: mutate there more often than in the
    // data (whose mutations only change weights)
    let header = 4096.min(seed.len());
    let seeds = vec![seed.clone(), seed[..header].to_vec()];
    fuzz("gguf", &seeds, iterations(), |bytes| {
        let mut file = seed.clone();
        let n = bytes.len().min(header);
        if bytes.len() <= header {
            // a mutated header, the original data after it
            file.splice(..header, bytes[..n].iter().copied());
        } else {
            file = bytes.to_vec();
        }
        std::fs::write(&path, &file).unwrap();
        let _ = softprompt::gguf::load_config(&path);
        if let Ok(source) = softprompt::gguf::load_model(&path) {
            // what loads is a model the backends can build
            let _ = load_backbone_from(source);
        }
        Ok(())
    });
}

fn load_backbone_from(source: softprompt::ModelSource) -> softprompt::Result<()> {
    softprompt::candle::CandleBackbone::from_source(source, Default::default()).map(|_| ())
}

#[test]
fn server_request_bodies() {
    use softprompt::serve::{serve, ServeConfig};
    use softprompt::store::DirectoryStore;
    use softprompt::PromptStore;
    use std::io::{Read, Write};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backbone = softprompt::load_backbone("candle", fixture_model("tiny-llama"), "cpu").unwrap();
    let tok = softprompt::load_tokenizer(fixture_model("tiny-llama")).unwrap();
    let store = DirectoryStore::new(dir.path());
    let d = backbone.spec().hidden_size;
    let prompt = SoftPrompt::new(2, d, vec![0.1; 2 * d]).unwrap();
    let mut config = PromptConfig::for_backbone(&prompt, backbone.spec());
    let prov = config.softprompt.as_mut().unwrap();
    prov.template = Some("Review: {text}\nSentiment:".into());
    prov.labels = vec![
        ("negative".into(), " negative".into()),
        ("positive".into(), " positive".into()),
    ];
    rt.block_on(store.save(
        "p",
        &StoredPrompt {
            prompt,
            config,
            metadata: Default::default(),
        },
    ))
    .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(serve(
        listener,
        backbone.into(),
        std::sync::Arc::new(tok),
        std::sync::Arc::new(store),
        ServeConfig {
            max_new_tokens: 4,
            ..ServeConfig::default()
        },
        async move {
            let _ = rx.await;
        },
    ));
    let seeds: Vec<Vec<u8>> = [
        &b"/v1/classify {\"model\": \"p\", \"input\": [\"a fine film\", \"dull\"]}"[..],
        b"/v1/classify {\"ensemble\": [\"p\", \"p\"], \"input\": \"wonderful\"}",
        b"/v1/completions {\"model\": \"p\", \"prompt\": \"the plot\", \"max_tokens\": 3, \"temperature\": 0}",
        b"/v1/completions {\"model\": \"p\", \"prompt\": [\"a\", \"b\"], \"max_tokens\": 2, \"n\": 2, \"logprobs\": 2}",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect();
    // a request line of the first word (the path), the rest as the body, over raw HTTP/1.1
    // every request is a real round trip: a third of the other targets' count
    fuzz("http_bodies", &seeds, iterations() / 3, |input| {
        let split = input.iter().position(|b| *b == b' ').unwrap_or(0);
        let path = match &input[..split] {
            b"/v1/completions" => "/v1/completions",
            _ => "/v1/classify",
        };
        let body = &input[(split + 1).min(input.len())..];
        let mut c = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        c.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
        c.write_all(body).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        c.read_to_end(&mut out).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out);
        let status: u16 = text
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line: {text:?}"))?;
        if status >= 500 {
            return Err(format!("status {status}: {text}"));
        }
        if status >= 400 && !text.contains("\"error\"") {
            return Err(format!("a {status} without an error body: {text}"));
        }
        Ok(())
    });
    let _ = tx.send(());
    rt.block_on(server).unwrap().unwrap();
}
