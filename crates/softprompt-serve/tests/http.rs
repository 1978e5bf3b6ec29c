//! The server over real HTTP on loopback with a real client (reqwest), on the tiny fixture
//! model: mixed-prompt batches against single-prompt results, streaming, hot reload, overload,
//! limits, traversal names, auth and graceful shutdown.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use softprompt::store::DirectoryStore;
use softprompt::{
    Backbone, BackboneSpec, Batch, BatchRow, Capabilities, DecodeSession, GenerationParams,
    PromptConfig, PromptStore, RowScores, SoftPrompt, StoredPrompt, TextTokenizer,
};
use softprompt_serve::{serve, Batching, ServeConfig};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

const TEMPLATE: &str = "Review: {text}\nSentiment:";
const TEXTS: &[&str] = &[
    "the ending was boring",
    "the film was beautifully shot",
    "a dull and tired plot",
    "wonderful",
];

/// A prompt of `n` virtual tokens with values from `seed`; `labels` empty for generation.
fn stored(spec: &BackboneSpec, n: usize, seed: u64, labels: &[(&str, &str)]) -> StoredPrompt {
    let d = spec.hidden_size;
    let mut rng = softprompt::Rng::seed_from_u64(seed);
    let values = (0..n * d).map(|_| rng.next_f64() as f32 - 0.5).collect();
    let prompt = SoftPrompt::new(n, d, values).unwrap();
    let mut config = PromptConfig::for_backbone(&prompt, spec);
    let prov = config.softprompt.as_mut().unwrap();
    prov.template = Some(TEMPLATE.into());
    prov.labels = labels
        .iter()
        .map(|(l, w)| (l.to_string(), w.to_string()))
        .collect();
    StoredPrompt {
        prompt,
        config,
        metadata: Default::default(),
    }
}

/// [`stored`] as a prefix-tuning prompt: keys and values at every layer.
fn stored_prefix(
    spec: &BackboneSpec,
    n: usize,
    seed: u64,
    labels: &[(&str, &str)],
) -> StoredPrompt {
    let placement = softprompt::Placement::KeyValuePrefix;
    let width = placement.width(spec);
    let mut rng = softprompt::Rng::seed_from_u64(seed);
    let values = (0..n * width)
        .map(|_| rng.next_f64() as f32 - 0.5)
        .collect();
    let mut s = stored(spec, n, seed, labels);
    s.prompt = SoftPrompt::new(n, width, values)
        .unwrap()
        .with_placement(placement);
    let softprompt = s.config.softprompt.take();
    s.config = PromptConfig::for_backbone(&s.prompt, spec);
    s.config.softprompt = softprompt;
    s
}

const SENTIMENT: &[(&str, &str)] = &[("negative", " negative"), ("positive", " positive")];
/// Multi-token label words take the scoring path.
const GOOD_BAD: &[(&str, &str)] = &[("negative", " bad"), ("positive", " good")];

/// A backbone whose forward passes wait while the gate is closed (to hold the engine busy).
struct Gated {
    inner: Box<dyn Backbone>,
    open: Mutex<bool>,
    changed: Condvar,
}

impl Gated {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
    }
    fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.changed.notify_all();
    }
}

impl Backbone for Gated {
    fn backend_name(&self) -> &str {
        self.inner.backend_name()
    }
    fn spec(&self) -> &BackboneSpec {
        self.inner.spec()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn embed(&self, ids: &[u32]) -> softprompt::Result<Vec<f32>> {
        self.inner.embed(ids)
    }
    fn score(&self, prompts: &[SoftPrompt], batch: &Batch) -> softprompt::Result<RowScores> {
        self.wait();
        self.inner.score(prompts, batch)
    }
    fn next_token_logprobs(
        &self,
        prompts: &[SoftPrompt],
        batch: &Batch,
        candidates: &[u32],
    ) -> softprompt::Result<Vec<Vec<f64>>> {
        self.wait();
        self.inner.next_token_logprobs(prompts, batch, candidates)
    }
    fn start_decode<'a>(
        &'a self,
        prompt: &SoftPrompt,
        ids: &[u32],
    ) -> softprompt::Result<Box<dyn DecodeSession + 'a>> {
        self.wait();
        self.inner.start_decode(prompt, ids)
    }
    fn batch_decoder(&self) -> Option<Box<dyn softprompt::BatchDecoder + '_>> {
        Some(Box::new(GatedDecoder {
            gate: self,
            inner: softprompt::batch_decoder(self.inner.as_ref()),
        }))
    }
}

/// The backend's own batch decoder behind the gate.
struct GatedDecoder<'a> {
    gate: &'a Gated,
    inner: Box<dyn softprompt::BatchDecoder + 'a>,
}

impl softprompt::BatchDecoder for GatedDecoder<'_> {
    fn add(&mut self, prompt: &SoftPrompt, ids: &[u32]) -> softprompt::Result<(u64, Vec<f32>)> {
        self.gate.wait();
        self.inner.add(prompt, ids)
    }
    fn step(&mut self, tokens: &[(u64, u32)]) -> softprompt::Result<Vec<Vec<f32>>> {
        self.gate.wait();
        self.inner.step(tokens)
    }
    fn remove(&mut self, id: u64) {
        self.inner.remove(id)
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn position(&self, id: u64) -> Option<usize> {
        self.inner.position(id)
    }
}

struct Server {
    url: String,
    client: reqwest::Client,
    store: DirectoryStore,
    _dir: tempfile::TempDir,
    backbone: Arc<Gated>,
    tok: Arc<softprompt::HfTokenizer>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), softprompt_serve::ServeError>>>,
}

impl Server {
    async fn start(config: ServeConfig) -> Server {
        let inner = softprompt::load_backbone("candle", fixture(), "cpu").unwrap();
        let backbone = Arc::new(Gated {
            inner,
            open: Mutex::new(true),
            changed: Condvar::new(),
        });
        let tok = Arc::new(softprompt::load_tokenizer(fixture()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let store = DirectoryStore::new(dir.path());
        let spec = backbone.spec().clone();
        store
            .save("sent-a", &stored(&spec, 4, 1, SENTIMENT))
            .await
            .unwrap();
        store
            .save("sent-b", &stored(&spec, 4, 2, SENTIMENT))
            .await
            .unwrap();
        store
            .save("sent-short", &stored(&spec, 2, 3, SENTIMENT))
            .await
            .unwrap();
        store
            .save("sent-prefix", &stored_prefix(&spec, 4, 6, SENTIMENT))
            .await
            .unwrap();
        store
            .save("words", &stored(&spec, 3, 4, GOOD_BAD))
            .await
            .unwrap();
        store
            .save("writer", &stored(&spec, 4, 5, &[]))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            backbone.clone(),
            tok.clone(),
            Arc::new(store.clone()),
            config,
            async move {
                let _ = rx.await;
            },
        ));
        Server {
            url,
            client: reqwest::Client::new(),
            store,
            _dir: dir,
            backbone,
            tok,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Per-label log-probabilities of `text` under stored prompt `name`, computed directly on
    /// the backbone, one prompt and one row per call.
    async fn expected(&self, name: &str, text: &str) -> Vec<f64> {
        let s = self.store.load(name).await.unwrap();
        let prov = s.config.softprompt.unwrap();
        let ctx = self
            .tok
            .encode(&prov.template.unwrap().replace("{text}", text), true)
            .unwrap();
        prov.labels
            .iter()
            .map(|(_, w)| {
                let word = self.tok.encode(w, false).unwrap();
                let row = BatchRow::with_continuation(&ctx, &word, 0);
                let batch = Batch::from_rows(&[row], 0).unwrap();
                self.backbone
                    .inner
                    .score(std::slice::from_ref(&s.prompt), &batch)
                    .unwrap()
                    .logprob_sum[0]
            })
            .collect()
    }

    async fn stop(mut self) {
        self.backbone.set(true);
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task.take().unwrap())
            .await
            .expect("graceful shutdown finishes")
            .unwrap()
            .unwrap();
    }
}

fn logprobs(v: &Value) -> Vec<f64> {
    ["negative", "positive"]
        .iter()
        .map(|l| v["logprobs"][l].as_f64().unwrap())
        .collect()
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-4)
}

/// Histogram observations above 1 (`le="1"` bucket below the count).
fn observations_above_one(metrics: &str, name: &str) -> u64 {
    metric(metrics, &format!("{name}_count"))
        - metric(metrics, &format!("{name}_bucket{{le=\"1\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_prompt_batches_equal_single_prompt_results() {
    let server = Server::start(ServeConfig::default()).await;
    let prompts = ["sent-a", "sent-b", "sent-short", "words", "sent-prefix"];
    // one ensemble request: rows of five prompts (two prompt lengths, single- and multi-token
    // labels, a key/value prefix of the same length as two input-embedding prompts) in one job
    let (status, body) = server
        .post(
            "/v1/classify",
            json!({ "ensemble": prompts, "input": TEXTS }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for (i, text) in TEXTS.iter().enumerate() {
        let result = &body["results"][i];
        let mut votes = [0, 0];
        for (k, name) in prompts.iter().enumerate() {
            let member = &result["members"][k];
            assert_eq!(member["model"], *name);
            let want = server.expected(name, text).await;
            let got = logprobs(member);
            assert!(close(&got, &want), "{name} / {text}: {got:?} vs {want:?}");
            let label = usize::from(want[1] > want[0]);
            assert_eq!(member["label"], ["negative", "positive"][label]);
            votes[label] += 1;
        }
        assert_eq!(result["votes"]["negative"], votes[0]);
        assert_eq!(result["votes"]["positive"], votes[1]);
    }
    // many concurrent single-prompt requests, queued while the engine is held so that they
    // meet in shared batches: same answers as one prompt at a time
    let taken = metric(
        &server.get("/metrics").await.1,
        "softprompt_queue_wait_seconds_count",
    );
    server.backbone.set(false);
    let held = server.post(
        "/v1/classify",
        json!({ "model": "sent-a", "input": TEXTS[0] }),
    );
    let mut calls = Vec::new();
    for round in 0..3 {
        for name in prompts {
            for text in TEXTS {
                let (server, name, text) = (&server, name, *text);
                calls.push(async move {
                    let (status, body) = server
                        .post("/v1/classify", json!({ "model": name, "input": text }))
                        .await;
                    (round, name, text, status, body)
                });
            }
        }
    }
    let release = release_when_queued(&server, calls.len() as u64 + 1, taken);
    let (answers, (held_status, _), ()) =
        tokio::join!(futures_util::future::join_all(calls), held, release);
    assert_eq!(held_status, 200);
    for (_, name, text, status, body) in answers {
        assert_eq!(status, 200, "{body}");
        let want = server.expected(name, text).await;
        let got = logprobs(&body["results"][0]);
        assert!(close(&got, &want), "{name} / {text}: {got:?} vs {want:?}");
        assert_eq!(body["model"], name);
    }
    let (_, metrics) = server.get("/metrics").await;
    // the ensemble's pass plus at least one pass of the released queue
    assert!(
        observations_above_one(&metrics, "softprompt_classify_batch_prompts") >= 2,
        "forward passes did not mix prompts:\n{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_prompt_mode_never_mixes_and_gives_the_same_answers() {
    let server = Server::start(ServeConfig {
        batching: Batching::PerPrompt,
        ..ServeConfig::default()
    })
    .await;
    let (status, body) = server
        .post(
            "/v1/classify",
            json!({ "ensemble": ["sent-a", "sent-b"], "input": TEXTS[0] }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let want = server.expected("sent-b", TEXTS[0]).await;
    assert!(close(&logprobs(&body["results"][0]["members"][1]), &want));
    let (_, metrics) = server.get("/metrics").await;
    assert_eq!(
        observations_above_one(&metrics, "softprompt_classify_batch_prompts"),
        0,
        "{metrics}"
    );
    assert!(metrics.contains("softprompt_classify_batch_prompts_count 2\n"));
    server.stop().await;
}

/// Greedy generation of `text` under `name`, one sequence on the backbone.
async fn expected_completion(server: &Server, name: &str, text: &str, n: usize) -> String {
    let s = server.store.load(name).await.unwrap();
    let ids = server.tok.encode(text, true).unwrap();
    let params = GenerationParams {
        max_new_tokens: n,
        stop_tokens: server.tok.eos_id().into_iter().collect(),
        ..Default::default()
    };
    let out =
        softprompt::generate(server.backbone.inner.as_ref(), &s.prompt, &ids, &params).unwrap();
    let tokens: Vec<u32> = out
        .tokens
        .into_iter()
        .filter(|t| Some(*t) != server.tok.eos_id())
        .collect();
    server.tok.decode(&tokens).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_batching_completions_and_streaming() {
    let server = Server::start(ServeConfig::default()).await;
    let names = ["sent-a", "sent-short", "writer", "words"];
    let texts = ["the plot", "a film about", "once upon a time there", "good"];
    let taken = metric(
        &server.get("/metrics").await.1,
        "softprompt_queue_wait_seconds_count",
    );
    server.backbone.set(false);
    let held = server.post(
        "/v1/completions",
        json!({ "model": "writer", "prompt": "hold", "max_tokens": 2 }),
    );
    let mut calls = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for (j, text) in texts.iter().enumerate() {
            let max = 3 + 2 * ((i + j) % 4); // sequences finish at different steps
            let server = &server;
            calls.push(async move {
                let (status, body) = server
                    .post(
                        "/v1/completions",
                        json!({ "model": name, "prompt": text, "max_tokens": max,
                                "temperature": 0 }),
                    )
                    .await;
                (name, text, max, status, body)
            });
        }
    }
    let release = release_when_queued(&server, calls.len() as u64 + 1, taken);
    let (answers, (held_status, _), ()) =
        tokio::join!(futures_util::future::join_all(calls), held, release);
    assert_eq!(held_status, 200);
    for (name, text, max, status, body) in answers {
        assert_eq!(status, 200, "{body}");
        let want = expected_completion(&server, name, text, max).await;
        assert_eq!(body["choices"][0]["text"], want, "{name} / {text}");
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["model"], *name);
        let n = body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
        assert!(n <= max && n >= 1);
        if n == max {
            assert_eq!(body["choices"][0]["finish_reason"], "length");
        }
    }
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        observations_above_one(&metrics, "softprompt_decode_batch_prompts") >= 1,
        "no decode step mixed prompts:\n{metrics}"
    );

    // streaming: the chunks add up to the non-streamed text, then [DONE]
    let want = expected_completion(&server, "writer", "once upon a time there", 12).await;
    let mut r = server
        .client
        .post(format!("{}/v1/completions", server.url))
        .json(
            &json!({ "model": "writer", "prompt": "once upon a time there",
                       "max_tokens": 12, "temperature": 0, "stream": true }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut raw = String::new();
    let mut chunks = 0;
    while let Some(c) = r.chunk().await.unwrap() {
        raw.push_str(std::str::from_utf8(&c).unwrap());
        chunks += 1;
    }
    let data: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{raw}");
    let events: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, want);
    assert!(events.len() > 1 && chunks > 1, "{raw}");
    let last = &events[events.len() - 1]["choices"][0]["finish_reason"];
    assert!(last == "length" || last == "stop", "{raw}");
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| e["choices"][0]["finish_reason"].is_null()));

    // a stop string cuts the text before it
    let chars: Vec<char> = want.chars().collect();
    let at = (2..chars.len().saturating_sub(1))
        .find(|i| chars[*i..*i + 2].iter().all(char::is_ascii_alphanumeric));
    let at = at.unwrap_or_else(|| panic!("no stop string candidate in {want:?}"));
    let stop: String = chars[at..at + 2].iter().collect();
    let (status, body) = server
        .post(
            "/v1/completions",
            json!({ "model": "writer", "prompt": "once upon a time there",
                    "max_tokens": 12, "temperature": 0, "stop": [stop] }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let first = want.find(&stop).unwrap();
    assert_eq!(body["choices"][0]["text"], &want[..first]);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_are_picked_up_replaced_and_removed_while_serving() {
    let server = Server::start(ServeConfig::default()).await;
    let spec = server.backbone.spec().clone();
    let (status, list) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&list).unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "sent-a",
            "sent-b",
            "sent-prefix",
            "sent-short",
            "words",
            "writer"
        ]
    );
    let a = &list["data"][0];
    assert_eq!(a["task"], "classification");
    assert_eq!(a["labels"], json!(["negative", "positive"]));
    assert_eq!(a["size_bytes"], 4 * spec.hidden_size * 4);
    assert_eq!(a["peft_type"], "PROMPT_TUNING");
    assert_eq!(a["placement"], "input_embeddings");
    let prefix = &list["data"][2];
    assert_eq!(prefix["peft_type"], "PREFIX_TUNING");
    assert_eq!(prefix["placement"], "key_value_prefix");
    assert_eq!(
        prefix["token_dim"],
        softprompt::Placement::KeyValuePrefix.width(&spec)
    );
    assert_eq!(list["data"][5]["task"], "generation");

    // added
    let ask = |name: &'static str| {
        let server = &server;
        async move {
            server
                .post("/v1/classify", json!({ "model": name, "input": TEXTS[1] }))
                .await
        }
    };
    assert_eq!(ask("late").await.0, 404);
    server
        .store
        .save("late", &stored(&spec, 4, 11, SENTIMENT))
        .await
        .unwrap();
    let (status, body) = ask("late").await;
    assert_eq!(status, 200, "{body}");
    let before = logprobs(&body["results"][0]);
    assert!(close(&before, &server.expected("late", TEXTS[1]).await));
    // replaced (different values and length)
    server
        .store
        .save("late", &stored(&spec, 6, 12, SENTIMENT))
        .await
        .unwrap();
    let (status, body) = ask("late").await;
    assert_eq!(status, 200, "{body}");
    let after = logprobs(&body["results"][0]);
    assert!(close(&after, &server.expected("late", TEXTS[1]).await));
    assert!(!close(&after, &before), "the replacement is served");
    // removed
    server.store.remove("late").await.unwrap();
    let (status, body) = ask("late").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("late"));

    // a prompt for another backbone is refused with the reason, and listed as not ready
    let mut other = spec.clone();
    other.fingerprint = "0123456789abcdef".into();
    server
        .store
        .save("foreign", &stored(&other, 4, 13, SENTIMENT))
        .await
        .unwrap();
    let (status, body) = ask("foreign").await;
    assert_eq!(status, 422, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("0123456789abcdef"), "{msg}");
    let (_, list) = server.get("/v1/models").await;
    let list: Value = serde_json::from_str(&list).unwrap();
    let foreign = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "foreign")
        .unwrap();
    assert_eq!(foreign["ready"], false);
    assert!(foreign["reason"]
        .as_str()
        .unwrap()
        .contains("trained for backbone 0123456789abcdef"));
    assert_eq!(foreign["num_virtual_tokens"], 4);
    assert_eq!(foreign["backbone_fingerprint"], "0123456789abcdef");

    // one unreadable prompt is one row that is not ready, not a failed listing
    let broken = server.store.root().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("adapter_config.json"), b"{ not json").unwrap();
    let (status, list) = server.get("/v1/models").await;
    assert_eq!(status, 200, "{list}");
    let list: Value = serde_json::from_str(&list).unwrap();
    let rows = list["data"].as_array().unwrap();
    let row = |id: &str| rows.iter().find(|m| m["id"] == id).unwrap().clone();
    assert_eq!(row("broken")["ready"], false);
    assert!(
        row("broken")["reason"].as_str().unwrap().contains("broken"),
        "{}",
        row("broken")
    );
    assert_eq!(row("broken")["num_virtual_tokens"], Value::Null);
    assert_eq!(row("foreign")["ready"], false);
    assert_eq!(row("sent-a")["ready"], true);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_admitted_requests_complete() {
    let server = Server::start(ServeConfig {
        queue_capacity: 3,
        ..ServeConfig::default()
    })
    .await;
    server.backbone.set(false); // the engine blocks in its first forward pass
    let url = server.url.clone();
    let send = |i: usize| {
        let (client, url) = (server.client.clone(), url.clone());
        tokio::spawn(async move {
            let r = client
                .post(format!("{url}/v1/classify"))
                .json(&json!({ "model": "sent-a", "input": TEXTS[i % TEXTS.len()] }))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").cloned();
            (status, retry, r.json::<Value>().await.unwrap())
        })
    };
    // the first is taken by the engine, the next three fill the queue
    let mut held = vec![send(0)];
    wait_for(&server, |m| {
        m.contains("softprompt_queue_wait_seconds_count 1\n")
    })
    .await;
    for i in 1..4 {
        held.push(send(i));
    }
    wait_for(&server, |m| m.contains("softprompt_queue_depth 3")).await;
    for i in 0..5 {
        let (status, retry, body) = send(i).await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(retry.is_some());
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("queue_capacity 3"), "{msg}");
    }
    server.backbone.set(true);
    for h in held {
        let (status, _, body) = h.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    server.stop().await;
}

/// Opens the gate once `count` more requests than the `taken` the engine had already taken are
/// in: queued, or taken by the (held) engine.
async fn release_when_queued(server: &Server, count: u64, taken: u64) {
    wait_for(server, |m| {
        metric(m, "softprompt_queue_depth") + metric(m, "softprompt_queue_wait_seconds_count")
            == count + taken
    })
    .await;
    server.backbone.set(true);
}

/// The value of an unlabelled metric.
fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

async fn wait_for(server: &Server, ok: impl Fn(&str) -> bool) {
    for _ in 0..1500 {
        let (_, m) = server.get("/metrics").await;
        if ok(&m) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached:\n{}", server.get("/metrics").await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400s_that_name_the_problem() {
    let server = Server::start(ServeConfig {
        max_new_tokens: 8,
        max_input_tokens: 20,
        max_body_bytes: 4096,
        ..ServeConfig::default()
    })
    .await;
    // each too-long input names its own request field
    for (path, body, field) in [
        (
            "/v1/completions",
            json!({ "model": "writer", "prompt": "a long input ".repeat(10), "max_tokens": 4 }),
            "prompt",
        ),
        (
            "/v1/classify",
            json!({ "model": "sent-a", "input": "a long input ".repeat(10) }),
            "input",
        ),
    ] {
        let (status, answer) = server.post(path, body).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["param"], field, "{path}: {answer}");
    }
    let cases = [
        (
            "/v1/completions",
            json!({ "model": "writer", "prompt": "hi", "max_tokens": 9 }),
            400,
            "max_new_tokens",
        ),
        (
            "/v1/completions",
            json!({ "model": "writer", "prompt": "a long input ".repeat(10), "max_tokens": 4 }),
            400,
            "max_input_tokens",
        ),
        (
            "/v1/classify",
            json!({ "model": "sent-a", "input": "a long input ".repeat(10) }),
            400,
            "max_input_tokens",
        ),
        (
            "/v1/completions",
            json!({ "model": "writer", "prompt": "hi", "n": 2 }),
            400,
            "n = 1",
        ),
        (
            "/v1/completions",
            json!({ "model": "writer", "prompt": "hi", "temperature": -1 }),
            400,
            "temperature",
        ),
        ("/v1/completions", json!({ "prompt": "hi" }), 400, "model"),
        (
            "/v1/classify",
            json!({ "model": "writer", "input": "hi" }),
            400,
            "no labels",
        ),
        (
            "/v1/classify",
            json!({ "model": "sent-a", "ensemble": ["sent-b"], "input": "hi" }),
            400,
            "exactly one",
        ),
        (
            "/v1/classify",
            json!({ "ensemble": ["sent-a", "words", "writer"], "input": "hi" }),
            400,
            "no labels",
        ),
        (
            "/v1/classify",
            json!({ "model": "sent-a", "input": "x".repeat(5000) }),
            413,
            "max_body_bytes",
        ),
        (
            "/v1/completions",
            json!({ "model": "nobody", "prompt": "hi" }),
            404,
            "nobody",
        ),
    ];
    for (path, body, status, needle) in cases {
        let (got, answer) = server.post(path, body.clone()).await;
        assert_eq!(got, status, "{body} -> {answer}");
        let msg = answer["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body} -> {msg}");
    }
    // malformed JSON
    let r = server
        .client
        .post(format!("{}/v1/classify", server.url))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // names that would leave the store are refused before the store is touched
    for name in [
        "../sent-a",
        "..",
        "a/b",
        "/etc/passwd",
        ".hidden",
        "sent-a\\..\\x",
    ] {
        let (status, body) = server
            .post("/v1/classify", json!({ "model": name, "input": "hi" }))
            .await;
        assert_eq!(status, 400, "{name}: {body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid prompt name"));
        assert_eq!(body["error"]["param"], "model");
    }
    let (status, _) = server.get("/v1/nothing").await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_template_renders_the_stored_template_and_a_bad_one_is_refused() {
    let server = Server::start(ServeConfig::default()).await;
    let spec = server.backbone.spec().clone();
    // `{input}` is the placeholder generation tasks use
    let mut qa = stored(&spec, 4, 21, &[]);
    qa.config.softprompt.as_mut().unwrap().template = Some("Q: {input}\nA:".into());
    server.store.save("qa", &qa).await.unwrap();
    for (name, rendered) in [
        ("qa", "Q: the plot\nA:".to_string()),
        ("writer", TEMPLATE.replace("{text}", "the plot")),
    ] {
        let (status, body) = server
            .post(
                "/v1/completions",
                json!({ "model": name, "prompt": "the plot", "max_tokens": 4,
                        "temperature": 0, "use_template": true }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let want = expected_completion(&server, name, &rendered, 4).await;
        assert_eq!(body["choices"][0]["text"], want, "{name}");
    }
    // a stored template without a placeholder cannot be served
    let mut bad = stored(&spec, 4, 22, SENTIMENT);
    bad.config.softprompt.as_mut().unwrap().template = Some("no placeholder".into());
    server.store.save("bad", &bad).await.unwrap();
    let (status, body) = server
        .post("/v1/classify", json!({ "model": "bad", "input": "hi" }))
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("placeholder"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_auth_guards_the_api_but_not_health() {
    let server = Server::start(ServeConfig {
        api_key: Some("s3cret".into()),
        ..ServeConfig::default()
    })
    .await;
    let url = format!("{}/v1/models", server.url);
    let r = server.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = server
        .client
        .get(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = server
        .client
        .get(&url)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // the scheme is case-insensitive
    let r = server
        .client
        .get(&url)
        .header("Authorization", "bearer  s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(server.get("/health").await.0, 200);
    // a known route with another method: a JSON 405
    let r = server
        .client
        .delete(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("POST"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let mut server = Server::start(ServeConfig::default()).await;
    server.backbone.set(false);
    let (client, url) = (server.client.clone(), server.url.clone());
    let pending = tokio::spawn(async move {
        client
            .post(format!("{url}/v1/completions"))
            .json(
                &json!({ "model": "writer", "prompt": "the plot", "max_tokens": 5,
                           "temperature": 0 }),
            )
            .send()
            .await
            .unwrap()
    });
    wait_for(&server, |m| {
        m.contains("softprompt_queue_wait_seconds_count 1\n")
    })
    .await;
    let _ = server.shutdown.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished(), "held in the engine");
    server.backbone.set(true);
    let r = pending.await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let want = expected_completion(&server, "writer", "the plot", 5).await;
    assert_eq!(body["choices"][0]["text"], want);
    tokio::time::timeout(Duration::from_secs(30), server.task.take().unwrap())
        .await
        .expect("serve returns after the last request")
        .unwrap()
        .unwrap();
    // no longer listening
    assert!(reqwest::get(format!("{}/health", server.url))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_shutdown_is_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = ServeConfig {
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        shutdown_timeout: Duration::from_millis(500),
        max_connections: 4,
        ..ServeConfig::default()
    };
    let mut server = Server::start(config).await;
    let addr = server.url.trim_start_matches("http://").to_string();
    // half the headers, then nothing: the server closes the connection
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a half-sent request held its connection open");
    // a body that stops arriving: 408
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut buf))
        .await
        .expect("a stalled body held its connection open")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // the closed connections free their slots; a connection over the limit is closed at once
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        c.read_exact(&mut first).await.unwrap();
        held.push(c);
    }
    let mut over = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = over
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), over.read_to_end(&mut buf))
        .await
        .expect("the connection over the limit was kept waiting")
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf));
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // and with the slots free again the server serves
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);
    // shutdown with a request stuck in the engine ends by the deadline
    server.backbone.set(false);
    let (client, url) = (server.client.clone(), server.url.clone());
    let stuck = tokio::spawn(async move {
        client
            .post(format!("{url}/v1/classify"))
            .json(&json!({ "model": "sent-a", "input": "wonderful" }))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let _ = server.shutdown.take().unwrap().send(());
    let task = server.task.take().unwrap();
    // the engine still holds the request: release it once the connections are closed
    let backbone = server.backbone.clone();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(3000)).await;
        backbone.set(true);
    });
    let deadline_passed = tokio::time::timeout(Duration::from_secs(10), async {
        while !stuck.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(deadline_passed.is_ok());
    let waited = started.elapsed();
    // the deadline is 0.5 s; the engine would only answer at 3 s
    assert!(
        waited < Duration::from_millis(2800),
        "the stuck client was answered or cut only after {waited:?}"
    );
    assert!(stuck.await.unwrap().is_err(), "the stuck request was cut");
    release.await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve returns")
        .unwrap()
        .unwrap();
}
