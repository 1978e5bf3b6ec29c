//! The ONNX exporter: a model description plus its weights become one ONNX graph that takes
//! soft prompts. The graph is the shared model code ([`softprompt_nn::Model`]) run once over the
//! graph builder (`GraphOps`, an implementation of [`softprompt_nn::Ops`]), between the inputs
//! and outputs declared here.
//!
//! Inputs (all dimensions dynamic):
//!
//! | name | type | shape | meaning |
//! |---|---|---|---|
//! | `input_ids` | int64 | `[batch, tokens]` | token ids, right padded |
//! | `prompt_embeds` | float | `[batch, virtual, hidden]` | each row's soft prompt (`virtual` may be 0) |
//! | `position_ids` | int64 | `[batch, virtual + tokens]` | position of every new input |
//! | `attention_bias` | float | `[batch, 1, virtual + tokens, past + virtual + tokens]` | additive mask: 0 visible, -1e9 hidden (causality and padding) |
//! | `attention_bias_local` | float | `[batch, 1, virtual + tokens, past_local + virtual + tokens]` | the sliding-window layers' mask (only for models that have them) |
//! | `gather_index` | int64 | `[batch, picks, 1]` | positions whose hidden state goes through the head |
//! | `candidate_ids` | int64 | `[batch, picks, candidates]` | tokens whose log-probability is returned |
//! | `past_key.{i}`, `past_value.{i}` | float | `[batch, kv_heads, past, head_dim]` | KV cache (`past` may be 0; `past_local` in a sliding-window layer, whose decode cache keeps the window only) |
//!
//! Outputs: `logprobs [batch, picks, candidates]` (log-softmax over the vocabulary, gathered at
//! the candidates: the loss and rank classification never ship `[batch, seq, vocab]` back),
//! `logits [batch, picks, vocab]` (raw logits at the picked positions only: generation and the
//! full-logits check), and `present_key.{i}`, `present_value.{i}` (the cache after this call).
//!
//! The embedding lookup and the `[prompt][tokens]` concatenation happen inside the graph. The
//! graph uses the standard `ai.onnx` domain at opset 17 only (no contrib operators), so any
//! ONNX runtime can execute it (sessions run it at ONNX Runtime's full graph optimization level).

use std::path::{Path, PathBuf};

use onnx_protobuf::{Message, ModelProto, OperatorSetIdProto, StringStringEntryProto};
use softprompt_core::model::ModelSource;
use softprompt_core::{Error, Result};
use softprompt_nn::{Model, Pass, PositionIds};

use crate::graph::{attr_int, value_info, Dim, GraphOps, FLOAT, INT64};

/// Version of the graph layout; part of the cache key, bumped whenever the graph changes.
pub const EXPORT_VERSION: u32 = 3;
/// ONNX opset of the exported graph.
pub const OPSET: i64 = 17;
/// ONNX IR version matching [`OPSET`].
const IR_VERSION: i64 = 8;
/// Protobuf messages cannot exceed 2 GiB; larger models would need external data files.
const MAX_PROTO_BYTES: usize = (1 << 31) - 1;

/// Metadata key holding the weights' fingerprint in the exported model.
pub const META_FINGERPRINT: &str = "softprompt.fingerprint";
/// Metadata key holding the model configuration (JSON).
pub const META_CONFIG: &str = "softprompt.config";
/// Metadata key holding [`EXPORT_VERSION`].
pub const META_VERSION: &str = "softprompt.export_version";

/// Declares the graph's inputs and outputs (`attention_bias_local` for a model with
/// sliding-window layers).
fn declare_io(
    g: &GraphOps,
    layers: usize,
    (kv_heads, head_dim): (usize, usize),
    (hidden, vocab): (usize, usize),
    sliding: &[bool],
) {
    use Dim::{Fixed, Named};
    let local = sliding.iter().any(|s| *s);
    let mut inputs = vec![
        value_info("input_ids", INT64, &[Named("batch"), Named("tokens")]),
        value_info(
            "prompt_embeds",
            FLOAT,
            &[Named("batch"), Named("virtual"), Fixed(hidden)],
        ),
        value_info("position_ids", INT64, &[Named("batch"), Named("seq")]),
        value_info(
            "attention_bias",
            FLOAT,
            &[Named("batch"), Fixed(1), Named("seq"), Named("total")],
        ),
        value_info(
            "gather_index",
            INT64,
            &[Named("batch"), Named("picks"), Fixed(1)],
        ),
        value_info(
            "candidate_ids",
            INT64,
            &[Named("batch"), Named("picks"), Named("candidates")],
        ),
    ];
    if local {
        inputs.push(value_info(
            "attention_bias_local",
            FLOAT,
            &[Named("batch"), Fixed(1), Named("seq"), Named("total_local")],
        ));
    }
    // a sliding-window layer's decode cache may be shorter than the others'
    let cache = |len: &'static str| [Named("batch"), Fixed(kv_heads), Named(len), Fixed(head_dim)];
    let mut outputs = vec![
        value_info(
            "logprobs",
            FLOAT,
            &[Named("batch"), Named("picks"), Named("candidates")],
        ),
        value_info(
            "token_embeds",
            FLOAT,
            &[Named("batch"), Named("tokens"), Fixed(hidden)],
        ),
        value_info(
            "logits",
            FLOAT,
            &[Named("batch"), Named("picks"), Fixed(vocab)],
        ),
    ];
    for (i, &sliding) in sliding.iter().enumerate().take(layers) {
        let (past, present) = if sliding {
            (cache("past_local"), cache("total_local"))
        } else {
            (cache("past"), cache("total"))
        };
        inputs.push(value_info(&format!("past_key.{i}"), FLOAT, &past));
        inputs.push(value_info(&format!("past_value.{i}"), FLOAT, &past));
        outputs.push(value_info(&format!("present_key.{i}"), FLOAT, &present));
        outputs.push(value_info(&format!("present_value.{i}"), FLOAT, &present));
    }
    g.declare(inputs, outputs);
}

/// Records the model between the declared inputs and outputs.
fn build(
    model: &Model<String>,
    g: &GraphOps,
    widths: (usize, usize),
    sliding: &[bool],
) -> Result<()> {
    let layers = model.num_layers();
    let heads = model.heads();
    let local = sliding.iter().any(|s| *s);
    declare_io(g, layers, (heads.kv, heads.dim), widths, sliding);
    // `[prompt_embeds][embed(input_ids)]` along the sequence
    let tokens = model.embed(g, &"input_ids".to_string())?;
    g.rename(&tokens, "token_embeds");
    let x = g.op(
        "Concat",
        &["prompt_embeds", "token_embeds"],
        vec![attr_int("axis", 1)],
    );
    let mut cache: Vec<Option<(String, String)>> = (0..layers)
        .map(|i| Some((format!("past_key.{i}"), format!("past_value.{i}"))))
        .collect();
    let positions = "position_ids".to_string();
    let bias = "attention_bias".to_string();
    let local_bias = "attention_bias_local".to_string();
    let mut pass = Pass::new(PositionIds::Tensor(&positions))
        .with_bias(&bias)
        .with_cache(&mut cache, true);
    if local {
        pass = pass.with_window_bias(&local_bias);
    }
    let hidden_states = model.forward(g, &x, &mut pass)?;
    for (i, slot) in cache.iter().enumerate() {
        let (k, v) = slot
            .as_ref()
            .ok_or_else(|| Error::backend(crate::BACKEND, "a layer left no keys and values"))?;
        g.rename(k, &format!("present_key.{i}"));
        g.rename(v, &format!("present_value.{i}"));
    }
    // only the picked positions go through the final norm and the head
    let picked = g.op(
        "GatherND",
        &[&hidden_states, "gather_index"],
        vec![attr_int("batch_dims", 1)],
    );
    let logits = model.logits(g, &picked)?;
    g.rename(&logits, "logits");
    let logp = g.op("LogSoftmax", &["logits"], vec![attr_int("axis", -1)]);
    g.op_into(
        "GatherElements",
        &[&logp, "candidate_ids"],
        vec![attr_int("axis", 2)],
        &["logprobs"],
    );
    Ok(())
}

fn meta(key: &str, value: String) -> StringStringEntryProto {
    let mut e = StringStringEntryProto::new();
    e.key = key.into();
    e.value = value;
    e
}

/// Exports `source` as a serialized ONNX model (consumes its weights).
pub fn export(source: ModelSource) -> Result<Vec<u8>> {
    let ModelSource {
        config,
        mut weights,
        spec,
        ..
    } = source;
    let g = GraphOps::default();
    let model = Model::load(&g, &config, &mut weights)?;
    drop(weights);
    let sliding: Vec<bool> = config
        .layer_masks()
        .iter()
        .map(|m| matches!(m, softprompt_core::AttentionMask::SlidingWindow(_)))
        .collect();
    build(
        &model,
        &g,
        (config.hidden_size(), config.vocab_size()),
        &sliding,
    )?;
    let mut graph = g.into_graph();
    graph.name = format!("softprompt-{}", spec.name);
    let mut model = ModelProto::new();
    model.ir_version = IR_VERSION;
    let mut opset = OperatorSetIdProto::new();
    opset.domain = String::new();
    opset.version = OPSET;
    model.opset_import.push(opset);
    model.producer_name = "softprompt".into();
    model.producer_version = env!("CARGO_PKG_VERSION").into();
    model.doc_string = "Frozen backbone taking per-row soft prompts (prompt_embeds).".into();
    let config_json = serde_json::to_string(&config)
        .map_err(|e| Error::backend(crate::BACKEND, format!("serializing the config: {e}")))?;
    model.metadata_props = vec![
        meta(META_FINGERPRINT, spec.fingerprint.clone()),
        meta(META_VERSION, EXPORT_VERSION.to_string()),
        meta(META_CONFIG, config_json),
        meta(
            "softprompt.architecture",
            spec.architecture.as_str().to_string(),
        ),
    ];
    model.graph = Some(graph).into();
    let size = model.compute_size() as usize;
    if size > MAX_PROTO_BYTES {
        return Err(Error::InvalidArgument(format!(
            "the exported model would be {size} bytes, above protobuf's 2 GiB limit for one file \
             (external weight files are not supported yet)"
        )));
    }
    model
        .write_to_bytes()
        .map_err(|e| Error::backend(crate::BACKEND, format!("serializing the ONNX model: {e}")))
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, then a rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp{}-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Where the exported model of weights with `fingerprint` is cached under `cache_dir`.
pub fn cached_path(cache_dir: &Path, fingerprint: &str) -> PathBuf {
    let short: String = fingerprint.chars().take(32).collect();
    cache_dir.join(format!("{short}-v{EXPORT_VERSION}.onnx"))
}

/// The default export cache: `$SOFTPROMPT_CACHE_DIR/onnx`, else `$XDG_CACHE_HOME/softprompt/onnx`,
/// else `~/.cache/softprompt/onnx`, else a directory under the system's temporary directory.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SOFTPROMPT_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("onnx");
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("softprompt").join("onnx");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h)
            .join(".cache")
            .join("softprompt")
            .join("onnx");
    }
    std::env::temp_dir().join("softprompt").join("onnx")
}

/// Exports `source` to `path` atomically; returns the number of bytes written.
pub fn export_to_file(source: ModelSource, path: &Path) -> Result<usize> {
    let bytes = export(source)?;
    write_atomic(path, &bytes)?;
    Ok(bytes.len())
}
