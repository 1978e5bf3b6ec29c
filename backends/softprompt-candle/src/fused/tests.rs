//! Every fused op against the candle composition it replaces (f64, values and gradients) and
//! against central finite differences.

use candle_core::{Device, Tensor, Var};

use candle_core::DType;

use crate::ops::{
    attention, attention_composed, geglu, geglu_composed, rms_norm, rms_norm_composed, rope,
    rope_heads, split_heads, split_heads_composed, swiglu, swiglu_composed,
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
        let composed = |t: &[Tensor]| flat(split_heads_composed(&t[0], (h, kv, hd), rope).unwrap());
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
            None,
        ),
        o: ((rand(&[d, h * hd], 22) * 0.5).unwrap(), None, None),
        post_norm: (rand(&[d], 23) + 1.0).unwrap(),
        gate_up: ((rand(&[2 * i, d], 24) * 0.5).unwrap(), None, None),
        down: (
            (rand(&[d, i], 25) * 0.5).unwrap(),
            Some(rand(&[d], 27)),
            None,
        ),
        eps: 1e-6,
        heads: (h, kv, hd),
    };
    let positions: Vec<usize> = (n..n + s).collect();
    let rope = crate::ops::rope_tables(&positions, hd, 10000.0, DType::F64, &Device::Cpu).unwrap();
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
    let lin = |x: &Tensor, (w, bb, _): &super::layer::Projection| {
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
            split_heads_composed(&lin(&hn, &w.qkv), (h, kv, hd), Some((&rope.0, &rope.1))).unwrap();
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

#[test]
fn geglu_matches_composition_and_finite_differences() {
    let x = Tensor::cat(
        &[(rand(&[2, 3, 9], 14) * 3.0).unwrap(), rand(&[2, 3, 9], 15)],
        2,
    )
    .unwrap();
    let wts = rand(&[2, 3, 9], 16);
    let fused = |t: &[Tensor]| geglu(&t[0]).unwrap();
    let composed = |t: &[Tensor]| geglu_composed(&t[0]).unwrap();
    let (y1, g1) = grads(std::slice::from_ref(&x), &wts, &fused);
    let (y2, g2) = grads(std::slice::from_ref(&x), &wts, &composed);
    assert!(max_diff(&y1, &y2) < 1e-12, "{}", max_diff(&y1, &y2));
    // candle's own GELU derivative is off by ~2e-7 (its backward uses six-digit constants);
    // the fused one is checked against finite differences at 1e-6 relative, and so is candle's
    assert!(
        max_diff(&g1[0], &g2[0]) < 1e-6,
        "{}",
        max_diff(&g1[0], &g2[0])
    );
    check_fd(std::slice::from_ref(&x), 0, &wts, &g1[0], &fused);
}

/// Shared tables `[s, hd]` and per-row tables `[b, s, hd]`.
#[test]
fn rope_matches_composition_and_finite_differences() {
    let x = rand(&[2, 3, 5, 8], 21);
    let wts = rand(&[2, 3, 5, 8], 22);
    for per_row in [false, true] {
        let shape: &[usize] = if per_row { &[2, 5, 8] } else { &[5, 8] };
        let (cos, sin) = (rand(shape, 23), rand(shape, 24));
        let fused = |t: &[Tensor]| rope_heads(&t[0], &cos, &sin).unwrap();
        let composed = |t: &[Tensor]| {
            if per_row {
                rope(
                    &t[0],
                    &cos.unsqueeze(1).unwrap(),
                    &sin.unsqueeze(1).unwrap(),
                )
                .unwrap()
            } else {
                rope(&t[0], &cos, &sin).unwrap()
            }
        };
        let (y1, g1) = grads(std::slice::from_ref(&x), &wts, &fused);
        let (y2, g2) = grads(std::slice::from_ref(&x), &wts, &composed);
        assert!(max_diff(&y1, &y2) < 1e-12, "per_row {per_row}");
        assert!(max_diff(&g1[0], &g2[0]) < 1e-12, "per_row {per_row}");
        check_fd(std::slice::from_ref(&x), 0, &wts, &g1[0], &fused);
    }
}

/// A quantized matrix of random blocks of `kinds` (one segment each, `rows` rows apiece) with
/// sane f16 scales.
fn random_quant(
    kinds: &[softprompt_core::QuantKind],
    rows: usize,
    cols: usize,
    seed: u64,
) -> softprompt_core::QuantMatrix {
    use softprompt_core::{QuantKind as K, QuantMatrix};
    let mut rng = softprompt_core::Rng::seed_from_u64(seed);
    let mut out: Option<QuantMatrix> = None;
    for kind in kinds {
        let bb = kind.block_bytes();
        let mut bytes: Vec<u8> = (0..rows * kind.row_bytes(cols))
            .map(|_| (rng.uniform(0.0, 256.0) as u32).min(255) as u8)
            .collect();
        let scales: &[usize] = match kind {
            K::Q4_1 | K::Q5_1 | K::Q4K | K::Q5K => &[0, 2],
            K::Q6K => &[208],
            _ => &[0],
        };
        for blk in bytes.chunks_mut(bb) {
            for at in scales {
                let v = half::f16::from_f32(rng.uniform(-0.05, 0.05)).to_le_bytes();
                blk[*at..*at + 2].copy_from_slice(&v);
            }
        }
        let m = QuantMatrix::new(*kind, rows, cols, bytes).unwrap();
        out = Some(match out {
            None => m,
            Some(o) => o.stack(m).unwrap(),
        });
    }
    out.unwrap()
}

/// Products with quantized weights (the direct decode kernel, the dequantized-tile few-rows
/// path and the tiled gemm) and their input gradients equal the f32 products with the
/// dequantized matrix, for every kept format and for stacked segments of mixed formats.
#[test]
fn quantized_products_match_the_dequantized_weights() {
    use super::{linear_grad, linear_rows, q_linear_grad, q_linear_rows};
    use softprompt_core::QuantKind as K;
    let cols = 512;
    let cases: Vec<Vec<K>> = vec![
        vec![K::Q4_0],
        vec![K::Q4_1],
        vec![K::Q5_0],
        vec![K::Q5_1],
        vec![K::Q8_0],
        vec![K::Q4K],
        vec![K::Q5K],
        vec![K::Q6K],
        vec![K::Q4_1, K::Q8_0, K::Q4_0],
        vec![K::Q5_0, K::Q8_0],
    ];
    for (i, kinds) in cases.iter().enumerate() {
        let q = random_quant(kinds, 37, cols, i as u64);
        let n = q.rows();
        let w = q.dequantize();
        for m in [1, 3, 4, 7, 130] {
            let x: Vec<f32> = rand(&[m, cols], 10 + m as u64)
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let want = linear_rows(&x, &w, None, n);
            let got = q_linear_rows(&x, &q, None, false);
            let scale = want.iter().fold(1f32, |s, v| s.max(v.abs()));
            let d = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                d <= 1e-5 * scale,
                "{kinds:?}, {m} rows: {d} (scale {scale})"
            );
            let g: Vec<f32> = x
                .iter()
                .take(m * n.min(cols))
                .copied()
                .cycle()
                .take(m * n)
                .collect();
            let want = linear_grad(&g, &w, n);
            let got = q_linear_grad(&g, &q);
            let d = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = want.iter().fold(1f32, |s, v| s.max(v.abs()));
            assert!(d <= 1e-5 * scale, "{kinds:?} grad, {m} rows: {d}");
        }
    }
}

/// A decode step's product with 8-bit input rows: equal (to f32 rounding) to the f32 product
/// of the rows' 8-bit values with the dequantized weights, within the rounding bound
/// `Σ_blocks max|x|/254 · Σ|w|` of the exact product, and the exact path wherever the 8-bit
/// kernel does not apply (more than four rows, other formats).
#[test]
fn int8_decode_products_stay_within_the_rounding_bound() {
    use super::qdot::{applies, quantize_rows};
    use super::{linear_rows, q_linear_rows};
    use softprompt_core::QuantKind as K;
    let cols = 512;
    let cases: Vec<Vec<K>> = vec![
        vec![K::Q4_0],
        vec![K::Q4_1],
        vec![K::Q8_0],
        vec![K::Q4_1, K::Q8_0, K::Q4_0],
        vec![K::Q6K],
    ];
    for (i, kinds) in cases.iter().enumerate() {
        let q = random_quant(kinds, 37, cols, 100 + i as u64);
        let n = q.rows();
        let w = q.dequantize();
        for m in [1, 2, 4, 5] {
            let mut x: Vec<f32> = rand(&[m, cols], 20 + m as u64)
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .into_iter()
                .map(|v| v as f32)
                .collect();
            // a block of zeros and a block of one large value: scales 0 and far from 1
            x[32..64].iter_mut().for_each(|v| *v = 0.0);
            x[64] = 40.0;
            let exact = linear_rows(&x, &w, None, n);
            let got = q_linear_rows(&x, &q, None, true);
            if !applies(&q, m) {
                assert_eq!(
                    got,
                    q_linear_rows(&x, &q, None, false),
                    "{kinds:?}, {m} rows"
                );
                continue;
            }
            // the same arithmetic in f32: the rows' 8-bit values times the dequantized weights
            let xq = quantize_rows(&x, cols);
            let rounded: Vec<f32> =
                xq.q.iter()
                    .enumerate()
                    .map(|(j, c)| *c as f32 * xq.d[j / 32])
                    .collect();
            let want = linear_rows(&rounded, &w, None, n);
            let mut moved = 0f32;
            for r in 0..m {
                for o in 0..n {
                    let (g, e, t) = (got[r * n + o], exact[r * n + o], want[r * n + o]);
                    let wo = &w[o * cols..][..cols];
                    let xr = &x[r * cols..][..cols];
                    let size: f32 = wo.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                    assert!(
                        (g - t).abs() <= 1e-5 * size.max(1e-3),
                        "{kinds:?}, {m} rows, ({r}, {o}): integer {g} vs f32 of codes {t}"
                    );
                    let bound: f32 = wo
                        .chunks(32)
                        .zip(xr.chunks(32))
                        .map(|(wb, xb)| {
                            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                            amax / 254.0 * wb.iter().map(|v| v.abs()).sum::<f32>()
                        })
                        .sum();
                    assert!(
                        (g - e).abs() <= bound * 1.001 + 1e-5 * size,
                        "{kinds:?}, {m} rows, ({r}, {o}): {g} vs exact {e}, bound {bound}"
                    );
                    moved = moved.max((g - e).abs());
                }
            }
            assert!(
                moved > 0.0,
                "{kinds:?}, {m} rows: the 8-bit kernel did not run"
            );
        }
    }
}

/// The quantized op in a candle graph: forward as the dense frozen matmul, and its backward
/// (the input gradient, tile by tile) against central finite differences in f64.
#[test]
fn quantized_matmul_op_gradient_matches_finite_differences() {
    use softprompt_core::QuantKind as K;
    let q = std::sync::Arc::new(random_quant(&[K::Q4_1, K::Q6K], 5, 256, 3));
    let w = Tensor::from_vec(
        q.dequantize()
            .into_iter()
            .map(f64::from)
            .collect::<Vec<_>>(),
        (10, 256),
        &Device::Cpu,
    )
    .unwrap();
    let x = Var::from_tensor(&rand(&[2, 3, 256], 4)).unwrap();
    let dy = rand(&[2, 3, 10], 5);
    let f = |x: &Tensor| -> Tensor {
        crate::ops::quantized_linear(x, &q, None, false)
            .unwrap()
            .mul(&dy)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let dense = crate::ops::linear(x.as_tensor(), &w, None).unwrap();
    let quant = crate::ops::quantized_linear(x.as_tensor(), &q, None, false).unwrap();
    assert!(max_diff(&dense, &quant) < 1e-10);
    let grads = f(x.as_tensor()).backward().unwrap();
    let g = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = x
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let eps = 1e-5;
    for i in [0, 17, 300, 767, 1535] {
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, (2, 3, 256), &Device::Cpu).unwrap();
            f(&t).to_scalar::<f64>().unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() <= 1e-6 * fd.abs().max(1.0),
            "x[{i}]: {fd} vs {}",
            g[i]
        );
    }
}

/// The ViT block (LayerNorm, biases, LayerScale on one branch and none on the other, exact
/// GELU) against its composition from candle ops, and against finite differences; its f32 run
/// against the f64 one.
#[test]
fn vit_layer_matches_composition_and_finite_differences() {
    use super::{VitLayer, VitWeights};
    let (b, s, d, h, hd, i) = (2, 5, 8, 4, 2, 12);
    let w = VitWeights {
        norm1: ((rand(&[d], 40) + 1.0).unwrap(), rand(&[d], 41)),
        qkv: (
            (rand(&[3 * d, d], 42) * 0.5).unwrap(),
            Some(rand(&[3 * d], 43)),
        ),
        o: ((rand(&[d, d], 44) * 0.5).unwrap(), Some(rand(&[d], 45))),
        ls1: Some(rand(&[d], 46)),
        norm2: ((rand(&[d], 47) + 1.0).unwrap(), rand(&[d], 48)),
        fc1: ((rand(&[i, d], 49) * 2.0).unwrap(), Some(rand(&[i], 50))),
        fc2: ((rand(&[d, i], 51) * 0.5).unwrap(), None),
        ls2: None,
        eps: 1e-6,
        heads: (h, hd),
    };
    let lin = |x: &Tensor, (w, bb): &(Tensor, Option<Tensor>)| {
        let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        match bb {
            Some(bb) => y.broadcast_add(bb).unwrap(),
            None => y,
        }
    };
    let ls = |x: Tensor, s: &Option<Tensor>| match s {
        Some(s) => x.broadcast_mul(s).unwrap(),
        None => x,
    };
    let composed = |t: &[Tensor]| {
        let x = &t[0];
        let hn = crate::ops::layer_norm(x, &w.norm1.0, &w.norm1.1, w.eps).unwrap();
        let (q, k, v) = split_heads_composed(&lin(&hn, &w.qkv), (h, h, hd), None).unwrap();
        let att = attention_composed(&q, &k, &v, None)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, s, h * hd))
            .unwrap();
        let x2 = (x + ls(lin(&att, &w.o), &w.ls1)).unwrap();
        let hn2 = crate::ops::layer_norm(&x2, &w.norm2.0, &w.norm2.1, w.eps).unwrap();
        let m = lin(&lin(&hn2, &w.fc1).gelu_erf().unwrap(), &w.fc2);
        (&x2 + ls(m, &w.ls2)).unwrap()
    };
    let fused_with = |w: &VitWeights, x: &Tensor, cls_only: bool| {
        let op = VitLayer {
            w: w.clone(),
            train: x.track_op(),
            cls_only,
            saved: Default::default(),
        };
        x.apply_op1(op).unwrap()
    };
    let ins = [(rand(&[b, s, d], 52) * 2.0).unwrap()];
    // every row, and the class rows alone (the last block of a classifier)
    for cls_only in [false, true] {
        let rows = if cls_only { 1 } else { s };
        let fused = |t: &[Tensor]| fused_with(&w, &t[0], cls_only);
        let composed = |t: &[Tensor]| composed(t).narrow(1, 0, rows).unwrap();
        let wts = rand(&[b, rows, d], 53);
        let (y1, g1) = grads(&ins, &wts, &fused);
        let (y2, g2) = grads(&ins, &wts, &composed);
        assert_eq!(y1.dims(), &[b, rows, d]);
        assert!(max_diff(&y1, &y2) < 1e-12, "{}", max_diff(&y1, &y2));
        // candle's GELU backward uses 1/sqrt(2π) rounded to 0.398942 (7e-7 relative): the
        // composition's gradient is the less exact one here, the finite differences decide
        let gap = max_diff(&g1[0], &g2[0]);
        assert!(gap < 2e-6, "cls_only {cls_only}: {gap}");
        check_fd(&ins, 0, &wts, &g1[0], &fused);
        // inference (untracked input) gives the same values and keeps nothing for a backward
        assert!(max_diff(&fused(&ins), &y1) < 1e-15);
    }
    // VPT-deep: rows 1..1 + n replaced by a second input before the block (that input's
    // gradient is the replaced rows', x gets none there)
    let n = 2;
    for cls_only in [false, true] {
        let rows = if cls_only { 1 } else { s };
        let fused = |t: &[Tensor]| {
            let op = VitLayer {
                w: w.clone(),
                train: t[0].track_op() || t[1].track_op(),
                cls_only,
                saved: Default::default(),
            };
            t[0].apply_op2(&t[1], op).unwrap()
        };
        let composed = |t: &[Tensor]| {
            let x = Tensor::cat(
                &[
                    &t[0].narrow(1, 0, 1).unwrap(),
                    &t[1],
                    &t[0].narrow(1, 1 + n, s - 1 - n).unwrap(),
                ],
                1,
            )
            .unwrap();
            composed(&[x]).narrow(1, 0, rows).unwrap()
        };
        let ins = [ins[0].clone(), rand(&[b, n, d], 54)];
        let wts = rand(&[b, rows, d], 55);
        let (y1, g1) = grads(&ins, &wts, &fused);
        let (y2, g2) = grads(&ins, &wts, &composed);
        assert!(max_diff(&y1, &y2) < 1e-12, "{}", max_diff(&y1, &y2));
        for k in 0..2 {
            let gap = max_diff(&g1[k], &g2[k]);
            assert!(gap < 2e-6, "deep, cls_only {cls_only}, input {k}: {gap}");
            check_fd(&ins, k, &wts, &g1[k], &fused);
        }
        let replaced = g1[0].narrow(1, 1, n).unwrap().abs().unwrap();
        assert_eq!(replaced.sum_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
    }
    let y1 = fused_with(&w, &ins[0], false);
    // f32
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let o = |(w, b): &(Tensor, Option<Tensor>)| (f(w), b.as_ref().map(f));
    let w32 = VitWeights {
        norm1: (f(&w.norm1.0), f(&w.norm1.1)),
        qkv: o(&w.qkv),
        o: o(&w.o),
        ls1: w.ls1.as_ref().map(f),
        norm2: (f(&w.norm2.0), f(&w.norm2.1)),
        fc1: o(&w.fc1),
        fc2: o(&w.fc2),
        ls2: w.ls2.as_ref().map(f),
        ..w.clone()
    };
    let y32 = fused_with(&w32, &f(&ins[0]), false);
    assert!(max_diff(&y32.to_dtype(DType::F64).unwrap(), &y1) < 1e-5);
}

/// The f32 GELU (no library calls) against erf/exp in f64 over the range activations take.
#[test]
fn fast_gelu_matches_the_exact_one() {
    let xs: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 6e-4).collect();
    let (mut g, mut s) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
    super::vit::fast_gelu::run(&mut g, Some(&mut s), &xs);
    let mut g_only = vec![0f32; xs.len()];
    super::vit::fast_gelu::run(&mut g_only, None, &xs);
    let (mut worst_g, mut worst_s) = (0f64, 0f64);
    for (i, x) in xs.iter().map(|x| *x as f64).enumerate() {
        let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x / 2f64.sqrt()));
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        worst_g = worst_g.max((g[i] as f64 - x * cdf).abs() / x.abs().max(1.0));
        worst_s = worst_s.max((s[i] as f64 - (cdf + x * pdf)).abs());
        assert_eq!(g[i], g_only[i]);
    }
    assert!(worst_g < 5e-7, "gelu: {worst_g}");
    assert!(worst_s < 1e-6, "slope: {worst_s}");
    // NaN stays NaN, the tails saturate
    let mut out = [0f32; 3];
    super::vit::fast_gelu::run(&mut out, None, &[f32::NAN, -200.0, 200.0]);
    assert!(
        out[0].is_nan() && out[1] == 0.0 && out[2] == 200.0,
        "{out:?}"
    );
}
