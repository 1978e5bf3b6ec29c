//! ONNX Runtime backend of softprompt.
//!
//! The backbone is exported once to an ONNX graph that takes the soft prompts as an input
//! ([`export`]), cached on disk by the weights' fingerprint, and executed by stock ONNX Runtime
//! through `ort`, loaded at run time (`ORT_DYLIB_PATH`, the `libonnxruntime.so.1.31.1` of the
//! pinned `onnxruntime==1.31.1` wheel). ONNX Runtime has no training API, so this backend is
//! forward only: scoring, rank classification, full logits and KV-cached generation; prompts
//! are trained on it with the gradient-free optimizers (SPSA, CMA-ES).

mod decoding;
pub mod export;
mod graph;
mod vision;

pub use crate::vision::OrtVision;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, Tensor};
use softprompt_core::backbone::{
    check_next_token, check_prefix_source, check_prompts, check_token_ids, pack_key_value_prefix,
};
use softprompt_core::model::{ModelConfig, ModelSource};

use crate::decoding::OrtKernels;
use softprompt_core::{
    Backbone, BackboneSpec, Batch, BatchDecoder, Batcher, Capabilities, Error, Placement, Result,
    RowScores, SoftPrompt,
};

/// Name of this runtime in messages.
pub const BACKEND: &str = "ort";
/// The ONNX Runtime version this backend is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";

fn ort_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::backend(BACKEND, format!("{context}: {e}"))
}

/// Where the ONNX Runtime library is looked for: `ORT_DYLIB_PATH`, else the pinned wheel in the
/// repository's `.venv` when run from a checkout.
pub fn library_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let rel = format!(
        ".venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}"
    );
    let mut dir = std::env::current_dir().ok();
    while let Some(d) = dir {
        let candidate = d.join(&rel);
        if candidate.is_file() {
            return Some(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    None
}

const INSTALL_HINT: &str = "install the pinned ONNX Runtime with `bash tools/setup-python.sh` \
     (PyPI onnxruntime==1.31.1) and `source tools/ort-env.sh`, or point ORT_DYLIB_PATH at a \
     libonnxruntime.so of version 1.31 or later";

static ENVIRONMENT: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime (once per process) and returns its environment.
pub fn environment() -> Result<&'static Environment> {
    let env = ENVIRONMENT.get_or_init(|| {
        let path = library_path().ok_or_else(|| {
            format!("the ONNX Runtime library was not found (ORT_DYLIB_PATH is unset and no .venv copy was found): {INSTALL_HINT}")
        })?;
        if !path.is_file() {
            return Err(format!(
                "the ONNX Runtime library {} does not exist: {INSTALL_HINT}",
                path.display()
            ));
        }
        let builder = ort::init_from(&path).map_err(|e| {
            format!("loading ONNX Runtime from {}: {e}; {INSTALL_HINT}", path.display())
        })?;
        builder
            .with_name("softprompt")
            .build()
            .map_err(|e| format!("creating the ONNX Runtime environment: {e}"))
    });
    env.as_ref().map_err(|m| Error::backend(BACKEND, m.clone()))
}

/// Where the graph runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrtDevice {
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// The CUDA execution provider on device `N` (Cargo feature `cuda`).
    Cuda(i32),
}

/// Parses `cpu` or `cuda[:N]`.
pub fn parse_device(name: &str) -> Result<OrtDevice> {
    match name {
        "cpu" => Ok(OrtDevice::Cpu),
        "cuda" => Ok(OrtDevice::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<i32>) {
            Some(Ok(n)) if n >= 0 => Ok(OrtDevice::Cuda(n)),
            _ => Err(Error::InvalidArgument(format!(
                "unknown device `{other}`: expected cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// Options of [`OrtBackbone`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrtOptions {
    /// Execution provider.
    pub device: OrtDevice,
    /// Intra-op threads (`None`: ONNX Runtime's default, one per physical core).
    pub threads: Option<usize>,
    /// Directory of exported models (`None`: [`export::default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            device: OrtDevice::Cpu,
            threads: None,
            cache_dir: None,
        }
    }
}

impl OrtOptions {
    /// CPU, default threads, default cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the execution provider.
    pub fn with_device(mut self, device: OrtDevice) -> Self {
        self.device = device;
        self
    }

    /// Sets the number of intra-op threads.
    pub fn with_threads(mut self, threads: Option<usize>) -> Self {
        self.threads = threads;
        self
    }

    /// Sets the export cache directory.
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }
}

/// A frozen model exported to ONNX and run by ONNX Runtime.
pub struct OrtBackbone {
    session: Mutex<Session>,
    config: ModelConfig,
    spec: BackboneSpec,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    onnx_path: PathBuf,
    /// `logits`, then `present_key.{i}` and `present_value.{i}` layer by layer (named once).
    decode_outputs: Vec<String>,
}

impl std::fmt::Debug for OrtBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtBackbone")
            .field("spec", &self.spec)
            .field("onnx", &self.onnx_path)
            .finish()
    }
}

/// Host tensors of one graph call.
struct Inputs {
    rows: usize,
    input_ids: Vec<i64>,
    tokens: usize,
    prompt_embeds: Vec<f32>,
    virtual_tokens: usize,
    position_ids: Vec<i64>,
    attention_bias: Bias,
    gather_index: Vec<i64>,
    picks: usize,
    candidate_ids: Vec<i64>,
    candidates: usize,
    /// Per layer `(keys, values)`, each `[rows, kv_heads, past, head_dim]` (a sliding-window
    /// layer's `past` may be shorter: its length is read from the data).
    past: Vec<(Vec<f32>, Vec<f32>)>,
    past_len: usize,
}

/// The additive attention biases of a call: the full-attention layers' (`attention_bias`) and,
/// for a model with sliding-window layers, theirs (`attention_bias_local`).
struct Bias {
    global: Vec<f32>,
    window: Option<Vec<f32>>,
}

/// One output: shape and values.
type HostOut = (Vec<usize>, Vec<f32>);

impl OrtBackbone {
    /// Loads the model at `path` (Hugging Face directory or, through the facade, GGUF).
    pub fn load(path: impl AsRef<Path>, options: OrtOptions) -> Result<Self> {
        Self::from_source(ModelSource::load(path)?, options)
    }

    /// Exports `source` (or reuses the cached export of the same weights) and opens it.
    pub fn from_source(source: ModelSource, options: OrtOptions) -> Result<Self> {
        let cache = options
            .cache_dir
            .clone()
            .unwrap_or_else(export::default_cache_dir);
        let path = export::cached_path(&cache, &source.spec.fingerprint);
        let config = source.config.clone();
        let spec = source.spec.clone();
        // the runtime first: a missing library is reported before any export work
        environment()?;
        // a cached export of the same weights is reused; a damaged or foreign one is redone
        let session = if path.is_file() {
            Self::open(&path, &spec, &options).ok()
        } else {
            None
        };
        let session = match session {
            Some(s) => {
                drop(source);
                s
            }
            None => {
                export::export_to_file(source, &path)?;
                Self::open(&path, &spec, &options)?
            }
        };
        let (layers, kv_heads, head_dim) = (
            config.num_layers(),
            config.num_key_value_heads(),
            config.head_dim(),
        );
        Ok(OrtBackbone {
            session: Mutex::new(session),
            config,
            spec,
            layers,
            kv_heads,
            head_dim,
            onnx_path: path,
            decode_outputs: std::iter::once("logits".to_string())
                .chain(
                    (0..layers)
                        .flat_map(|l| [format!("present_key.{l}"), format!("present_value.{l}")]),
                )
                .collect(),
        })
    }

    /// Opens an exported model and checks that it was exported from weights of `spec`.
    fn open(path: &Path, spec: &BackboneSpec, options: &OrtOptions) -> Result<Session> {
        let env = environment()?;
        let mut builder = Session::builder(env)
            .map_err(|e| ort_err("session options", e))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| ort_err("session options", e))?;
        if let Some(t) = options.threads {
            builder = builder
                .with_intra_threads(t)
                .map_err(|e| ort_err("session options", e))?;
        }
        builder = register_device(builder, options.device)?;
        let session = builder
            .commit_from_file(path)
            .map_err(|e| ort_err(&format!("loading {}", path.display()), e))?;
        let found = session
            .metadata()
            .ok()
            .and_then(|m| m.custom(export::META_FINGERPRINT));
        if found.as_deref() != Some(spec.fingerprint.as_str()) {
            return Err(Error::backend(
                BACKEND,
                format!(
                    "{} was exported from other weights (fingerprint {:?}, expected {})",
                    path.display(),
                    found,
                    spec.fingerprint
                ),
            ));
        }
        Ok(session)
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The exported ONNX file this backbone runs.
    pub fn onnx_path(&self) -> &Path {
        &self.onnx_path
    }

    fn session(&self) -> MutexGuard<'_, Session> {
        // a session is never left half-updated by a panic elsewhere
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_length(&self, positions: usize) -> Result<()> {
        let max = self.config.max_positions();
        if positions > max {
            return Err(Error::InvalidBatch(format!(
                "{positions} positions (virtual tokens included) exceed the model's maximum of {max}"
            )));
        }
        Ok(())
    }

    /// The biases of a call from the model's masks: `make(mask)` lays one out.
    /// The biases of one decode step over caches bounded by their layers' masks
    /// ([`softprompt_core::AttentionMask::kept_step_bias`]).
    fn step_bias(&self, lens: &[usize]) -> Bias {
        self.bias(|m| m.kept_step_bias(lens).0)
    }

    fn bias(&self, make: impl Fn(softprompt_core::AttentionMask) -> Vec<f32>) -> Bias {
        Bias {
            global: make(self.config.attention_mask()),
            window: self.config.sliding_window_mask().map(&make),
        }
    }

    /// Inputs of a full (uncached) pass over `[prompt][tokens]` of `batch`; the picks are left
    /// for the caller. Key/value prefixes enter as the graph's past keys and values (the
    /// graph's positions are then the tokens only: [`Self::graph_shift`] is `n`).
    fn full_inputs(&self, prompts: &[SoftPrompt], batch: &Batch, n: usize) -> Inputs {
        if prompts[0].placement() == Placement::KeyValuePrefix {
            return self.prefix_inputs(prompts, batch, n);
        }
        let (rows, t) = (batch.rows(), batch.seq_len());
        let s = n + t;
        let d = self.spec.hidden_size;
        let mut prompt_embeds = Vec::with_capacity(rows * n * d);
        for &p in batch.prompt_index() {
            prompt_embeds.extend_from_slice(prompts[p].values());
        }
        Inputs {
            rows,
            input_ids: batch.input_ids().iter().map(|i| *i as i64).collect(),
            tokens: t,
            prompt_embeds,
            virtual_tokens: n,
            position_ids: (0..rows).flat_map(|_| 0..s as i64).collect(),
            attention_bias: self.bias(|m| m.bias(batch, n)),
            gather_index: Vec::new(),
            picks: 0,
            candidate_ids: Vec::new(),
            candidates: 0,
            past: Vec::new(),
            past_len: 0,
        }
    }

    /// How many of a sequence's positions precede the graph's first one: `n` for key/value
    /// prefixes (they are the graph's past), 0 for input embeddings.
    fn graph_shift(prompts: &[SoftPrompt], n: usize) -> usize {
        match prompts.first().map(SoftPrompt::placement) {
            Some(Placement::KeyValuePrefix) => n,
            _ => 0,
        }
    }

    /// [`Self::full_inputs`] for key/value prefixes (PEFT's `[N, layers·2·kv·hd]` rows): every
    /// row's prefix as the past of each layer, its tokens at positions `n..`.
    fn prefix_inputs(&self, prompts: &[SoftPrompt], batch: &Batch, n: usize) -> Inputs {
        let (rows, t) = (batch.rows(), batch.seq_len());
        let (kv, hd) = (self.kv_heads, self.head_dim);
        let width = self.layers * 2 * kv * hd;
        let mut past: Vec<(Vec<f32>, Vec<f32>)> = (0..self.layers)
            .map(|_| {
                let cap = rows * kv * n * hd;
                (Vec::with_capacity(cap), Vec::with_capacity(cap))
            })
            .collect();
        for &p in batch.prompt_index() {
            let v = prompts[p].values();
            for (l, (keys, values)) in past.iter_mut().enumerate() {
                for (which, out) in [keys, values].into_iter().enumerate() {
                    for h in 0..kv {
                        for j in 0..n {
                            let at = j * width + ((l * 2 + which) * kv + h) * hd;
                            out.extend_from_slice(&v[at..at + hd]);
                        }
                    }
                }
            }
        }
        Inputs {
            rows,
            input_ids: batch.input_ids().iter().map(|i| *i as i64).collect(),
            tokens: t,
            prompt_embeds: Vec::new(),
            virtual_tokens: 0,
            position_ids: (0..rows).flat_map(|_| n as i64..(n + t) as i64).collect(),
            attention_bias: self.bias(|m| m.token_bias(batch, n)),
            gather_index: Vec::new(),
            picks: 0,
            candidate_ids: Vec::new(),
            candidates: 0,
            past,
            past_len: n,
        }
    }

    /// Runs the graph; returns the asked outputs in order.
    fn run(&self, inputs: Inputs, outputs: &[&str]) -> Result<Vec<HostOut>> {
        let Inputs {
            rows,
            input_ids,
            tokens,
            prompt_embeds,
            virtual_tokens,
            position_ids,
            attention_bias,
            gather_index,
            picks,
            candidate_ids,
            candidates,
            past,
            past_len,
        } = inputs;
        let s = virtual_tokens + tokens;
        let d = self.spec.hidden_size;
        let f = |shape: Vec<usize>, data: Vec<f32>| -> Result<DynValue> {
            Tensor::from_array((shape, data))
                .map(|t| t.into_dyn())
                .map_err(|e| ort_err("input tensor", e))
        };
        let i = |shape: Vec<usize>, data: Vec<i64>| -> Result<DynValue> {
            Tensor::from_array((shape, data))
                .map(|t| t.into_dyn())
                .map_err(|e| ort_err("input tensor", e))
        };
        let mut values: Vec<(String, DynValue)> = vec![
            ("input_ids".into(), i(vec![rows, tokens], input_ids)?),
            (
                "prompt_embeds".into(),
                f(vec![rows, virtual_tokens, d], prompt_embeds)?,
            ),
            ("position_ids".into(), i(vec![rows, s], position_ids)?),
            (
                "attention_bias".into(),
                f(vec![rows, 1, s, past_len + s], attention_bias.global)?,
            ),
            (
                "gather_index".into(),
                i(vec![rows, picks, 1], gather_index)?,
            ),
            (
                "candidate_ids".into(),
                i(vec![rows, picks, candidates], candidate_ids)?,
            ),
        ];
        if let Some(local) = attention_bias.window {
            // over the sliding-window layers' own past, which a decode step keeps shorter
            let width = local.len() / (rows * s);
            values.push((
                "attention_bias_local".into(),
                f(vec![rows, 1, s, width], local)?,
            ));
        }
        let mut past = past.into_iter();
        for l in 0..self.layers {
            let (k, v) = past.next().unwrap_or_else(|| (Vec::new(), Vec::new()));
            let len = k.len() / (rows * self.kv_heads * self.head_dim);
            let cache_shape = vec![rows, self.kv_heads, len, self.head_dim];
            values.push((format!("past_key.{l}"), f(cache_shape.clone(), k)?));
            values.push((format!("past_value.{l}"), f(cache_shape, v)?));
        }
        let mut selector = ort::session::OutputSelector::no_default();
        for o in outputs {
            selector = selector.with(*o);
        }
        let options = RunOptions::new()
            .map_err(|e| ort_err("run options", e))?
            .with_outputs(selector);
        let mut session = self.session();
        let result = session
            .run_with_options(values, &options)
            .map_err(|e| ort_err("running the graph", e))?;
        outputs
            .iter()
            .map(|name| {
                let v = result
                    .get(*name)
                    .ok_or_else(|| Error::backend(BACKEND, format!("output {name} missing")))?;
                let (shape, data) = v
                    .try_extract_tensor::<f32>()
                    .map_err(|e| ort_err(name, e))?;
                Ok((shape.iter().map(|d| *d as usize).collect(), data.to_vec()))
            })
            .collect()
    }

    /// Runs the graph for decoding: the picked logits, then every layer's present key and value.
    fn run_decode(&self, inputs: Inputs) -> Result<Vec<HostOut>> {
        let names: Vec<&str> = self.decode_outputs.iter().map(String::as_str).collect();
        self.run(inputs, &names)
    }
}

#[cfg(feature = "cuda")]
fn register_device(
    builder: ort::session::builder::SessionBuilder,
    device: OrtDevice,
) -> Result<ort::session::builder::SessionBuilder> {
    match device {
        OrtDevice::Cpu => Ok(builder),
        OrtDevice::Cuda(n) => builder
            .with_execution_providers([ort::ep::CUDA::default()
                .with_device_id(n)
                .build()
                .error_on_failure()])
            .map_err(|e| {
                ort_err(
                    &format!(
                        "registering the CUDA execution provider on cuda:{n} (no fall back to CPU)"
                    ),
                    e,
                )
            }),
    }
}

#[cfg(not(feature = "cuda"))]
fn register_device(
    builder: ort::session::builder::SessionBuilder,
    device: OrtDevice,
) -> Result<ort::session::builder::SessionBuilder> {
    match device {
        OrtDevice::Cpu => Ok(builder),
        OrtDevice::Cuda(_) => Err(Error::unsupported(
            BACKEND,
            "cuda",
            Some("rebuild with the Cargo feature `cuda` of softprompt-ort (and the onnxruntime-gpu library)"),
        )),
    }
}

impl Backbone for OrtBackbone {
    fn backend_name(&self) -> &str {
        BACKEND
    }

    fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            gradients: false,
            generation: true,
            placements: Capabilities::DECODER,
        }
    }

    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        check_token_ids(ids.iter().copied(), self.spec.vocab_size)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let t = ids.len();
        let inputs = Inputs {
            rows: 1,
            input_ids: ids.iter().map(|i| *i as i64).collect(),
            tokens: t,
            prompt_embeds: Vec::new(),
            virtual_tokens: 0,
            position_ids: (0..t as i64).collect(),
            attention_bias: self.bias(|m| m.chunk_bias(t, t)),
            gather_index: vec![0],
            picks: 1,
            candidate_ids: vec![0],
            candidates: 1,
            past: Vec::new(),
            past_len: 0,
        };
        Ok(self.run(inputs, &["token_embeds"])?.remove(0).1)
    }

    fn score(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<RowScores> {
        let n = check_prompts(self, prompts, batch)?;
        self.check_length(n + batch.seq_len())?;
        let shift = Self::graph_shift(prompts, n);
        let targets = if shift > 0 {
            batch.token_targets(n)?
        } else {
            batch.targets(n)?
        };
        let rows = batch.rows();
        let mut per_row = vec![0usize; rows];
        for (r, _, _) in &targets {
            per_row[*r] += 1;
        }
        let k = per_row.iter().copied().max().unwrap_or(0).max(1);
        let mut gather = vec![0i64; rows * k];
        let mut cand = vec![0i64; rows * k];
        let mut fill = vec![0usize; rows];
        let t = batch.seq_len();
        for (r, tok, pos) in &targets {
            let j = r * k + fill[*r];
            gather[j] = (*pos - shift) as i64;
            cand[j] = batch.input_ids()[r * t + tok] as i64;
            fill[*r] += 1;
        }
        let mut inputs = self.full_inputs(prompts, batch, n);
        inputs.gather_index = gather;
        inputs.picks = k;
        inputs.candidate_ids = cand;
        inputs.candidates = 1;
        let (_, logp) = self.run(inputs, &["logprobs"])?.remove(0);
        let mut scores = RowScores {
            logprob_sum: vec![0.0; rows],
            num_targets: per_row.clone(),
        };
        for r in 0..rows {
            scores.logprob_sum[r] = logp[r * k..r * k + per_row[r]]
                .iter()
                .map(|x| *x as f64)
                .sum();
        }
        Ok(scores)
    }

    fn next_token_logprobs(
        &self,
        prompts: &[SoftPrompt],
        batch: &Batch,
        candidates: &[u32],
    ) -> Result<Vec<Vec<f64>>> {
        let n = check_next_token(self, prompts, batch, candidates)?;
        self.check_length(n + batch.seq_len())?;
        if candidates.is_empty() {
            return Ok(vec![Vec::new(); batch.rows()]);
        }
        let rows = batch.rows();
        let c = candidates.len();
        let mut inputs = self.full_inputs(prompts, batch, n);
        let shift = Self::graph_shift(prompts, n);
        inputs.gather_index = (0..rows)
            .map(|r| (n + batch.row_len(r) - 1 - shift) as i64)
            .collect();
        inputs.picks = 1;
        inputs.candidate_ids = (0..rows)
            .flat_map(|_| candidates.iter().map(|c| *c as i64))
            .collect();
        inputs.candidates = c;
        let (_, logp) = self.run(inputs, &["logprobs"])?.remove(0);
        Ok(logp
            .chunks(c)
            .map(|row| row.iter().map(|x| *x as f64).collect())
            .collect())
    }

    fn logits(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<Vec<f32>> {
        let n = check_prompts(self, prompts, batch)?;
        self.check_length(n + batch.seq_len())?;
        let rows = batch.rows();
        let s = n + batch.seq_len() - Self::graph_shift(prompts, n);
        let mut inputs = self.full_inputs(prompts, batch, n);
        inputs.gather_index = (0..rows).flat_map(|_| 0..s as i64).collect();
        inputs.picks = s;
        inputs.candidate_ids = vec![0; rows * s];
        inputs.candidates = 1;
        Ok(self.run(inputs, &["logits"])?.remove(0).1)
    }

    fn key_value_prefix(&self, prompt: &SoftPrompt) -> Result<SoftPrompt> {
        let n = check_prefix_source(self, prompt)?;
        self.check_length(n + 1)?;
        let layers = OrtKernels { backbone: self }.prompt_keys_values(prompt)?;
        pack_key_value_prefix(&layers, n, self.kv_heads, self.head_dim)
    }

    fn batch_decoder(&self) -> Option<Box<dyn BatchDecoder + '_>> {
        Some(Box::new(Batcher::new(OrtKernels { backbone: self })))
    }
}
