//! Fused CPU kernels (f32 and f64) with hand-written backward passes.
//!
//! candle's autograd records every elementary op of a composition (RMSNorm is six ops, softmax
//! five), keeps each op's output alive until the backward pass, and accumulates every gradient
//! into a fresh zero tensor. On the CPU that bookkeeping, not the matrix products, dominated a
//! training step. These ops compute a whole block in one pass over the data, store only their
//! inputs for the backward pass, and compute that backward in one pass too. The matrix products
//! inside them go straight to `gemm` (the crate candle itself calls), on the rows of the
//! tensors in place: no transposed or packed copies. Independent rows / heads run on rayon's
//! pool (`RAYON_NUM_THREADS`, like candle's own kernels).
//!
//! Each op is checked against the composition it replaces and against central finite
//! differences in the tests at the bottom of this file.

#![allow(unsafe_code)] // gemm takes raw pointers; every block states why its offsets are in bounds

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};
use gemm::Parallelism;
use num_traits::Float;
use rayon::prelude::*;

/// Element types the fused kernels run on.
pub(crate) trait Elem:
    WithDType + Float + Send + Sync + std::iter::Sum + std::ops::AddAssign + std::ops::MulAssign
{
    /// `x [m, k] · Wᵀ` (`W [n, k]`) by a kernel for a few rows, where there is one for this
    /// type and machine; `None` leaves it to `gemm`.
    fn few_rows(_x: &[Self], _w: &[Self], _n: usize) -> Option<Vec<Self>> {
        None
    }
}
impl Elem for f32 {
    fn few_rows(x: &[f32], w: &[f32], n: usize) -> Option<Vec<f32>> {
        few_rows::linear(x, w, n)
    }
}
impl Elem for f64 {}

/// Frozen-weight products of 1 to [`few_rows::MAX_ROWS`] rows (a decode step of a few
/// sequences): `gemm` pads such a product to its 16-row micro-kernel, so two rows cost about
/// twice one. This kernel streams each weight row once and multiplies it into every input row
/// (AVX2 + FMA, detected at run time; elsewhere `gemm` keeps the job).
mod few_rows {
    use rayon::prelude::*;

    /// Most rows this kernel takes.
    pub(super) const MAX_ROWS: usize = 4;

    /// Output columns per parallel task.
    const BLOCK: usize = 64;

    pub(super) fn linear(x: &[f32], w: &[f32], n: usize) -> Option<Vec<f32>> {
        let k = w.len() / n.max(1);
        let m = x.len() / k.max(1);
        if n == 0 || k == 0 || k % 8 != 0 || m == 0 || m > MAX_ROWS || !detected() {
            return None;
        }
        assert!(
            x.len() == m * k && w.len() == n * k,
            "few-rows linear: sizes"
        );
        // each task: BLOCK columns, column-major `[cols, m]`
        let blocks: Vec<Vec<f32>> = w
            .par_chunks(BLOCK * k)
            .map(|wb| {
                let mut out = vec![0f32; wb.len() / k * m];
                // SAFETY: `detected()` checked AVX2 and FMA; `x` is [m, k] and `wb` [cols, k]
                // with k a multiple of 8 (asserted above), `out` is [cols, m]
                unsafe { avx2::block(x, wb, m, k, &mut out) };
                out
            })
            .collect();
        let mut y = vec![0f32; m * n];
        for (b, out) in blocks.iter().enumerate() {
            for (j, col) in out.chunks(m).enumerate() {
                for (r, v) in col.iter().enumerate() {
                    y[r * n + b * BLOCK + j] = *v;
                }
            }
        }
        Some(y)
    }

    #[cfg(target_arch = "x86_64")]
    fn detected() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn detected() -> bool {
        false
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        /// # Safety
        /// AVX2 and FMA present; `x` is `[m, k]`, `w` `[cols, k]`, `k % 8 == 0`, `out` is
        /// `[cols, m]`, `1 ≤ m ≤ 4`.
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn block(x: &[f32], w: &[f32], m: usize, k: usize, out: &mut [f32]) {
            match m {
                1 => rows::<1>(x, w, k, out),
                2 => rows::<2>(x, w, k, out),
                3 => rows::<3>(x, w, k, out),
                _ => rows::<4>(x, w, k, out),
            }
        }

        /// Two weight rows at a time against all `M` input rows: 2·M accumulators in registers.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn rows<const M: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
            assert!(w.len() % k == 0 && x.len() >= M * k && out.len() >= w.len() / k * M);
            let cols = w.len() / k;
            let (xp, wp) = (x.as_ptr(), w.as_ptr());
            let mut o = 0;
            while o < cols {
                let two = o + 1 < cols;
                let w0 = wp.add(o * k);
                let w1 = if two { wp.add((o + 1) * k) } else { w0 };
                let mut a0 = [_mm256_setzero_ps(); M];
                let mut a1 = [_mm256_setzero_ps(); M];
                let mut kk = 0;
                while kk < k {
                    let v0 = _mm256_loadu_ps(w0.add(kk));
                    let v1 = _mm256_loadu_ps(w1.add(kk));
                    for r in 0..M {
                        let xv = _mm256_loadu_ps(xp.add(r * k + kk));
                        a0[r] = _mm256_fmadd_ps(xv, v0, a0[r]);
                        a1[r] = _mm256_fmadd_ps(xv, v1, a1[r]);
                    }
                    kk += 8;
                }
                for r in 0..M {
                    out[o * M + r] = hsum(a0[r]);
                    if two {
                        out[(o + 1) * M + r] = hsum(a1[r]);
                    }
                }
                o += 2;
            }
        }

        #[target_feature(enable = "avx2,fma")]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    mod avx2 {
        /// Never called: [`super::detected`] is false off x86-64.
        pub(super) unsafe fn block(_: &[f32], _: &[f32], _: usize, _: usize, _: &mut [f32]) {
            unreachable!("few-rows kernel without AVX2")
        }
    }
}

/// Whether the fused kernels handle tensors like `t` (CPU, f32 or f64).
pub(crate) fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The contiguous slice of a storage a layout describes.
fn view<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernel needs contiguous inputs".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Runs `f` on the contiguous data of a captured (frozen) tensor.
fn with_data<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    match &*guard {
        Storage::Cpu(cpu) => f(view::<T>(cpu, layout)?),
        _ => candle_core::bail!("fused kernel: tensor is not on the CPU"),
    }
}

fn threads() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}
impl<T> Shared<T> {
    fn at(self, offset: usize) -> *mut T {
        // SAFETY (of callers): offsets stay inside the buffer the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

/// Row-major strides of one matrix operand: element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: usize,
    cs: usize,
}

impl<T> Mat<T> {
    fn rows(ptr: *const T, rs: usize) -> Self {
        Mat { ptr, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    fn t(ptr: *const T, rs: usize) -> Self {
        Mat { ptr, rs: 1, cs: rs }
    }
}

/// Where a product goes: a pointer and its row and column strides.
struct Out<T> {
    ptr: *mut T,
    rs: usize,
    cs: usize,
}

impl<T> Out<T> {
    /// Row-major with row stride `rs`.
    fn rows(ptr: *mut T, rs: usize) -> Self {
        Out { ptr, rs, cs: 1 }
    }
    /// Column-major with column stride `cs` (the transpose lies row-major).
    fn cols(ptr: *mut T, cs: usize) -> Self {
        Out { ptr, rs: 1, cs }
    }
}

/// `dst [m, n] = a [m, k] · b [k, n]`, or `+=` with `accumulate`.
///
/// # Safety
/// Every pointer must address a buffer that holds the described matrix.
unsafe fn matmul<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: Out<T>,
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        dst.cs as isize,
        dst.rs as isize,
        accumulate,
        a.ptr,
        a.cs as isize,
        a.rs as isize,
        b.ptr,
        b.cs as isize,
        b.rs as isize,
        if accumulate { T::one() } else { T::zero() },
        T::one(),
        false,
        false,
        false,
        par,
    )
}

macro_rules! dispatch {
    ($storage:expr, $f:ident ( $($arg:expr),* )) => {
        match $storage {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("fused kernels run on f32 and f64"),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// x · Wᵀ for a frozen W

/// `x [m, k] · Wᵀ` with `W [n, k]` frozen; the backward pass computes only `∂L/∂x = ∂L/∂y · W`
/// (a plain matmul's backward would also compute the weight gradient, as costly as the forward).
pub(crate) struct FrozenMatmul {
    pub w: Tensor,
}

fn frozen_matmul_fwd<T: Elem>(
    w: &Tensor,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = view::<T>(s, l)?;
    // leading dimensions are rows: `[.., k]` → `[.., n]` without reshape nodes in the graph
    let dims = l.shape().dims();
    let (k, lead) = dims
        .split_last()
        .ok_or_else(|| candle_core::Error::Msg("frozen-matmul: scalar input".into()))?;
    let k = *k;
    let (n, wk) = w.dims2()?;
    if wk != k {
        candle_core::bail!("frozen-matmul: input has {k} columns, weight {wk}");
    }
    let y = with_data::<T, _>(w, |w| Ok(linear_rows(x, w, None, n)))?;
    let mut out = lead.to_vec();
    out.push(n);
    Ok((T::to_cpu_storage_owned(y), Shape::from(out)))
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

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension, `w` frozen.
pub(crate) struct RmsNorm {
    pub w: Tensor,
    pub eps: f64,
}

/// RMSNorm of rows of `w.len()` values.
fn rms_rows<T: Elem>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
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

fn rms_fwd<T: Elem>(
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
struct RmsNormBwd {
    w: Tensor,
    eps: f64,
}

/// `∂L/∂x` of [`rms_rows`] from `x` and `∂L/∂y`.
fn rms_bwd_rows<T: Elem>(x: &[T], g: &[T], w: &[T], eps: f64) -> Vec<T> {
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

fn rms_bwd<T: Elem>(
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

// ---------------------------------------------------------------------------------------------
// SwiGLU: silu(a) · u on the packed gate/up projection

/// `silu(a) ⊙ u` (Llama's gated MLP activation) of a packed `[.., 2·i]` input, the gate `a` in
/// the first half of the last dimension, `u` in the second: gate and up come from one matrix
/// product, and their input gradients go back through one.
pub(crate) struct SwiGlu;

fn sigmoid<T: Elem>(a: T) -> T {
    (T::one() + (-a).exp()).recip()
}

fn half_width(shape: &Shape) -> Result<usize> {
    let w = shape.dims().last().copied().unwrap_or(0);
    if w % 2 != 0 {
        candle_core::bail!("swiglu: packed width {w} is odd");
    }
    Ok(w / 2)
}

/// `silu(a) ⊙ u` of packed rows `[a | u]` of `2·i` values.
fn swiglu_rows<T: Elem>(x: &[T], i: usize) -> Vec<T> {
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

fn swiglu_fwd<T: Elem>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
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
struct SwiGluBwd;

/// The packed input gradient of [`swiglu_rows`] from its input and `∂L/∂y`.
fn swiglu_bwd_rows<T: Elem>(x: &[T], g: &[T], i: usize) -> Vec<T> {
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

fn swiglu_bwd<T: Elem>(
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

// ---------------------------------------------------------------------------------------------
// Heads: the fused q/k/v projection split into heads, with RoPE

/// Splits a fused projection `[b, s, (h + 2·kv)·hd]` into `q [b, h, s, hd]`, `k [b, kv, s, hd]`
/// and `v [b, kv, s, hd]` (concatenated flat in that order), applying Hugging Face's rotary
/// embedding (`x·cos + rotate_half(x)·sin`) to `q` and `k` when `rope` is set. Replaces three
/// transposed copies and two seven-op RoPE compositions per layer.
pub(crate) struct SplitHeads {
    pub h: usize,
    pub kv: usize,
    pub hd: usize,
    /// `cos`, `sin`, each `[s, hd]` (every row at the same positions) or `[b, s, hd]`.
    pub rope: Option<(Tensor, Tensor)>,
}

impl SplitHeads {
    /// `(b, s)` of an input layout, checked against the heads and tables.
    fn dims(&self, shape: &Shape) -> Result<(usize, usize)> {
        let (b, s, w) = shape.dims3()?;
        if w != (self.h + 2 * self.kv) * self.hd || self.hd % 2 != 0 {
            candle_core::bail!(
                "split-heads: width {w} is not ({} + 2·{})·{}",
                self.h,
                self.kv,
                self.hd
            );
        }
        if let Some((cos, _)) = &self.rope {
            let ok = match cos.dims() {
                [ts, thd] => *ts == s && *thd == self.hd,
                [tb, ts, thd] => *tb == b && *ts == s && *thd == self.hd,
                _ => false,
            };
            if !ok {
                candle_core::bail!("split-heads: rope table {:?} does not fit", cos.shape());
            }
        }
        Ok((b, s))
    }

    /// Runs `f` with the rope tables (or none) as slices.
    fn with_tables<T: Elem, R>(&self, f: impl FnOnce(Tables<'_, T>) -> Result<R>) -> Result<R> {
        match &self.rope {
            None => f(None),
            Some((cos, sin)) => {
                let shared = cos.rank() == 2;
                with_data::<T, _>(cos, |c| with_data::<T, _>(sin, |s| f(Some((c, s, shared)))))
            }
        }
    }
}

/// Where [`split_heads_into`] puts the heads: `q [b, h, s, hd]`, and `k`, `v` at key positions
/// `t_off..t_off + s` of `[b, kv, t, hd]` buffers (after a cached prefix of `t_off` keys).
#[derive(Clone, Copy)]
struct HeadLayout {
    b: usize,
    s: usize,
    h: usize,
    kv: usize,
    hd: usize,
    t: usize,
    t_off: usize,
}

impl HeadLayout {
    /// Buffer (0 q, 1 k, 2 v) and offset of row `bi`, position `si`, head `j` of `h + 2·kv`.
    fn at(&self, bi: usize, si: usize, j: usize) -> (usize, usize) {
        let (h, kv, hd) = (self.h, self.kv, self.hd);
        if j < h {
            (0, ((bi * h + j) * self.s + si) * hd)
        } else {
            let (which, head) = if j < h + kv {
                (1, j - h)
            } else {
                (2, j - h - kv)
            };
            (which, ((bi * kv + head) * self.t + self.t_off + si) * hd)
        }
    }
}

/// The rope tables as slices, and whether they are shared by every row (`[s, hd]`).
type Tables<'a, T> = Option<(&'a [T], &'a [T], bool)>;

/// Rotates (or copies, for `v` and without tables) one head vector.
fn rotate<T: Elem>(x: &[T], o: &mut [T], tables: Tables<'_, T>, row: usize, inverse: bool) {
    match tables {
        Some((cos, sin, _)) => {
            let hd = x.len();
            let half = hd / 2;
            let (c, sn) = (&cos[row * hd..][..hd], &sin[row * hd..][..hd]);
            for i in 0..half {
                if inverse {
                    o[i] = x[i] * c[i] + x[i + half] * sn[i + half];
                    o[i + half] = x[i + half] * c[i + half] - x[i] * sn[i];
                } else {
                    o[i] = x[i] * c[i] - x[i + half] * sn[i];
                    o[i + half] = x[i + half] * c[i + half] + x[i] * sn[i + half];
                }
            }
        }
        None => o.copy_from_slice(x),
    }
}

/// Splits rows `[b·s, (h + 2·kv)·hd]` into the heads of `q`, `k`, `v` (see [`HeadLayout`]),
/// rotating `q` and `k` with the tables.
fn split_heads_into<T: Elem>(x: &[T], l: HeadLayout, tables: Tables<'_, T>, out: [&mut [T]; 3]) {
    let heads = l.h + 2 * l.kv;
    let width = heads * l.hd;
    let [q, k, v] = out;
    let dst = [
        Shared(q.as_mut_ptr()),
        Shared(k.as_mut_ptr()),
        Shared(v.as_mut_ptr()),
    ];
    let lens = [q.len(), k.len(), v.len()];
    (0..l.b * heads).into_par_iter().for_each(|task| {
        let (bi, j) = (task / heads, task % heads);
        for si in 0..l.s {
            let (which, at) = l.at(bi, si, j);
            assert!(
                at + l.hd <= lens[which],
                "split-heads: head outside its buffer"
            );
            // SAFETY: in bounds (asserted); each task writes the vectors of its own (row, head)
            let o = unsafe { std::slice::from_raw_parts_mut(dst[which].at(at), l.hd) };
            let xr = &x[(bi * l.s + si) * width + j * l.hd..][..l.hd];
            let row = match tables {
                Some((_, _, true)) => si,
                _ => bi * l.s + si,
            };
            rotate(
                xr,
                o,
                if j < l.h + l.kv { tables } else { None },
                row,
                false,
            );
        }
    });
}

/// The backward of [`split_heads_into`]: rows `[b·s, (h + 2·kv)·hd]` from the head gradients,
/// the rotation inverted.
fn split_heads_grad<T: Elem>(grads: [&[T]; 3], l: HeadLayout, tables: Tables<'_, T>) -> Vec<T> {
    let heads = l.h + 2 * l.kv;
    let width = heads * l.hd;
    let mut dx = vec![T::zero(); l.b * l.s * width];
    dx.par_chunks_mut(width).enumerate().for_each(|(r, dxr)| {
        let (bi, si) = (r / l.s, r % l.s);
        for (j, o) in dxr.chunks_mut(l.hd).enumerate() {
            let (which, at) = l.at(bi, si, j);
            let gr = &grads[which][at..at + l.hd];
            let row = match tables {
                Some((_, _, true)) => si,
                _ => r,
            };
            rotate(gr, o, if j < l.h + l.kv { tables } else { None }, row, true);
        }
    });
    dx
}

/// One sequence's attention in a decode step over its own token-major caches
/// (`[len, kv, hd]`, see the candle backend's `HostCache`): rotates the new token's q and k heads
/// (`row`, one row of the fused q/k/v projection) with that position's `cos`/`sin` (`[hd]`),
/// appends its keys and values to `kc`/`vc`, and writes the attention output `[h·hd]` to `out`.
pub(crate) fn decode_attention_row(
    row: &[f32],
    (h, kv, hd): (usize, usize, usize),
    (cos, sin): (&[f32], &[f32]),
    (kc, vc): (&mut Vec<f32>, &mut Vec<f32>),
    out: &mut [f32],
) {
    let tables = Some((cos, sin, true));
    let mut q = vec![0f32; h * hd];
    for (j, qh) in q.chunks_mut(hd).enumerate() {
        rotate(&row[j * hd..][..hd], qh, tables, 0, false);
    }
    let at = kc.len();
    kc.resize(at + kv * hd, 0.0);
    for (j, kh) in kc[at..].chunks_mut(hd).enumerate() {
        rotate(&row[(h + j) * hd..][..hd], kh, tables, 0, false);
    }
    vc.extend_from_slice(&row[(h + kv) * hd..][..kv * hd]);
    let (t, rep) = (kc.len() / (kv * hd), h / kv);
    let scale = 1.0 / (hd as f32).sqrt();
    // the `rep` query heads of one key/value head together: each cached key and value is read
    // once per kv head, not once per query head
    let mut p = vec![0f32; rep * t];
    for (kh, o) in out.chunks_mut(rep * hd).enumerate() {
        let qs = &q[kh * rep * hd..][..rep * hd];
        for tt in 0..t {
            let k = &kc[(tt * kv + kh) * hd..][..hd];
            for (r, qh) in qs.chunks(hd).enumerate() {
                p[r * t + tt] = dot(qh, k) * scale;
            }
        }
        p.chunks_mut(t).for_each(softmax_in_place);
        o.fill(0.0);
        for tt in 0..t {
            let v = &vc[(tt * kv + kh) * hd..][..hd];
            for (r, or) in o.chunks_mut(hd).enumerate() {
                let w = p[r * t + tt];
                or.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
            }
        }
    }
}

/// `a · b` with eight partial sums, so that the compiler vectorizes it (a plain iterator sum is
/// sequential: float addition does not reassociate).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn split_heads_fwd<T: Elem>(
    op: &SplitHeads,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = view::<T>(s, l)?;
    let (b, sl) = op.dims(l.shape())?;
    let hl = HeadLayout {
        b,
        s: sl,
        h: op.h,
        kv: op.kv,
        hd: op.hd,
        t: sl,
        t_off: 0,
    };
    let mut out = vec![T::zero(); x.len()];
    let (nq, nk) = (b * op.h * sl * op.hd, b * op.kv * sl * op.hd);
    op.with_tables::<T, _>(|tables| {
        let (q, rest) = out.split_at_mut(nq);
        let (k, v) = rest.split_at_mut(nk);
        split_heads_into(x, hl, tables, [q, k, v]);
        Ok(())
    })?;
    Ok((T::to_cpu_storage_owned(out), Shape::from(x.len())))
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "fused-split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, split_heads_fwd(self, s, l))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = SplitHeadsBwd {
            fwd: SplitHeads {
                h: self.h,
                kv: self.kv,
                hd: self.hd,
                rope: self.rope.clone(),
            },
            shape: arg.shape().clone(),
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The backward of [`SplitHeads`]: heads gathered back into `[b, s, (h + 2·kv)·hd]`, RoPE
/// inverted (the rotation by `-sin`).
struct SplitHeadsBwd {
    fwd: SplitHeads,
    shape: Shape,
}

fn split_heads_bwd<T: Elem>(
    op: &SplitHeadsBwd,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let g = view::<T>(s, l)?;
    let f = &op.fwd;
    let (b, sl) = f.dims(&op.shape)?;
    let hl = HeadLayout {
        b,
        s: sl,
        h: f.h,
        kv: f.kv,
        hd: f.hd,
        t: sl,
        t_off: 0,
    };
    let (nq, nk) = (b * f.h * sl * f.hd, b * f.kv * sl * f.hd);
    let dx = f.with_tables::<T, _>(|tables| {
        let (q, rest) = g.split_at(nq);
        let (k, v) = rest.split_at(nk);
        Ok(split_heads_grad([q, k, v], hl, tables))
    })?;
    Ok((T::to_cpu_storage_owned(dx), op.shape.clone()))
}

impl CustomOp1 for SplitHeadsBwd {
    fn name(&self) -> &'static str {
        "fused-split-heads-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, split_heads_bwd(self, s, l))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Scaled dot-product attention of `q [b, h, s, hd]` over `k, v [b, kv, t, hd]` (grouped
/// queries: head `j` reads key/value head `j / (h / kv)`) plus an additive `bias [1 or b, 1, s,
/// t]`, returning `[b, s, h, hd]` (the layout the output projection reads, no transpose). Per
/// (row, head): `softmax(scale·q·kᵀ + bias)·v`, the probabilities never stored: the backward
/// pass recomputes them from `q`, `k` (as flash attention does).
pub(crate) struct Attention {
    pub bias: Option<Tensor>,
    pub scale: f64,
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    s: usize,
    t: usize,
    hd: usize,
    /// Rows of the bias (1: shared by every batch row).
    bias_rows: usize,
}

impl Dims {
    fn of(q: &Shape, k: &Shape, bias: Option<&Tensor>) -> Result<Self> {
        let (b, h, s, hd) = q.dims4()?;
        let (kb, kv, t, khd) = k.dims4()?;
        if kb != b || khd != hd || kv == 0 || h % kv != 0 {
            candle_core::bail!("attention: q {q:?} and k {k:?} do not fit");
        }
        let bias_rows = match bias {
            None => 0,
            Some(bias) => {
                let (bb, one, bs, bt) = bias.dims4()?;
                if one != 1 || bs != s || bt != t || (bb != 1 && bb != b) {
                    candle_core::bail!(
                        "attention: bias {:?} does not fit [{b}, 1, {s}, {t}]",
                        bias.shape()
                    );
                }
                bb
            }
        };
        Ok(Dims {
            b,
            h,
            kv,
            s,
            t,
            hd,
            bias_rows,
        })
    }

    fn q_at(&self, bi: usize, hi: usize) -> usize {
        (bi * self.h + hi) * self.s * self.hd
    }
    fn kv_at(&self, bi: usize, ki: usize) -> usize {
        (bi * self.kv + ki) * self.t * self.hd
    }
    /// Start of row `bi`, head `hi` in the `[b, s, h, hd]` output (rows `h·hd` apart).
    fn out_at(&self, bi: usize, hi: usize) -> usize {
        (bi * self.s * self.h + hi) * self.hd
    }
    fn bias_at(&self, bi: usize) -> usize {
        if self.bias_rows == 1 {
            0
        } else {
            bi * self.s * self.t
        }
    }
}

/// `p [s, t] = softmax(scale·q·kᵀ + bias)` for one (row, head).
///
/// # Safety
/// `q` addresses `[s, hd]`, `k` `[t, hd]`, both row-major.
unsafe fn probabilities<T: Elem>(
    d: &Dims,
    q: *const T,
    k: *const T,
    bias: Option<&[T]>,
    scale: T,
    p: &mut [T],
) {
    let (s, t, hd) = (d.s, d.t, d.hd);
    matmul(
        (s, t, hd),
        Out::rows(p.as_mut_ptr(), t),
        false,
        Mat::rows(q, hd),
        Mat::t(k, hd),
        Parallelism::None,
    );
    for (i, row) in p.chunks_mut(t).enumerate() {
        match bias {
            Some(bias) => {
                for (x, b) in row.iter_mut().zip(&bias[i * t..(i + 1) * t]) {
                    *x = *x * scale + *b;
                }
            }
            None => row.iter_mut().for_each(|x| *x *= scale),
        }
        softmax_in_place(row);
    }
}

/// `row ← softmax(row)`, shifted by its maximum.
fn softmax_in_place<T: Elem>(row: &mut [T]) {
    let max = row.iter().copied().fold(T::neg_infinity(), Float::max);
    let mut sum = T::zero();
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = sum.recip();
    row.iter_mut().for_each(|x| *x *= inv);
}

impl Dims {
    /// Panics unless the slices have the sizes these dimensions describe (the raw-pointer
    /// arithmetic of the attention kernels relies on it).
    fn check<T>(&self, q: &[T], k: &[T], v: &[T], bias: Option<&[T]>) {
        assert_eq!(
            q.len(),
            self.b * self.h * self.s * self.hd,
            "attention: q size"
        );
        assert_eq!(
            k.len(),
            self.b * self.kv * self.t * self.hd,
            "attention: k size"
        );
        assert_eq!(v.len(), k.len(), "attention: v size");
        if let Some(bias) = bias {
            assert_eq!(
                bias.len(),
                self.bias_rows * self.s * self.t,
                "attention: bias size"
            );
        }
    }
}

/// Attention output `[b, s, h, hd]` (see [`Attention`]).
fn attention_rows<T: Elem>(
    d: &Dims,
    (q, k, v): (&[T], &[T], &[T]),
    bias: Option<&[T]>,
    scale: T,
) -> Vec<T> {
    d.check(q, k, v, bias);
    let mut out = vec![T::zero(); d.b * d.s * d.h * d.hd];
    let dst = Shared(out.as_mut_ptr());
    let rep = d.h / d.kv;
    (0..d.b * d.h).into_par_iter().for_each_init(
        || vec![T::zero(); d.s * d.t],
        |p, task| {
            let (bi, hi) = (task / d.h, task % d.h);
            let kv_at = d.kv_at(bi, hi / rep);
            let bias = bias.map(|b| &b[d.bias_at(bi)..d.bias_at(bi) + d.s * d.t]);
            // SAFETY: the sizes are checked above, so the offsets from `Dims` stay inside q,
            // k, v and out; each task writes its own (row, head) block of `out`
            unsafe {
                probabilities(
                    d,
                    q.as_ptr().add(d.q_at(bi, hi)),
                    k.as_ptr().add(kv_at),
                    bias,
                    scale,
                    p,
                );
                matmul(
                    (d.s, d.hd, d.t),
                    Out::rows(dst.at(d.out_at(bi, hi)), d.h * d.hd),
                    false,
                    Mat::rows(p.as_ptr(), d.t),
                    Mat::rows(v.as_ptr().add(kv_at), d.hd),
                    Parallelism::None,
                );
            }
        },
    );
    out
}

fn attention_fwd<T: Elem>(
    op: &Attention,
    (sq, lq): (&CpuStorage, &Layout),
    (sk, lk): (&CpuStorage, &Layout),
    (sv, lv): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let d = Dims::of(lq.shape(), lk.shape(), op.bias.as_ref())?;
    if lv.shape() != lk.shape() {
        candle_core::bail!(
            "attention: v {:?} differs from k {:?}",
            lv.shape(),
            lk.shape()
        );
    }
    let (q, k, v) = (view::<T>(sq, lq)?, view::<T>(sk, lk)?, view::<T>(sv, lv)?);
    let scale = T::from(op.scale).expect("scale is finite");
    let out = match &op.bias {
        Some(b) => with_data::<T, _>(b, |b| Ok(attention_rows(&d, (q, k, v), Some(b), scale)))?,
        None => attention_rows(&d, (q, k, v), None, scale),
    };
    Ok((
        T::to_cpu_storage_owned(out),
        Shape::from((d.b, d.s, d.h, d.hd)),
    ))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, attention_fwd(self, (s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = AttentionBwd {
            q: q.contiguous()?,
            bias: self.bias.clone(),
            scale: self.scale,
        };
        let all = k
            .contiguous()?
            .apply_op3_no_bwd(&v.contiguous()?, &grad.contiguous()?, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The three input gradients of [`Attention`] (flat `[dq | dk | dv]`) from `k`, `v` and
/// `∂L/∂out`, with `q` captured: per (row, key/value head), for each of its query heads,
/// `P` recomputed, `dV += Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − rowsum(dO·Vᵀ ⊙ P))`,
/// `dQ = scale·dS·K`, `dK += scale·dSᵀ·Q`.
struct AttentionBwd {
    q: Tensor,
    bias: Option<Tensor>,
    scale: f64,
}

/// The input gradients of [`attention_rows`], flat `[dq | dk | dv]` (see [`AttentionBwd`]).
fn attention_grads<T: Elem>(
    d: &Dims,
    (q, k, v): (&[T], &[T], &[T]),
    g: &[T],
    bias: Option<&[T]>,
    scale: T,
) -> Vec<T> {
    d.check(q, k, v, bias);
    assert_eq!(g.len(), q.len(), "attention: output gradient size");
    let (nq, nk) = (d.b * d.h * d.s * d.hd, d.b * d.kv * d.t * d.hd);
    let mut all = vec![T::zero(); nq + 2 * nk];
    let dst = Shared(all.as_mut_ptr());
    let rep = d.h / d.kv;
    (0..d.b * d.kv).into_par_iter().for_each_init(
        || (vec![T::zero(); d.s * d.t], vec![T::zero(); d.s * d.t]),
        |(p, dp), task| {
            let (bi, ki) = (task / d.kv, task % d.kv);
            let kv_at = d.kv_at(bi, ki);
            let bias = bias.map(|b| &b[d.bias_at(bi)..d.bias_at(bi) + d.s * d.t]);
            // SAFETY: sizes checked above, so offsets from `Dims` stay inside their buffers; each task writes
            // the dq blocks of its own query heads and its own dk/dv block
            unsafe {
                let (kp, vp) = (k.as_ptr().add(kv_at), v.as_ptr().add(kv_at));
                let (dk, dv) = (dst.at(nq + kv_at), dst.at(nq + nk + kv_at));
                for hi in ki * rep..(ki + 1) * rep {
                    let qp = q.as_ptr().add(d.q_at(bi, hi));
                    let go = g.as_ptr().add(d.out_at(bi, hi));
                    probabilities(d, qp, kp, bias, scale, p);
                    // dV += Pᵀ · dO
                    let first = hi == ki * rep;
                    let no = Parallelism::None;
                    matmul(
                        (d.t, d.hd, d.s),
                        Out::rows(dv, d.hd),
                        !first,
                        Mat::t(p.as_ptr(), d.t),
                        Mat::rows(go, d.h * d.hd),
                        no,
                    );
                    // dP = dO · Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)), times scale
                    matmul(
                        (d.s, d.t, d.hd),
                        Out::rows(dp.as_mut_ptr(), d.t),
                        false,
                        Mat::rows(go, d.h * d.hd),
                        Mat::t(vp, d.hd),
                        no,
                    );
                    for (dp, p) in dp.chunks_mut(d.t).zip(p.chunks(d.t)) {
                        let dot = dp.iter().zip(p).map(|(a, b)| *a * *b).sum::<T>();
                        for (x, p) in dp.iter_mut().zip(p) {
                            *x = *p * (*x - dot) * scale;
                        }
                    }
                    // dQ = dS · K; dK += dSᵀ · Q
                    matmul(
                        (d.s, d.hd, d.t),
                        Out::rows(dst.at(d.q_at(bi, hi)), d.hd),
                        false,
                        Mat::rows(dp.as_ptr(), d.t),
                        Mat::rows(kp, d.hd),
                        no,
                    );
                    matmul(
                        (d.t, d.hd, d.s),
                        Out::rows(dk, d.hd),
                        !first,
                        Mat::t(dp.as_ptr(), d.t),
                        Mat::rows(qp, d.hd),
                        no,
                    );
                }
            }
        },
    );
    all
}

fn attention_bwd<T: Elem>(
    op: &AttentionBwd,
    (sk, lk): (&CpuStorage, &Layout),
    (sv, lv): (&CpuStorage, &Layout),
    (sg, lg): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let d = Dims::of(op.q.shape(), lk.shape(), op.bias.as_ref())?;
    let (k, v, g) = (view::<T>(sk, lk)?, view::<T>(sv, lv)?, view::<T>(sg, lg)?);
    let scale = T::from(op.scale).expect("scale is finite");
    let all = with_data::<T, _>(&op.q, |q| match &op.bias {
        Some(b) => with_data::<T, _>(b, |b| Ok(attention_grads(&d, (q, k, v), g, Some(b), scale))),
        None => Ok(attention_grads(&d, (q, k, v), g, None, scale)),
    })?;
    let n = all.len();
    Ok((T::to_cpu_storage_owned(all), Shape::from(n)))
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, attention_bwd(self, (s1, l1), (s2, l2), (s3, l3)))
    }
}

// ---------------------------------------------------------------------------------------------
// A whole Llama decoder layer over token rows that attend to a cached prefix (training)

/// The frozen weights of one Llama decoder layer, as the model holds them.
#[derive(Clone)]
pub(crate) struct LayerWeights {
    pub input_norm: Tensor,
    /// `[(h + 2·kv)·hd, d]` and its bias
    pub qkv: (Tensor, Option<Tensor>),
    /// `[d, h·hd]`
    pub o: (Tensor, Option<Tensor>),
    pub post_norm: Tensor,
    /// `[2·i, d]`, gate rows then up rows
    pub gate_up: (Tensor, Option<Tensor>),
    /// `[d, i]`
    pub down: (Tensor, Option<Tensor>),
    pub eps: f64,
    pub heads: (usize, usize, usize),
}

/// One Llama decoder layer as one op: token rows `x [b, s, d]` attending to a prefix of cached
/// keys/values `pk, pv [b, kv, n, hd]` (the soft prompt's, which carry its gradient) and to
/// themselves under `bias [1 or b, 1, s, n + s]`, RoPE at positions `n..n + s`. Returns the
/// layer's output `[b, s, d]`; the backward pass gives `∂x` (when `x` is tracked), `∂pk`, `∂pv`.
///
/// Built from the same slice kernels as the single ops above, but the graph gets one node per
/// layer instead of ~20: candle's backward allocates a zero tensor and adds into it for every
/// edge of the graph, which cost more than a tenth of a training step. The activations the
/// backward pass needs are kept in the op (`saved`) between the two passes.
pub(crate) struct TokenLayer {
    pub w: LayerWeights,
    /// `cos`, `sin`: `[s, hd]`
    pub rope: (Tensor, Tensor),
    pub bias: Tensor,
    pub saved: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// What the backward pass of [`TokenLayer`] reads: `q` (roped), `k`/`v` (prefix + tokens),
/// the residual stream after attention, and the gate/up projection (no weight gradients, so
/// neither normed input nor the attention output is needed).
struct Saved<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    x2: Vec<T>,
    gu: Vec<T>,
}

/// Most rows for which [`linear_rows`] has gemm write its product column-major.
const COLUMN_MAJOR_ROWS: usize = 96;

/// `x [m, k] · Wᵀ (+ b)` with `W [n, k]`.
fn linear_rows<T: Elem>(x: &[T], w: &[T], bias: Option<&[T]>, n: usize) -> Vec<T> {
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
fn linear_grad<T: Elem>(g: &[T], w: &[T], n: usize) -> Vec<T> {
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

fn add_into<T: Elem>(acc: &mut [T], x: &[T]) {
    acc.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, x)| *a += *x));
}

/// Slices of every tensor in `ts` (CPU, contiguous), for `f`.
fn with_all<T: Elem, R>(ts: &[&Tensor], f: impl FnOnce(&[&[T]]) -> Result<R>) -> Result<R> {
    let held: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(held.len());
    for (guard, layout) in &held {
        match &**guard {
            Storage::Cpu(cpu) => slices.push(view::<T>(cpu, layout)?),
            _ => candle_core::bail!("fused layer: tensor is not on the CPU"),
        }
    }
    f(&slices)
}

impl TokenLayer {
    /// The layer's tensors in a fixed order for [`with_all`]; optional biases at the end.
    fn tensors(&self) -> Vec<&Tensor> {
        let w = &self.w;
        let mut ts = vec![
            &w.input_norm,
            &w.qkv.0,
            &w.o.0,
            &w.post_norm,
            &w.gate_up.0,
            &w.down.0,
            &self.rope.0,
            &self.rope.1,
            &self.bias,
        ];
        for b in [&w.qkv.1, &w.o.1, &w.gate_up.1, &w.down.1]
            .into_iter()
            .flatten()
        {
            ts.push(b);
        }
        ts
    }

    /// Splits [`Self::tensors`]' slices back into named parts.
    fn parts<'a, T>(&self, t: &[&'a [T]]) -> Parts<'a, T> {
        let w = &self.w;
        let mut extra = t[9..].iter().copied();
        let mut bias_of = |b: &Option<Tensor>| b.as_ref().and_then(|_| extra.next());
        Parts {
            input_norm: t[0],
            qkv: t[1],
            o: t[2],
            post_norm: t[3],
            gate_up: t[4],
            down: t[5],
            cos: t[6],
            sin: t[7],
            bias: t[8],
            qkv_b: bias_of(&w.qkv.1),
            o_b: bias_of(&w.o.1),
            gate_up_b: bias_of(&w.gate_up.1),
            down_b: bias_of(&w.down.1),
        }
    }

    fn dims(&self, x: &Shape, pk: &Shape) -> Result<(Dims, HeadLayout, usize, usize)> {
        let (b, s, d) = x.dims3()?;
        let (h, kv, hd) = self.w.heads;
        let (pb, pkv, n, phd) = pk.dims4()?;
        if pb != b || pkv != kv || phd != hd {
            candle_core::bail!("fused layer: prefix {pk:?} does not fit {x:?}");
        }
        let q_shape = Shape::from((b, h, s, hd));
        let k_shape = Shape::from((b, kv, n + s, hd));
        let dims = Dims::of(&q_shape, &k_shape, Some(&self.bias))?;
        let hl = HeadLayout {
            b,
            s,
            h,
            kv,
            hd,
            t: n + s,
            t_off: n,
        };
        let inter = self.w.gate_up.0.dim(0)? / 2;
        Ok((dims, hl, d, inter))
    }
}

struct Parts<'a, T> {
    input_norm: &'a [T],
    qkv: &'a [T],
    o: &'a [T],
    post_norm: &'a [T],
    gate_up: &'a [T],
    down: &'a [T],
    cos: &'a [T],
    sin: &'a [T],
    bias: &'a [T],
    qkv_b: Option<&'a [T]>,
    o_b: Option<&'a [T]>,
    gate_up_b: Option<&'a [T]>,
    down_b: Option<&'a [T]>,
}

/// Copies `prefix [b, kv, n, hd]` into positions `0..n` of `full [b, kv, n + s, hd]`.
fn place_prefix<T: Elem>(
    full: &mut [T],
    prefix: &[T],
    blocks: usize,
    n: usize,
    t: usize,
    hd: usize,
) {
    for blk in 0..blocks {
        full[blk * t * hd..][..n * hd].copy_from_slice(&prefix[blk * n * hd..][..n * hd]);
    }
}

fn token_layer_fwd<T: Elem>(
    op: &TokenLayer,
    (sx, lx): (&CpuStorage, &Layout),
    (sk, lk): (&CpuStorage, &Layout),
    (sv, lv): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (d, hl, dm, inter) = op.dims(lx.shape(), lk.shape())?;
    if lv.shape() != lk.shape() {
        candle_core::bail!(
            "fused layer: pv {:?} differs from pk {:?}",
            lv.shape(),
            lk.shape()
        );
    }
    let (x, pk, pv) = (view::<T>(sx, lx)?, view::<T>(sk, lk)?, view::<T>(sv, lv)?);
    let (h, kv, hd) = op.w.heads;
    let n = hl.t_off;
    let (out, saved) = with_all::<T, _>(&op.tensors(), |t| {
        let p = op.parts(t);
        let hn = rms_rows(x, p.input_norm, op.w.eps);
        let qkv = linear_rows(&hn, p.qkv, p.qkv_b, (h + 2 * kv) * hd);
        let mut q = vec![T::zero(); d.b * h * d.s * hd];
        let mut k = vec![T::zero(); d.b * kv * d.t * hd];
        let mut v = vec![T::zero(); k.len()];
        place_prefix(&mut k, pk, d.b * kv, n, d.t, hd);
        place_prefix(&mut v, pv, d.b * kv, n, d.t, hd);
        split_heads_into(
            &qkv,
            hl,
            Some((p.cos, p.sin, true)),
            [&mut q, &mut k, &mut v],
        );
        let scale = T::from(1.0 / (hd as f64).sqrt()).expect("scale is finite");
        let att = attention_rows(&d, (&q, &k, &v), Some(p.bias), scale);
        let mut x2 = linear_rows(&att, p.o, p.o_b, dm);
        add_into(&mut x2, x);
        let hn2 = rms_rows(&x2, p.post_norm, op.w.eps);
        let gu = linear_rows(&hn2, p.gate_up, p.gate_up_b, 2 * inter);
        let m = swiglu_rows(&gu, inter);
        let mut out = linear_rows(&m, p.down, p.down_b, dm);
        add_into(&mut out, &x2);
        Ok((out, Saved { q, k, v, x2, gu }))
    })?;
    *op.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(saved));
    Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
}

/// `(∂x or nothing, ∂pk, ∂pv)`, each flat.
type LayerGrads<T> = (Option<Vec<T>>, Vec<T>, Vec<T>);

fn token_layer_bwd<T: Elem>(
    op: &TokenLayer,
    x: &Tensor,
    pk: &Tensor,
    grad: &Tensor,
) -> Result<LayerGrads<T>> {
    let (d, hl, dm, inter) = op.dims(x.shape(), pk.shape())?;
    let (h, kv, hd) = op.w.heads;
    let n = hl.t_off;
    let saved = op
        .saved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| candle_core::Error::Msg("fused layer: backward ran twice".into()))?;
    let sv = saved.downcast::<Saved<T>>().map_err(|_| {
        candle_core::Error::Msg("fused layer: saved activations of another dtype".into())
    })?;
    let (x, g) = (x.contiguous()?, grad.contiguous()?);
    let want_dx = x.track_op();
    let mut ts = op.tensors();
    ts.push(&x);
    ts.push(&g);
    with_all::<T, _>(&ts, |t| {
        let p = op.parts(&t[..t.len() - 2]);
        let (x, g) = (t[t.len() - 2], t[t.len() - 1]);
        // MLP: out = x2 + down(swiglu(gate_up(rms(x2))))
        let gm = linear_grad(g, p.down, dm);
        let dgu = swiglu_bwd_rows(&sv.gu, &gm, inter);
        let dhn2 = linear_grad(&dgu, p.gate_up, 2 * inter);
        let mut dx2 = rms_bwd_rows(&sv.x2, &dhn2, p.post_norm, op.w.eps);
        add_into(&mut dx2, g);
        // attention: x2 = x + o(attention(split(qkv(rms(x)))))
        let datt = linear_grad(&dx2, p.o, dm);
        let scale = T::from(1.0 / (hd as f64).sqrt()).expect("scale is finite");
        let all = attention_grads(&d, (&sv.q, &sv.k, &sv.v), &datt, Some(p.bias), scale);
        let (nq, nk) = (d.b * h * d.s * hd, d.b * kv * d.t * hd);
        let (dq, rest) = all.split_at(nq);
        let (dk, dv) = rest.split_at(nk);
        let prefix = |full: &[T]| {
            let mut out = vec![T::zero(); d.b * kv * n * hd];
            for blk in 0..d.b * kv {
                out[blk * n * hd..][..n * hd].copy_from_slice(&full[blk * d.t * hd..][..n * hd]);
            }
            out
        };
        let (dpk, dpv) = (prefix(dk), prefix(dv));
        let dx = if want_dx {
            let dqkv = split_heads_grad([dq, dk, dv], hl, Some((p.cos, p.sin, true)));
            let dhn = linear_grad(&dqkv, p.qkv, (h + 2 * kv) * hd);
            let mut dx = rms_bwd_rows(x, &dhn, p.input_norm, op.w.eps);
            add_into(&mut dx, &dx2);
            Some(dx)
        } else {
            None
        };
        Ok((dx, dpk, dpv))
    })
}

impl CustomOp3 for TokenLayer {
    fn name(&self) -> &'static str {
        "fused-llama-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, token_layer_fwd(self, (s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pk: &Tensor,
        pv: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dev = x.device();
        macro_rules! run {
            ($t:ty) => {{
                let (dx, dpk, dpv) = token_layer_bwd::<$t>(self, x, pk, grad)?;
                (
                    dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                        .transpose()?,
                    Tensor::from_vec(dpk, pk.shape(), dev)?,
                    Tensor::from_vec(dpv, pv.shape(), dev)?,
                )
            }};
        }
        let (dx, dpk, dpv) = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            other => candle_core::bail!("fused layer: {other:?} is not supported"),
        };
        Ok((dx, Some(dpk), Some(dpv)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use candle_core::DType;

    use crate::ops::{
        attention, attention_composed, rms_norm, rms_norm_composed, split_heads,
        split_heads_composed, swiglu, swiglu_composed,
    };

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // a small LCG: deterministic inputs without a random-number dependency
        let n: usize = shape.iter().product();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.shape(), b.shape());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Gradients of `sum(f(inputs) ⊙ weights)` with respect to every input.
    fn grads(
        inputs: &[Tensor],
        weights: &Tensor,
        f: &dyn Fn(&[Tensor]) -> Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let g = (&y * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = ts.iter().map(|t| g.get(t).unwrap().clone()).collect();
        (y, gs)
    }

    /// Central finite differences of `sum(f(inputs) ⊙ weights)` at a few coordinates of input
    /// `which`, against `grad`.
    fn check_fd(
        inputs: &[Tensor],
        which: usize,
        weights: &Tensor,
        grad: &Tensor,
        f: &dyn Fn(&[Tensor]) -> Tensor,
    ) {
        let base: Vec<f64> = inputs[which].flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        let loss = |v: Vec<f64>| {
            let mut ins = inputs.to_vec();
            ins[which] = Tensor::from_vec(v, inputs[which].shape(), &Device::Cpu).unwrap();
            (f(&ins) * weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let step = (base.len() / 7).max(1);
        for i in (0..base.len()).step_by(step) {
            let (mut p, mut m) = (base.clone(), base.clone());
            p[i] += eps;
            m[i] -= eps;
            let fd = (loss(p) - loss(m)) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "input {which} coordinate {i}: finite difference {fd} vs gradient {}",
                g[i]
            );
        }
    }

    #[test]
    fn rms_norm_matches_composition_and_finite_differences() {
        let (x, w) = (rand(&[3, 5, 16], 1), rand(&[16], 2));
        let wts = rand(&[3, 5, 16], 3);
        let fused = |t: &[Tensor]| rms_norm(&t[0], &w, 1e-5).unwrap();
        let composed = |t: &[Tensor]| rms_norm_composed(&t[0], &w, 1e-5).unwrap();
        let (y1, g1) = grads(std::slice::from_ref(&x), &wts, &fused);
        let (y2, g2) = grads(std::slice::from_ref(&x), &wts, &composed);
        assert!(max_diff(&y1, &y2) < 1e-12);
        assert!(max_diff(&g1[0], &g2[0]) < 1e-12);
        check_fd(&[x], 0, &wts, &g1[0], &fused);
    }

    #[test]
    fn swiglu_matches_composition_and_finite_differences() {
        let x = Tensor::cat(&[(rand(&[4, 9], 4) * 4.0).unwrap(), rand(&[4, 9], 5)], 1).unwrap();
        let wts = rand(&[4, 9], 6);
        let fused = |t: &[Tensor]| swiglu(&t[0]).unwrap();
        let composed = |t: &[Tensor]| swiglu_composed(&t[0]).unwrap();
        let (y1, g1) = grads(std::slice::from_ref(&x), &wts, &fused);
        let (y2, g2) = grads(std::slice::from_ref(&x), &wts, &composed);
        assert!(max_diff(&y1, &y2) < 1e-12);
        assert!(max_diff(&g1[0], &g2[0]) < 1e-12);
        check_fd(std::slice::from_ref(&x), 0, &wts, &g1[0], &fused);
    }

    /// Grouped queries (6 heads over 2 key/value heads), more keys than queries (a cached
    /// prefix), a bias per row, shared by all rows, and none.
    #[test]
    fn attention_matches_composition_and_finite_differences() {
        let (b, h, kv, s, t, hd) = (2, 6, 2, 3, 5, 4);
        let q = rand(&[b, h, s, hd], 7);
        let k = rand(&[b, kv, t, hd], 8);
        let v = rand(&[b, kv, t, hd], 9);
        let mut per_row = vec![0f64; b * s * t];
        per_row[2] = -1e9; // row 0 query 0 does not see key 2
        per_row[s * t + t - 1] = -1e9; // row 1 query 0 does not see the last key
        let per_row = Tensor::from_vec(per_row, (b, 1, s, t), &Device::Cpu).unwrap();
        let shared = (rand(&[1, 1, s, t], 10) * 0.5).unwrap();
        let wts = rand(&[b, s, h * hd], 11);
        for bias in [Some(per_row), Some(shared), None] {
            let fused = |x: &[Tensor]| attention(&x[0], &x[1], &x[2], bias.as_ref()).unwrap();
            let composed = |x: &[Tensor]| {
                attention_composed(&x[0], &x[1], &x[2], bias.as_ref())
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, s, h * hd))
                    .unwrap()
            };
            let ins = [q.clone(), k.clone(), v.clone()];
            let (y1, g1) = grads(&ins, &wts, &fused);
            let (y2, g2) = grads(&ins, &wts, &composed);
            assert!(max_diff(&y1, &y2) < 1e-12, "{}", max_diff(&y1, &y2));
            for (i, (g1, g2)) in g1.iter().zip(&g2).enumerate() {
                assert!(max_diff(g1, g2) < 1e-12, "input {i}: {}", max_diff(g1, g2));
                check_fd(&ins, i, &wts, g1, &fused);
            }
        }
    }

    #[test]
    fn frozen_linear_matches_matmul_and_finite_differences() {
        // 6 rows: gemm writes column-major; 120 rows: row-major (see `COLUMN_MAJOR_ROWS`)
        for (lead, seed) in [([2, 3], 15), ([4, 30], 25)] {
            let x = rand(&[lead[0], lead[1], 5], seed);
            let w = rand(&[7, 5], seed + 1);
            let wts = rand(&[lead[0], lead[1], 7], seed + 2);
            let lin = crate::ops::Linear::new(w.clone(), None);
            let fused = |t: &[Tensor]| lin.forward(&t[0]).unwrap();
            let plain = |t: &[Tensor]| t[0].broadcast_matmul(&w.t().unwrap()).unwrap();
            let (y1, g1) = grads(std::slice::from_ref(&x), &wts, &fused);
            let (y2, g2) = grads(std::slice::from_ref(&x), &wts, &plain);
            assert!(max_diff(&y1, &y2) < 1e-12);
            assert!(max_diff(&g1[0], &g2[0]) < 1e-12);
            check_fd(&[x], 0, &wts, &g1[0], &fused);
        }
    }

    /// q, k, v heads with RoPE (shared and per-row position tables) and without (GPT-2).
    #[test]
    fn split_heads_matches_composition_and_finite_differences() {
        let (b, s, h, kv, hd) = (2, 3, 4, 2, 6);
        let qkv = rand(&[b, s, (h + 2 * kv) * hd], 18);
        let positions: Vec<usize> = (0..s).map(|i| i + 2).collect();
        let per_row: Vec<usize> = vec![5, 6, 7, 0, 1, 2];
        let dev = Device::Cpu;
        let shared = crate::ops::rope_tables(&positions, hd, 10000.0, DType::F64, &dev).unwrap();
        let rows = crate::ops::rope_tables(&per_row, hd, 10000.0, DType::F64, &dev).unwrap();
        let rows = (
            rows.0.reshape((b, s, hd)).unwrap(),
            rows.1.reshape((b, s, hd)).unwrap(),
        );
        let wts = rand(&[b * (h + 2 * kv) * s * hd], 19);
        for tables in [Some(&shared), Some(&rows), None] {
            let flat = |parts: (Tensor, Tensor, Tensor)| {
                Tensor::cat(
                    &[
                        parts.0.flatten_all().unwrap(),
                        parts.1.flatten_all().unwrap(),
                        parts.2.flatten_all().unwrap(),
                    ],
                    0,
                )
                .unwrap()
            };
            let rope = tables.map(|(c, s)| (c, s));
            let fused = |t: &[Tensor]| flat(split_heads(&t[0], (h, kv, hd), rope).unwrap());
            let composed =
                |t: &[Tensor]| flat(split_heads_composed(&t[0], (h, kv, hd), rope).unwrap());
            let (y1, g1) = grads(std::slice::from_ref(&qkv), &wts, &fused);
            let (y2, g2) = grads(std::slice::from_ref(&qkv), &wts, &composed);
            assert!(max_diff(&y1, &y2) < 1e-12);
            assert!(max_diff(&g1[0], &g2[0]) < 1e-12);
            check_fd(std::slice::from_ref(&qkv), 0, &wts, &g1[0], &fused);
        }
    }

    /// The whole-layer op against the layer composed from candle primitives: output and the
    /// gradients to the token rows and to the prompt's keys/values, and finite differences.
    #[test]
    fn token_layer_matches_composition_and_finite_differences() {
        use super::{LayerWeights, TokenLayer};
        let (b, s, n, d, h, kv, hd, i) = (2, 3, 2, 8, 4, 2, 2, 6);
        let w = LayerWeights {
            input_norm: (rand(&[d], 20) + 1.0).unwrap(),
            qkv: (
                (rand(&[(h + 2 * kv) * hd, d], 21) * 0.5).unwrap(),
                Some(rand(&[(h + 2 * kv) * hd], 26)),
            ),
            o: ((rand(&[d, h * hd], 22) * 0.5).unwrap(), None),
            post_norm: (rand(&[d], 23) + 1.0).unwrap(),
            gate_up: ((rand(&[2 * i, d], 24) * 0.5).unwrap(), None),
            down: ((rand(&[d, i], 25) * 0.5).unwrap(), Some(rand(&[d], 27))),
            eps: 1e-6,
            heads: (h, kv, hd),
        };
        let positions: Vec<usize> = (n..n + s).collect();
        let rope =
            crate::ops::rope_tables(&positions, hd, 10000.0, DType::F64, &Device::Cpu).unwrap();
        let mut bias = vec![0f64; b * s * (n + s)];
        for r in 0..b {
            for q in 0..s {
                for j in q + 1..s {
                    bias[(r * s + q) * (n + s) + n + j] = -1e9;
                }
            }
        }
        bias[(s + 1) * (n + s)] = -1e9; // row 1 query 1 does not see the first prompt key
        let bias = Tensor::from_vec(bias, (b, 1, s, n + s), &Device::Cpu).unwrap();
        let lin = |x: &Tensor, (w, bb): &(Tensor, Option<Tensor>)| {
            let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            match bb {
                Some(bb) => y.broadcast_add(bb).unwrap(),
                None => y,
            }
        };
        let composed = |t: &[Tensor]| {
            let (x, pk, pv) = (&t[0], &t[1], &t[2]);
            let hn = rms_norm_composed(x, &w.input_norm, w.eps).unwrap();
            let (q, k, v) =
                split_heads_composed(&lin(&hn, &w.qkv), (h, kv, hd), Some((&rope.0, &rope.1)))
                    .unwrap();
            let k = Tensor::cat(&[pk, &k], 2).unwrap();
            let v = Tensor::cat(&[pv, &v], 2).unwrap();
            let att = attention_composed(&q, &k, &v, Some(&bias))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, s, h * hd))
                .unwrap();
            let x2 = (x + lin(&att, &w.o)).unwrap();
            let hn2 = rms_norm_composed(&x2, &w.post_norm, w.eps).unwrap();
            let m = swiglu_composed(&lin(&hn2, &w.gate_up)).unwrap();
            (&x2 + lin(&m, &w.down)).unwrap()
        };
        let fused = |t: &[Tensor]| {
            let op = TokenLayer {
                w: w.clone(),
                rope: rope.clone(),
                bias: bias.clone(),
                saved: Default::default(),
            };
            t[0].apply_op3(&t[1], &t[2], op).unwrap()
        };
        let ins = [
            rand(&[b, s, d], 28),
            rand(&[b, kv, n, hd], 29),
            rand(&[b, kv, n, hd], 30),
        ];
        let wts = rand(&[b, s, d], 31);
        let (y1, g1) = grads(&ins, &wts, &fused);
        let (y2, g2) = grads(&ins, &wts, &composed);
        assert!(max_diff(&y1, &y2) < 1e-12, "{}", max_diff(&y1, &y2));
        for (k, (g1, g2)) in g1.iter().zip(&g2).enumerate() {
            assert!(max_diff(g1, g2) < 1e-11, "input {k}: {}", max_diff(g1, g2));
            check_fd(&ins, k, &wts, g1, &fused);
        }
    }

    #[test]
    fn f32_agrees_with_f64() {
        let (b, h, kv, s, t, hd) = (1, 4, 1, 2, 4, 8);
        let q = rand(&[b, h, s, hd], 12);
        let k = rand(&[b, kv, t, hd], 13);
        let v = rand(&[b, kv, t, hd], 14);
        let y64 = attention(&q, &k, &v, None).unwrap();
        let f = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let y32 = attention(&f(&q), &f(&k), &f(&v), None).unwrap();
        assert!(max_diff(&y64, &y32.to_dtype(candle_core::DType::F64).unwrap()) < 1e-6);
    }

    #[test]
    fn few_rows_kernel_matches_a_sum_in_f64() {
        let (k, n) = (40, 13); // an odd number of columns: the last weight row is alone
        let w: Vec<f32> = rand(&[n, k], 21)
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .concat();
        for m in 1..=super::few_rows::MAX_ROWS + 1 {
            let x: Vec<f32> = rand(&[m, k], 22 + m as u64)
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .concat();
            let got = super::few_rows::linear(&x, &w, n);
            if m > super::few_rows::MAX_ROWS {
                assert!(got.is_none(), "{m} rows are gemm's");
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            let expected = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            #[cfg(not(target_arch = "x86_64"))]
            let expected = false;
            let Some(y) = got else {
                assert!(!expected, "AVX2 and FMA are here: the kernel should run");
                continue;
            };
            assert_eq!(y.len(), m * n);
            for r in 0..m {
                for o in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                        .sum();
                    let d = (y[r * n + o] as f64 - want).abs();
                    assert!(d < 1e-5, "row {r} column {o}: {} vs {want}", y[r * n + o]);
                }
            }
            // linear_rows takes the kernel for these rows
            let via = super::linear_rows(&x, &w, None, n);
            assert_eq!(via, y);
        }
        // a depth that is not a multiple of 8 stays with gemm
        assert!(super::few_rows::linear(&[0.0; 12], &[0.0; 36], 3).is_none());
    }
}
