//! The shared softprompt trainer.
//!
//! [`Trainer`] tunes a [`softprompt_core::SoftPrompt`] against any
//! [`softprompt_core::Backbone`]: it never knows which runtime runs the model. Data come from
//! JSONL files through a [`data::Task`] (template + verbalizer); optimizers update host slices;
//! checkpoints make a killed run resumable to the same result.

pub mod checkpoint;
pub mod data;
pub mod encoder;
pub mod eval;
pub mod free;
pub mod optim;
pub mod trainer;
pub mod vision;

pub use checkpoint::{read_checkpoint, write_checkpoint, TrainState};
pub use data::{EncodedExample, EncodedSet, Task, Template, Verbalizer};
pub use encoder::{check_method, PromptEncoder};
pub use free::{CmaEs, Spsa};
pub use optim::{clip_grad_norm, Adafactor, AdamW, OptimizerChoice, Schedule, Sgd};
pub use trainer::{EvalRecord, Metric, TrainConfig, TrainOutcome, Trainer};
