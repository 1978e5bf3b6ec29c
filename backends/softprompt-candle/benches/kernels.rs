//! Criterion benches of the candle backend's hot kernels, each fused op beside the candle
//! composition it replaced, forward + backward as a train step runs them, at the shapes of one
//! SmolLM2-135M layer in `softprompt bench`'s train step (8 rows × 57 tokens after a 20-token
//! prompt, d 576, 9 query / 3 key-value heads of 64, MLP 1536), f32.
//!
//! ```bash
//! RAYON_NUM_THREADS=2 cargo bench -p softprompt-candle --bench kernels
//! ```

// `criterion_main!` generates an undocumented `main`
#![allow(missing_docs)]

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use softprompt_candle::ops::{
    attention, attention_composed, rms_norm, rms_norm_composed, rope_tables, split_heads,
    split_heads_composed, swiglu, swiglu_composed, Linear,
};

const B: usize = 8;
const S: usize = 57;
const N: usize = 20;
const D: usize = 576;
const H: usize = 9;
const KV: usize = 3;
const HD: usize = 64;
const I: usize = 1536;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("random tensor")
}

/// Forward, then backward of `sum(f(x) ⊙ w)` to every input (what a train step does per op).
fn step(inputs: &[Var], weights: &Tensor, f: &dyn Fn(&[Tensor]) -> Tensor) {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let loss = (y * weights).and_then(|l| l.sum_all()).expect("loss");
    let grads = loss.backward().expect("backward");
    for t in &ts {
        assert!(grads.get(t).is_some(), "no gradient reached an input");
    }
}

fn bench_pair(
    c: &mut Criterion,
    name: &str,
    inputs: &[Var],
    out_shape: &[usize],
    fused: &dyn Fn(&[Tensor]) -> Tensor,
    composed: &dyn Fn(&[Tensor]) -> Tensor,
) {
    let weights = randn(out_shape);
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.bench_function("fused", |b| b.iter(|| step(inputs, &weights, fused)));
    g.bench_function("composed", |b| b.iter(|| step(inputs, &weights, composed)));
    g.finish();
}

fn var(shape: &[usize]) -> Var {
    Var::from_tensor(&randn(shape)).expect("var")
}

fn kernels(c: &mut Criterion) {
    // the packed gate/up projection: frozen-weight matmul (input gradient only) against
    // candle's matmul, whose backward also computes the weight gradient
    let w = randn(&[2 * I, D]);
    let lin = Linear::new(w.clone(), None);
    bench_pair(
        c,
        "linear_576x3072",
        &[var(&[B, S, D])],
        &[B, S, 2 * I],
        &|t| lin.forward(&t[0]).expect("linear"),
        &|t| {
            t[0].reshape((B * S, D))
                .and_then(|x| x.matmul(&w.t()?))
                .and_then(|y| y.reshape((B, S, 2 * I)))
                .expect("matmul")
        },
    );

    let norm = randn(&[D]);
    bench_pair(
        c,
        "rms_norm",
        &[var(&[B, S, D])],
        &[B, S, D],
        &|t| rms_norm(&t[0], &norm, 1e-5).expect("rms"),
        &|t| rms_norm_composed(&t[0], &norm, 1e-5).expect("rms"),
    );

    bench_pair(
        c,
        "swiglu",
        &[var(&[B, S, 2 * I])],
        &[B, S, I],
        &|t| swiglu(&t[0]).expect("swiglu"),
        &|t| swiglu_composed(&t[0]).expect("swiglu"),
    );

    let positions: Vec<usize> = (N..N + S).collect();
    let (cos, sin) = rope_tables(&positions, HD, 10000.0, DType::F32, &Device::Cpu).expect("rope");
    let flat = |(q, k, v): (Tensor, Tensor, Tensor)| {
        Tensor::cat(
            &[
                q.flatten_all().expect("q"),
                k.flatten_all().expect("k"),
                v.flatten_all().expect("v"),
            ],
            0,
        )
        .expect("cat")
    };
    bench_pair(
        c,
        "split_heads_rope",
        &[var(&[B, S, (H + 2 * KV) * HD])],
        &[B * S * (H + 2 * KV) * HD],
        &|t| flat(split_heads(&t[0], (H, KV, HD), Some((&cos, &sin))).expect("split")),
        &|t| flat(split_heads_composed(&t[0], (H, KV, HD), Some((&cos, &sin))).expect("split")),
    );

    // causal over the tokens, every token sees the prompt
    let mut bias = vec![0f32; B * S * (N + S)];
    for r in 0..B {
        for i in 0..S {
            for j in i + 1..S {
                bias[(r * S + i) * (N + S) + N + j] = -1e9;
            }
        }
    }
    let bias = Tensor::from_vec(bias, (B, 1, S, N + S), &Device::Cpu).expect("bias");
    bench_pair(
        c,
        "attention",
        &[
            var(&[B, H, S, HD]),
            var(&[B, KV, N + S, HD]),
            var(&[B, KV, N + S, HD]),
        ],
        &[B, S, H * HD],
        &|t| attention(&t[0], &t[1], &t[2], Some(&bias)).expect("attention"),
        &|t| {
            attention_composed(&t[0], &t[1], &t[2], Some(&bias))
                .and_then(|a| a.transpose(1, 2))
                .and_then(|a| a.reshape((B, S, H * HD)))
                .expect("attention")
        },
    );
}

criterion_group!(benches, kernels);
criterion_main!(benches);
