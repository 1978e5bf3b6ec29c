//! The fused q/k/v projection split into heads, with RoPE.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

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
    pub(super) fn dims(&self, shape: &Shape) -> Result<(usize, usize)> {
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
    pub(super) fn with_tables<T: Elem, R>(
        &self,
        f: impl FnOnce(Tables<'_, T>) -> Result<R>,
    ) -> Result<R> {
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
pub(super) struct HeadLayout {
    pub(super) b: usize,
    pub(super) s: usize,
    pub(super) h: usize,
    pub(super) kv: usize,
    pub(super) hd: usize,
    pub(super) t: usize,
    pub(super) t_off: usize,
}

impl HeadLayout {
    /// Buffer (0 q, 1 k, 2 v) and offset of row `bi`, position `si`, head `j` of `h + 2·kv`.
    pub(super) fn at(&self, bi: usize, si: usize, j: usize) -> (usize, usize) {
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
pub(super) type Tables<'a, T> = Option<(&'a [T], &'a [T], bool)>;

/// Rotates (or copies, for `v` and without tables) one head vector.
pub(super) fn rotate<T: Elem>(
    x: &[T],
    o: &mut [T],
    tables: Tables<'_, T>,
    row: usize,
    inverse: bool,
) {
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
pub(super) fn split_heads_into<T: Elem>(
    x: &[T],
    l: HeadLayout,
    tables: Tables<'_, T>,
    out: [&mut [T]; 3],
) {
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
pub(super) fn split_heads_grad<T: Elem>(
    grads: [&[T]; 3],
    l: HeadLayout,
    tables: Tables<'_, T>,
) -> Vec<T> {
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

pub(super) fn split_heads_fwd<T: Elem>(
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
pub(super) struct SplitHeadsBwd {
    pub(super) fwd: SplitHeads,
    pub(super) shape: Shape,
}

pub(super) fn split_heads_bwd<T: Elem>(
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
