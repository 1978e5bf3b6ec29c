//! libtorch's implementation of the op seam ([`softprompt_nn::Ops`]): the shared model files
//! run on `tch` tensors. Weights never require a gradient, so autograd only ever reaches the
//! prompt leaf a caller passes in.

use softprompt_core::{Error, HostTensor, Positions, Result};
use softprompt_nn::{Gelu, Heads, Linear, Ops, PositionIds, Rope};
use tch::{Device, Kind, TchError, Tensor};

use crate::to_core;

/// A `tch::Tensor` that clones as a handle (`shallow_clone`: the same storage), as the shared
/// model code expects of a tensor.
#[derive(Debug)]
pub struct Handle(pub Tensor);

impl Clone for Handle {
    fn clone(&self) -> Self {
        Handle(self.0.shallow_clone())
    }
}

impl From<Tensor> for Handle {
    fn from(t: Tensor) -> Self {
        Handle(t)
    }
}

/// libtorch tensors on one device in one kind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TchOps {
    pub device: Device,
    pub kind: Kind,
}

fn t<T>(r: std::result::Result<T, TchError>) -> Result<T> {
    r.map_err(to_core)
}

fn h(r: std::result::Result<Tensor, TchError>) -> Result<Handle> {
    r.map(Handle).map_err(to_core)
}

/// Hugging Face's `LlamaRMSNorm`: in f32, `x · rsqrt(mean(x²) + eps)`, back to the input kind,
/// times the weight.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> std::result::Result<Tensor, TchError> {
    let kind = x.kind();
    let xf = upcast(x)?;
    let var = xf.f_square()?.f_mean_dim(-1, true, None::<Kind>)?;
    let y = xf.f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?;
    y.f_to_kind(kind)?.f_mul(w)
}

fn upcast(x: &Tensor) -> std::result::Result<Tensor, TchError> {
    match x.kind() {
        Kind::Half | Kind::BFloat16 => x.f_to_kind(Kind::Float),
        _ => Ok(x.shallow_clone()),
    }
}

/// RoPE tables `[positions.len(), hd]` for `positions`, computed as transformers does (inverse
/// frequencies and angles in f32).
fn rope_tables(
    positions: &[usize],
    head_dim: usize,
    theta: f64,
    kind: Kind,
    device: Device,
) -> std::result::Result<(Tensor, Tensor), TchError> {
    let half = head_dim / 2;
    let len = positions.len();
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for &p in positions {
        let row: Vec<f64> = (0..half)
            .map(|i| {
                let inv = 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
                (p as f32 * inv) as f64
            })
            .collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos()));
            sin.extend(row.iter().map(|a| a.sin()));
        }
    }
    let shape = [len as i64, head_dim as i64];
    let table = |v: &[f64]| -> std::result::Result<Tensor, TchError> {
        Tensor::f_from_slice(v)?
            .f_view(shape)?
            .f_to_kind(kind)?
            .f_to_device(device)
    };
    Ok((table(&cos)?, table(&sin)?))
}

fn host_positions(positions: &PositionIds<'_, Handle>) -> Result<(Vec<usize>, usize, usize)> {
    match positions {
        PositionIds::Host { positions, tokens } => {
            let rows = match positions {
                Positions::From(_) => 1,
                Positions::PerRow(starts) => starts.len(),
            };
            Ok((positions.ids(*tokens), rows, *tokens))
        }
        PositionIds::Tensor(_) => Err(Error::unsupported(
            crate::BACKEND,
            "positions given as a tensor",
            Some("pass host positions"),
        )),
    }
}

impl Ops for TchOps {
    type Tensor = Handle;

    fn constant(&self, _name: &str, value: HostTensor) -> Result<Handle> {
        let dims: Vec<i64> = value.shape.iter().map(|d| *d as i64).collect();
        h(Tensor::f_from_slice(&value.data)
            .and_then(|t| t.f_view(dims.as_slice()))
            .and_then(|t| t.f_to_kind(self.kind))
            .and_then(|t| t.f_to_device(self.device)))
    }

    fn linear(&self, x: &Handle, layer: &Linear<Handle>) -> Result<Handle> {
        h(x.0.f_linear(&layer.w.0, layer.b.as_ref().map(|b| &b.0)))
    }

    fn head(&self, x: &Handle, table: &Handle) -> Result<Handle> {
        h(x.0.f_linear(&table.0, None::<&Tensor>))
    }

    fn embedding(&self, table: &Handle, ids: &Handle) -> Result<Handle> {
        let mut shape = ids.0.size();
        shape.push(table.0.size()[1]);
        let flat = t(ids.0.f_reshape([-1]))?;
        h(table
            .0
            .f_index_select(0, &flat)
            .and_then(|r| r.f_reshape(shape.as_slice())))
    }

    fn rms_norm(&self, x: &Handle, w: &Handle, eps: f64) -> Result<Handle> {
        h(rms_norm(&x.0, &w.0, eps))
    }

    fn layer_norm(&self, x: &Handle, w: &Handle, b: &Handle, eps: f64) -> Result<Handle> {
        let d = *x.0.size().last().unwrap_or(&0);
        h(x.0.f_layer_norm([d], Some(&w.0), Some(&b.0), eps, false))
    }

    fn rope_tables(
        &self,
        positions: &PositionIds<'_, Handle>,
        head_dim: usize,
        theta: f64,
        _max_positions: usize,
    ) -> Result<Rope<Handle>> {
        let (ids, rows, tokens) = host_positions(positions)?;
        let per_row = matches!(
            positions,
            PositionIds::Host {
                positions: Positions::PerRow(_),
                ..
            }
        );
        let (cos, sin) = t(rope_tables(&ids, head_dim, theta, self.kind, self.device))?;
        // `[s, hd]` broadcasts over rows and heads; per-row tables are `[rows, 1, s, hd]`
        let (cos, sin) = if per_row {
            let shape = [rows as i64, 1, tokens as i64, head_dim as i64];
            (t(cos.f_view(shape))?, t(sin.f_view(shape))?)
        } else {
            (cos, sin)
        };
        Ok(Rope {
            cos: Handle(cos),
            sin: Handle(sin),
            theta,
            per_row,
        })
    }

    fn rope(&self, x: &Handle, rope: &Rope<Handle>) -> Result<Handle> {
        let x = &x.0;
        let hd = x.size()[3];
        h((|| {
            let x1 = x.f_narrow(-1, 0, hd / 2)?;
            let x2 = x.f_narrow(-1, hd / 2, hd / 2)?;
            let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
            x.f_mul(&rope.cos.0)?.f_add(&rotated.f_mul(&rope.sin.0)?)
        })())
    }

    fn position_rows(&self, table: &Handle, positions: &PositionIds<'_, Handle>) -> Result<Handle> {
        let (ids, rows, tokens) = host_positions(positions)?;
        let d = table.0.size()[1];
        h((|| match positions {
            PositionIds::Host {
                positions: Positions::From(start),
                ..
            } => table.0.f_narrow(0, *start as i64, tokens as i64),
            _ => {
                let ids: Vec<i64> = ids.iter().map(|p| *p as i64).collect();
                let ids = Tensor::f_from_slice(&ids)?.f_to_device(self.device)?;
                table
                    .0
                    .f_index_select(0, &ids)?
                    .f_view([rows as i64, tokens as i64, d])
            }
        })())
    }

    /// libtorch's scaled dot-product attention (fused kernels where the device has them), each
    /// key/value head repeated for its query group.
    fn attention(
        &self,
        q: &Handle,
        k: &Handle,
        v: &Handle,
        bias: Option<&Handle>,
        _heads: Heads,
    ) -> Result<Handle> {
        let (qs, ks) = (q.0.size(), k.0.size());
        let (b, heads, s, hd) = (qs[0], qs[1], qs[2], qs[3]);
        let rep = heads / ks[1];
        h((|| {
            let repeat = |x: &Tensor| {
                if rep == 1 {
                    Ok(x.shallow_clone())
                } else {
                    x.f_repeat_interleave_self_int(rep, 1, None)
                }
            };
            Tensor::f_scaled_dot_product_attention(
                &q.0,
                &repeat(&k.0)?,
                &repeat(&v.0)?,
                bias.map(|b| &b.0),
                0.0,
                false,
                None,
                false,
            )?
            .f_transpose(1, 2)?
            .f_reshape([b, s, heads * hd])
        })())
    }

    fn add(&self, a: &Handle, b: &Handle) -> Result<Handle> {
        h(a.0.f_add(&b.0))
    }

    fn mul(&self, a: &Handle, b: &Handle) -> Result<Handle> {
        h(a.0.f_mul(&b.0))
    }

    fn silu(&self, x: &Handle) -> Result<Handle> {
        h(x.0.f_silu())
    }

    fn gelu(&self, x: &Handle, form: Gelu) -> Result<Handle> {
        h(x.0.f_gelu(match form {
            Gelu::Tanh => "tanh",
            Gelu::Erf => "none",
        }))
    }

    fn narrow(&self, x: &Handle, dim: usize, start: usize, len: usize) -> Result<Handle> {
        h(x.0.f_narrow(dim as i64, start as i64, len as i64))
    }

    fn cat(&self, xs: &[&Handle], dim: usize) -> Result<Handle> {
        let xs: Vec<&Tensor> = xs.iter().map(|x| &x.0).collect();
        h(Tensor::f_cat(&xs, dim as i64))
    }

    fn reshape(&self, x: &Handle, shape: &[i64]) -> Result<Handle> {
        let dims = x.0.size();
        let shape = shape
            .iter()
            .enumerate()
            .map(|(i, s)| match (*s, dims.get(i)) {
                (0, Some(d)) => Ok(*d),
                (0, None) => Err(Error::Shape(format!(
                    "reshape {dims:?} to {shape:?}: no dimension {i} to keep"
                ))),
                (s, _) => Ok(s),
            })
            .collect::<Result<Vec<i64>>>()?;
        h(x.0.f_reshape(shape.as_slice()))
    }

    fn permute(&self, x: &Handle, perm: &[usize]) -> Result<Handle> {
        let perm: Vec<i64> = perm.iter().map(|p| *p as i64).collect();
        h(x.0.f_permute(perm.as_slice()))
    }
}
