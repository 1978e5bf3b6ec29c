//! candle's implementation of the op seam ([`softprompt_nn::Ops`]): the shared model files run
//! on candle tensors. The fused CPU kernels (`fused.rs`) come in as overrides of the default
//! compositions (split heads + RoPE, SwiGLU, the whole Llama block in training), and a packed
//! pass over per-sequence host caches (continuous batching on the CPU) overrides
//! self-attention.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use softprompt_core::{Error, HostTensor, Positions, Result};
use softprompt_nn::models::VitBlock;
use softprompt_nn::{Gelu, Heads, Linear, Ops, Pass, PositionIds, PreNormBlock, Rope};

use crate::model::HostCache;
use crate::{fused, ops, to_core};

/// candle tensors on one device in one dtype.
pub(crate) struct CandleOps<'h> {
    pub device: Device,
    pub dtype: DType,
    /// Set for a packed pass over host caches (see [`HostPass`]).
    host: Option<RefCell<HostPass<'h>>>,
    /// Whether projection weights held in quantized blocks stay so (CPU, f32/f64 only).
    pub quantized: bool,
    /// Whether products of a few rows with quantized weights round the rows to 8 bits (a decode
    /// step; see [`crate::CandleOptions::with_int8_decode`]).
    pub int8_rows: bool,
}

/// New tokens of several sequences as one unpadded batch `[total, 1, d]`: `counts[s]` consecutive
/// rows belong to `caches[s]`; each row's keys and values are appended to its sequence's cache and
/// the row attends over that cache where it lies.
pub(crate) struct HostPass<'h> {
    pub caches: Vec<&'h mut HostCache>,
    pub counts: Vec<usize>,
    /// `cos`/`sin` rows (`[hd]` per input row), read from the pass's RoPE tables once.
    tables: Option<(Vec<f32>, Vec<f32>)>,
}

impl<'h> HostPass<'h> {
    pub fn new(caches: Vec<&'h mut HostCache>, counts: Vec<usize>) -> Self {
        HostPass {
            caches,
            counts,
            tables: None,
        }
    }
}

impl CandleOps<'static> {
    /// Plain tensor ops on `device` in `dtype`.
    pub fn new(device: &Device, dtype: DType) -> Self {
        CandleOps {
            device: device.clone(),
            dtype,
            host: None,
            quantized: false,
            int8_rows: false,
        }
    }
}

impl<'h> CandleOps<'h> {
    /// Ops whose self-attention runs over the host caches of `pass`.
    pub fn with_host(device: &Device, dtype: DType, pass: HostPass<'h>) -> Self {
        CandleOps {
            device: device.clone(),
            dtype,
            quantized: false,
            int8_rows: false,
            host: Some(RefCell::new(pass)),
        }
    }

    fn host_attention(
        &self,
        hp: &mut HostPass<'_>,
        qkv: &Tensor,
        heads: Heads,
        rope: Option<&Rope<Tensor>>,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let rows = qkv.dim(0)?;
        let (h, kv, hd) = (heads.q, heads.kv, heads.dim);
        let width = heads.qkv_width();
        if hp.tables.is_none() {
            let r = rope.ok_or_else(|| {
                candle_core::Error::Msg("host decoding runs rotary-position models only".into())
            })?;
            let host = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
            hp.tables = Some((host(&r.cos)?, host(&r.sin)?));
        }
        let (cos, sin) = hp.tables.as_ref().expect("filled above");
        let qkv: Vec<f32> = qkv.flatten_all()?.to_vec1()?;
        let mut att = vec![0f32; rows * h * hd];
        // each sequence's rows, in order (a row attends to the rows before it)
        let mut jobs = Vec::with_capacity(hp.caches.len());
        let (mut q_rest, mut a_rest, mut first) = (qkv.as_slice(), att.as_mut_slice(), 0);
        for (cache, &n) in hp.caches.iter_mut().zip(&hp.counts) {
            let (q, qr) = q_rest.split_at(n * width);
            let (a, ar) = std::mem::take(&mut a_rest).split_at_mut(n * h * hd);
            (q_rest, a_rest) = (qr, ar);
            let (kc, vc) = &mut cache.layers[layer];
            jobs.push(((kc, vc), q, a, first));
            first += n;
        }
        jobs.into_par_iter().for_each(|((kc, vc), q, a, first)| {
            for (j, (row, out)) in q.chunks(width).zip(a.chunks_mut(h * hd)).enumerate() {
                let t = (first + j) * hd;
                let tables = (&cos[t..t + hd], &sin[t..t + hd]);
                fused::decode_attention_row(row, (h, kv, hd), tables, (kc, vc), out);
            }
        });
        Tensor::from_vec(att, (rows, 1, h * hd), &self.device)
    }

    /// The Llama block as one op in training: token rows over the prompt's tracked keys and
    /// values, read but not extended (see [`fused::TokenLayer`]).
    fn token_layer(
        &self,
        b: &PreNormBlock<'_, Tensor>,
        x: &Tensor,
        rope: &Rope<Tensor>,
        layer: usize,
        pass: &Pass<'_, Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        let (Some((pk, pv)), Some(bias)) = (pass.past(layer), pass.bias) else {
            return Ok(None);
        };
        let fits = !pass.extend_cache
            && !rope.per_row
            && pk.track_op()
            && fused::supported(pk)
            && pk.dtype() == x.dtype();
        if !fits {
            return Ok(None);
        }
        let owned = |l: &Linear<Tensor>| (l.w.clone(), l.b.clone(), l.quant.clone());
        let op = fused::TokenLayer {
            w: fused::LayerWeights {
                input_norm: b.input_norm.clone(),
                qkv: owned(b.qkv),
                o: owned(b.o),
                post_norm: b.post_norm.clone(),
                gate_up: owned(b.gate_up),
                down: owned(b.down),
                eps: b.eps,
                heads: (b.heads.q, b.heads.kv, b.heads.dim),
            },
            rope: (rope.cos.clone(), rope.sin.clone()),
            bias: bias.contiguous()?,
            saved: Default::default(),
        };
        let y = x
            .contiguous()?
            .apply_op3(&pk.contiguous()?, &pv.contiguous()?, op)?;
        Ok(Some(y))
    }
}

/// `ids.len()` positions as `[rows, tokens]` host ids, and `rows` (1 for shared positions).
fn host_positions(positions: &PositionIds<'_, Tensor>) -> Result<(Vec<usize>, usize, usize)> {
    match positions {
        PositionIds::Host { positions, tokens } => {
            let rows = match positions {
                Positions::From(_) => 1,
                Positions::PerRow(starts) => starts.len(),
            };
            Ok((positions.ids(*tokens), rows, *tokens))
        }
        PositionIds::Tensor(_) => Err(Error::unsupported(
            crate::BACKEND,
            "positions given as a tensor",
            Some("pass host positions"),
        )),
    }
}

fn c<T>(r: candle_core::Result<T>) -> Result<T> {
    r.map_err(to_core)
}

impl Ops for CandleOps<'_> {
    type Tensor = Tensor;

    fn constant(&self, _name: &str, value: HostTensor) -> Result<Tensor> {
        c(Tensor::from_vec(value.data, value.shape, &self.device)
            .and_then(|t| t.to_dtype(self.dtype)))
    }

    fn keeps_quantized(&self) -> bool {
        self.quantized && self.device.is_cpu() && matches!(self.dtype, DType::F32 | DType::F64)
    }

    fn quantized_linear_weight(
        &self,
        _name: &str,
        q: &softprompt_core::QuantMatrix,
    ) -> Result<Tensor> {
        // the layer's shape without its values: one element broadcast (no memory)
        c(Tensor::zeros((1, 1), self.dtype, &self.device)
            .and_then(|t| t.broadcast_as((q.rows(), q.cols))))
    }

    fn table_rows(&self, table: &Linear<Tensor>, ids: &Tensor) -> Result<Tensor> {
        let Some(q) = &table.quant else {
            return self.embedding(&table.w, ids);
        };
        // the rows asked for, dequantized one by one
        let list = c(ids
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::U32)?.to_vec1::<u32>()))?;
        let d = q.cols;
        let mut out = vec![0f32; list.len() * d];
        for (row, id) in out.chunks_mut(d.max(1)).zip(&list) {
            let id = *id as usize;
            if id >= q.rows() {
                return Err(Error::InvalidArgument(format!(
                    "token id {id} outside the embedding table of {} rows",
                    q.rows()
                )));
            }
            q.dequantize_rows(id, id + 1, row);
        }
        let mut shape = ids.dims().to_vec();
        shape.push(d);
        c(Tensor::from_vec(out, shape, &self.device).and_then(|t| t.to_dtype(self.dtype)))
    }

    fn table_head(&self, x: &Tensor, table: &Linear<Tensor>) -> Result<Tensor> {
        match &table.quant {
            Some(q) => c(ops::quantized_linear(x, q, None, self.int8_rows)),
            None => self.head(x, &table.w),
        }
    }

    fn linear(&self, x: &Tensor, layer: &Linear<Tensor>) -> Result<Tensor> {
        match &layer.quant {
            Some(q) => c(ops::quantized_linear(
                x,
                q,
                layer.b.as_ref(),
                self.int8_rows,
            )),
            None => c(ops::linear(x, &layer.w, layer.b.as_ref())),
        }
    }

    fn head(&self, x: &Tensor, table: &Tensor) -> Result<Tensor> {
        c(ops::linear(x, table, None))
    }

    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let mut shape = ids.dims().to_vec();
        c((|| {
            shape.push(table.dim(1)?);
            table.index_select(&ids.flatten_all()?, 0)?.reshape(shape)
        })())
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        c(ops::rms_norm(x, w, eps))
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        c(ops::layer_norm(x, w, b, eps))
    }

    fn rope_tables(
        &self,
        positions: &PositionIds<'_, Tensor>,
        head_dim: usize,
        theta: f64,
        _max_positions: usize,
    ) -> Result<Rope<Tensor>> {
        let (ids, rows, tokens) = host_positions(positions)?;
        let per_row = matches!(
            positions,
            PositionIds::Host {
                positions: Positions::PerRow(_),
                ..
            }
        );
        let (cos, sin) = c(ops::rope_tables(
            &ids,
            head_dim,
            theta,
            self.dtype,
            &self.device,
        ))?;
        // per-row tables are `[rows, tokens, hd]` (what the fused split-heads op takes)
        let (cos, sin) = if per_row {
            c(cos
                .reshape((rows, tokens, head_dim))
                .and_then(|cos| Ok((cos, sin.reshape((rows, tokens, head_dim))?))))?
        } else {
            (cos, sin)
        };
        Ok(Rope {
            cos,
            sin,
            theta,
            per_row,
        })
    }

    fn rope(&self, x: &Tensor, rope: &Rope<Tensor>) -> Result<Tensor> {
        c(ops::rope_heads(x, &rope.cos, &rope.sin))
    }

    fn position_rows(&self, table: &Tensor, positions: &PositionIds<'_, Tensor>) -> Result<Tensor> {
        let (ids, rows, tokens) = host_positions(positions)?;
        c((|| match positions {
            PositionIds::Host {
                positions: Positions::From(start),
                ..
            } => table.narrow(0, *start, tokens),
            _ => {
                let ids: Vec<u32> = ids.iter().map(|p| *p as u32).collect();
                let ids = Tensor::from_vec(ids, rows * tokens, &self.device)?;
                table
                    .index_select(&ids, 0)?
                    .reshape((rows, tokens, table.dim(1)?))
            }
        })())
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        _heads: Heads,
    ) -> Result<Tensor> {
        c(ops::attention(q, k, v, bias))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        c(if a.dims() == b.dims() {
            a + b
        } else {
            a.broadcast_add(b)
        })
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        c(if a.dims() == b.dims() {
            a * b
        } else {
            a.broadcast_mul(b)
        })
    }

    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        c(x.silu())
    }

    fn gelu(&self, x: &Tensor, form: Gelu) -> Result<Tensor> {
        c(match form {
            Gelu::Tanh => x.gelu(),
            Gelu::Erf => x.gelu_erf(),
        })
    }

    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        c(x.narrow(dim, start, len))
    }

    fn cat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
        c(Tensor::cat(xs, dim))
    }

    fn reshape(&self, x: &Tensor, shape: &[i64]) -> Result<Tensor> {
        let dims = resolve_shape(x.dims(), shape)?;
        c(x.reshape(dims))
    }

    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        c(x.permute(perm))
    }

    fn split_heads(
        &self,
        qkv: &Tensor,
        heads: Heads,
        rope: Option<&Rope<Tensor>>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        c(ops::split_heads(
            qkv,
            (heads.q, heads.kv, heads.dim),
            rope.map(|r| (&r.cos, &r.sin)),
        ))
    }

    fn swiglu(&self, gate_up: &Tensor, _inner: usize) -> Result<Tensor> {
        c(ops::swiglu(gate_up))
    }

    fn geglu(&self, gate_up: &Tensor, inner: usize, form: Gelu) -> Result<Tensor> {
        match form {
            Gelu::Tanh => c(ops::geglu(gate_up)),
            Gelu::Erf => softprompt_nn::ops::geglu_composed(self, gate_up, inner, form),
        }
    }

    fn self_attention(
        &self,
        qkv: &Tensor,
        heads: Heads,
        rope: Option<&Rope<Tensor>>,
        layer: usize,
        pass: &mut Pass<'_, Tensor>,
    ) -> Result<Tensor> {
        if let Some(host) = &self.host {
            let mut hp = host.borrow_mut();
            return c(self.host_attention(&mut hp, qkv, heads, rope, layer));
        }
        softprompt_nn::ops::self_attention_composed(self, qkv, heads, rope, layer, pass)
    }

    fn fused_vit_block(
        &self,
        block: &VitBlock<Tensor>,
        x: &Tensor,
        heads: Heads,
        eps: f64,
        cls_only: bool,
        replace: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let linears = [&block.qkv, &block.o, &block.fc1, &block.fc2];
        let fits = fused::supported(x)
            && replace.is_none_or(|r| r.dtype() == x.dtype() && r.device().is_cpu());
        if !fits || linears.iter().any(|l| l.quant.is_some()) {
            return Ok(None);
        }
        let owned = |l: &Linear<Tensor>| (l.w.clone(), l.b.clone());
        let op = fused::VitLayer {
            w: fused::VitWeights {
                norm1: (block.norm1.w.clone(), block.norm1.b.clone()),
                qkv: owned(&block.qkv),
                o: owned(&block.o),
                ls1: block.ls1.clone(),
                norm2: (block.norm2.w.clone(), block.norm2.b.clone()),
                fc1: owned(&block.fc1),
                fc2: owned(&block.fc2),
                ls2: block.ls2.clone(),
                eps,
                heads: (heads.q, heads.dim),
            },
            train: x.track_op() || replace.is_some_and(|r| r.track_op()),
            cls_only,
            saved: Default::default(),
        };
        c((|| {
            let x = x.contiguous()?;
            match replace {
                Some(rows) => x.apply_op2(&rows.contiguous()?, op),
                None => x.apply_op1(op),
            }
        })()
        .map(Some))
    }

    fn fused_block(
        &self,
        block: &PreNormBlock<'_, Tensor>,
        x: &Tensor,
        rope: &Rope<Tensor>,
        layer: usize,
        pass: &Pass<'_, Tensor>,
    ) -> Result<Option<Tensor>> {
        c(self.token_layer(block, x, rope, layer, pass))
    }
}

/// `shape` with ONNX's conventions (0 keeps a dimension, one -1 is inferred) against `dims`.
pub(crate) fn resolve_shape(dims: &[usize], shape: &[i64]) -> Result<Vec<usize>> {
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, s) in shape.iter().enumerate() {
        match *s {
            0 => out.push(*dims.get(i).ok_or_else(|| {
                Error::Shape(format!(
                    "reshape {dims:?} to {shape:?}: no dimension {i} to keep"
                ))
            })?),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            s if s > 0 => out.push(s as usize),
            _ => return Err(Error::Shape(format!("reshape {dims:?} to {shape:?}"))),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || total % known != 0 {
            return Err(Error::Shape(format!("reshape {dims:?} to {shape:?}")));
        }
        out[i] = total / known;
    }
    Ok(out)
}
