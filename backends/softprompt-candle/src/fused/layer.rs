//! A whole Llama decoder layer over token rows that attend to a cached prefix (training).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::*;

/// A projection's weight, its bias, and its quantized blocks (then the weight tensor is a
/// shape-only stand-in).
pub(crate) type Projection = (
    Tensor,
    Option<Tensor>,
    Option<std::sync::Arc<softprompt_core::QuantMatrix>>,
);

/// The frozen weights of one Llama decoder layer, as the model holds them.
#[derive(Clone)]
pub(crate) struct LayerWeights {
    pub input_norm: Tensor,
    /// `[(h + 2·kv)·hd, d]` and its bias
    pub qkv: Projection,
    /// `[d, h·hd]`
    pub o: Projection,
    pub post_norm: Tensor,
    /// `[2·i, d]`, gate rows then up rows
    pub gate_up: Projection,
    /// `[d, i]`
    pub down: Projection,
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
pub(super) struct Saved<T> {
    pub(super) q: Vec<T>,
    pub(super) k: Vec<T>,
    pub(super) v: Vec<T>,
    x2: Vec<T>,
    pub(super) gu: Vec<T>,
}

pub(super) fn add_into<T: Elem>(acc: &mut [T], x: &[T]) {
    acc.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, x)| *a += *x));
}

/// Slices of every tensor in `ts` (CPU, contiguous), for `f`.
pub(super) fn with_all<T: Elem, R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> Result<R>,
) -> Result<R> {
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
    pub(super) fn tensors(&self) -> Vec<&Tensor> {
        let w = &self.w;
        // a quantized projection's stand-in has no values to view: the norm (any contiguous
        // tensor) holds its place, and `weight` reads the blocks instead
        fn weight<'t>(p: &'t Projection, stand_in: &'t Tensor) -> &'t Tensor {
            if p.2.is_some() {
                stand_in
            } else {
                &p.0
            }
        }
        let n = &w.input_norm;
        let mut ts = vec![
            &w.input_norm,
            weight(&w.qkv, n),
            weight(&w.o, n),
            &w.post_norm,
            weight(&w.gate_up, n),
            weight(&w.down, n),
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
    pub(super) fn parts<'a, T>(&'a self, t: &[&'a [T]]) -> Parts<'a, T> {
        let w = &self.w;
        let mut extra = t[9..].iter().copied();
        let mut bias_of = |b: &Option<Tensor>| b.as_ref().and_then(|_| extra.next());
        let weight = |p: &'a Projection, dense: &'a [T]| match &p.2 {
            Some(q) => Weight::Quant(q),
            None => Weight::Dense(dense),
        };
        Parts {
            input_norm: t[0],
            qkv: weight(&w.qkv, t[1]),
            o: weight(&w.o, t[2]),
            post_norm: t[3],
            gate_up: weight(&w.gate_up, t[4]),
            down: weight(&w.down, t[5]),
            cos: t[6],
            sin: t[7],
            bias: t[8],
            qkv_b: bias_of(&w.qkv.1),
            o_b: bias_of(&w.o.1),
            gate_up_b: bias_of(&w.gate_up.1),
            down_b: bias_of(&w.down.1),
        }
    }

    pub(super) fn dims(&self, x: &Shape, pk: &Shape) -> Result<(Dims, HeadLayout, usize, usize)> {
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

pub(super) struct Parts<'a, T> {
    pub(super) input_norm: &'a [T],
    pub(super) qkv: Weight<'a, T>,
    pub(super) o: Weight<'a, T>,
    pub(super) post_norm: &'a [T],
    pub(super) gate_up: Weight<'a, T>,
    pub(super) down: Weight<'a, T>,
    pub(super) cos: &'a [T],
    pub(super) sin: &'a [T],
    pub(super) bias: &'a [T],
    pub(super) qkv_b: Option<&'a [T]>,
    pub(super) o_b: Option<&'a [T]>,
    pub(super) gate_up_b: Option<&'a [T]>,
    pub(super) down_b: Option<&'a [T]>,
}

/// Copies `prefix [b, kv, n, hd]` into positions `0..n` of `full [b, kv, n + s, hd]`.
pub(super) fn place_prefix<T: Elem>(
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

pub(super) fn token_layer_fwd<T: Elem>(
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
        let qkv = linear_w(&hn, p.qkv, p.qkv_b, (h + 2 * kv) * hd);
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
        let mut x2 = linear_w(&att, p.o, p.o_b, dm);
        add_into(&mut x2, x);
        let hn2 = rms_rows(&x2, p.post_norm, op.w.eps);
        let gu = linear_w(&hn2, p.gate_up, p.gate_up_b, 2 * inter);
        let m = swiglu_rows(&gu, inter);
        let mut out = linear_w(&m, p.down, p.down_b, dm);
        add_into(&mut out, &x2);
        Ok((out, Saved { q, k, v, x2, gu }))
    })?;
    *op.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(saved));
    Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
}

/// `(∂x or nothing, ∂pk, ∂pv)`, each flat.
pub(super) type LayerGrads<T> = (Option<Vec<T>>, Vec<T>, Vec<T>);

pub(super) fn token_layer_bwd<T: Elem>(
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
        let gm = linear_grad_w(g, p.down, dm);
        let dgu = swiglu_bwd_rows(&sv.gu, &gm, inter);
        let dhn2 = linear_grad_w(&dgu, p.gate_up, 2 * inter);
        let mut dx2 = rms_bwd_rows(&sv.x2, &dhn2, p.post_norm, op.w.eps);
        add_into(&mut dx2, g);
        // attention: x2 = x + o(attention(split(qkv(rms(x)))))
        let datt = linear_grad_w(&dx2, p.o, dm);
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
            let dhn = linear_grad_w(&dqkv, p.qkv, (h + 2 * kv) * hd);
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
