//! Hugging Face's rotary embedding on heads `[b, h, s, hd]`, with its backward (the inverse
//! rotation): for models whose heads are normed between the projection and RoPE (Gemma), where
//! the split-heads op cannot rotate.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// `x·cos + rotate_half(x)·sin` on `[b, h, s, hd]` with tables `[s, hd]` (shared positions) or
/// `[b, s, hd]` (per row); `inverse` rotates back (the backward pass).
pub(crate) struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub inverse: bool,
}

impl Rope {
    fn dims(&self, shape: &Shape) -> Result<(usize, usize, usize, usize)> {
        let (b, h, s, hd) = shape.dims4()?;
        let ok = hd % 2 == 0
            && match self.cos.dims() {
                [ts, thd] => *ts == s && *thd == hd,
                [tb, ts, thd] => *tb == b && *ts == s && *thd == hd,
                _ => false,
            };
        if !ok {
            candle_core::bail!("rope: table {:?} does not fit {shape:?}", self.cos.shape());
        }
        Ok((b, h, s, hd))
    }

    fn fwd<T: Elem>(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = view::<T>(st, l)?;
        let (_, h, s, hd) = self.dims(l.shape())?;
        let shared = self.cos.rank() == 2;
        let mut out = vec![T::zero(); x.len()];
        with_data::<T, _>(&self.cos, |c| {
            with_data::<T, _>(&self.sin, |sn| {
                let tables = Some((c, sn, shared));
                out.par_chunks_mut(hd)
                    .zip(x.par_chunks(hd))
                    .enumerate()
                    .for_each(|(i, (o, x))| {
                        // vector i is (row, head, position) = (i / (h·s), ·, i % s)
                        let (bi, si) = (i / (h * s), i % s);
                        let row = if shared { si } else { bi * s + si };
                        rotate(x, o, tables, row, self.inverse);
                    });
                Ok(())
            })
        })?;
        Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, fwd_of(self, s, l))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // a rotation's transpose is its inverse
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

fn fwd_of<T: Elem>(op: &Rope, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    op.fwd::<T>(s, l)
}
