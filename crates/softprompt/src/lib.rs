//! softprompt: prompt tuning of frozen language models in Rust.
//!
//! This facade re-exports the core traits and types, the op seam and model families (`nn`), the
//! conformance contract, the prompt store, the trainer, each backend compiled in through its
//! Cargo feature (`candle` by default), and the HTTP server behind the `serve` feature.
//!
//! ```no_run
//! use softprompt::{load_backbone, Backbone};
//! let backbone = load_backbone("candle", "path/to/model", "cpu")?;
//! println!("{} with d = {}", backbone.spec().name, backbone.spec().hidden_size);
//! # Ok::<(), softprompt::Error>(())
//! ```

mod backends;

pub use backends::{
    available_backends, export_onnx, is_vision_model, load_backbone, load_backbone_with,
    load_model_config, load_model_source, load_quantized_model_source, load_tokenizer,
    load_vision_backbone, load_vision_source, matmul_flops, tch_cuda_available, BackendOptions,
    BACKENDS,
};
pub use softprompt_conformance as conformance;
pub use softprompt_core::*;
pub use softprompt_gguf as gguf;
pub use softprompt_nn as nn;
pub use softprompt_onnx as onnx;
#[cfg(feature = "serve")]
pub use softprompt_serve as serve;
pub use softprompt_store as store;
pub use softprompt_train as train;

#[cfg(feature = "candle")]
pub use softprompt_candle as candle;
#[cfg(feature = "ort")]
pub use softprompt_ort as ort;
#[cfg(feature = "tch")]
pub use softprompt_tch as tch;
