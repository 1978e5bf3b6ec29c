//! Differentiable building blocks. candle's fused kernels (softmax_last_dim, rms_norm,
//! layer_norm, rope) record no backward, so the training path uses these compositions.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};

use crate::fused;

/// `x · Wᵀ + b` with `W` stored `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    /// A layer with weight `w [out, in]` and bias `b [out]`.
    pub fn new(w: Tensor, b: Option<Tensor>) -> Self {
        Linear { w, b }
    }

    /// The weight `[out, in]` and the bias.
    pub fn weights(&self) -> (&Tensor, Option<&Tensor>) {
        (&self.w, self.b.as_ref())
    }

    /// One layer computing `parts` side by side (their outputs concatenated): one matrix
    /// product instead of several narrower ones. All parts have a bias or none has.
    pub fn concat(parts: &[Linear]) -> Result<Self> {
        let ws: Vec<&Tensor> = parts.iter().map(|l| &l.w).collect();
        let w = Tensor::cat(&ws, 0)?;
        let bs: Option<Vec<&Tensor>> = parts.iter().map(|l| l.b.as_ref()).collect();
        let b = match bs {
            Some(bs) => Some(Tensor::cat(&bs, 0)?),
            None if parts.iter().any(|l| l.b.is_some()) => {
                candle_core::bail!("Linear::concat: some parts have a bias, some not")
            }
            None => None,
        };
        Ok(Linear { w, b })
    }

    /// `x · Wᵀ + b` (see [`linear`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.w, self.b.as_ref())
    }
}

/// `x · Wᵀ + b` over the last dimension of `x`, `W` `[out, in]` frozen: only the gradient with
/// respect to `x` is propagated.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if fused::supported(x) {
        // Training: the backward of a plain matmul would also compute the (unused) weight
        // gradient, as costly as the forward; this op only propagates to the input.
        // Inference: the input rows are read in place, and a product of a few rows (a decode
        // step) takes the few-rows kernel.
        let y = x
            .contiguous()?
            .apply_op1(fused::FrozenMatmul { w: w.clone() })?;
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let dims = x.dims().to_vec();
    let (last, lead) = dims
        .split_last()
        .expect("linear input has at least one dim");
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, *last))?;
    let y = if x.track_op() && x.device().is_cpu() {
        x2.contiguous()?
            .apply_op1(FrozenMatmulAny { w: w.clone() })?
    } else {
        x2.matmul(&w.t()?)?
    };
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// `x · Wᵀ + b` over the last dimension of `x` with `W` `[out, in]` in quantized blocks (CPU,
/// f32 or f64): only the gradient with respect to `x` is propagated, tile by tile. With
/// `int8_rows`, a product of at most four f32 rows with Q4_0/Q4_1/Q8_0 blocks rounds the rows
/// to 8 bits first (a decode step: see [`crate::CandleOptions::with_int8_decode`]).
pub fn quantized_linear(
    x: &Tensor,
    q: &std::sync::Arc<softprompt_core::QuantMatrix>,
    b: Option<&Tensor>,
    int8_rows: bool,
) -> Result<Tensor> {
    if !fused::supported(x) {
        candle_core::bail!(
            "quantized weights compute on the CPU in f32 or f64, not {:?} on {:?}",
            x.dtype(),
            x.device()
        );
    }
    let y = x.contiguous()?.apply_op1(fused::QuantMatmul {
        q: q.clone(),
        int8_rows,
    })?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// The frozen-weight matmul for the dtypes the fused kernels do not cover (bf16, f16): the input
/// is copied into a tensor and multiplied by candle.
struct FrozenMatmulAny {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmulAny {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul needs a contiguous input".into())
        })?;
        let dev = &candle_core::Device::Cpu;
        let x = match storage {
            CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], layout.shape(), dev)?,
            CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], layout.shape(), dev)?,
            CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], layout.shape(), dev)?,
            CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], layout.shape(), dev)?,
            _ => candle_core::bail!("frozen-matmul supports f32, f64, bf16 and f16 weights"),
        };
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let (guard, _) = y.storage_and_layout();
        match &*guard {
            Storage::Cpu(cpu) => Ok((cpu.clone(), shape)),
            _ => candle_core::bail!("frozen-matmul result left the CPU"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// Splits a fused projection `[b, s, (h + 2·kv)·hd]` into `q [b, h, s, hd]`, `k, v [b, kv, s,
/// hd]`, applying the rotary embedding to `q` and `k` with `rope = (cos, sin)`, each `[s, hd]`
/// (shared positions) or `[b, s, hd]` (per row). One fused op on the CPU in f32/f64.
pub fn split_heads(
    qkv: &Tensor,
    (h, kv, hd): (usize, usize, usize),
    rope_tables: Option<(&Tensor, &Tensor)>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, s, _) = qkv.dims3()?;
    let tables_fit = rope_tables.is_none_or(|(c, _)| c.dtype() == qkv.dtype());
    if fused::supported(qkv) && tables_fit {
        let op = fused::SplitHeads {
            h,
            kv,
            hd,
            rope: rope_tables
                .map(|(c, s)| Ok::<_, candle_core::Error>((c.contiguous()?, s.contiguous()?)))
                .transpose()?,
        };
        let flat = qkv.contiguous()?.apply_op1(op)?;
        let (nq, nk) = (b * h * s * hd, b * kv * s * hd);
        return Ok((
            flat.narrow(0, 0, nq)?.reshape((b, h, s, hd))?,
            flat.narrow(0, nq, nk)?.reshape((b, kv, s, hd))?,
            flat.narrow(0, nq + nk, nk)?.reshape((b, kv, s, hd))?,
        ));
    }
    split_heads_composed(qkv, (h, kv, hd), rope_tables)
}

/// [`split_heads`] from candle primitives (narrow, transpose, [`rope`]).
pub fn split_heads_composed(
    qkv: &Tensor,
    (h, kv, hd): (usize, usize, usize),
    rope_tables: Option<(&Tensor, &Tensor)>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, s, _) = qkv.dims3()?;
    let head = |from: usize, n: usize| -> Result<Tensor> {
        qkv.narrow(2, from * hd, n * hd)?
            .reshape((b, s, n, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (head(0, h)?, head(h, kv)?, head(h + kv, kv)?);
    match rope_tables {
        None => Ok((q, k, v)),
        Some((cos, sin)) => {
            let (cos, sin) = match cos.rank() {
                3 => (cos.unsqueeze(1)?, sin.unsqueeze(1)?),
                _ => (cos.clone(), sin.clone()),
            };
            Ok((rope(&q, &cos, &sin)?, rope(&k, &cos, &sin)?, v))
        }
    }
}

/// `silu(a) ⊙ u`, Llama's gated MLP activation, of the packed gate/up projection `[.., 2·i]`
/// (`a` the first half of the last dimension, `u` the second).
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    if fused::supported(gate_up) {
        return gate_up.contiguous()?.apply_op1(fused::SwiGlu);
    }
    swiglu_composed(gate_up)
}

/// [`swiglu`] from candle primitives.
pub fn swiglu_composed(gate_up: &Tensor) -> Result<Tensor> {
    let i = gate_up.dim(D::Minus1)? / 2;
    let a = gate_up.narrow(D::Minus1, 0, i)?;
    let u = gate_up.narrow(D::Minus1, i, i)?;
    a.silu()? * u
}

/// `gelu_tanh(a) ⊙ u` of the packed gate/up projection `[.., 2·i]` (Gemma's GeGLU); one fused
/// op on the CPU in f32/f64.
pub fn geglu(gate_up: &Tensor) -> Result<Tensor> {
    if fused::supported(gate_up) {
        return gate_up.contiguous()?.apply_op1(fused::GeGlu);
    }
    geglu_composed(gate_up)
}

/// [`geglu`] from candle primitives.
pub fn geglu_composed(gate_up: &Tensor) -> Result<Tensor> {
    let i = gate_up.dim(D::Minus1)? / 2;
    let a = gate_up.narrow(D::Minus1, 0, i)?;
    let u = gate_up.narrow(D::Minus1, i, i)?;
    a.gelu()? * u
}

/// [`rope`] on `[b, h, s, hd]` with tables `[s, hd]` or `[b, s, hd]` (per row); one fused op on
/// the CPU in f32/f64, the composition elsewhere.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused::supported(x) && cos.dtype() == x.dtype() {
        let op = fused::Rope {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            inverse: false,
        };
        return x.contiguous()?.apply_op1(op);
    }
    match cos.rank() {
        3 => rope(x, &cos.unsqueeze(1)?, &sin.unsqueeze(1)?),
        _ => rope(x, cos, sin),
    }
}

/// Softmax over the last dimension from differentiable primitives (max is a detached shift).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `log_softmax` over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) · w`, computed in f32 or wider; one fused op on the CPU
/// in f32/f64.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::supported(x) && w.dtype() == x.dtype() && w.dims() == [x.dim(D::Minus1)?] {
        let op = fused::RmsNorm {
            w: w.contiguous()?,
            eps,
        };
        return x.contiguous()?.apply_op1(op);
    }
    rms_norm_composed(x, w, eps)
}

/// [`rms_norm`] from candle primitives.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = upcast(x)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(w)
}

/// LayerNorm: `(x - mean) / sqrt(var + eps) · w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = upcast(x)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)
}

fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// Hugging Face's rotary embedding on `[b, h, s, hd]` with `cos`/`sin` of shape `[s, hd]`:
/// `x·cos + rotate_half(x)·sin`, `rotate_half(x) = [-x₂, x₁]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)?
        .broadcast_add(&rotated.broadcast_mul(sin)?)
}

/// RoPE tables `[positions.len(), head_dim]` for `positions`.
pub fn rope_tables(
    positions: &[usize],
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let len = positions.len();
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for &p in positions {
        let row: Vec<f64> = (0..half)
            .map(|i| {
                // HF computes inv_freq in f32 and the angle as an f32 product
                let inv = (1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)) as f64;
                (p as f32 * inv as f32) as f64
            })
            .collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos()));
            sin.extend(row.iter().map(|a| a.sin()));
        }
    }
    let cos = Tensor::from_vec(cos, (len, head_dim), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (len, head_dim), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Scaled dot-product attention of `q [b,h,s,hd]` over `k, v [b,kv,t,hd]` (`h` a multiple of
/// `kv`: grouped-query attention, query head `j` reads key/value head `j / (h / kv)` as in
/// Hugging Face's `repeat_kv`) with an additive bias broadcastable to `[b,1,s,t]`. Returns
/// `[b, s, h·hd]`, the input of the output projection. On the CPU in f32/f64 with a bias of
/// shape `[1 or b, 1, s, t]` (or none) this is one fused op; otherwise
/// [`attention_composed`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, s, hd) = q.dims4()?;
    let bias_fits = match bias {
        None => true,
        Some(bias) => {
            bias.rank() == 4
                && bias.dtype() == q.dtype()
                && matches!(bias.dims(), [bb, 1, bs, bt] if (*bb == 1 || *bb == b) && *bs == s && *bt == k.dim(2)?)
        }
    };
    if fused::supported(q) && bias_fits && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        let op = fused::Attention {
            bias: bias.map(Tensor::contiguous).transpose()?,
            scale: 1.0 / (hd as f64).sqrt(),
        };
        let out = q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
        return out.reshape((b, s, h * hd));
    }
    attention_composed(q, k, v, bias)?
        .transpose(1, 2)?
        .reshape((b, s, h * hd))
}

/// [`attention`] from differentiable candle primitives, returning `[b, h, s, hd]`. The query
/// heads of a group are stacked as one `[rep·s, hd]` matrix instead of repeating keys and values.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, s, hd) = q.dims4()?;
    let (kv, t) = (k.dim(1)?, k.dim(2)?);
    let rep = h / kv;
    let q = q.reshape((b, kv, rep * s, hd))?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = match bias {
        Some(bias) => {
            let bias = match bias.rank() {
                4 => bias.unsqueeze(1)?,
                _ => bias.clone(),
            };
            scores
                .reshape((b, kv, rep, s, t))?
                .broadcast_add(&bias)?
                .reshape((b, kv, rep * s, t))?
        }
        None => scores,
    };
    softmax_last(&scores)?.matmul(v)?.reshape((b, h, s, hd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_and_log_softmax_agree_and_differentiate() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![1.0f64, 2.0, 0.5, -1.0, 0.0, 3.0], (2, 3), &dev).unwrap();
        let s = softmax_last(x.as_tensor()).unwrap();
        let ls = log_softmax_last(x.as_tensor()).unwrap();
        let diff = (s.log().unwrap() - &ls)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12);
        // d/dx of sum(softmax * c) is nonzero and matches a finite difference
        let c = Tensor::new(&[[1.0f64, 0.0, 0.0], [0.0, 0.0, 1.0]], &dev).unwrap();
        let f = |t: &Tensor| (softmax_last(t).unwrap() * &c).unwrap().sum_all().unwrap();
        let g = f(x.as_tensor()).backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
        let base: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        for i in 0..6 {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let fp = f(&Tensor::from_vec(plus, (2, 3), &dev).unwrap())
                .to_scalar::<f64>()
                .unwrap();
            let fm = f(&Tensor::from_vec(minus, (2, 3), &dev).unwrap())
                .to_scalar::<f64>()
                .unwrap();
            let fd = (fp - fm) / (2.0 * eps);
            assert!(
                (fd - g[i / 3][i % 3]).abs() < 1e-7,
                "i {i}: fd {fd} vs {}",
                g[i / 3][i % 3]
            );
        }
    }

    #[test]
    fn rms_norm_matches_formula() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3.0f32, 4.0]], &dev).unwrap();
        let w = Tensor::new(&[1.0f32, 2.0], &dev).unwrap();
        let y = rms_norm(&x, &w, 0.0).unwrap().to_vec2::<f32>().unwrap();
        let rms = (12.5f32).sqrt();
        assert!((y[0][0] - 3.0 / rms).abs() < 1e-6 && (y[0][1] - 8.0 / rms).abs() < 1e-6);
    }
}
