//! RMSNorm with its backward pass.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension, `w` frozen.
pub(crate) struct RmsNorm {
    pub w: Tensor,
    pub eps: f64,
}

/// RMSNorm of rows of `w.len()` values.
pub(super) fn rms_rows<T: Elem>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let eps = T::from(eps).expect("eps is finite");
    let dn = T::from(d).expect("dimension fits");
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
        let ms = x.iter().map(|v| *v * *v).sum::<T>() / dn;
        let r = (ms + eps).sqrt().recip();
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = *x * r * *w;
        }
    });
    y
}

pub(super) fn rms_fwd<T: Elem>(
    w: &Tensor,
    eps: f64,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = view::<T>(s, l)?;
    let y = with_data::<T, _>(w, |w| Ok(rms_rows(x, w, eps)))?;
    Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, rms_fwd(&self.w, self.eps, s, l))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = RmsNormBwd {
            w: self.w.clone(),
            eps: self.eps,
        };
        Ok(Some(
            x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?,
        ))
    }
}

/// `∂L/∂x` of [`RmsNorm`] from `x` and `∂L/∂y`:
/// `r·(g⊙w) − x·r³·Σ(g⊙w⊙x)/d` with `r = 1/sqrt(mean(x²) + eps)`.
pub(super) struct RmsNormBwd {
    pub(super) w: Tensor,
    pub(super) eps: f64,
}

/// `∂L/∂x` of [`rms_rows`] from `x` and `∂L/∂y`.
pub(super) fn rms_bwd_rows<T: Elem>(x: &[T], g: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let eps = T::from(eps).expect("eps is finite");
    let dn = T::from(d).expect("dimension fits");
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(g.par_chunks(d)))
        .for_each(|(dx, (x, g))| {
            let ms = x.iter().map(|v| *v * *v).sum::<T>() / dn;
            let r = (ms + eps).sqrt().recip();
            let dot = x
                .iter()
                .zip(g)
                .zip(w)
                .map(|((x, g), w)| *x * *g * *w)
                .sum::<T>();
            let c = r * r * r * dot / dn;
            for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                *dx = r * *g * *w - *x * c;
            }
        });
    dx
}

pub(super) fn rms_bwd<T: Elem>(
    w: &Tensor,
    eps: f64,
    (sx, lx): (&CpuStorage, &Layout),
    (sg, lg): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (view::<T>(sx, lx)?, view::<T>(sg, lg)?);
    let dx = with_data::<T, _>(w, |w| Ok(rms_bwd_rows(x, g, w, eps)))?;
    Ok((T::to_cpu_storage_owned(dx), lx.shape().clone()))
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, rms_bwd(&self.w, self.eps, (s1, l1), (s2, l2)))
    }
}
