//! Optimizers update a flat host slice of prompt values.

use crate::{Error, Result};

/// Whether an optimizer consumes gradients or only loss values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// Needs `Backbone::loss_and_grad`.
    Gradient,
    /// Needs only forward passes (`ask` / `tell`).
    GradientFree,
}

/// Updates prompt values in place. Prompts are tiny, so every optimizer works on host memory
/// and therefore with every backend.
pub trait Optimizer: Send {
    /// Name used in configs and messages (`adamw`, `sgd`, …).
    fn name(&self) -> &str;

    /// Gradient or gradient-free.
    fn kind(&self) -> OptimizerKind;

    /// One update from the gradient `grads` at learning rate `lr`.
    fn step(&mut self, _params: &mut [f32], _grads: &[f32], _lr: f32) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "optimizer `{}` is gradient-free: use ask/tell",
            self.name()
        )))
    }

    /// Gradient-free: the candidate parameter vectors to evaluate next.
    fn ask(&mut self, _params: &[f32]) -> Result<Vec<Vec<f32>>> {
        Err(Error::InvalidArgument(format!(
            "optimizer `{}` needs gradients: use step",
            self.name()
        )))
    }

    /// Gradient-free: updates `params` from the losses of the candidates of the last `ask`.
    fn tell(&mut self, _params: &mut [f32], _losses: &[f32], _lr: f32) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "optimizer `{}` needs gradients: use step",
            self.name()
        )))
    }

    /// Serializable state (moments, step count) for checkpoints.
    fn state(&self) -> serde_json::Value;

    /// Restores a state produced by [`Optimizer::state`].
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()>;
}
