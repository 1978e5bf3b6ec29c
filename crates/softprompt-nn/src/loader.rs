//! One weight loader for every runtime: Hugging Face tensor names in, the runtime's frozen
//! tensors out.

use softprompt_core::{HostTensor, ModelWeights, Result};

use crate::ops::{Linear, Ops};

/// Takes weights out of a [`ModelWeights`] by Hugging Face name, checks their shapes and hands
/// them to the runtime ([`Ops::constant`], [`Ops::linear_weight`]).
#[derive(Debug)]
pub struct Loader<'a, O> {
    ops: &'a O,
    weights: &'a mut ModelWeights,
}

impl<'a, O: Ops> Loader<'a, O> {
    /// Loads from `weights` into `ops`' runtime.
    pub fn new(ops: &'a O, weights: &'a mut ModelWeights) -> Self {
        Loader { ops, weights }
    }

    /// Whether the checkpoint has `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(name)
    }

    /// The tensor `name` of shape `shape`.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<O::Tensor> {
        let t = self.weights.take(name, shape)?;
        self.ops.constant(name, t)
    }

    /// A host tensor of the model's own making (a scale, a table) as a frozen constant.
    pub fn constant(&mut self, name: &str, value: HostTensor) -> Result<O::Tensor> {
        self.ops.constant(name, value)
    }

    /// A norm weight `[len]` stored as `w` for a norm that scales by `1 + w` (Gemma): loaded as
    /// `1 + w`, so that the plain RMSNorm computes it.
    pub fn norm_plus_one(&mut self, name: &str, len: usize) -> Result<O::Tensor> {
        let mut t = self.weights.take(name, &[len])?;
        t.data.iter_mut().for_each(|x| *x += 1.0);
        self.ops.constant(name, t)
    }

    /// A Hugging Face `nn.Linear` under `prefix` (`weight [out, in]`, `bias [out]` if `bias`).
    pub fn linear(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear<O::Tensor>> {
        self.linear_cat(prefix, &[(prefix, out)], inp, bias)
    }

    /// Several linear layers over the same input as one (their outputs side by side): q, k and
    /// v, or gate and up, become one wider product. `name` names the fused weight.
    pub fn linear_cat(
        &mut self,
        name: &str,
        parts: &[(&str, usize)],
        inp: usize,
        bias: bool,
    ) -> Result<Linear<O::Tensor>> {
        if let Some(q) = self.quantized_cat(parts, inp)? {
            let w = self
                .ops
                .quantized_linear_weight(&format!("{name}.weight"), &q)?;
            let b = self.bias_cat(name, parts, bias)?;
            return Ok(Linear {
                w,
                b,
                quant: Some(std::sync::Arc::new(q)),
            });
        }
        let mut w = Vec::new();
        let mut b = Vec::new();
        for (prefix, out) in parts {
            w.extend(
                self.weights
                    .take(&format!("{prefix}.weight"), &[*out, inp])?
                    .data,
            );
            if bias {
                b.extend(self.weights.take(&format!("{prefix}.bias"), &[*out])?.data);
            }
        }
        let out: usize = parts.iter().map(|(_, o)| o).sum();
        let w = self.ops.linear_weight(
            &format!("{name}.weight"),
            HostTensor::new(vec![out, inp], w)?,
        )?;
        let b = if bias {
            let b = HostTensor::new(vec![out], b)?;
            Some(self.ops.constant(&format!("{name}.bias"), b)?)
        } else {
            None
        };
        Ok(Linear { w, b, quant: None })
    }

    /// The parts' weights stacked in their quantized blocks, when the runtime keeps them so and
    /// every part is held quantized (else `None` and nothing taken).
    fn quantized_cat(
        &mut self,
        parts: &[(&str, usize)],
        inp: usize,
    ) -> Result<Option<softprompt_core::QuantMatrix>> {
        let all = parts
            .iter()
            .all(|(prefix, _)| self.weights.is_quantized(&format!("{prefix}.weight")));
        if !self.ops.keeps_quantized() || !all {
            return Ok(None);
        }
        let mut stacked: Option<softprompt_core::QuantMatrix> = None;
        for (prefix, out) in parts {
            let name = format!("{prefix}.weight");
            let q = self
                .weights
                .take_quantized(&name, &[*out, inp])?
                .ok_or(softprompt_core::Error::MissingTensor { name })?;
            stacked = Some(match stacked {
                None => q,
                Some(s) => s.stack(q)?,
            });
        }
        Ok(stacked)
    }

    /// The parts' biases side by side, if `bias`.
    fn bias_cat(
        &mut self,
        name: &str,
        parts: &[(&str, usize)],
        bias: bool,
    ) -> Result<Option<O::Tensor>> {
        if !bias {
            return Ok(None);
        }
        let mut b = Vec::new();
        for (prefix, out) in parts {
            b.extend(self.weights.take(&format!("{prefix}.bias"), &[*out])?.data);
        }
        let len = b.len();
        let b = HostTensor::new(vec![len], b)?;
        Ok(Some(self.ops.constant(&format!("{name}.bias"), b)?))
    }

    /// A layer stored as `weight [out, ...]` (a convolution whose stride equals its kernel: a
    /// patch projection) as a linear layer `[out, rest]` over flattened inputs, with `bias [out]`.
    pub fn linear_flat(&mut self, prefix: &str, shape: &[usize]) -> Result<Linear<O::Tensor>> {
        let name = format!("{prefix}.weight");
        let w = self.weights.take(&name, shape)?;
        let out = shape.first().copied().unwrap_or(0);
        let inp = shape.iter().skip(1).product();
        let w = self
            .ops
            .linear_weight(&name, HostTensor::new(vec![out, inp], w.data)?)?;
        let b = self.tensor(&format!("{prefix}.bias"), &[out])?;
        Ok(Linear {
            w,
            b: Some(b),
            quant: None,
        })
    }

    /// A weight kept on the host as it is stored (a table the model reshapes per input).
    pub fn host(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        self.weights.take(name, shape)
    }

    /// GPT-2's `Conv1D` under `prefix`: `weight [in, out]` (transposed here to a linear layer's
    /// `[out, in]`) and `bias [out]`.
    pub fn conv1d(&mut self, prefix: &str, inp: usize, out: usize) -> Result<Linear<O::Tensor>> {
        let name = format!("{prefix}.weight");
        let w = self.weights.take(&name, &[inp, out])?;
        let mut t = vec![0f32; inp * out];
        for i in 0..inp {
            for o in 0..out {
                t[o * inp + i] = w.data[i * out + o];
            }
        }
        let w = self
            .ops
            .linear_weight(&name, HostTensor::new(vec![out, inp], t)?)?;
        let b = self.tensor(&format!("{prefix}.bias"), &[out])?;
        Ok(Linear {
            w,
            b: Some(b),
            quant: None,
        })
    }

    /// A table `[vocab, width]` (token embeddings, an untied output head) as a [`Linear`]
    /// without bias: in quantized blocks where the runtime keeps them and the checkpoint has
    /// them so, else f32.
    pub fn table(&mut self, name: &str, shape: &[usize]) -> Result<Linear<O::Tensor>> {
        if self.ops.keeps_quantized() && self.weights.is_quantized(name) {
            if let Some(q) = self.weights.take_quantized(name, shape)? {
                let w = self.ops.quantized_linear_weight(name, &q)?;
                return Ok(Linear {
                    w,
                    b: None,
                    quant: Some(std::sync::Arc::new(q)),
                });
            }
        }
        Ok(Linear {
            w: self.tensor(name, shape)?,
            b: None,
            quant: None,
        })
    }

    /// [`Loader::head`] over [`Loader::table`]s: the embeddings themselves when tied (sharing
    /// their blocks), else `name`.
    pub fn head_table(
        &mut self,
        name: &str,
        tied: bool,
        embedding: &Linear<O::Tensor>,
        shape: &[usize],
    ) -> Result<Linear<O::Tensor>> {
        if tied || !self.contains(name) {
            return Ok(embedding.clone());
        }
        self.table(name, shape)
    }

    /// The output head `[vocab, width]`: `lm_head.weight` unless the embeddings are tied (or the
    /// checkpoint has no separate head), in which case `embedding` itself.
    pub fn head(
        &mut self,
        name: &str,
        tied: bool,
        embedding: &O::Tensor,
        shape: &[usize],
    ) -> Result<O::Tensor> {
        if tied || !self.contains(name) {
            return Ok(embedding.clone());
        }
        self.tensor(name, shape)
    }
}
