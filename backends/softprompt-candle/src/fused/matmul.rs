//! `x · Wᵀ` for a frozen `W`: only the input gradient is ever computed.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// `x [m, k] · Wᵀ` with `W [n, k]` frozen; the backward pass computes only `∂L/∂x = ∂L/∂y · W`
/// (a plain matmul's backward would also compute the weight gradient, as costly as the forward).
pub(crate) struct FrozenMatmul {
    pub w: Tensor,
}

pub(super) fn frozen_matmul_fwd<T: Elem>(
    w: &Tensor,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = view::<T>(s, l)?;
    let (n, wk) = w.dims2()?;
    let out = rows_shape(l, wk, n, "frozen-matmul")?;
    let y = with_data::<T, _>(w, |w| Ok(linear_rows(x, w, None, n)))?;
    Ok((T::to_cpu_storage_owned(y), out))
}

/// The output shape of a frozen product over the last dimension of an input laid out as `l`:
/// leading dimensions are rows, `[.., k]` → `[.., n]` (no reshape nodes in the graph); errors
/// unless the input has `k` columns.
pub(super) fn rows_shape(l: &Layout, k: usize, n: usize, what: &str) -> Result<Shape> {
    let dims = l.shape().dims();
    let (cols, lead) = dims
        .split_last()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: scalar input")))?;
    if *cols != k {
        candle_core::bail!("{what}: input has {cols} columns, weight {k}");
    }
    let mut out = lead.to_vec();
    out.push(n);
    Ok(Shape::from(out))
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, frozen_matmul_fwd(&self.w, s, l))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // one [rows, n] · [n, k] product (a batched product would run one small gemm per row)
        let dims = grad.dims();
        let n = dims.last().copied().unwrap_or(1);
        let g = grad.reshape((grad.elem_count() / n.max(1), n))?;
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = self.w.dim(1)?;
        }
        Ok(Some(g.matmul(&self.w)?.reshape(out)?))
    }
}

/// Most rows for which [`linear_rows`] has gemm write its product column-major.
pub(super) const COLUMN_MAJOR_ROWS: usize = 96;

/// `x [m, k] · Wᵀ (+ b)` with `W [n, k]`.
pub(super) fn linear_rows<T: Elem>(x: &[T], w: &[T], bias: Option<&[T]>, n: usize) -> Vec<T> {
    let k = w.len() / n;
    let m = x.len() / k;
    assert!(x.len() == m * k && w.len() == n * k, "linear: sizes");
    let mut y = match T::few_rows(x, w, n) {
        Some(y) => y,
        None => {
            // gemm writing the product column-major (`yᵀ [n, m]`) is 1.2-1.45× faster than
            // row-major for 5 to 64 rows on this kind of CPU (equal at 128, slower at 456):
            // up to COLUMN_MAJOR_ROWS rows, compute it so and transpose the small result
            let column_major = m <= COLUMN_MAJOR_ROWS;
            let mut buf = vec![T::zero(); m * n];
            let out = if column_major {
                Out::cols(buf.as_mut_ptr(), m)
            } else {
                Out::rows(buf.as_mut_ptr(), n)
            };
            // SAFETY: x is [m, k], w is [n, k] (read transposed), buf holds the [m, n] product
            // in either layout (asserted above)
            unsafe {
                matmul(
                    (m, n, k),
                    out,
                    false,
                    Mat::rows(x.as_ptr(), k),
                    Mat::t(w.as_ptr(), k),
                    threads(),
                )
            };
            if !column_major {
                buf
            } else {
                let mut y = vec![T::zero(); m * n];
                y.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
                    row.iter_mut()
                        .zip(buf[r..].iter().step_by(m))
                        .for_each(|(y, v)| *y = *v);
                });
                y
            }
        }
    };
    if let Some(bias) = bias {
        y.par_chunks_mut(n)
            .for_each(|r| r.iter_mut().zip(bias).for_each(|(y, b)| *y += *b));
    }
    y
}

/// `g [m, n] · W` with `W [n, k]`: the input gradient of [`linear_rows`].
pub(super) fn linear_grad<T: Elem>(g: &[T], w: &[T], n: usize) -> Vec<T> {
    let k = w.len() / n;
    let m = g.len() / n;
    assert!(g.len() == m * n && w.len() == n * k, "linear grad: sizes");
    let mut dx = vec![T::zero(); m * k];
    // SAFETY: g is [m, n], w is [n, k], dx is [m, k] (asserted above)
    unsafe {
        matmul(
            (m, k, n),
            Out::rows(dx.as_mut_ptr(), k),
            false,
            Mat::rows(g.as_ptr(), n),
            Mat::rows(w.as_ptr(), k),
            threads(),
        )
    };
    dx
}
