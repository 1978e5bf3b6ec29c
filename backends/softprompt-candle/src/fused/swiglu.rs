//! SwiGLU, `silu(a) · u`, on the packed gate/up projection.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// `silu(a) ⊙ u` (Llama's gated MLP activation) of a packed `[.., 2·i]` input, the gate `a` in
/// the first half of the last dimension, `u` in the second: gate and up come from one matrix
/// product, and their input gradients go back through one.
pub(crate) struct SwiGlu;

pub(super) fn sigmoid<T: Elem>(a: T) -> T {
    (T::one() + (-a).exp()).recip()
}

pub(super) fn half_width(shape: &Shape) -> Result<usize> {
    let w = shape.dims().last().copied().unwrap_or(0);
    if w % 2 != 0 {
        candle_core::bail!("swiglu: packed width {w} is odd");
    }
    Ok(w / 2)
}

/// `silu(a) ⊙ u` of packed rows `[a | u]` of `2·i` values.
pub(super) fn swiglu_rows<T: Elem>(x: &[T], i: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len() / 2];
    y.par_chunks_mut(i)
        .zip(x.par_chunks(2 * i))
        .for_each(|(y, x)| {
            let (a, u) = x.split_at(i);
            for ((y, a), u) in y.iter_mut().zip(a).zip(u) {
                *y = *a * sigmoid(*a) * *u;
            }
        });
    y
}

pub(super) fn swiglu_fwd<T: Elem>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = view::<T>(s, l)?;
    let i = half_width(l.shape())?;
    let y = swiglu_rows(x, i);
    let mut out = l.shape().dims().to_vec();
    if let Some(last) = out.last_mut() {
        *last = i;
    }
    Ok((T::to_cpu_storage_owned(y), Shape::from(out)))
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, swiglu_fwd(s, l))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = x
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &SwiGluBwd)?;
        Ok(Some(dx))
    }
}

/// The packed input gradient of [`SwiGlu`]:
/// `∂a = g·u·σ(a)·(1 + a·(1 − σ(a)))`, `∂u = g·a·σ(a)`.
pub(super) struct SwiGluBwd;

/// The packed input gradient of [`swiglu_rows`] from its input and `∂L/∂y`.
pub(super) fn swiglu_bwd_rows<T: Elem>(x: &[T], g: &[T], i: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(2 * i)
        .zip(x.par_chunks(2 * i).zip(g.par_chunks(i)))
        .for_each(|(dx, (x, g))| {
            let (a, u) = x.split_at(i);
            let (da, du) = dx.split_at_mut(i);
            for j in 0..i {
                let s = sigmoid(a[j]);
                du[j] = g[j] * a[j] * s;
                da[j] = g[j] * u[j] * s * (T::one() + a[j] * (T::one() - s));
            }
        });
    dx
}

pub(super) fn swiglu_bwd<T: Elem>(
    (sx, lx): (&CpuStorage, &Layout),
    (sg, lg): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (view::<T>(sx, lx)?, view::<T>(sg, lg)?);
    let dx = swiglu_bwd_rows(x, g, half_width(lx.shape())?);
    Ok((T::to_cpu_storage_owned(dx), lx.shape().clone()))
}

impl CustomOp2 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, swiglu_bwd((s1, l1), (s2, l2)))
    }
}
