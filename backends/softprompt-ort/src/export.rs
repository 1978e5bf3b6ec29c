//! The ONNX exporter: a Llama-family or GPT-2 model description plus its weights become one
//! ONNX graph that takes soft prompts.
//!
//! Inputs (all dimensions dynamic):
//!
//! | name | type | shape | meaning |
//! |---|---|---|---|
//! | `input_ids` | int64 | `[batch, tokens]` | token ids, right padded |
//! | `prompt_embeds` | float | `[batch, virtual, hidden]` | each row's soft prompt (`virtual` may be 0) |
//! | `position_ids` | int64 | `[batch, virtual + tokens]` | position of every new input |
//! | `attention_bias` | float | `[batch, 1, virtual + tokens, past + virtual + tokens]` | additive mask: 0 visible, -1e9 hidden (causality and padding) |
//! | `gather_index` | int64 | `[batch, picks, 1]` | positions whose hidden state goes through the head |
//! | `candidate_ids` | int64 | `[batch, picks, candidates]` | tokens whose log-probability is returned |
//! | `past_key.{i}`, `past_value.{i}` | float | `[batch, kv_heads, past, head_dim]` | KV cache (`past` may be 0) |
//!
//! Outputs: `logprobs [batch, picks, candidates]` (log-softmax over the vocabulary, gathered at
//! the candidates: the loss and rank classification never ship `[batch, seq, vocab]` back),
//! `logits [batch, picks, vocab]` (raw logits at the picked positions only: generation and the
//! full-logits check), and `present_key.{i}`, `present_value.{i}` (the cache after this call).
//!
//! The embedding lookup and the `[prompt][tokens]` concatenation happen inside the graph. The
//! graph uses the standard `ai.onnx` domain at opset 17 only (no contrib operators), so any
//! ONNX runtime can execute it (sessions run it at ONNX Runtime's full graph optimization level).

use std::path::{Path, PathBuf};

use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    Message, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use softprompt_core::model::{
    gpt2_names, llama_names, Gpt2Activation, Gpt2Config, HostTensor, LlamaConfig, ModelConfig,
    ModelSource, ModelWeights, GPT2_LN_F, GPT2_WPE, GPT2_WTE, LLAMA_EMBED, LLAMA_FINAL_NORM,
    LM_HEAD,
};
use softprompt_core::{Error, Result};

/// Version of the graph layout; part of the cache key, bumped whenever the graph changes.
pub const EXPORT_VERSION: u32 = 1;
/// ONNX opset of the exported graph.
pub const OPSET: i64 = 17;
/// ONNX IR version matching [`OPSET`].
const IR_VERSION: i64 = 8;
/// Protobuf messages cannot exceed 2 GiB; larger models would need external data files.
const MAX_PROTO_BYTES: usize = (1 << 31) - 1;

/// Metadata key holding the weights' fingerprint in the exported model.
pub const META_FINGERPRINT: &str = "softprompt.fingerprint";
/// Metadata key holding the model configuration (JSON).
pub const META_CONFIG: &str = "softprompt.config";
/// Metadata key holding [`EXPORT_VERSION`].
pub const META_VERSION: &str = "softprompt.export_version";

const FLOAT: i32 = 1;
const INT64: i32 = 7;

/// Builds a graph node by node; every intermediate value gets a fresh name.
struct Builder {
    graph: GraphProto,
    next: usize,
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = v.to_vec();
    a
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::FLOAT.into();
    a.f = v;
    a
}

/// A value's declared type: `elem` with named (symbolic) or fixed dimensions.
fn value_info(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.value = Some(match d {
            Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
            Dim::Named(s) => tensor_shape_proto::dimension::Value::DimParam((*s).into()),
        });
        shape.dim.push(dim);
    }
    let mut tensor = type_proto::Tensor::new();
    tensor.elem_type = elem;
    tensor.shape = Some(shape).into();
    let mut tp = TypeProto::new();
    tp.value = Some(type_proto::Value::TensorType(tensor));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(tp).into();
    v
}

#[derive(Clone, Copy)]
enum Dim {
    Fixed(usize),
    Named(&'static str),
}

impl Builder {
    fn new() -> Self {
        Builder {
            graph: GraphProto::new(),
            next: 0,
        }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("{hint}_{}", self.next)
    }

    /// Adds `op(inputs)` with one output; returns the output's name.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.op_into(op, inputs, attrs, &[&out]);
        out
    }

    fn op_into(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, outs: &[&str]) {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.name = format!("n{}_{op}", self.graph.node.len());
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = outs.iter().map(|s| s.to_string()).collect();
        n.attribute = attrs;
        self.graph.node.push(n);
    }

    fn op_multi(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        let outs: Vec<String> = (0..n).map(|_| self.fresh(op)).collect();
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.op_into(op, inputs, attrs, &refs);
        outs
    }

    /// A float initializer (a weight) holding `data` of shape `dims`.
    fn weight(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        let mut t = TensorProto::new();
        t.name = name.into();
        t.data_type = FLOAT;
        t.dims = dims.iter().map(|d| *d as i64).collect();
        let mut raw = Vec::with_capacity(data.len() * 4);
        for x in data {
            raw.extend_from_slice(&x.to_le_bytes());
        }
        t.raw_data = raw;
        self.graph.initializer.push(t);
        name.to_string()
    }

    /// A constant int64 vector.
    fn ints(&mut self, v: &[i64]) -> String {
        let name = self.fresh("const_i64");
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = INT64;
        t.dims = vec![v.len() as i64];
        t.int64_data = v.to_vec();
        self.graph.initializer.push(t);
        name
    }

    /// A constant float scalar.
    fn scalar(&mut self, v: f32) -> String {
        let name = self.fresh("const_f32");
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = FLOAT;
        t.float_data = vec![v];
        self.graph.initializer.push(t);
        name
    }

    fn matmul(&mut self, x: &str, w: &str, b: Option<&str>) -> String {
        let y = self.op("MatMul", &[x, w], vec![]);
        match b {
            Some(b) => self.op("Add", &[&y, b], vec![]),
            None => y,
        }
    }

    fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.ints(shape);
        self.op("Reshape", &[x, &s], vec![])
    }

    fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op("Transpose", &[x], vec![attr_ints("perm", perm)])
    }

    fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let a = self.ints(axes);
        self.op("Unsqueeze", &[x, &a], vec![])
    }

    /// `x[..., start..end]` along `axis`.
    fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64) -> String {
        let s = self.ints(&[start]);
        let e = self.ints(&[end]);
        let a = self.ints(&[axis]);
        self.op("Slice", &[x, &s, &e, &a], vec![])
    }

    /// Hugging Face's RMSNorm in f32: `w * x / sqrt(mean(x²) + eps)`.
    fn rms_norm(&mut self, x: &str, w: &str, eps: f64) -> String {
        let sq = self.op("Mul", &[x, x], vec![]);
        let mean = self.op(
            "ReduceMean",
            &[&sq],
            vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
        );
        let e = self.scalar(eps as f32);
        let var = self.op("Add", &[&mean, &e], vec![]);
        let std = self.op("Sqrt", &[&var], vec![]);
        let normed = self.op("Div", &[x, &std], vec![]);
        self.op("Mul", &[&normed, w], vec![])
    }

    fn layer_norm(&mut self, x: &str, w: &str, b: &str, eps: f64) -> String {
        self.op(
            "LayerNormalization",
            &[x, w, b],
            vec![attr_int("axis", -1), attr_float("epsilon", eps as f32)],
        )
    }

    /// `x · cos + rotate_half(x) · sin` (the half-split RoPE of Hugging Face Llama).
    fn rope(&mut self, x: &str, cos: &str, sin: &str, head_dim: usize) -> String {
        let half = (head_dim / 2) as i64;
        let x1 = self.slice(x, -1, 0, half);
        let x2 = self.slice(x, -1, half, head_dim as i64);
        let neg = self.op("Neg", &[&x2], vec![]);
        let rot = self.op("Concat", &[&neg, &x1], vec![attr_int("axis", -1)]);
        let a = self.op("Mul", &[x, cos], vec![]);
        let b = self.op("Mul", &[&rot, sin], vec![]);
        self.op("Add", &[&a, &b], vec![])
    }

    /// `[b, s, heads·hd]` → `[b, heads, s, hd]`.
    fn split_heads(&mut self, x: &str, heads: usize, head_dim: usize) -> String {
        let r = self.reshape(x, &[0, 0, heads as i64, head_dim as i64]);
        self.transpose(&r, &[0, 2, 1, 3])
    }

    /// Attention of `q [b, h, s, hd]` over the cache `k, v [b, kv, t, hd]` with the additive
    /// `bias5 [b, 1, 1, s, t]`, grouped-query (query head `j` reads key/value head `j / (h/kv)`);
    /// returns `[b, s, h·hd]`.
    fn attention(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        bias5: &str,
        Heads {
            heads,
            kv_heads,
            head_dim,
        }: Heads,
    ) -> String {
        let rep = heads / kv_heads;
        let scale = self.scalar(1.0 / (head_dim as f32).sqrt());
        let q = self.op("Mul", &[q, &scale], vec![]);
        let q5 = self.reshape(&q, &[0, kv_heads as i64, rep as i64, -1, head_dim as i64]);
        let k5 = self.unsqueeze(k, &[2]);
        let kt = self.transpose(&k5, &[0, 1, 2, 4, 3]);
        let scores = self.op("MatMul", &[&q5, &kt], vec![]);
        let scores = self.op("Add", &[&scores, bias5], vec![]);
        let p = self.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let v5 = self.unsqueeze(v, &[2]);
        let o = self.op("MatMul", &[&p, &v5], vec![]);
        let o = self.reshape(&o, &[0, heads as i64, -1, head_dim as i64]);
        let o = self.transpose(&o, &[0, 2, 1, 3]);
        self.reshape(&o, &[0, 0, (heads * head_dim) as i64])
    }

    /// Appends this call's keys/values to layer `i`'s cache and declares them as outputs.
    fn cache(&mut self, i: usize, k: &str, v: &str) -> (String, String) {
        let (pk, pv) = (format!("past_key.{i}"), format!("past_value.{i}"));
        let (ok, ov) = (format!("present_key.{i}"), format!("present_value.{i}"));
        self.op_into("Concat", &[&pk, k], vec![attr_int("axis", 2)], &[&ok]);
        self.op_into("Concat", &[&pv, v], vec![attr_int("axis", 2)], &[&ov]);
        (ok, ov)
    }
}

/// Attention geometry.
#[derive(Clone, Copy)]
struct Heads {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Weights taken out of the model description one by one (each is copied into the graph once).
struct Weights<'a>(&'a mut ModelWeights);

impl Weights<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        self.0.take(name, shape)
    }

    /// `name` `[rows, cols]` stored transposed (`[cols, rows]`), as `MatMul(x, W)` wants it.
    fn transposed(
        &mut self,
        g: &mut Builder,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<String> {
        let w = self.take(name, &[rows, cols])?;
        let mut t = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = w.data[r * cols + c];
            }
        }
        Ok(g.weight(name, &[cols, rows], &t))
    }

    fn plain(&mut self, g: &mut Builder, name: &str, shape: &[usize]) -> Result<String> {
        let w = self.take(name, shape)?;
        Ok(g.weight(name, shape, &w.data))
    }

    /// A Hugging Face linear layer `weight [out, in]` (+ `bias [out]`) as `(W^T, bias)`.
    fn linear(
        &mut self,
        g: &mut Builder,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<(String, Option<String>)> {
        let w = self.transposed(g, &format!("{prefix}.weight"), out, inp)?;
        let b = if bias {
            Some(self.plain(g, &format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok((w, b))
    }

    /// GPT-2's Conv1D: `weight [in, out]` is already what `MatMul` wants.
    fn conv1d(
        &mut self,
        g: &mut Builder,
        prefix: &str,
        inp: usize,
        out: usize,
    ) -> Result<(String, String)> {
        let w = self.plain(g, &format!("{prefix}.weight"), &[inp, out])?;
        let b = self.plain(g, &format!("{prefix}.bias"), &[out])?;
        Ok((w, b))
    }
}

/// Declares the graph's inputs and outputs (shared by both families).
fn declare_io(
    g: &mut Builder,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    vocab: usize,
) {
    use Dim::{Fixed, Named};
    let inputs = [
        value_info("input_ids", INT64, &[Named("batch"), Named("tokens")]),
        value_info(
            "prompt_embeds",
            FLOAT,
            &[Named("batch"), Named("virtual"), Fixed(hidden)],
        ),
        value_info("position_ids", INT64, &[Named("batch"), Named("seq")]),
        value_info(
            "attention_bias",
            FLOAT,
            &[Named("batch"), Fixed(1), Named("seq"), Named("total")],
        ),
        value_info(
            "gather_index",
            INT64,
            &[Named("batch"), Named("picks"), Fixed(1)],
        ),
        value_info(
            "candidate_ids",
            INT64,
            &[Named("batch"), Named("picks"), Named("candidates")],
        ),
    ];
    g.graph.input.extend(inputs);
    let cache = [
        Named("batch"),
        Fixed(kv_heads),
        Named("past"),
        Fixed(head_dim),
    ];
    let present = [
        Named("batch"),
        Fixed(kv_heads),
        Named("total"),
        Fixed(head_dim),
    ];
    g.graph.output.push(value_info(
        "logprobs",
        FLOAT,
        &[Named("batch"), Named("picks"), Named("candidates")],
    ));
    g.graph.output.push(value_info(
        "token_embeds",
        FLOAT,
        &[Named("batch"), Named("tokens"), Fixed(hidden)],
    ));
    g.graph.output.push(value_info(
        "logits",
        FLOAT,
        &[Named("batch"), Named("picks"), Fixed(vocab)],
    ));
    for i in 0..layers {
        g.graph
            .input
            .push(value_info(&format!("past_key.{i}"), FLOAT, &cache));
        g.graph
            .input
            .push(value_info(&format!("past_value.{i}"), FLOAT, &cache));
        g.graph
            .output
            .push(value_info(&format!("present_key.{i}"), FLOAT, &present));
        g.graph
            .output
            .push(value_info(&format!("present_value.{i}"), FLOAT, &present));
    }
}

/// `[prompt_embeds][embed(input_ids)]` along the sequence.
fn embed_inputs(g: &mut Builder, table: &str) -> String {
    g.op_into(
        "Gather",
        &[table, "input_ids"],
        vec![attr_int("axis", 0)],
        &["token_embeds"],
    );
    g.op(
        "Concat",
        &["prompt_embeds", "token_embeds"],
        vec![attr_int("axis", 1)],
    )
}

/// Final norm at the picked positions, the head, and the two outputs.
fn head(
    g: &mut Builder,
    x: &str,
    norm: impl FnOnce(&mut Builder, &str) -> String,
    head_w: &str,
    hidden: usize,
    vocab: usize,
) {
    let picked = g.op(
        "GatherND",
        &[x, "gather_index"],
        vec![attr_int("batch_dims", 1)],
    );
    let normed = norm(g, &picked);
    // Gemm wants 2-D operands: [b, k, d] → [b·k, d] · head^T (the head stays [vocab, d], shared
    // with the embedding when tied) → [b, k, vocab]
    let shape = g.op("Shape", &["gather_index"], vec![]);
    let bk = g.slice(&shape, 0, 0, 2);
    let v = g.ints(&[vocab as i64]);
    let out_shape = g.op("Concat", &[&bk, &v], vec![attr_int("axis", 0)]);
    let flat = g.reshape(&normed, &[-1, hidden as i64]);
    let logits2 = g.op("Gemm", &[&flat, head_w], vec![attr_int("transB", 1)]);
    g.op_into("Reshape", &[&logits2, &out_shape], vec![], &["logits"]);
    let logp = g.op("LogSoftmax", &["logits"], vec![attr_int("axis", -1)]);
    g.op_into(
        "GatherElements",
        &[&logp, "candidate_ids"],
        vec![attr_int("axis", 2)],
        &["logprobs"],
    );
}

fn export_llama(c: &LlamaConfig, weights: &mut ModelWeights) -> Result<Builder> {
    let mut g = Builder::new();
    let (d, hd) = (c.hidden_size, c.head_dim);
    let (h, kv) = (c.num_attention_heads, c.num_key_value_heads);
    declare_io(&mut g, c.num_hidden_layers, kv, hd, d, c.vocab_size);
    let mut w = Weights(weights);
    let embed = w.plain(&mut g, LLAMA_EMBED, &[c.vocab_size, d])?;
    let mut x = embed_inputs(&mut g, &embed);

    // RoPE tables for every position the model supports, gathered per input position
    let (cos_t, sin_t) = rope_tables(c.max_position_embeddings, hd, c.rope_theta);
    let cos_t = g.weight("rope.cos", &[c.max_position_embeddings, hd], &cos_t);
    let sin_t = g.weight("rope.sin", &[c.max_position_embeddings, hd], &sin_t);
    let cos = g.op(
        "Gather",
        &[&cos_t, "position_ids"],
        vec![attr_int("axis", 0)],
    );
    let cos = g.unsqueeze(&cos, &[1]);
    let sin = g.op(
        "Gather",
        &[&sin_t, "position_ids"],
        vec![attr_int("axis", 0)],
    );
    let sin = g.unsqueeze(&sin, &[1]);
    let bias5 = g.unsqueeze("attention_bias", &[2]);

    for i in 0..c.num_hidden_layers {
        let n = llama_names(i);
        let in_norm = w.plain(&mut g, &n.input_norm, &[d])?;
        let (wq, bq) = w.linear(&mut g, &n.q, h * hd, d, c.qkv_bias)?;
        let (wk, bk) = w.linear(&mut g, &n.k, kv * hd, d, c.qkv_bias)?;
        let (wv, bv) = w.linear(&mut g, &n.v, kv * hd, d, c.qkv_bias)?;
        let (wo, bo) = w.linear(&mut g, &n.o, d, h * hd, c.o_bias)?;
        let post_norm = w.plain(&mut g, &n.post_norm, &[d])?;
        let (wg, bg) = w.linear(&mut g, &n.gate, c.intermediate_size, d, c.mlp_bias)?;
        let (wu, bu) = w.linear(&mut g, &n.up, c.intermediate_size, d, c.mlp_bias)?;
        let (wd, bd) = w.linear(&mut g, &n.down, d, c.intermediate_size, c.mlp_bias)?;

        let a = g.rms_norm(&x, &in_norm, c.rms_norm_eps);
        let q = g.matmul(&a, &wq, bq.as_deref());
        let k = g.matmul(&a, &wk, bk.as_deref());
        let v = g.matmul(&a, &wv, bv.as_deref());
        let q = g.split_heads(&q, h, hd);
        let k = g.split_heads(&k, kv, hd);
        let v = g.split_heads(&v, kv, hd);
        let q = g.rope(&q, &cos, &sin, hd);
        let k = g.rope(&k, &cos, &sin, hd);
        let (k, v) = g.cache(i, &k, &v);
        let heads = Heads {
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        };
        let att = g.attention(&q, &k, &v, &bias5, heads);
        let o = g.matmul(&att, &wo, bo.as_deref());
        x = g.op("Add", &[&x, &o], vec![]);

        let m = g.rms_norm(&x, &post_norm, c.rms_norm_eps);
        let gate = g.matmul(&m, &wg, bg.as_deref());
        let up = g.matmul(&m, &wu, bu.as_deref());
        let sig = g.op("Sigmoid", &[&gate], vec![]);
        let silu = g.op("Mul", &[&gate, &sig], vec![]);
        let act = g.op("Mul", &[&silu, &up], vec![]);
        let down = g.matmul(&act, &wd, bd.as_deref());
        x = g.op("Add", &[&x, &down], vec![]);
    }
    let norm = w.plain(&mut g, LLAMA_FINAL_NORM, &[d])?;
    let head_w = if c.tie_word_embeddings {
        embed
    } else {
        w.plain(&mut g, LM_HEAD, &[c.vocab_size, d])?
    };
    let eps = c.rms_norm_eps;
    head(
        &mut g,
        &x,
        |g, p| g.rms_norm(p, &norm, eps),
        &head_w,
        d,
        c.vocab_size,
    );
    Ok(g)
}

fn export_gpt2(c: &Gpt2Config, weights: &mut ModelWeights) -> Result<Builder> {
    let mut g = Builder::new();
    let d = c.n_embd;
    let hd = d / c.n_head;
    declare_io(&mut g, c.n_layer, c.n_head, hd, d, c.vocab_size);
    let mut w = Weights(weights);
    let wte = w.plain(&mut g, GPT2_WTE, &[c.vocab_size, d])?;
    let wpe = w.plain(&mut g, GPT2_WPE, &[c.n_positions, d])?;
    let x = embed_inputs(&mut g, &wte);
    let pos = g.op("Gather", &[&wpe, "position_ids"], vec![attr_int("axis", 0)]);
    let mut x = g.op("Add", &[&x, &pos], vec![]);
    let bias5 = g.unsqueeze("attention_bias", &[2]);
    let eps = c.layer_norm_epsilon;
    for i in 0..c.n_layer {
        let n = gpt2_names(i);
        let ln1w = w.plain(&mut g, &format!("{}.weight", n.ln_1), &[d])?;
        let ln1b = w.plain(&mut g, &format!("{}.bias", n.ln_1), &[d])?;
        let (wqkv, bqkv) = w.conv1d(&mut g, &n.c_attn, d, 3 * d)?;
        let (wo, bo) = w.conv1d(&mut g, &n.c_proj, d, d)?;
        let ln2w = w.plain(&mut g, &format!("{}.weight", n.ln_2), &[d])?;
        let ln2b = w.plain(&mut g, &format!("{}.bias", n.ln_2), &[d])?;
        let (wfc, bfc) = w.conv1d(&mut g, &n.c_fc, d, c.n_inner)?;
        let (wp, bp) = w.conv1d(&mut g, &n.mlp_proj, c.n_inner, d)?;

        let a = g.layer_norm(&x, &ln1w, &ln1b, eps);
        let qkv = g.matmul(&a, &wqkv, Some(&bqkv));
        let split = g.ints(&[d as i64, d as i64, d as i64]);
        let parts = g.op_multi("Split", &[&qkv, &split], vec![attr_int("axis", 2)], 3);
        let q = g.split_heads(&parts[0], c.n_head, hd);
        let k = g.split_heads(&parts[1], c.n_head, hd);
        let v = g.split_heads(&parts[2], c.n_head, hd);
        let (k, v) = g.cache(i, &k, &v);
        let heads = Heads {
            heads: c.n_head,
            kv_heads: c.n_head,
            head_dim: hd,
        };
        let att = g.attention(&q, &k, &v, &bias5, heads);
        let o = g.matmul(&att, &wo, Some(&bo));
        x = g.op("Add", &[&x, &o], vec![]);

        let m = g.layer_norm(&x, &ln2w, &ln2b, eps);
        let f = g.matmul(&m, &wfc, Some(&bfc));
        let act = gelu(&mut g, &f, c.activation);
        let p = g.matmul(&act, &wp, Some(&bp));
        x = g.op("Add", &[&x, &p], vec![]);
    }
    let lnfw = w.plain(&mut g, &format!("{GPT2_LN_F}.weight"), &[d])?;
    let lnfb = w.plain(&mut g, &format!("{GPT2_LN_F}.bias"), &[d])?;
    let head_w = if c.tie_word_embeddings || !w.0.contains(LM_HEAD) {
        wte
    } else {
        w.plain(&mut g, LM_HEAD, &[c.vocab_size, d])?
    };
    head(
        &mut g,
        &x,
        |g, p| g.layer_norm(p, &lnfw, &lnfb, eps),
        &head_w,
        d,
        c.vocab_size,
    );
    Ok(g)
}

fn gelu(g: &mut Builder, x: &str, act: Gpt2Activation) -> String {
    let half = g.scalar(0.5);
    let one = g.scalar(1.0);
    let inner = match act {
        Gpt2Activation::GeluErf => {
            let r = g.scalar(std::f32::consts::FRAC_1_SQRT_2);
            let s = g.op("Mul", &[x, &r], vec![]);
            g.op("Erf", &[&s], vec![])
        }
        Gpt2Activation::GeluTanh => {
            let c = g.scalar(0.044715);
            let k = g.scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32);
            let x2 = g.op("Mul", &[x, x], vec![]);
            let x3 = g.op("Mul", &[&x2, x], vec![]);
            let cx3 = g.op("Mul", &[&x3, &c], vec![]);
            let sum = g.op("Add", &[x, &cx3], vec![]);
            let arg = g.op("Mul", &[&sum, &k], vec![]);
            g.op("Tanh", &[&arg], vec![])
        }
    };
    let onep = g.op("Add", &[&inner, &one], vec![]);
    let hx = g.op("Mul", &[x, &half], vec![]);
    g.op("Mul", &[&hx, &onep], vec![])
}

/// RoPE tables `[positions, head_dim]`, computed as Hugging Face does (inverse frequencies and
/// angles in f32).
fn rope_tables(positions: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(positions * head_dim);
    let mut sin = Vec::with_capacity(positions * head_dim);
    for p in 0..positions {
        let angles: Vec<f64> = inv.iter().map(|f| (p as f32 * f) as f64).collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos() as f32));
            sin.extend(angles.iter().map(|a| a.sin() as f32));
        }
    }
    (cos, sin)
}

fn meta(key: &str, value: String) -> StringStringEntryProto {
    let mut e = StringStringEntryProto::new();
    e.key = key.into();
    e.value = value;
    e
}

/// Exports `source` as a serialized ONNX model (consumes its weights).
pub fn export(source: ModelSource) -> Result<Vec<u8>> {
    let ModelSource {
        config,
        mut weights,
        spec,
        ..
    } = source;
    let mut g = match &config {
        ModelConfig::Llama(c) => export_llama(c, &mut weights)?,
        ModelConfig::Gpt2(c) => export_gpt2(c, &mut weights)?,
    };
    drop(weights);
    g.graph.name = format!("softprompt-{}", spec.name);
    let mut model = ModelProto::new();
    model.ir_version = IR_VERSION;
    let mut opset = OperatorSetIdProto::new();
    opset.domain = String::new();
    opset.version = OPSET;
    model.opset_import.push(opset);
    model.producer_name = "softprompt".into();
    model.producer_version = env!("CARGO_PKG_VERSION").into();
    model.doc_string = "Frozen backbone taking per-row soft prompts (prompt_embeds).".into();
    let config_json = serde_json::to_string(&config)
        .map_err(|e| Error::backend(crate::BACKEND, format!("serializing the config: {e}")))?;
    model.metadata_props = vec![
        meta(META_FINGERPRINT, spec.fingerprint.clone()),
        meta(META_VERSION, EXPORT_VERSION.to_string()),
        meta(META_CONFIG, config_json),
        meta(
            "softprompt.architecture",
            format!("{:?}", spec.architecture),
        ),
    ];
    model.graph = Some(g.graph).into();
    let size = model.compute_size() as usize;
    if size > MAX_PROTO_BYTES {
        return Err(Error::InvalidArgument(format!(
            "the exported model would be {size} bytes, above protobuf's 2 GiB limit for one file \
             (external weight files are not supported yet)"
        )));
    }
    model
        .write_to_bytes()
        .map_err(|e| Error::backend(crate::BACKEND, format!("serializing the ONNX model: {e}")))
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, then a rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp{}-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Where the exported model of weights with `fingerprint` is cached under `cache_dir`.
pub fn cached_path(cache_dir: &Path, fingerprint: &str) -> PathBuf {
    let short: String = fingerprint.chars().take(32).collect();
    cache_dir.join(format!("{short}-v{EXPORT_VERSION}.onnx"))
}

/// The default export cache: `$SOFTPROMPT_CACHE_DIR/onnx`, else `$XDG_CACHE_HOME/softprompt/onnx`,
/// else `~/.cache/softprompt/onnx`, else a directory under the system's temporary directory.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SOFTPROMPT_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("onnx");
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("softprompt").join("onnx");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h)
            .join(".cache")
            .join("softprompt")
            .join("onnx");
    }
    std::env::temp_dir().join("softprompt").join("onnx")
}

/// Exports `source` to `path` atomically; returns the number of bytes written.
pub fn export_to_file(source: ModelSource, path: &Path) -> Result<usize> {
    let bytes = export(source)?;
    write_atomic(path, &bytes)?;
    Ok(bytes.len())
}
