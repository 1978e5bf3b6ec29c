//! The shared model code ([`softprompt_nn::Model`]) on libtorch tensors.
//!
//! Every weight is created with `requires_grad = false`; only the prompt leaf passed by the
//! caller may require a gradient, so autograd never computes or stores a weight gradient.

use softprompt_core::{ModelConfig, ModelWeights, Positions};
use softprompt_nn::{Pass, PositionIds};
use tch::{Device, Kind, Tensor};

use crate::runtime::{Handle, TchOps};
use crate::{Result, TResult};

/// Cached keys and values of one layer, `[b, kv_heads, t, head_dim]` (after RoPE).
pub type LayerCache = Option<(Tensor, Tensor)>;

/// The additive attention biases of a pass: the full-attention layers', and the sliding-window
/// layers' when the model has them.
#[derive(Debug)]
pub struct Bias {
    pub global: Tensor,
    pub window: Option<Tensor>,
}

/// A frozen decoder of any family on one device in one kind.
pub struct Model {
    nn: softprompt_nn::Model<Handle>,
    ops: TchOps,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Model({} layers)", self.nn.num_layers())
    }
}

impl Model {
    pub fn load(
        config: &ModelConfig,
        mut weights: ModelWeights,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let ops = TchOps { device, kind };
        Ok(Model {
            nn: softprompt_nn::Model::load(&ops, config, &mut weights)?,
            ops,
        })
    }

    /// Token embeddings of `ids` (int64, any shape) as `ids.shape ++ [d]`.
    pub fn embed(&self, ids: &Tensor) -> TResult<Tensor> {
        Ok(self.nn.embed(&self.ops, &Handle(ids.shallow_clone()))?.0)
    }

    /// The residual stream after every block for input embeddings `x [b, s, d]` at positions
    /// `start..`, over and appending to `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        start: usize,
        mask: Option<&Bias>,
        cache: Option<&mut Vec<LayerCache>>,
    ) -> TResult<Tensor> {
        self.forward_at(x, Positions::From(start), mask, cache)
    }

    /// [`Model::forward`] with each row at its own positions.
    pub fn forward_at(
        &self,
        x: &Tensor,
        positions: Positions<'_>,
        mask: Option<&Bias>,
        cache: Option<&mut Vec<LayerCache>>,
    ) -> TResult<Tensor> {
        let tokens = x.size()[1] as usize;
        let window = mask.and_then(|m| m.window.as_ref().map(|w| Handle(w.shallow_clone())));
        let mask = mask.map(|m| Handle(m.global.shallow_clone()));
        let mut own: Option<Vec<Option<(Handle, Handle)>>> = cache.as_ref().map(|c| {
            c.iter()
                .map(|s| {
                    s.as_ref()
                        .map(|(k, v)| (Handle(k.shallow_clone()), Handle(v.shallow_clone())))
                })
                .collect()
        });
        let mut pass = Pass::new(PositionIds::Host { positions, tokens });
        pass.bias = mask.as_ref();
        pass.window_bias = window.as_ref();
        if let Some(own) = own.as_mut() {
            pass = pass.with_cache(own, true);
        }
        let h = self
            .nn
            .forward(&self.ops, &Handle(x.shallow_clone()), &mut pass)?;
        if let (Some(cache), Some(own)) = (cache, own) {
            *cache = own
                .into_iter()
                .map(|s| s.map(|(k, v)| (k.0, v.0)))
                .collect();
        }
        Ok(h.0)
    }

    /// Logits `[n, vocab]` of residual-stream rows `[n, d]` (final norm and head).
    pub fn head(&self, h: &Tensor) -> TResult<Tensor> {
        Ok(self.nn.logits(&self.ops, &Handle(h.shallow_clone()))?.0)
    }

    pub fn num_layers(&self) -> usize {
        self.nn.num_layers()
    }

    /// Attention geometry of every block.
    pub fn heads(&self) -> softprompt_nn::Heads {
        self.nn.heads()
    }
}
