//! A DINOv2-style vision transformer (Hugging Face `Dinov2Model`): patch projection, class
//! token, learned positions (resized to the input's grid), pre-norm blocks with LayerScale and an
//! exact-GELU MLP, final LayerNorm; visual prompt tokens after the class token, at the input
//! (VPT-shallow) or fresh at every block (VPT-deep).

use softprompt_core::model::HostTensor;
use softprompt_core::vision::{positions_for, vit_names};
use softprompt_core::{Result, VitConfig};

use crate::loader::Loader;
use crate::models::gpt2::Norm;
use crate::ops::{Gelu, Heads, Linear, Ops, Pass, PositionIds};

/// One pre-norm block.
#[derive(Debug, Clone)]
pub struct VitBlock<T> {
    /// LayerNorm before attention.
    pub norm1: Norm<T>,
    /// q, k and v side by side.
    pub qkv: Linear<T>,
    /// Attention output projection.
    pub o: Linear<T>,
    /// LayerScale of the attention branch.
    pub ls1: Option<T>,
    /// LayerNorm before the MLP.
    pub norm2: Norm<T>,
    /// MLP up projection.
    pub fc1: Linear<T>,
    /// MLP down projection.
    pub fc2: Linear<T>,
    /// LayerScale of the MLP branch.
    pub ls2: Option<T>,
}

/// Where visual prompt tokens go, with their number `N`.
#[derive(Debug)]
pub enum VitPrompt<'a, T> {
    /// None (a linear probe's features).
    None,
    /// `[rows, N, d]` after the class token at the input.
    Shallow(&'a T, usize),
    /// `[rows, N, layers · d]`: block `l` replaces the prompt positions with columns
    /// `l·d..(l+1)·d`.
    Deep(&'a T, usize),
}

/// A vision transformer; the class token and position table stay on the host (the positions
/// depend on the input's resolution).
#[derive(Debug, Clone)]
pub struct Vit<T> {
    /// Hyper-parameters.
    pub cfg: VitConfig,
    /// Patch projection as a linear layer `[d, channels · p · p]`.
    pub patch: Linear<T>,
    /// Class token `[d]`.
    pub cls: Vec<f32>,
    /// Position table `[1, 1 + grid², d]`.
    pub positions: HostTensor,
    /// Blocks.
    pub blocks: Vec<VitBlock<T>>,
    /// Final LayerNorm.
    pub norm: Norm<T>,
}

impl<T: Clone> Vit<T> {
    /// Loads the weights under Hugging Face `Dinov2Model` names.
    pub fn load<O: Ops<Tensor = T>>(cfg: &VitConfig, l: &mut Loader<'_, O>) -> Result<Self> {
        cfg.check()?;
        let d = cfg.hidden_size;
        let norm = |l: &mut Loader<'_, O>, p: &str| -> Result<Norm<T>> {
            Ok(Norm {
                w: l.tensor(&format!("{p}.weight"), &[d])?,
                b: l.tensor(&format!("{p}.bias"), &[d])?,
            })
        };
        let (c, p) = (cfg.num_channels, cfg.patch_size);
        let patch = l.linear_flat(vit_names::PATCH, &[d, c, p, p])?;
        let cls = l.host(vit_names::CLS, &[1, 1, d])?.data;
        let g = cfg.grid();
        let positions = l.host(vit_names::POSITIONS, &[1, 1 + g * g, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let n = vit_names::layer(i);
            let att = format!("{n}.attention.attention");
            let scale = |l: &mut Loader<'_, O>, k: usize| -> Result<Option<T>> {
                if cfg.layerscale {
                    Ok(Some(
                        l.tensor(&format!("{n}.layer_scale{k}.lambda1"), &[d])?,
                    ))
                } else {
                    Ok(None)
                }
            };
            blocks.push(VitBlock {
                norm1: norm(l, &format!("{n}.norm1"))?,
                qkv: l.linear_cat(
                    &format!("{att}.qkv"),
                    &[
                        (&format!("{att}.query"), d),
                        (&format!("{att}.key"), d),
                        (&format!("{att}.value"), d),
                    ],
                    d,
                    cfg.qkv_bias,
                )?,
                o: l.linear(&format!("{n}.attention.output.dense"), d, d, true)?,
                ls1: scale(l, 1)?,
                norm2: norm(l, &format!("{n}.norm2"))?,
                fc1: l.linear(&format!("{n}.mlp.fc1"), cfg.intermediate_size, d, true)?,
                fc2: l.linear(&format!("{n}.mlp.fc2"), d, cfg.intermediate_size, true)?,
                ls2: scale(l, 2)?,
            });
        }
        let norm = norm(l, vit_names::FINAL_NORM)?;
        Ok(Vit {
            cfg: cfg.clone(),
            patch,
            cls,
            positions,
            blocks,
            norm,
        })
    }

    /// Attention geometry.
    pub fn heads(&self) -> Heads {
        let h = self.cfg.num_attention_heads;
        Heads {
            q: h,
            kv: h,
            dim: self.cfg.head_dim(),
        }
    }

    /// The class token plus its position (`[d]`) and the patch positions of a `grid × grid`
    /// input (`[grid², d]`), on the host.
    pub fn inputs_for(&self, grid: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (cls_pos, patches) = positions_for(&self.positions, self.cfg.grid(), grid, grid)?;
        let cls = self.cls.iter().zip(&cls_pos).map(|(a, b)| a + b).collect();
        Ok((cls, patches))
    }

    /// Non-overlapping patches `[rows, g², c·p·p]` of images `x [rows, c, g·p, g·p]`, each in
    /// the convolution weight's `(channel, y, x)` order, grid row-major (what
    /// [`softprompt_core::Images::patches`] does on the host, here in the graph so that a
    /// pattern added to the pixels gets a gradient).
    pub fn patchify<O: Ops<Tensor = T>>(&self, ops: &O, x: &T, grid: usize) -> Result<T> {
        let (c, p, g) = (
            self.cfg.num_channels as i64,
            self.cfg.patch_size as i64,
            grid as i64,
        );
        let x = ops.reshape(x, &[-1, c, g, p, g, p])?;
        let x = ops.permute(&x, &[0, 2, 4, 1, 3, 5])?;
        ops.reshape(&x, &[-1, g * g, c * p * p])
    }

    /// Class-token features after the final norm, `[rows, d]`, of `patches [rows, np, c·p·p]`;
    /// `cls [rows, 1, d]` is the class token plus its position and `positions [1, np, d]` the
    /// patch positions ([`Self::inputs_for`]). With `taps`, also pushes onto it the input of
    /// every block (`[rows, 1 + N + np, d]`: the embeddings, then each block's output but the
    /// last's; with VPT-deep, before the block's own prompt replaces the previous one's rows):
    /// the hidden states that visual prompt tokens can start from.
    #[allow(clippy::too_many_arguments)]
    pub fn features<O: Ops<Tensor = T>>(
        &self,
        ops: &O,
        patches: &T,
        np: usize,
        cls: &T,
        positions: &T,
        prompt: VitPrompt<'_, T>,
        mut taps: Option<&mut Vec<T>>,
    ) -> Result<T> {
        let c = &self.cfg;
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let x = ops.add(&ops.linear(patches, &self.patch)?, positions)?;
        let mut x = match prompt {
            VitPrompt::None => ops.cat(&[cls, &x], 1)?,
            VitPrompt::Shallow(p, _) => ops.cat(&[cls, p, &x], 1)?,
            VitPrompt::Deep(p, _) => ops.cat(&[cls, &ops.narrow(p, 2, 0, d)?, &x], 1)?,
        };
        let mut pass = Pass::new(PositionIds::Host {
            positions: softprompt_core::Positions::From(0),
            tokens: 0,
        });
        for (layer, b) in self.blocks.iter().enumerate() {
            // VPT-deep: this block's prompt takes the place of the previous block's
            let fresh = match (&prompt, layer > 0) {
                (VitPrompt::Deep(p, _), true) => Some(ops.narrow(p, 2, layer * d, d)?),
                _ => None,
            };
            let last = layer + 1 == self.blocks.len();
            if let Some(taps) = taps.as_deref_mut() {
                taps.push(x.clone());
            }
            if let Some(y) = ops.fused_vit_block(b, &x, self.heads(), eps, last, fresh.as_ref())? {
                x = y;
                continue;
            }
            if let (Some(fresh), VitPrompt::Deep(_, n)) = (&fresh, &prompt) {
                // [cls][the previous block's prompt][patches] -> [cls][this block's][patches]
                let head = ops.narrow(&x, 1, 0, 1)?;
                let tail = ops.narrow(&x, 1, 1 + *n, np)?;
                x = ops.cat(&[&head, fresh, &tail], 1)?;
            }
            let h = ops.layer_norm(&x, &b.norm1.w, &b.norm1.b, eps)?;
            let qkv = ops.linear(&h, &b.qkv)?;
            let att = ops.self_attention(&qkv, self.heads(), None, layer, &mut pass)?;
            let mut o = ops.linear(&att, &b.o)?;
            if let Some(s) = &b.ls1 {
                o = ops.mul(&o, s)?;
            }
            x = ops.add(&x, &o)?;
            let h = ops.layer_norm(&x, &b.norm2.w, &b.norm2.b, eps)?;
            let mut m = ops.linear(&ops.gelu(&ops.linear(&h, &b.fc1)?, Gelu::Erf)?, &b.fc2)?;
            if let Some(s) = &b.ls2 {
                m = ops.mul(&m, s)?;
            }
            x = ops.add(&x, &m)?;
        }
        // the class row (a fused last block may have returned it alone)
        let cls = ops.narrow(&x, 1, 0, 1)?;
        let f = ops.layer_norm(&cls, &self.norm.w, &self.norm.b, eps)?;
        ops.reshape(&f, &[-1, d as i64])
    }
}
