//! Scaled dot-product attention (training, with the backward pass recomputing the
//! probabilities) and one decode row over a sequence's host cache.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

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
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) h: usize,
    pub(super) kv: usize,
    pub(super) s: usize,
    pub(super) t: usize,
    pub(super) hd: usize,
    /// Rows of the bias (1: shared by every batch row).
    pub(super) bias_rows: usize,
}

impl Dims {
    pub(super) fn of(q: &Shape, k: &Shape, bias: Option<&Tensor>) -> Result<Self> {
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

    pub(super) fn q_at(&self, bi: usize, hi: usize) -> usize {
        (bi * self.h + hi) * self.s * self.hd
    }
    pub(super) fn kv_at(&self, bi: usize, ki: usize) -> usize {
        (bi * self.kv + ki) * self.t * self.hd
    }
    /// Start of row `bi`, head `hi` in the `[b, s, h, hd]` output (rows `h·hd` apart).
    pub(super) fn out_at(&self, bi: usize, hi: usize) -> usize {
        (bi * self.s * self.h + hi) * self.hd
    }
    pub(super) fn bias_at(&self, bi: usize) -> usize {
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
pub(super) unsafe fn probabilities<T: Elem>(
    d: &Dims,
    q: *const T,
    k: *const T,
    bias: Option<&[T]>,
    scale: T,
    p: &mut [T],
) {
    let (s, t, hd) = (d.s, d.t, d.hd);
    assert!(
        p.len() >= s * t,
        "attention probabilities: buffer too small"
    );
    // SAFETY: `q` and `k` address `[s, hd]` and `[t, hd]` (this function's contract) and `p`
    // holds `[s, t]` (asserted)
    unsafe {
        matmul(
            (s, t, hd),
            Out::rows(p.as_mut_ptr(), t),
            false,
            Mat::rows(q, hd),
            Mat::t(k, hd),
            Parallelism::None,
        )
    };
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
pub(super) fn softmax_in_place<T: Elem>(row: &mut [T]) {
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
    pub(super) fn check<T>(&self, q: &[T], k: &[T], v: &[T], bias: Option<&[T]>) {
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
pub(super) fn attention_rows<T: Elem>(
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

pub(super) fn attention_fwd<T: Elem>(
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
pub(super) struct AttentionBwd {
    pub(super) q: Tensor,
    pub(super) bias: Option<Tensor>,
    pub(super) scale: f64,
}

/// The input gradients of [`attention_rows`], flat `[dq | dk | dv]` (see [`AttentionBwd`]).
pub(super) fn attention_grads<T: Elem>(
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

pub(super) fn attention_bwd<T: Elem>(
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
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
