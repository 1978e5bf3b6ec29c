//! The ONNX graph builder as an implementation of the op seam ([`softprompt_nn::Ops`]): a
//! tensor is the name of a value in the graph, and every op appends nodes. Running the shared
//! model code once with these ops records the model as a graph.
//!
//! Only the standard `ai.onnx` domain at opset 17 is used (no contrib operators).

use std::cell::RefCell;
use std::collections::BTreeMap;

use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use softprompt_core::{Error, HostTensor, Result};
use softprompt_nn::{Gelu, Heads, Linear, Ops, PositionIds, Rope};

pub(crate) const FLOAT: i32 = 1;
pub(crate) const INT64: i32 = 7;

pub(crate) fn attr_int(name: &str, v: i64) -> AttributeProto {
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

/// A dimension of a declared input or output.
#[derive(Clone, Copy)]
pub(crate) enum Dim {
    Fixed(usize),
    Named(&'static str),
}

/// A value's declared type: `elem` with named (symbolic) or fixed dimensions.
pub(crate) fn value_info(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
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

#[derive(Default)]
struct State {
    graph: GraphProto,
    next: usize,
    /// RoPE `cos`/`sin` already computed in the graph, by base θ and head width.
    rope: BTreeMap<(u64, usize), (String, String)>,
    /// 5-D forms of attention biases already unsqueezed, by the bias's name.
    bias5: BTreeMap<String, String>,
}

/// Records ops as nodes of one ONNX graph.
#[derive(Default)]
pub(crate) struct GraphOps {
    state: RefCell<State>,
}

impl std::fmt::Debug for GraphOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GraphOps({} nodes)",
            self.state.borrow().graph.node.len()
        )
    }
}

impl GraphOps {
    /// The graph built so far.
    pub fn into_graph(self) -> GraphProto {
        self.state.into_inner().graph
    }

    /// Declares graph inputs and outputs.
    pub fn declare(&self, inputs: Vec<ValueInfoProto>, outputs: Vec<ValueInfoProto>) {
        let mut s = self.state.borrow_mut();
        s.graph.input.extend(inputs);
        s.graph.output.extend(outputs);
    }

    fn fresh(&self, hint: &str) -> String {
        let mut s = self.state.borrow_mut();
        s.next += 1;
        format!("{hint}_{}", s.next)
    }

    /// Adds `op(inputs)` with one output; returns the output's name.
    pub fn op(&self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.op_into(op, inputs, attrs, &[&out]);
        out
    }

    /// Adds `op(inputs)` writing the named outputs.
    pub fn op_into(&self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, outs: &[&str]) {
        let mut s = self.state.borrow_mut();
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.name = format!("n{}_{op}", s.graph.node.len());
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = outs.iter().map(|s| s.to_string()).collect();
        n.attribute = attrs;
        s.graph.node.push(n);
    }

    /// Renames value `from` to `to` everywhere (its producer and its consumers), so that a graph
    /// output is the value itself rather than an `Identity` of it.
    pub fn rename(&self, from: &str, to: &str) {
        let mut s = self.state.borrow_mut();
        for node in &mut s.graph.node {
            for name in node.output.iter_mut().chain(node.input.iter_mut()) {
                if name == from {
                    *name = to.to_string();
                }
            }
        }
    }

    /// `Split` of `x` along `axis` into parts of `sizes`.
    fn split(&self, x: &str, axis: i64, sizes: &[i64]) -> Vec<String> {
        let sizes_name = self.ints(sizes);
        let outs: Vec<String> = sizes.iter().map(|_| self.fresh("Split")).collect();
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.op_into(
            "Split",
            &[x, &sizes_name],
            vec![attr_int("axis", axis)],
            &refs,
        );
        outs
    }

    /// A float initializer holding `data` of shape `dims`.
    fn weight(&self, name: &str, dims: &[usize], data: &[f32]) -> String {
        let mut t = TensorProto::new();
        t.name = name.into();
        t.data_type = FLOAT;
        t.dims = dims.iter().map(|d| *d as i64).collect();
        let mut raw = Vec::with_capacity(data.len() * 4);
        for x in data {
            raw.extend_from_slice(&x.to_le_bytes());
        }
        t.raw_data = raw;
        self.state.borrow_mut().graph.initializer.push(t);
        name.to_string()
    }

    /// A constant int64 vector.
    pub fn ints(&self, v: &[i64]) -> String {
        let name = self.fresh("const_i64");
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = INT64;
        t.dims = vec![v.len() as i64];
        t.int64_data = v.to_vec();
        self.state.borrow_mut().graph.initializer.push(t);
        name
    }

    /// A constant float scalar.
    fn scalar(&self, v: f32) -> String {
        let name = self.fresh("const_f32");
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = FLOAT;
        t.float_data = vec![v];
        self.state.borrow_mut().graph.initializer.push(t);
        name
    }

    fn unsqueeze(&self, x: &str, axes: &[i64]) -> String {
        let a = self.ints(axes);
        self.op("Unsqueeze", &[x, &a], vec![])
    }

    /// `x[start..end]` along `axis` (negative `end` counts from the back).
    pub fn slice(&self, x: &str, axis: i64, start: i64, end: i64) -> String {
        let s = self.ints(&[start]);
        let e = self.ints(&[end]);
        let a = self.ints(&[axis]);
        self.op("Slice", &[x, &s, &e, &a], vec![])
    }

    /// `bias [b, 1, s, t]` as `[b, 1, 1, s, t]`, once per bias.
    fn bias5(&self, bias: &str) -> String {
        if let Some(b) = self.state.borrow().bias5.get(bias) {
            return b.clone();
        }
        let b5 = self.unsqueeze(bias, &[2]);
        self.state
            .borrow_mut()
            .bias5
            .insert(bias.to_string(), b5.clone());
        b5
    }
}

/// RoPE inverse frequencies `[head_dim / 2]`, computed as Hugging Face does (in f32).
fn inverse_frequencies(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

fn graph_positions<'a>(positions: &PositionIds<'a, String>) -> Result<&'a str> {
    match positions {
        PositionIds::Tensor(t) => Ok(t.as_str()),
        PositionIds::Host { .. } => Err(Error::unsupported(
            crate::BACKEND,
            "host positions in an exported graph",
            Some("pass the position_ids input"),
        )),
    }
}

impl Ops for GraphOps {
    type Tensor = String;

    fn constant(&self, name: &str, value: HostTensor) -> Result<String> {
        Ok(self.weight(name, &value.shape, &value.data))
    }

    /// Stored transposed, `[in, out]`, as `MatMul(x, W)` wants it.
    fn linear_weight(&self, name: &str, value: HostTensor) -> Result<String> {
        let [rows, cols] = value.shape[..] else {
            return Err(Error::Shape(format!(
                "linear weight `{name}` has shape {:?}",
                value.shape
            )));
        };
        let mut t = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = value.data[r * cols + c];
            }
        }
        Ok(self.weight(name, &[cols, rows], &t))
    }

    fn linear(&self, x: &String, layer: &Linear<String>) -> Result<String> {
        let y = self.op("MatMul", &[x, &layer.w], vec![]);
        Ok(match &layer.b {
            Some(b) => self.op("Add", &[&y, b], vec![]),
            None => y,
        })
    }

    /// `Gemm` wants 2-D operands: `[.., d]` → `[n, d]` · tableᵀ (the table stays `[vocab, d]`,
    /// shared with the embedding when tied) → `[.., vocab]`.
    fn head(&self, x: &String, table: &String) -> Result<String> {
        let shape = self.op("Shape", &[x], vec![]);
        let lead = self.slice(&shape, 0, 0, -1);
        let infer = self.ints(&[-1]);
        let out_shape = self.op("Concat", &[&lead, &infer], vec![attr_int("axis", 0)]);
        let last = self.slice(&shape, 0, -1, i64::MAX);
        let flat_shape = self.op("Concat", &[&infer, &last], vec![attr_int("axis", 0)]);
        let flat = self.op("Reshape", &[x, &flat_shape], vec![]);
        let y = self.op("Gemm", &[&flat, table], vec![attr_int("transB", 1)]);
        Ok(self.op("Reshape", &[&y, &out_shape], vec![]))
    }

    fn embedding(&self, table: &String, ids: &String) -> Result<String> {
        Ok(self.op("Gather", &[table, ids], vec![attr_int("axis", 0)]))
    }

    /// Hugging Face's RMSNorm: `w · x / sqrt(mean(x²) + eps)`.
    fn rms_norm(&self, x: &String, w: &String, eps: f64) -> Result<String> {
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
        Ok(self.op("Mul", &[&normed, w], vec![]))
    }

    fn layer_norm(&self, x: &String, w: &String, b: &String, eps: f64) -> Result<String> {
        Ok(self.op(
            "LayerNormalization",
            &[x, w, b],
            vec![attr_int("axis", -1), attr_float("epsilon", eps as f32)],
        ))
    }

    /// The tables computed in the graph from the `position_ids` input (angles `position ·
    /// inv_freq` in f32, as Hugging Face computes them), `[rows, 1, tokens, hd]`; one set per RoPE
    /// base. Nothing of size `max_positions` is stored.
    fn rope_tables(
        &self,
        positions: &PositionIds<'_, String>,
        head_dim: usize,
        theta: f64,
        _max_positions: usize,
    ) -> Result<Rope<String>> {
        let pos = graph_positions(positions)?;
        let key = (theta.to_bits(), head_dim);
        let existing = self.state.borrow().rope.get(&key).cloned();
        let (cos, sin) = match existing {
            Some(t) => t,
            None => {
                let n = self.state.borrow().rope.len();
                let inv = self.weight(
                    &format!("rope.inv_freq.{n}"),
                    &[head_dim / 2],
                    &inverse_frequencies(head_dim, theta),
                );
                let p = self.op("Cast", &[pos], vec![attr_int("to", FLOAT as i64)]);
                let p = self.unsqueeze(&p, &[-1]);
                let angles = self.op("Mul", &[&p, &inv], vec![]);
                let both = self.op("Concat", &[&angles, &angles], vec![attr_int("axis", -1)]);
                let both = self.unsqueeze(&both, &[1]);
                let t = (
                    self.op("Cos", &[&both], vec![]),
                    self.op("Sin", &[&both], vec![]),
                );
                self.state.borrow_mut().rope.insert(key, t.clone());
                t
            }
        };
        Ok(Rope {
            cos,
            sin,
            theta,
            per_row: true,
        })
    }

    /// `x · cos + rotate_half(x) · sin` (the half-split RoPE of Hugging Face Llama).
    fn rope(&self, x: &String, rope: &Rope<String>) -> Result<String> {
        // the head width is not known to the graph builder: `Split` without sizes halves the axis
        let (x1, x2) = (self.fresh("Split"), self.fresh("Split"));
        self.op_into("Split", &[x], vec![attr_int("axis", -1)], &[&x1, &x2]);
        let neg = self.op("Neg", &[&x2], vec![]);
        let rot = self.op("Concat", &[&neg, &x1], vec![attr_int("axis", -1)]);
        let a = self.op("Mul", &[x, &rope.cos], vec![]);
        let b = self.op("Mul", &[&rot, &rope.sin], vec![]);
        Ok(self.op("Add", &[&a, &b], vec![]))
    }

    fn position_rows(&self, table: &String, positions: &PositionIds<'_, String>) -> Result<String> {
        let pos = graph_positions(positions)?;
        Ok(self.op("Gather", &[table, pos], vec![attr_int("axis", 0)]))
    }

    /// Grouped-query attention in 5-D: the `rep` query heads of one key/value head as one
    /// `[rep·s, hd]` block, against that head's keys (no repeated keys and values).
    fn attention(
        &self,
        q: &String,
        k: &String,
        v: &String,
        bias: Option<&String>,
        heads: Heads,
    ) -> Result<String> {
        let (h, kv, hd) = (heads.q as i64, heads.kv as i64, heads.dim as i64);
        let rep = h / kv;
        let scale = self.scalar(1.0 / (heads.dim as f32).sqrt());
        let q = self.op("Mul", &[q, &scale], vec![]);
        let q5 = self.reshape(&q, &[0, kv, rep, -1, hd])?;
        let k5 = self.unsqueeze(k, &[2]);
        let kt = self.op(
            "Transpose",
            &[&k5],
            vec![attr_ints("perm", &[0, 1, 2, 4, 3])],
        );
        let mut scores = self.op("MatMul", &[&q5, &kt], vec![]);
        if let Some(bias) = bias {
            let b5 = self.bias5(bias);
            scores = self.op("Add", &[&scores, &b5], vec![]);
        }
        let p = self.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let v5 = self.unsqueeze(v, &[2]);
        let o = self.op("MatMul", &[&p, &v5], vec![]);
        let o = self.reshape(&o, &[0, h, -1, hd])?;
        let o = self.op("Transpose", &[&o], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        self.reshape(&o, &[0, 0, h * hd])
    }

    fn add(&self, a: &String, b: &String) -> Result<String> {
        Ok(self.op("Add", &[a, b], vec![]))
    }

    fn mul(&self, a: &String, b: &String) -> Result<String> {
        Ok(self.op("Mul", &[a, b], vec![]))
    }

    fn silu(&self, x: &String) -> Result<String> {
        let sig = self.op("Sigmoid", &[x], vec![]);
        Ok(self.op("Mul", &[x, &sig], vec![]))
    }

    fn gelu(&self, x: &String, form: Gelu) -> Result<String> {
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        let inner = match form {
            Gelu::Erf => {
                let r = self.scalar(std::f32::consts::FRAC_1_SQRT_2);
                let s = self.op("Mul", &[x, &r], vec![]);
                self.op("Erf", &[&s], vec![])
            }
            Gelu::Tanh => {
                let c = self.scalar(0.044715);
                let k = self.scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32);
                let x2 = self.op("Mul", &[x, x], vec![]);
                let x3 = self.op("Mul", &[&x2, x], vec![]);
                let cx3 = self.op("Mul", &[&x3, &c], vec![]);
                let sum = self.op("Add", &[x, &cx3], vec![]);
                let arg = self.op("Mul", &[&sum, &k], vec![]);
                self.op("Tanh", &[&arg], vec![])
            }
        };
        let onep = self.op("Add", &[&inner, &one], vec![]);
        let hx = self.op("Mul", &[x, &half], vec![]);
        Ok(self.op("Mul", &[&hx, &onep], vec![]))
    }

    fn narrow(&self, x: &String, dim: usize, start: usize, len: usize) -> Result<String> {
        Ok(self.slice(x, dim as i64, start as i64, (start + len) as i64))
    }

    fn cat(&self, xs: &[&String], dim: usize) -> Result<String> {
        let xs: Vec<&str> = xs.iter().map(|s| s.as_str()).collect();
        Ok(self.op("Concat", &xs, vec![attr_int("axis", dim as i64)]))
    }

    fn reshape(&self, x: &String, shape: &[i64]) -> Result<String> {
        let s = self.ints(shape);
        Ok(self.op("Reshape", &[x, &s], vec![]))
    }

    fn permute(&self, x: &String, perm: &[usize]) -> Result<String> {
        let perm: Vec<i64> = perm.iter().map(|p| *p as i64).collect();
        Ok(self.op("Transpose", &[x], vec![attr_ints("perm", &perm)]))
    }

    /// One `Split` node for the three parts (fewer nodes per decode step than three slices).
    fn split_heads(
        &self,
        qkv: &String,
        heads: Heads,
        rope: Option<&Rope<String>>,
    ) -> Result<(String, String, String)> {
        let hd = heads.dim as i64;
        let (q, kv) = (heads.q as i64, heads.kv as i64);
        let parts = self.split(qkv, 2, &[q * hd, kv * hd, kv * hd]);
        let head = |x: &String, n: i64| -> Result<String> {
            let x = self.reshape(x, &[0, 0, n, hd])?;
            self.permute(&x, &[0, 2, 1, 3])
        };
        let (q, k, v) = (
            head(&parts[0], q)?,
            head(&parts[1], kv)?,
            head(&parts[2], kv)?,
        );
        match rope {
            None => Ok((q, k, v)),
            Some(r) => Ok((self.rope(&q, r)?, self.rope(&k, r)?, v)),
        }
    }

    fn swiglu(&self, gate_up: &String, inner: usize) -> Result<String> {
        let parts = self.split(gate_up, 2, &[inner as i64, inner as i64]);
        self.mul(&self.silu(&parts[0])?, &parts[1])
    }
}
