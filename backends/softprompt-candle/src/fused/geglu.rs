//! GeGLU with tanh-GELU, `gelu(a) · u`, on the packed gate/up projection (Gemma's MLP).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// `gelu_tanh(a) ⊙ u` of a packed `[.., 2·i]` input (`a` the first half of the last dimension).
pub(crate) struct GeGlu;

/// `(gelu_tanh(a), d gelu_tanh / da)`.
fn gelu_and_slope<T: Elem>(a: T) -> (T, T) {
    let k = T::from(0.797_884_560_802_865_4_f64).expect("a float");
    let c = T::from(0.044715_f64).expect("a float");
    let half = T::from(0.5_f64).expect("a float");
    let three = T::from(3.0_f64).expect("a float");
    let t = (k * (a + c * a * a * a)).tanh();
    let g = half * a * (T::one() + t);
    let slope =
        half * (T::one() + t) + half * a * (T::one() - t * t) * k * (T::one() + three * c * a * a);
    (g, slope)
}

fn geglu_fwd<T: Elem>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = view::<T>(s, l)?;
    let i = half_width(l.shape())?;
    let mut y = vec![T::zero(); x.len() / 2];
    y.par_chunks_mut(i)
        .zip(x.par_chunks(2 * i))
        .for_each(|(y, x)| {
            let (a, u) = x.split_at(i);
            for ((y, a), u) in y.iter_mut().zip(a).zip(u) {
                *y = gelu_and_slope(*a).0 * *u;
            }
        });
    let mut out = l.shape().dims().to_vec();
    if let Some(last) = out.last_mut() {
        *last = i;
    }
    Ok((T::to_cpu_storage_owned(y), Shape::from(out)))
}

impl CustomOp1 for GeGlu {
    fn name(&self) -> &'static str {
        "fused-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, geglu_fwd(s, l))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = x
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &GeGluBwd)?;
        Ok(Some(dx))
    }
}

/// The packed input gradient of [`GeGlu`]: `∂a = g·u·gelu'(a)`, `∂u = g·gelu(a)`.
struct GeGluBwd;

fn geglu_bwd<T: Elem>(
    (sx, lx): (&CpuStorage, &Layout),
    (sg, lg): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (view::<T>(sx, lx)?, view::<T>(sg, lg)?);
    let i = half_width(lx.shape())?;
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(2 * i)
        .zip(x.par_chunks(2 * i).zip(g.par_chunks(i)))
        .for_each(|(dx, (x, g))| {
            let (a, u) = x.split_at(i);
            let (da, du) = dx.split_at_mut(i);
            for j in 0..i {
                let (ga, slope) = gelu_and_slope(a[j]);
                du[j] = g[j] * ga;
                da[j] = g[j] * u[j] * slope;
            }
        });
    Ok((T::to_cpu_storage_owned(dx), lx.shape().clone()))
}

impl CustomOp2 for GeGluBwd {
    fn name(&self) -> &'static str {
        "fused-geglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, geglu_bwd((s1, l1), (s2, l2)))
    }
}
