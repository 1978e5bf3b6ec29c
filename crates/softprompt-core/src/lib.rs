//! Core traits and types of softprompt.
//!
//! A soft prompt is `N` learnable vectors of the backbone's hidden size that are prepended to the
//! embedded input of a frozen language model. This crate defines what every runtime implements
//! ([`Backbone`]), how prompts are persisted ([`PromptStore`]) and how they are updated
//! ([`Optimizer`]), plus the model description (config, weights, tokenizer) shared by all
//! backends. It depends on no runtime.

pub mod backbone;
pub mod batch;
pub mod collective;
pub mod decode;
pub mod error;
pub mod generate;
pub mod mask;
pub mod model;
pub mod optimizer;
pub mod prompt;
pub mod quant;
pub mod rng;
pub mod spec;
pub mod store;
pub mod tokenizer;
pub mod vision;

pub use backbone::{Backbone, Capabilities, DecodeSession, LossAndGrad, RowScores};
pub use batch::{input_rows, prompt_slots, Batch, BatchRow, Positions};
pub use collective::{shard, Collective, SingleProcess, ThreadGroup};
pub use decode::{
    batch_decoder, BatchDecoder, Batcher, DecodeKernels, OneSequence, PrefillPlan, SeqId,
    SessionDecoder,
};
pub use error::{Error, Result};
pub use generate::{generate, GenerationOutput, GenerationParams, StopReason};
pub use mask::{causal_bias, AttentionMask, MASKED_BIAS};
pub use model::{
    Architecture, Gemma3Config, Gpt2Config, HostTensor, LlamaConfig, ModelConfig, ModelSource,
    ModelWeights,
};
pub use optimizer::{Optimizer, OptimizerKind};
pub use prompt::{EncoderKind, Placement, PrefixCache, PromptInit, PromptMethod, SoftPrompt};
pub use quant::{QuantKind, QuantMatrix, QuantSegment};
pub use rng::Rng;
pub use spec::BackboneSpec;
pub use store::{process_alive, PromptConfig, PromptInfo, PromptStore, StoredPrompt};
pub use tokenizer::{HfTokenizer, TextTokenizer};
pub use vision::{Images, VisionBackbone, VisionSource, VitConfig};
