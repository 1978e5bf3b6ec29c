//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Prompt tuning of frozen language models: train, evaluate and serve soft prompts that load
/// in Hugging Face PEFT.
#[derive(Debug, Parser)]
#[command(name = "softprompt", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The backend flags of the command, if it loads a model.
    pub fn backend(&self) -> Option<&BackendArgs> {
        match &self.command {
            Command::Train(a) => Some(&a.backend),
            Command::Eval(a) => Some(&a.backend),
            Command::Generate(a) => Some(&a.backend),
            Command::Serve(a) => Some(&a.backend),
            Command::Inspect(_) | Command::Bench(_) | Command::Export(_) => None,
        }
    }

    /// Thread count asked for, by any command.
    pub fn threads(&self) -> Option<usize> {
        match &self.command {
            Command::Bench(a) => a.threads,
            _ => self.backend().and_then(|b| b.threads),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tune a soft prompt on a frozen model and save it in PEFT's layout.
    Train(Box<TrainArgs>),
    /// Score a soft prompt (or the plain model) on a JSONL data set.
    Eval(EvalArgs),
    /// Generate text after a soft prompt with a KV cache.
    Generate(GenerateArgs),
    /// Show a stored prompt (or every prompt of a store) and its metadata.
    Inspect(InspectArgs),
    /// Time train steps, rank classification and generation of each backend on one fixed batch.
    Bench(BenchArgs),
    /// Serve every prompt of a store over HTTP from one frozen model, batching mixed tasks.
    Serve(ServeArgs),
    /// Export a model to the ONNX graph the ort backend runs (prompt embeddings as an input).
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Model: a Hugging Face directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Output .onnx file (written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Prompt store: a directory with one PEFT prompt folder per name (read only; changes are
    /// picked up while serving).
    #[arg(long)]
    pub store: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// mixed: rows of different prompts share forward passes; per-prompt: one prompt per batch.
    #[arg(long, value_enum, default_value_t = BatchingKind::Mixed)]
    pub batching: BatchingKind,
    /// Requests waiting for the engine before new ones get 503.
    #[arg(long, default_value_t = 256)]
    pub queue_capacity: usize,
    /// Most classification rows per forward pass.
    #[arg(long, default_value_t = 32)]
    pub max_batch_rows: usize,
    /// Most sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 32)]
    pub max_active: usize,
    /// Largest max_tokens a completion may ask for.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Longest input in tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_input_tokens: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// File holding the bearer token that /v1/* requires (or set SOFTPROMPT_API_KEY).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Seconds a client gets to send its request headers (also an idle keep-alive connection's
    /// wait for its next request) before the connection is closed.
    #[arg(long, default_value_t = 10.0)]
    pub header_read_timeout: f64,
    /// Seconds a client gets to send its request body (408 after).
    #[arg(long, default_value_t = 30.0)]
    pub body_read_timeout: f64,
    /// Open connections at most; more are closed at once.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds in-flight requests get to finish on SIGTERM / Ctrl-C before every connection is
    /// closed.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Log lines on stderr (one per request: id, method, path, status, latency, the error;
    /// prompt loads, reloads and removals): human-readable text or one JSON object per line.
    /// The level comes from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BatchingKind {
    Mixed,
    PerPrompt,
}

/// Which runtime executes the backbone, on which device, in which precision.
#[derive(Debug, Args, Clone)]
pub struct BackendArgs {
    /// Model: a Hugging Face directory (config.json, model.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Backend, among those compiled into this build: candle (default), tch (feature `tch`), ort
    /// (feature `ort`, forward only: train with --optimizer spsa or cma-es).
    #[arg(long, default_value = "candle")]
    pub backend: String,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the frozen weights: f32, f64, bf16, f16, quantized or quantized-exact
    /// (candle, CPU: a GGUF file's projection matrices stay in their blocks and compute in f32;
    /// `quantized` also rounds decode steps' activations to 8 bits, as llama.cpp does).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Intra-op threads of the backend (default: the runtime's own choice).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// How rows of the data set become model inputs.
#[derive(Debug, Args, Clone)]
pub struct TaskArgs {
    /// Task kind: classification rows {"text","label"} or generation rows {"input","target"}.
    #[arg(long, value_enum, default_value_t = TaskKind::Classification)]
    pub task: TaskKind,
    /// Input template with one {text} (or {input}) placeholder. Default: the prompt's own;
    /// train and eval without either are refused (bench: "Review: {text}\nSentiment:").
    #[arg(long)]
    pub template: Option<String>,
    /// Verbalizer as label=word pairs, e.g. "negative= negative,positive= positive".
    #[arg(long)]
    pub labels: Option<String>,
    /// Keep at most this many context tokens (the last ones).
    #[arg(long, default_value_t = 256)]
    pub max_context: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskKind {
    Classification,
    Generation,
    /// Images (`--images`) on a vision transformer (`--model` an `.onnx` file or a Dinov2Model
    /// folder), with `--method linear|vpt-shallow|vpt-deep`.
    ImageClassification,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InitKind {
    /// Embeddings of --init-text, tiled and truncated (PEFT's TEXT).
    Text,
    /// Embeddings of the label words, then sampled vocabulary rows (Lester et al.).
    Labels,
    /// Embeddings of sampled vocabulary rows.
    Vocab,
    /// Uniform in [-0.5, 0.5] (visual prompt tokens: VPT's uniform initialisation).
    Uniform,
    /// Visual prompt tokens (VPT-shallow/deep) start as the hidden states that patches of the
    /// training images have at each block's input.
    Patches,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodKind {
    /// Prompt tuning (Lester et al.): vectors prepended to the input embeddings.
    Prompt,
    /// Prefix tuning (Li & Liang; P-tuning v2): keys and values prepended at every layer.
    Prefix,
    /// P-tuning (Liu et al.): an encoder over virtual-token embeddings makes the prompt.
    PTuning,
    /// Images: a linear head on frozen class-token features (the baseline).
    Linear,
    /// Images: prompt tokens after the class token at the input, and a linear head.
    VptShallow,
    /// Images: fresh prompt tokens after the class token at every block, and a linear head.
    VptDeep,
    /// Images: a pattern added to the pixels in a frame (`--frame-width`), and a linear head.
    PixelFrame,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EncoderArg {
    /// Three linear layers with ReLU (PEFT's default).
    Mlp,
    /// A bidirectional LSTM, then a two-layer MLP.
    Lstm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleKind {
    Constant,
    /// Linear warmup over --warmup steps, then linear decay to zero.
    Linear,
}

#[derive(Debug, Args, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub task: TaskArgs,
    /// Training data (JSONL).
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Image data (`--task image-classification`): `fashion-mnist` (Debian's
    /// dataset-fashion-mnist, or $SOFTPROMPT_FASHION_MNIST), `digits` (scikit-learn's, from
    /// $SOFTPROMPT_DIGITS or .cache/assets/digits.csv.gz) or a folder with one sub-folder of
    /// PNG/JPEG images per class (`train/` and `test/` inside it, or every fifth image held out).
    #[arg(long)]
    pub images: Option<String>,
    /// Training images per class (`--task image-classification`).
    #[arg(long, default_value_t = 16)]
    pub shots: usize,
    /// Test images per class, a fixed balanced subset (`--task image-classification`).
    #[arg(long, default_value_t = 200)]
    pub test_per_class: usize,
    /// Input resolution of the vision transformer (224 native; 112 is 4× cheaper).
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Steps of the head alone, on the features under the initial prompt, before a visual
    /// prompt trains (a warm start: the prompt starts with a fitted head).
    #[arg(long, default_value_t = 300)]
    pub head_warmup: usize,
    /// Validation images per class (`--task image-classification`), drawn from the training
    /// split beside the shots (disjoint, the same shots as without them): evaluated after the
    /// head's warm start, every --eval-every steps and at the end; the best evaluation's prompt
    /// and head are kept (0: none, the last step's are).
    #[arg(long, default_value_t = 0)]
    pub val_per_class: usize,
    /// Width of the pixel frame of `--method pixel-frame` (default 30 px at 224, scaled).
    #[arg(long)]
    pub frame_width: Option<usize>,
    /// Learning rate of the linear head (`--task image-classification`).
    #[arg(long, default_value_t = 1e-2)]
    pub head_lr: f32,
    /// Development data (JSONL) for periodic evaluation, keep-best and early stopping.
    #[arg(long)]
    pub dev: Option<PathBuf>,
    /// Held-out test data (JSONL): zero-shot and tuned scores are reported on it.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Where to save the prompt (a PEFT adapter directory).
    #[arg(long)]
    pub output: PathBuf,
    /// Number of virtual tokens.
    #[arg(long, default_value_t = 20)]
    pub num_virtual_tokens: usize,
    /// Prompt-learning method (saved as PEFT's PROMPT_TUNING, PREFIX_TUNING or P_TUNING).
    #[arg(long, value_enum, default_value_t = MethodKind::Prompt)]
    pub method: MethodKind,
    /// --method prefix: train the prefix through an MLP of this hidden width (PEFT's
    /// prefix_projection with encoder_hidden_size); 0 trains the prefix directly.
    #[arg(long, default_value_t = 0)]
    pub prefix_projection: usize,
    /// --method p-tuning: the encoder (PEFT's encoder_reparameterization_type).
    #[arg(long, value_enum, default_value_t = EncoderArg::Mlp)]
    pub encoder: EncoderArg,
    /// --method p-tuning: the encoder's hidden width (default: the model's hidden size, as PEFT).
    #[arg(long)]
    pub encoder_hidden_size: Option<usize>,
    /// --method p-tuning --encoder lstm: LSTM layers.
    #[arg(long, default_value_t = 2)]
    pub encoder_num_layers: usize,
    /// Prompt initialisation (default: text). --method prefix (without --prefix-projection)
    /// takes it too when given (or when --init-text is): the prefix starts as the keys and values
    /// that prompt produces at every layer (Li & Liang's initialisation from real words'
    /// activations); without either it starts as PEFT's does (N(0, 1)), as P-tuning and the
    /// projected prefix always do (N(0, 1) embeddings, PyTorch's default linear initialisation).
    #[arg(long, value_enum)]
    pub init: Option<InitKind>,
    /// Text for --init text (default: "Classify as <label words joined by or>" for
    /// classification, the template's own words for generation).
    #[arg(long)]
    pub init_text: Option<String>,
    /// Optimizer: adamw, adafactor (Lester et al.: --lr 0.3), sgd; gradient-free (forward passes
    /// only, any backend): spsa (MeZO; --lr is its step size) or cma-es (Black-Box Tuning; --lr unused).
    /// Visual prompts: adamw or spsa (the head always takes AdamW at --head-lr).
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// spsa: perturbation scale ε.
    #[arg(long, default_value_t = 1e-2)]
    pub spsa_eps: f32,
    /// spsa: two-point estimates per step (2 candidates each).
    #[arg(long, default_value_t = 1)]
    pub spsa_perturbations: usize,
    /// cma-es: candidates per generation (all scored in one batched forward pass).
    #[arg(long, default_value_t = 20)]
    pub population: usize,
    /// cma-es: dimension of the random projection searched.
    #[arg(long, default_value_t = 500)]
    pub intrinsic_dim: usize,
    /// cma-es: initial step size σ₀.
    #[arg(long, default_value_t = 1.0)]
    pub sigma0: f64,
    /// Learning rate.
    #[arg(long, default_value_t = 0.03)]
    pub lr: f32,
    /// Weight decay (default: 0.01 AdamW, 1e-5 Adafactor, 0 SGD).
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Constant)]
    pub schedule: ScheduleKind,
    /// Warmup steps of --schedule linear.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 150)]
    pub steps: u64,
    /// Rows per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Gradient-norm clipping (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Evaluate on --dev every N steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Examples per scoring pass during evaluation.
    #[arg(long, default_value_t = 16)]
    pub eval_batch_size: usize,
    /// Stop after N evaluations without improvement.
    #[arg(long)]
    pub patience: Option<usize>,
    /// Seed of the initialisation and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Several runs, one per seed (e.g. 0,1,2), each saved to OUTPUT/seed-S; prints each run's
    /// report and then the mean and standard deviation of the test metric over the seeds.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["resume", "run_dir"])]
    pub seeds: Vec<u64>,
    /// Run directory for checkpoint.json and metrics.jsonl (default: OUTPUT/run).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 25)]
    pub checkpoint_every: u64,
    /// Continue from RUN_DIR/checkpoint.json.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub task: TaskArgs,
    /// Data to score (JSONL; with `--task image-classification` what `train --images` takes:
    /// `fashion-mnist`, `digits` or an image folder, whose test images are scored).
    #[arg(long)]
    pub data: PathBuf,
    /// Test images per class, a fixed balanced subset (`--task image-classification`).
    #[arg(long, default_value_t = 200)]
    pub test_per_class: usize,
    /// Prompt directory (PEFT layout); without it the plain model is scored (zero-shot).
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// Examples per scoring pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Prompt directory (PEFT layout); without it the plain model generates.
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// Input text (put through the prompt's template when it has one and --raw is not set).
    #[arg(long)]
    pub text: String,
    /// Use the text as is, without the prompt's template.
    #[arg(long)]
    pub raw: bool,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra stop token ids (the end-of-sequence token always stops).
    #[arg(long, value_delimiter = ',')]
    pub stop: Vec<u32>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A prompt directory, or a store directory holding several.
    pub path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model: a Hugging Face directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Data (JSONL): the first --batch-size examples form the train batch, the next
    /// --eval-examples the rank-classification set.
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub task: TaskArgs,
    /// Comma-separated backends (default: every backend compiled in).
    #[arg(long)]
    pub backends: Option<String>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the frozen weights: f32, f64, bf16, f16, quantized or quantized-exact
    /// (candle, CPU: a GGUF file's projection matrices stay in their blocks and compute in f32;
    /// `quantized` also rounds decode steps' activations to 8 bits, as llama.cpp does).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Intra-op threads of every backend.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Rows of the train batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Virtual tokens of the prompt.
    #[arg(long, default_value_t = 20)]
    pub num_virtual_tokens: usize,
    /// Examples scored for the rank-classification throughput (16 per pass).
    #[arg(long, default_value_t = 64)]
    pub eval_examples: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Tokens generated (greedy, KV cache) after the first train row for the decoding speed
    /// (0 skips it).
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: usize,
    /// Size n of the n × n f32 matrix product measured as the FLOP/s ceiling.
    #[arg(long, default_value_t = 1536)]
    pub matmul_size: usize,
    /// Write the token ids of both batches here (JSON) for tools/peft_bench.py.
    #[arg(long)]
    pub batch_out: Option<PathBuf>,
}
