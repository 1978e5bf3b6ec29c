//! The vision server over HTTP on the tiny random ViT fixture: visual prompts of several kinds
//! and lengths answered together equal one image at a time on the backbone; listing, bad
//! requests, replaced prompts and bearer auth.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use softprompt::train::vision::{
    class_logprobs, decode_image, save_classifier, ImageSet, VisualClassifier, IMAGENET_MEAN,
    IMAGENET_STD,
};
use softprompt::{Placement, Rng, SoftPrompt, VisionBackbone};
use softprompt_serve::{serve_vision, ServeConfig};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-dinov2")
}

const CLASSES: [&str; 3] = ["cat", "dog", "fish"];

/// A classifier with random prompt values and head: `n` tokens at `placement` (a pixel pattern
/// for `Placement::Pixels`), images of `size` px.
fn classifier(
    backbone: &dyn VisionBackbone,
    placement: Placement,
    n: usize,
    size: usize,
    seed: u64,
) -> VisualClassifier {
    let d = backbone.spec().hidden_size;
    let mut rng = Rng::seed_from_u64(seed);
    let mut values = |k: usize, scale: f64| -> Vec<f32> {
        (0..k).map(|_| (rng.normal() * scale) as f32).collect()
    };
    let layers = backbone.config().num_hidden_layers;
    let (n, width) = match placement {
        Placement::Pixels => (1, 3 * size * size),
        Placement::DeepAfterClassToken => (n, d * layers),
        _ => (n, d),
    };
    let prompt = SoftPrompt::new(n, width, values(n * width, 0.5))
        .unwrap()
        .with_placement(placement);
    VisualClassifier {
        prompt,
        head_w: values(CLASSES.len() * d, 0.3),
        head_b: values(CLASSES.len(), 0.1),
        classes: CLASSES.iter().map(|c| c.to_string()).collect(),
        image_size: size,
        init: None,
        losses: Vec::new(),
        validation: Vec::new(),
    }
}

/// A `w × h` PNG (or JPEG) of a gradient, base64.
fn image_b64(w: u32, h: u32, seed: u32, jpeg: bool) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 37 + seed * 11) % 256) as u8,
            ((y * 53 + seed * 7) % 256) as u8,
            ((x * y + seed) % 256) as u8,
        ])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    let format = if jpeg {
        image::ImageFormat::Jpeg
    } else {
        image::ImageFormat::Png
    };
    img.write_to(&mut bytes, format).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes.into_inner())
}

/// Class log-probabilities of one image under one classifier, straight from the backbone.
fn expected(backbone: &dyn VisionBackbone, model: &VisualClassifier, b64: &str) -> Vec<f64> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let s = model.image_size;
    let one = ImageSet {
        height: s,
        width: s,
        channels: 3,
        pixels: decode_image(&bytes, s).unwrap(),
        labels: vec![0],
        classes: Vec::new(),
    };
    let images = one.prepare(&[0], s, IMAGENET_MEAN, IMAGENET_STD);
    let f = backbone
        .features(std::slice::from_ref(&model.prompt), &[0], &images)
        .unwrap();
    let d = backbone.spec().hidden_size;
    class_logprobs(model, &f, d).remove(0)
}

/// The fixture's backbone behind a gate: while closed, a forward pass waits (so that requests
/// queue up and the next engine round takes them together).
struct Gated {
    inner: Box<dyn VisionBackbone>,
    open: Mutex<bool>,
    changed: Condvar,
}

impl Gated {
    fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.changed.notify_all();
    }
}

impl VisionBackbone for Gated {
    fn backend_name(&self) -> &str {
        self.inner.backend_name()
    }
    fn spec(&self) -> &softprompt::BackboneSpec {
        self.inner.spec()
    }
    fn config(&self) -> &softprompt::VitConfig {
        self.inner.config()
    }
    fn features(
        &self,
        prompts: &[SoftPrompt],
        prompt_index: &[usize],
        images: &softprompt::Images,
    ) -> softprompt::Result<Vec<f32>> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
        drop(open);
        self.inner.features(prompts, prompt_index, images)
    }
}

struct Server {
    url: String,
    client: reqwest::Client,
    dir: tempfile::TempDir,
    backbone: Arc<Gated>,
    models: Vec<(&'static str, VisualClassifier)>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), softprompt_serve::ServeError>>>,
}

impl Server {
    async fn start(config: ServeConfig) -> Server {
        let backbone = Arc::new(Gated {
            inner: softprompt::load_vision_backbone("candle", fixture(), "cpu").unwrap(),
            open: Mutex::new(true),
            changed: Condvar::new(),
        });
        let dir = tempfile::tempdir().unwrap();
        let b = backbone.as_ref();
        let models = vec![
            (
                "shallow-a",
                classifier(b, Placement::AfterClassToken, 2, 16, 1),
            ),
            (
                "shallow-b",
                classifier(b, Placement::AfterClassToken, 2, 16, 2),
            ),
            (
                "shallow-3",
                classifier(b, Placement::AfterClassToken, 3, 16, 3),
            ),
            (
                "linear",
                classifier(b, Placement::AfterClassToken, 0, 16, 4),
            ),
            (
                "deep",
                classifier(b, Placement::DeepAfterClassToken, 2, 16, 5),
            ),
            ("frame", classifier(b, Placement::Pixels, 1, 16, 6)),
            (
                "shallow-28px",
                classifier(b, Placement::AfterClassToken, 2, 28, 7),
            ),
        ];
        for (name, m) in &models {
            save_classifier(&dir.path().join(name), m, b, "tiny-dinov2").unwrap();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_vision(
            listener,
            backbone.clone() as Arc<dyn VisionBackbone>,
            dir.path().to_path_buf(),
            config,
            async move {
                let _ = rx.await;
            },
        ));
        Server {
            url,
            client: reqwest::Client::new(),
            dir,
            backbone,
            models,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    fn model(&self, name: &str) -> &VisualClassifier {
        &self.models.iter().find(|(n, _)| *n == name).unwrap().1
    }

    fn store(&self) -> &Path {
        self.dir.path()
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

    async fn metrics(&self) -> String {
        let r = self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap();
        r.text().await.unwrap()
    }

    async fn stop(mut self) {
        self.backbone.set(true);
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task.take().unwrap())
            .await
            .expect("shutdown finishes")
            .unwrap()
            .unwrap();
    }
}

/// The value of an unlabelled metric.
fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

fn logprobs(result: &Value) -> Vec<f64> {
    CLASSES
        .iter()
        .map(|c| result["logprobs"][c].as_f64().unwrap())
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Requests for prompts of every kind, sent at once (one engine round packs what waits
/// together), give what each image gives alone under its prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn visual_prompts_of_every_kind_served_together_equal_one_at_a_time() {
    let server = Arc::new(
        Server::start(ServeConfig {
            max_batch_rows: 64,
            ..ServeConfig::default()
        })
        .await,
    );
    // the engine is held on a first request while the others queue: the next round takes
    // them all, prompts of every kind together
    server.backbone.set(false);
    let first = {
        let server = server.clone();
        let img = image_b64(9, 9, 0, false);
        tokio::spawn(async move {
            server
                .post(
                    "/v1/classify",
                    json!({ "model": "shallow-a", "input": img }),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let names: [&'static str; 7] = [
        "shallow-a",
        "shallow-b",
        "shallow-3",
        "linear",
        "deep",
        "frame",
        "shallow-28px",
    ];
    let mut tasks = Vec::new();
    for (k, name) in names.into_iter().enumerate() {
        for rep in 0..2u32 {
            let server = server.clone();
            let images: Vec<String> = (0..3u32)
                .map(|i| image_b64(10 + i * 7, 12 + k as u32, i + rep * 5, i == 1))
                .collect();
            tasks.push(tokio::spawn(async move {
                let input = if rep == 0 {
                    json!(images)
                } else {
                    // a data URL is accepted too
                    json!(images
                        .iter()
                        .map(|i| format!("data:image/png;base64,{i}"))
                        .collect::<Vec<_>>())
                };
                let (status, body) = server
                    .post("/v1/classify", json!({ "model": name, "input": input }))
                    .await;
                (name.to_string(), images, status, body)
            }));
        }
    }
    // 14 requests waiting: let the engine go
    for _ in 0..1500 {
        if metric(&server.metrics().await, "softprompt_queue_depth") == 14 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&server.metrics().await, "softprompt_queue_depth"),
        14
    );
    server.backbone.set(true);
    assert_eq!(first.await.unwrap().0, 200);
    for t in tasks {
        let (name, images, status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["model"], name.as_str());
        assert_eq!(body["labels"], json!(CLASSES));
        assert_eq!(body["usage"]["images"], 3);
        let model = server.model(&name);
        for (i, b64) in images.iter().enumerate() {
            let r = &body["results"][i];
            let want = expected(server.backbone.as_ref(), model, b64);
            let got = logprobs(r);
            assert!(
                max_diff(&got, &want) < 1e-4,
                "{name}[{i}]: {got:?} vs {want:?}"
            );
            let best = (0..3).fold(0, |b, j| if want[j] > want[b] { j } else { b });
            assert_eq!(r["label"], CLASSES[best]);
        }
    }
    // rows of different prompts shared forward passes: the shallow 2-token prompts (a, b and
    // the 28 px one apart) and the others per kind, length and resolution
    let m = server.metrics().await;
    let mixed = metric(&m, "softprompt_classify_batch_prompts_count")
        - metric(&m, "softprompt_classify_batch_prompts_bucket{le=\"1\"}");
    assert!(mixed >= 1, "no forward pass mixed prompts:\n{m}");
    // one pass for the first request, then one per kind/length/resolution group (6)
    assert_eq!(metric(&m, "softprompt_classify_batch_rows_count"), 7, "{m}");
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}

#[tokio::test]
async fn models_bad_requests_and_replaced_prompts() {
    let server = Server::start(ServeConfig {
        max_batch_inputs: 4,
        ..ServeConfig::default()
    })
    .await;
    // a text prompt's folder and a broken visual one sit in the same store
    let text = server.store().join("a-text-prompt");
    std::fs::create_dir_all(&text).unwrap();
    std::fs::write(
        text.join("adapter_config.json"),
        r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}"#,
    )
    .unwrap();
    let broken = server.store().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(
        server.store().join("linear/adapter_config.json"),
        broken.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(broken.join("adapter_model.safetensors"), b"not weights").unwrap();

    let r = server
        .client
        .get(format!("{}/v1/models", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let list: Value = r.json().await.unwrap();
    let find = |id: &str| {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not listed: {list}"))
    };
    let deep = find("deep");
    assert_eq!(deep["ready"], true);
    assert_eq!(deep["placement"], "deep_after_class_token");
    assert_eq!(deep["peft_type"], "VISUAL_PROMPT_TUNING");
    assert_eq!(deep["num_virtual_tokens"], 2);
    assert_eq!(deep["image_size"], 16);
    assert_eq!(deep["labels"], json!(CLASSES));
    assert_eq!(find("frame")["placement"], "pixels");
    assert_eq!(find("a-text-prompt")["ready"], false);
    assert!(find("a-text-prompt")["reason"]
        .as_str()
        .unwrap()
        .contains("not a visual prompt"));
    assert_eq!(find("broken")["ready"], false);
    assert!(find("broken")["reason"]
        .as_str()
        .unwrap()
        .contains("weights_sha256"));

    let img = image_b64(8, 8, 1, false);
    for (body, status, param, says) in [
        (
            json!({"model": "nope", "input": img}),
            404,
            "model",
            "no prompt `nope`",
        ),
        (
            json!({"model": "../linear", "input": img}),
            400,
            "model",
            "not a prompt name",
        ),
        (
            json!({"model": "a-text-prompt", "input": img}),
            400,
            "model",
            "not a visual prompt",
        ),
        (
            json!({"model": "broken", "input": img}),
            422,
            "model",
            "cannot be read",
        ),
        (
            json!({"model": "linear", "input": "%%%"}),
            400,
            "input",
            "input[0]: not base64",
        ),
        (
            json!({"model": "linear", "input": base64::engine::general_purpose::STANDARD.encode(b"GIF89a....")}),
            400,
            "input",
            "not a PNG or JPEG",
        ),
        (
            json!({"model": "linear", "input": []}),
            400,
            "input",
            "1..=4 images",
        ),
        (
            json!({"model": "linear", "input": vec![img.clone(); 5]}),
            400,
            "input",
            "1..=4 images",
        ),
    ] {
        let (s, b) = server.post("/v1/classify", body.clone()).await;
        assert_eq!(s, status, "{body}: {b}");
        assert_eq!(b["error"]["param"], param, "{b}");
        let message = b["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
    // a prompt replaced while serving answers with its new weights at once
    let (_, before) = server
        .post("/v1/classify", json!({"model": "linear", "input": img}))
        .await;
    let replacement = classifier(
        server.backbone.as_ref(),
        Placement::AfterClassToken,
        0,
        16,
        99,
    );
    save_classifier(
        &server.store().join("linear"),
        &replacement,
        server.backbone.as_ref(),
        "tiny-dinov2",
    )
    .unwrap();
    let (s, after) = server
        .post("/v1/classify", json!({"model": "linear", "input": img}))
        .await;
    assert_eq!(s, 200, "{after}");
    let want = expected(server.backbone.as_ref(), &replacement, &img);
    assert!(max_diff(&logprobs(&after["results"][0]), &want) < 1e-4);
    assert!(max_diff(&logprobs(&before["results"][0]), &want) > 1e-3);
    // unknown routes and methods are JSON errors
    let r = server
        .client
        .get(format!("{}/v1/classify", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    server.stop().await;
}

#[tokio::test]
async fn bearer_auth_guards_the_vision_api_but_not_health() {
    let server = Server::start(ServeConfig {
        api_key: Some("sesame".into()),
        ..ServeConfig::default()
    })
    .await;
    let img = image_b64(8, 8, 2, false);
    let (s, b) = server
        .post("/v1/classify", json!({"model": "linear", "input": img}))
        .await;
    assert_eq!(s, 401, "{b}");
    let r = server
        .client
        .post(format!("{}/v1/classify", server.url))
        .bearer_auth("sesame")
        .json(&json!({"model": "linear", "input": img}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = server
        .client
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let h: Value = r.json().await.unwrap();
    assert_eq!(
        h["fingerprint"],
        server.backbone.spec().fingerprint.as_str()
    );
    server.stop().await;
}
