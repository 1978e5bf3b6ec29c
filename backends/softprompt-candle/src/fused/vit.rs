//! A whole vision-transformer block (DINOv2: pre-norm LayerNorm, bidirectional attention with
//! biases, LayerScale, exact-GELU MLP) as one op, with LayerNorm's and GELU's row kernels.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// `(x − mean) / sqrt(var + eps) · w + b` over rows of `w.len()` values.
pub(super) fn layer_norm_rows<T: Elem>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
        let (mean, r) = moments(x, eps);
        for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = (*x - mean) * r * *w + *b;
        }
    });
    y
}

/// A row's mean and `1 / sqrt(var + eps)` (two passes: the variance of centred values).
fn moments<T: Elem>(x: &[T], eps: f64) -> (T, T) {
    let dn = T::from(x.len()).expect("dimension fits");
    let mean = x.iter().copied().sum::<T>() / dn;
    let var = x.iter().map(|v| (*v - mean) * (*v - mean)).sum::<T>() / dn;
    let eps = T::from(eps).expect("eps is finite");
    (mean, (var + eps).sqrt().recip())
}

/// `∂L/∂x` of [`layer_norm_rows`] from `x` and `∂L/∂y`: with `x̂ = (x − mean)·r` and
/// `ĝ = g ⊙ w`, `r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))`.
pub(super) fn layer_norm_bwd_rows<T: Elem>(x: &[T], g: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let dn = T::from(d).expect("dimension fits");
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(g.par_chunks(d)))
        .for_each(|(dx, (x, g))| {
            let (mean, r) = moments(x, eps);
            let (mut sg, mut sgx) = (T::zero(), T::zero());
            for ((x, g), w) in x.iter().zip(g).zip(w) {
                let gw = *g * *w;
                sg += gw;
                sgx += gw * (*x - mean) * r;
            }
            let (mg, mgx) = (sg / dn, sgx / dn);
            for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                *dx = r * (*g * *w - mg - (*x - mean) * r * mgx);
            }
        });
    dx
}

/// Exact (erf) GELU of every value, and with `slope` its derivative `Φ(x) + x·φ(x)` too.
pub(super) fn gelu_erf_rows<T: Elem>(f: &[T], slope: bool) -> (Vec<T>, Option<Vec<T>>) {
    let mut g = vec![T::zero(); f.len()];
    let mut s = slope.then(|| vec![T::zero(); f.len()]);
    if let Some(f32s) = T::as_f32(f) {
        let g32 = T::as_f32_mut(&mut g).expect("the same type as f");
        const CHUNK: usize = 4096;
        match &mut s {
            Some(s) => {
                let s32 = T::as_f32_mut(s).expect("the same type as f");
                g32.par_chunks_mut(CHUNK)
                    .zip(s32.par_chunks_mut(CHUNK))
                    .zip(f32s.par_chunks(CHUNK))
                    .for_each(|((g, s), f)| fast_gelu::run(g, Some(s), f));
            }
            None => g32
                .par_chunks_mut(CHUNK)
                .zip(f32s.par_chunks(CHUNK))
                .for_each(|(g, f)| fast_gelu::run(g, None, f)),
        }
        return (g, s);
    }
    let half = T::from(0.5).expect("a float");
    let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).expect("a float");
    // 1 / sqrt(2π)
    let inv_sqrt_2pi = T::from(0.398_942_280_401_432_7_f64).expect("a float");
    const CHUNK: usize = 4096;
    let one = |g: &mut [T], s: Option<&mut [T]>, f: &[T]| match s {
        Some(s) => {
            for ((g, s), x) in g.iter_mut().zip(s).zip(f) {
                let cdf = half * (T::one() + T::erf(*x * inv_sqrt2));
                *g = *x * cdf;
                *s = cdf + *x * inv_sqrt_2pi * (-half * *x * *x).exp();
            }
        }
        None => {
            for (g, x) in g.iter_mut().zip(f) {
                *g = *x * half * (T::one() + T::erf(*x * inv_sqrt2));
            }
        }
    };
    match &mut s {
        Some(s) => g
            .par_chunks_mut(CHUNK)
            .zip(s.par_chunks_mut(CHUNK))
            .zip(f.par_chunks(CHUNK))
            .for_each(|((g, s), f)| one(g, Some(s), f)),
        None => g
            .par_chunks_mut(CHUNK)
            .zip(f.par_chunks(CHUNK))
            .for_each(|(g, f)| one(g, None, f)),
    }
    (g, s)
}

/// Exact GELU in f32 without calls into a maths library, so that the loops vectorise: `erf` by
/// Hastings' approximation (Abramowitz & Stegun 7.1.28, |error| ≤ 3e-7), the normal density's
/// `exp` by range reduction and a degree-7 polynomial (relative error ~1e-7). libm's `erff` and
/// `expf`, one call per value, took a sixth of a ViT training step.
pub(super) mod fast_gelu {
    const A: [f32; 6] = [
        0.070_523_08,
        0.042_282_01,
        0.009_270_527,
        0.000_152_014_3,
        0.000_276_567_2,
        0.000_043_063_8,
    ];

    /// `(1 − erf(t))` for `t ≥ 0`, as `1 / p(t)¹⁶`.
    #[inline(always)]
    fn erfc_pos(t: f32) -> f32 {
        let p = 1.0 + t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * (A[4] + t * A[5])))));
        let p2 = p * p;
        let p4 = p2 * p2;
        let p8 = p4 * p4;
        1.0 / (p8 * p8)
    }

    /// `exp(y)` for `y ≤ 0` (0 below −87).
    #[inline(always)]
    fn exp_neg(y: f32) -> f32 {
        let y = y.max(-87.0);
        // round y·log2(e) to the nearest integer n by the 1.5·2²³ trick (no call, no branch)
        const MAGIC: f32 = 12_582_912.0;
        let n = (y * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
        // r = y − n·ln 2 in two parts (ln 2 = 0.693359375 − 2.12194440e-4)
        let r = (y - n * 0.693_359_4) + n * 2.121_944_4e-4;
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (1.0 / 6.0
                        + r * (1.0 / 24.0
                            + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
        // 2ⁿ from its exponent bits (n in −126..=0)
        p * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    /// `(gelu(x), gelu'(x))`.
    #[inline(always)]
    fn one(x: f32) -> (f32, f32) {
        let q = 0.5 * erfc_pos(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
        // Φ(x) = 1 − q for x ≥ 0, q below (no cancellation in the lower tail)
        let cdf = if x >= 0.0 { 1.0 - q } else { q };
        let pdf = 0.398_942_3 * exp_neg(-0.5 * x * x);
        (x * cdf, cdf + x * pdf)
    }

    #[inline(always)]
    fn body(g: &mut [f32], s: Option<&mut [f32]>, f: &[f32]) {
        match s {
            Some(s) => {
                for ((g, s), x) in g.iter_mut().zip(s.iter_mut()).zip(f) {
                    (*g, *s) = one(*x);
                }
            }
            None => {
                for (g, x) in g.iter_mut().zip(f) {
                    *g = one(*x).0;
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn body_avx512(g: &mut [f32], s: Option<&mut [f32]>, f: &[f32]) {
        body(g, s, f)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn body_avx2(g: &mut [f32], s: Option<&mut [f32]>, f: &[f32]) {
        body(g, s, f)
    }

    /// `g = gelu(f)` and, with `s`, `s = gelu'(f)`, in the widest vectors this CPU has.
    pub(in crate::fused) fn run(g: &mut [f32], s: Option<&mut [f32]>, f: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (detected just above)
                return unsafe { body_avx512(g, s, f) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA (detected just above)
                return unsafe { body_avx2(g, s, f) };
            }
        }
        body(g, s, f)
    }
}

/// `acc += x ⊙ scale` (a row-broadcast `scale` of `scale.len()` values, or `x` itself).
fn add_scaled<T: Elem>(acc: &mut [T], x: &[T], scale: Option<&[T]>) {
    match scale {
        None => add_into(acc, x),
        Some(s) => acc
            .par_chunks_mut(s.len())
            .zip(x.par_chunks(s.len()))
            .for_each(|(a, x)| {
                for ((a, x), s) in a.iter_mut().zip(x).zip(s) {
                    *a += *x * *s;
                }
            }),
    }
}

/// `x ⊙ scale` row-broadcast, or a copy.
fn scaled<T: Elem>(x: &[T], scale: Option<&[T]>) -> Vec<T> {
    match scale {
        None => x.to_vec(),
        Some(s) => {
            let mut y = x.to_vec();
            y.par_chunks_mut(s.len()).for_each(|y| {
                for (y, s) in y.iter_mut().zip(s) {
                    *y *= *s;
                }
            });
            y
        }
    }
}

/// The frozen weights of one ViT block (Hugging Face `Dinov2Layer`), as the model holds them.
#[derive(Clone)]
pub(crate) struct VitWeights {
    /// LayerNorm before attention: weight, bias
    pub norm1: (Tensor, Tensor),
    /// `[3·d, d]` (q, k, v rows) and its bias
    pub qkv: (Tensor, Option<Tensor>),
    /// `[d, d]` and its bias
    pub o: (Tensor, Option<Tensor>),
    /// LayerScale of the attention branch `[d]`
    pub ls1: Option<Tensor>,
    pub norm2: (Tensor, Tensor),
    /// `[i, d]`
    pub fc1: (Tensor, Option<Tensor>),
    /// `[d, i]`
    pub fc2: (Tensor, Option<Tensor>),
    pub ls2: Option<Tensor>,
    pub eps: f64,
    /// heads, head width
    pub heads: (usize, usize),
}

/// One ViT block as one op over every token row `x [b, s, d]` (all rows attend to all rows):
/// `x2 = x + ls1 ⊙ o(attention(qkv(LN₁(x))))`, `out = x2 + ls2 ⊙ fc2(gelu(fc1(LN₂(x2))))`. The
/// backward pass gives `∂x` only (the weights are frozen), from the activations kept in the op.
pub(crate) struct VitLayer {
    pub w: VitWeights,
    /// Whether the forward pass keeps what the backward pass needs (the input is tracked);
    /// inference keeps nothing.
    pub train: bool,
    /// Only each image's class row leaves the block (`[b, 1, d]`): the last block of a
    /// classifier, whose other rows nothing reads. Every row's key and value are still computed;
    /// the query, the output projection and the MLP run on the class rows alone.
    pub cls_only: bool,
    pub saved: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// What the backward pass reads: the heads `q`, `k`, `v`, the residual stream after attention
/// and GELU's slope at the MLP's hidden values.
struct VitSaved<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    x2: Vec<T>,
    slope: Vec<T>,
    /// The block's input when it was made here (prompt rows put in), not the op's argument.
    input: Option<Vec<T>>,
}

/// The block's weights as slices, in [`VitLayer::tensors`]' order.
struct VitParts<'a, T> {
    n1: (&'a [T], &'a [T]),
    qkv: (&'a [T], Option<&'a [T]>),
    o: (&'a [T], Option<&'a [T]>),
    ls1: Option<&'a [T]>,
    n2: (&'a [T], &'a [T]),
    fc1: (&'a [T], Option<&'a [T]>),
    fc2: (&'a [T], Option<&'a [T]>),
    ls2: Option<&'a [T]>,
}

impl VitLayer {
    fn tensors(&self) -> Vec<&Tensor> {
        let w = &self.w;
        let mut ts = vec![
            &w.norm1.0, &w.norm1.1, &w.qkv.0, &w.o.0, &w.norm2.0, &w.norm2.1, &w.fc1.0, &w.fc2.0,
        ];
        for t in [&w.qkv.1, &w.o.1, &w.ls1, &w.fc1.1, &w.fc2.1, &w.ls2]
            .into_iter()
            .flatten()
        {
            ts.push(t);
        }
        ts
    }

    fn parts<'a, T>(&'a self, t: &[&'a [T]]) -> VitParts<'a, T> {
        let w = &self.w;
        let mut extra = t[8..].iter().copied();
        let mut opt = |o: &Option<Tensor>| o.as_ref().and_then(|_| extra.next());
        let (qkv_b, o_b, ls1, fc1_b, fc2_b, ls2) = (
            opt(&w.qkv.1),
            opt(&w.o.1),
            opt(&w.ls1),
            opt(&w.fc1.1),
            opt(&w.fc2.1),
            opt(&w.ls2),
        );
        VitParts {
            n1: (t[0], t[1]),
            qkv: (t[2], qkv_b),
            o: (t[3], o_b),
            ls1,
            n2: (t[4], t[5]),
            fc1: (t[6], fc1_b),
            fc2: (t[7], fc2_b),
            ls2,
        }
    }

    fn dims(&self, x: &Shape) -> Result<(Dims, HeadLayout, usize, usize)> {
        let (b, s, d) = x.dims3()?;
        let (h, hd) = self.w.heads;
        if h * hd != d || self.w.qkv.0.dims2()? != (3 * d, d) {
            candle_core::bail!("fused ViT block: input {x:?} does not fit {h} heads of {hd}");
        }
        let inter = self.w.fc1.0.dim(0)?;
        // queries: every row, or each image's class row; keys: every row
        let dims = Dims {
            b,
            h,
            kv: h,
            s: if self.cls_only { 1 } else { s },
            t: s,
            hd,
            bias_rows: 0,
        };
        // where the projection's heads go: q, k, v, or (class row only) k and v, the query
        // projected apart
        let hl = HeadLayout {
            b,
            s,
            h: if self.cls_only { 0 } else { h },
            kv: h,
            hd,
            t: s,
            t_off: 0,
        };
        Ok((dims, hl, d, inter))
    }

    /// `[b, s, d]`, or `[b, 1, d]` with [`Self::cls_only`].
    fn out_shape(&self, x: &Shape) -> Result<Shape> {
        let (b, s, d) = x.dims3()?;
        Ok(Shape::from((b, if self.cls_only { 1 } else { s }, d)))
    }

    fn scale<T: Elem>(&self) -> T {
        T::from(1.0 / (self.w.heads.1 as f64).sqrt()).expect("scale is finite")
    }
}

/// Rows `0, s, 2s, …` (each image's class token) of `x [b·s, d]`.
fn class_rows<T: Elem>(x: &[T], s: usize, d: usize) -> Vec<T> {
    x.chunks(s * d)
        .flat_map(|img| img[..d].iter().copied())
        .collect()
}

/// `acc [b·s, d]` at each image's class row `+= rows [b, d]`.
fn add_class_rows<T: Elem>(acc: &mut [T], rows: &[T], s: usize, d: usize) {
    for (img, r) in acc.chunks_mut(s * d).zip(rows.chunks(d)) {
        img[..d].iter_mut().zip(r).for_each(|(a, r)| *a += *r);
    }
}

/// The block's output over rows `x` of shape `shape`, and what its backward pass reads (when
/// training).
fn block_fwd<T: Elem>(
    op: &VitLayer,
    x: &[T],
    shape: &Shape,
) -> Result<(Vec<T>, Option<VitSaved<T>>)> {
    let (dims, hl, d, inter) = op.dims(shape)?;
    let eps = op.w.eps;
    with_all::<T, _>(&op.tensors(), |t| {
        let p = op.parts(t);
        let h1 = layer_norm_rows(x, p.n1.0, p.n1.1, eps);
        let nk = dims.b * dims.h * dims.t * dims.hd;
        let (mut k, mut v) = (vec![T::zero(); nk], vec![T::zero(); nk]);
        let (q, residual) = if op.cls_only {
            // keys and values of every row, the query of the class row only: q [b, h, 1, hd]
            // is laid out as the projection's rows [b, d]
            let (wq, wkv) = p.qkv.0.split_at(d * d);
            let (bq, bkv) = p.qkv.1.map(|b| b.split_at(d)).unzip();
            let kv = linear_rows(&h1, wkv, bkv, 2 * d);
            split_heads_into(&kv, hl, None, [&mut [], &mut k, &mut v]);
            let q = linear_rows(&class_rows(&h1, dims.t, d), wq, bq, d);
            (q, class_rows(x, dims.t, d))
        } else {
            let qkv = linear_rows(&h1, p.qkv.0, p.qkv.1, 3 * d);
            let mut q = vec![T::zero(); nk];
            split_heads_into(&qkv, hl, None, [&mut q, &mut k, &mut v]);
            (q, x.to_vec())
        };
        drop(h1);
        let att = attention_rows(&dims, (&q, &k, &v), None, op.scale());
        let o = linear_rows(&att, p.o.0, p.o.1, d);
        drop(att);
        let mut x2 = residual;
        add_scaled(&mut x2, &o, p.ls1);
        drop(o);
        let h2 = layer_norm_rows(&x2, p.n2.0, p.n2.1, eps);
        let f = linear_rows(&h2, p.fc1.0, p.fc1.1, inter);
        drop(h2);
        let (g, slope) = gelu_erf_rows(&f, op.train);
        drop(f);
        let m = linear_rows(&g, p.fc2.0, p.fc2.1, d);
        drop(g);
        let mut out = x2.clone();
        add_scaled(&mut out, &m, p.ls2);
        let saved = slope.map(|slope| VitSaved {
            q,
            k,
            v,
            x2,
            slope,
            input: None,
        });
        Ok((out, saved))
    })
}

fn vit_layer_fwd<T: Elem>(
    op: &VitLayer,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (out, saved) = block_fwd(op, view::<T>(s, l)?, l.shape())?;
    if let Some(saved) = saved {
        *op.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(saved));
    }
    Ok((T::to_cpu_storage_owned(out), op.out_shape(l.shape())?))
}

/// Checks `rows [b, n, d]` against `x [b, s, d]` (`1 + n ≤ s`); returns `n`.
fn replaced_rows(x: &Shape, rows: &Shape) -> Result<usize> {
    let (b, s, d) = x.dims3()?;
    let (rb, n, rd) = rows.dims3()?;
    if rb != b || rd != d || 1 + n > s {
        candle_core::bail!("fused ViT block: prompt rows {rows:?} do not fit the input {x:?}");
    }
    Ok(n)
}

/// With the rows after each image's class token replaced by `rows` (VPT-deep's prompt of this
/// block) before the block runs.
fn vit_layer_fwd2<T: Elem>(
    op: &VitLayer,
    (sx, lx): (&CpuStorage, &Layout),
    (sr, lr): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let n = replaced_rows(lx.shape(), lr.shape())?;
    let (_, s, d) = lx.shape().dims3()?;
    let (x, rows) = (view::<T>(sx, lx)?, view::<T>(sr, lr)?);
    let mut input = x.to_vec();
    for (img, r) in input.chunks_mut(s * d).zip(rows.chunks(n * d)) {
        img[d..(1 + n) * d].copy_from_slice(r);
    }
    let (out, saved) = block_fwd(op, &input, lx.shape())?;
    if let Some(mut saved) = saved {
        saved.input = Some(input);
        *op.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(saved));
    }
    Ok((T::to_cpu_storage_owned(out), op.out_shape(lx.shape())?))
}

fn take_saved<T: Elem>(op: &VitLayer) -> Result<Box<VitSaved<T>>> {
    let saved = op
        .saved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| {
            candle_core::Error::Msg(
                "fused ViT block: no saved activations (backward ran twice)".into(),
            )
        })?;
    saved.downcast::<VitSaved<T>>().map_err(|_| {
        candle_core::Error::Msg("fused ViT block: saved activations of another dtype".into())
    })
}

fn vit_layer_bwd<T: Elem>(op: &VitLayer, x: &Tensor, grad: &Tensor) -> Result<Vec<T>> {
    let sv = take_saved::<T>(op)?;
    let (xc, g) = (x.contiguous()?, grad.contiguous()?);
    with_all::<T, _>(&[&xc, &g], |t| block_bwd(op, x.shape(), &sv, t[0], t[1]))
}

/// `(∂x, ∂rows)` of [`vit_layer_fwd2`]: the replaced rows' gradient goes to the prompt rows,
/// none to `x` there.
fn vit_layer_bwd2<T: Elem>(
    op: &VitLayer,
    x: &Tensor,
    rows: &Tensor,
    grad: &Tensor,
) -> Result<(Vec<T>, Vec<T>)> {
    let n = replaced_rows(x.shape(), rows.shape())?;
    let (_, s, d) = x.dims3()?;
    let sv = take_saved::<T>(op)?;
    let input = sv.input.as_deref().ok_or_else(|| {
        candle_core::Error::Msg("fused ViT block: the replaced input was not kept".into())
    })?;
    let g = grad.contiguous()?;
    let mut dx = with_all::<T, _>(&[&g], |t| block_bwd(op, x.shape(), &sv, input, t[0]))?;
    let mut drows = Vec::with_capacity(rows.elem_count());
    for img in dx.chunks_mut(s * d) {
        let at = &mut img[d..(1 + n) * d];
        drows.extend_from_slice(at);
        at.fill(T::zero());
    }
    Ok((dx, drows))
}

/// `∂x` of the block from its input `x` and `∂out`.
fn block_bwd<T: Elem>(
    op: &VitLayer,
    shape: &Shape,
    sv: &VitSaved<T>,
    x: &[T],
    g: &[T],
) -> Result<Vec<T>> {
    let (dims, hl, d, inter) = op.dims(shape)?;
    let eps = op.w.eps;
    with_all::<T, _>(&op.tensors(), |t| {
        let p = op.parts(t);
        // MLP: out = x2 + ls2 ⊙ fc2(gelu(fc1(LN₂(x2))))
        let dm = scaled(g, p.ls2);
        let mut df = linear_grad(&dm, p.fc2.0, d);
        drop(dm);
        df.par_chunks_mut(4096)
            .zip(sv.slope.par_chunks(4096))
            .for_each(|(df, s)| df.iter_mut().zip(s).for_each(|(df, s)| *df *= *s));
        let dh2 = linear_grad(&df, p.fc1.0, inter);
        drop(df);
        let mut dx2 = layer_norm_bwd_rows(&sv.x2, &dh2, p.n2.0, eps);
        drop(dh2);
        add_into(&mut dx2, g);
        // attention: x2 = x + ls1 ⊙ o(attention(split(qkv(LN₁(x)))))
        let datt = linear_grad(&scaled(&dx2, p.ls1), p.o.0, d);
        let all = attention_grads(&dims, (&sv.q, &sv.k, &sv.v), &datt, None, op.scale());
        drop(datt);
        let (dq, rest) = all.split_at(sv.q.len());
        let (dk, dv) = rest.split_at(sv.k.len());
        // x2's gradient reaches x through the residual: at every row, or at the class rows
        // when only they left the block
        Ok(if op.cls_only {
            let (wq, wkv) = p.qkv.0.split_at(d * d);
            let dkv = split_heads_grad([&[], dk, dv], hl, None);
            let mut dh1 = linear_grad(&dkv, wkv, 2 * d);
            drop(dkv);
            add_class_rows(&mut dh1, &linear_grad(dq, wq, d), dims.t, d);
            let mut dx = layer_norm_bwd_rows(x, &dh1, p.n1.0, eps);
            add_class_rows(&mut dx, &dx2, dims.t, d);
            dx
        } else {
            let dqkv = split_heads_grad([dq, dk, dv], hl, None);
            let dh1 = linear_grad(&dqkv, p.qkv.0, 3 * d);
            let mut dx = layer_norm_bwd_rows(x, &dh1, p.n1.0, eps);
            add_into(&mut dx, &dx2);
            dx
        })
    })
}

impl CustomOp1 for VitLayer {
    fn name(&self) -> &'static str {
        "fused-vit-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, vit_layer_fwd(self, s, l))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = match x.dtype() {
            DType::F32 => {
                Tensor::from_vec(vit_layer_bwd::<f32>(self, x, grad)?, x.shape(), x.device())?
            }
            DType::F64 => {
                Tensor::from_vec(vit_layer_bwd::<f64>(self, x, grad)?, x.shape(), x.device())?
            }
            other => candle_core::bail!("fused ViT block: {other:?} is not supported"),
        };
        Ok(Some(dx))
    }
}

/// The block with the rows after each class token replaced by a second input (VPT-deep).
impl CustomOp2 for VitLayer {
    fn name(&self) -> &'static str {
        "fused-vit-layer-deep-prompt"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, vit_layer_fwd2(self, (s1, l1), (s2, l2)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        rows: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        macro_rules! run {
            ($t:ty) => {{
                let (dx, dr) = vit_layer_bwd2::<$t>(self, x, rows, grad)?;
                (
                    Tensor::from_vec(dx, x.shape(), x.device())?,
                    Tensor::from_vec(dr, rows.shape(), rows.device())?,
                )
            }};
        }
        let (dx, dr) = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            other => candle_core::bail!("fused ViT block: {other:?} is not supported"),
        };
        Ok((Some(dx), Some(dr)))
    }
}
