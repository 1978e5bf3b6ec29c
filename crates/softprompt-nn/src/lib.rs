//! The op-level seam of softprompt and the model families written once above it.
//!
//! ```text
//!  models::{llama, gpt2}      one file per family, Hugging Face names, reads like the paper
//!          │  written against
//!          ▼
//!  Ops (this crate)           frozen linear, embedding, norms, RoPE, attention, element-wise,
//!          │                  shape ops; provided compositions a runtime may override
//!          ▼  implemented by
//!  candle (fused CPU kernels) · libtorch · ONNX graph builder (a tensor is a value name)
//! ```
//!
//! A runtime implements [`Ops`]; a model family is a file in [`models`]; [`Loader`] maps
//! Hugging Face tensor names to the runtime's frozen tensors once for every family.

mod loader;
pub mod models;
pub mod ops;

pub use loader::Loader;
pub use models::Model;
pub use ops::{Gelu, Heads, KeyValue, Linear, Ops, Pass, PositionIds, PreNormBlock, Rope};
