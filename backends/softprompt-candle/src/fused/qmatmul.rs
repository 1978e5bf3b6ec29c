//! Products with frozen weights kept in GGUF's quantized blocks: `x · Wᵀ` and the input
//! gradient `g · W`, reading `W` a tile of rows at a time (dequantized into a buffer of at
//! most [`TILE_VALUES`] values, never the whole matrix) and multiplying each tile by every
//! input row with the same kernels as f32 weights: `gemm` for many rows, the few-rows kernel
//! (AVX2, detected at run time) for a decode step.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use softprompt_core::QuantMatrix;

use super::*;

/// Most values one dequantized tile holds (4 MiB of f32).
const TILE_VALUES: usize = 1 << 20;

/// Weight rows per parallel task of the few-rows path.
const FEW_ROWS_BLOCK: usize = 32;

/// Rows dequantized per parallel task when a tile is filled.
const DEQUANT_ROWS: usize = 16;

/// A frozen weight: f32/f64 values, or quantized blocks.
#[derive(Clone, Copy)]
pub(crate) enum Weight<'a, T> {
    Dense(&'a [T]),
    Quant(&'a QuantMatrix),
}

/// `x [m, k] · Wᵀ (+ b)`, `W [n, k]` dense or quantized.
pub(super) fn linear_w<T: Elem>(x: &[T], w: Weight<'_, T>, bias: Option<&[T]>, n: usize) -> Vec<T> {
    match w {
        Weight::Dense(w) => linear_rows(x, w, bias, n),
        Weight::Quant(q) => q_linear_rows(x, q, bias, false),
    }
}

/// `g [m, n] · W`, `W [n, k]` dense or quantized.
pub(super) fn linear_grad_w<T: Elem>(g: &[T], w: Weight<'_, T>, n: usize) -> Vec<T> {
    match w {
        Weight::Dense(w) => linear_grad(g, w, n),
        Weight::Quant(q) => q_linear_grad(g, q),
    }
}

/// Rows per tile for `k` columns.
fn tile_rows(k: usize, n: usize) -> usize {
    (TILE_VALUES / k.max(1)).clamp(1, n.max(1))
}

/// Rows `lo..hi` of `q` into `out` (`(hi − lo) · cols` values): AVX2 for Q4_0, Q4_1 and Q8_0
/// where the machine has it, the portable code otherwise.
fn dequantize_rows(q: &QuantMatrix, lo: usize, hi: usize, out: &mut [f32]) {
    q.dequantize_rows_with(lo, hi, out, |kind, bytes, dst| {
        if !super::qdot::dequantize(kind, bytes, dst) {
            kind.dequantize(bytes, dst);
        }
    });
}

/// Rows `lo..hi` of `q` as `T`, into `buf` (`(hi − lo) · k` values), in parallel.
fn dequantize_tile<T: Elem>(q: &QuantMatrix, lo: usize, hi: usize, buf: &mut [T]) {
    let k = q.cols;
    buf[..(hi - lo) * k]
        .par_chunks_mut(DEQUANT_ROWS * k)
        .enumerate()
        .for_each(|(i, chunk)| {
            let a = lo + i * DEQUANT_ROWS;
            let b = a + chunk.len() / k;
            if let Some(out) = T::as_f32_mut(chunk) {
                dequantize_rows(q, a, b, out);
            } else {
                let mut f = vec![0f32; chunk.len()];
                dequantize_rows(q, a, b, &mut f);
                for (c, v) in chunk.iter_mut().zip(&f) {
                    *c = T::from(*v).unwrap_or_else(T::zero);
                }
            }
        });
}

/// Calls `f(lo, hi, tile)` for consecutive runs of `W`'s rows, `tile` holding rows `lo..hi`
/// dequantized (`[hi − lo, k]`, in a per-thread scratch buffer of at most [`TILE_VALUES`]).
fn for_each_tile<T: Elem>(q: &QuantMatrix, mut f: impl FnMut(usize, usize, &[T])) {
    let (n, k) = (q.rows(), q.cols);
    let rows = tile_rows(k, n);
    T::with_scratch(rows * k, |buf| {
        for lo in (0..n).step_by(rows) {
            let hi = (lo + rows).min(n);
            dequantize_tile(q, lo, hi, buf);
            f(lo, hi, &buf[..(hi - lo) * k]);
        }
    });
}

/// `x [m, k] · Wᵀ (+ b)` with `W [n, k]` in quantized blocks; `int8_rows`: a few f32 rows go
/// through the 8-bit-activation kernel ([`super::qdot::linear_q8`]) where it applies.
pub(super) fn q_linear_rows<T: Elem>(
    x: &[T],
    q: &QuantMatrix,
    bias: Option<&[T]>,
    int8_rows: bool,
) -> Vec<T> {
    let (n, k) = (q.rows(), q.cols);
    let m = x.len() / k.max(1);
    assert!(x.len() == m * k, "quantized linear: sizes");
    let mut y = match T::as_f32(x) {
        Some(xf) if int8_rows && super::qdot::applies(q, m) => {
            Some(T::from_f32_vec(super::qdot::linear_q8(xf, q, m)))
        }
        Some(xf) if super::qdot::applies(q, m) => {
            Some(T::from_f32_vec(super::qdot::linear(xf, q, m)))
        }
        Some(xf) if m <= super::few_rows::MAX_ROWS => few_rows(xf, q, m).map(T::from_f32_vec),
        _ => None,
    }
    .unwrap_or_else(|| {
        let mut y = vec![T::zero(); m * n];
        for_each_tile(q, |lo, hi, tile| {
            // SAFETY: x is [m, k]; `tile` holds rows lo..hi of W ([hi - lo, k], read
            // transposed); y is [m, n] and columns lo..hi of it are written (row stride n)
            unsafe {
                matmul(
                    (m, hi - lo, k),
                    Out::rows(y.as_mut_ptr().add(lo), n),
                    false,
                    Mat::rows(x.as_ptr(), k),
                    Mat::t(tile.as_ptr(), k),
                    threads(),
                )
            };
        });
        y
    });
    if let Some(bias) = bias {
        y.par_chunks_mut(n)
            .for_each(|r| r.iter_mut().zip(bias).for_each(|(y, b)| *y += *b));
    }
    y
}

/// A decode step's product (`m ≤ MAX_ROWS`): blocks of weight rows dequantized per task and
/// multiplied by the few-rows kernel; `None` where that kernel does not run.
fn few_rows(x: &[f32], q: &QuantMatrix, m: usize) -> Option<Vec<f32>> {
    let (n, k) = (q.rows(), q.cols);
    let blocks: Vec<Option<Vec<f32>>> = (0..n.div_ceil(FEW_ROWS_BLOCK))
        .into_par_iter()
        .map(|b| {
            let lo = b * FEW_ROWS_BLOCK;
            let hi = (lo + FEW_ROWS_BLOCK).min(n);
            let mut w = vec![0f32; (hi - lo) * k];
            dequantize_rows(q, lo, hi, &mut w);
            let mut out = vec![0f32; (hi - lo) * m];
            super::few_rows::block_into(x, &w, m, k, &mut out).then_some(out)
        })
        .collect();
    let blocks: Option<Vec<Vec<f32>>> = blocks.into_iter().collect();
    Some(super::few_rows::gather_columns(
        &blocks?,
        m,
        n,
        FEW_ROWS_BLOCK,
    ))
}

/// `g [m, n] · W` with `W [n, k]` in quantized blocks: the input gradient of
/// [`q_linear_rows`], summed over tiles of `W`'s rows.
pub(super) fn q_linear_grad<T: Elem>(g: &[T], q: &QuantMatrix) -> Vec<T> {
    let (n, k) = (q.rows(), q.cols);
    let m = g.len() / n.max(1);
    assert!(g.len() == m * n, "quantized linear grad: sizes");
    let mut dx = vec![T::zero(); m * k];
    for_each_tile(q, |lo, hi, tile| {
        // SAFETY: g is [m, n] and its columns lo..hi are read (row stride n); `tile` holds rows
        // lo..hi of W ([hi - lo, k]); dx is [m, k]
        unsafe {
            matmul(
                (m, k, hi - lo),
                Out::rows(dx.as_mut_ptr(), k),
                lo > 0,
                Mat::rows(g.as_ptr().add(lo), n),
                Mat::rows(tile.as_ptr(), k),
                threads(),
            )
        };
    });
    dx
}

/// `x · Wᵀ` for a frozen quantized `W [n, k]` over the last dimension of `x`; the backward pass
/// computes only `∂L/∂x`, tile by tile.
pub(crate) struct QuantMatmul {
    pub q: std::sync::Arc<QuantMatrix>,
    /// Rounds a few f32 input rows to 8 bits (forward only; see [`super::qdot::linear_q8`]).
    pub int8_rows: bool,
}

fn quant_matmul_fwd<T: Elem>(
    q: &QuantMatrix,
    int8_rows: bool,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = view::<T>(s, l)?;
    let out = super::matmul::rows_shape(l, q.cols, q.rows(), "quantized matmul")?;
    let y = q_linear_rows(x, q, None, int8_rows);
    Ok((T::to_cpu_storage_owned(y), out))
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, quant_matmul_fwd(&self.q, self.int8_rows, s, l))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let mut dims = grad.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.q.cols;
        }
        let dev = grad.device().clone();
        let dx = match grad.dtype() {
            candle_core::DType::F32 => {
                let dx = with_data::<f32, _>(&grad, |g| Ok(q_linear_grad(g, &self.q)))?;
                Tensor::from_vec(dx, dims, &dev)?
            }
            candle_core::DType::F64 => {
                let dx = with_data::<f64, _>(&grad, |g| Ok(q_linear_grad(g, &self.q)))?;
                Tensor::from_vec(dx, dims, &dev)?
            }
            other => candle_core::bail!("quantized matmul: {other:?} gradients"),
        };
        Ok(Some(dx))
    }
}
