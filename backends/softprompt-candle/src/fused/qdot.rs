//! A decode step's product with quantized weights, straight from the blocks: each weight row's
//! 4-bit or 8-bit values are unpacked in registers and multiplied into the few input rows (AVX2
//! and FMA, detected at run time), with no dequantized copy of the row. Q4_0, Q4_1 and Q8_0;
//! other formats go through a dequantized tile ([`super::qmatmul`]).
//!
//! Per block of 32 values and input row `x`: `Σ (d·q + m)·x = d·(q·x) + m·Σx`. The partial sums
//! stay lane-wise (eight lanes) until the row ends; `Σx` per block is computed once per call.

use rayon::prelude::*;
use softprompt_core::{QuantKind, QuantMatrix};

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// Whether [`linear`] takes `q` with `m` input rows on this machine.
pub(super) fn applies(q: &QuantMatrix, m: usize) -> bool {
    (1..=super::few_rows::MAX_ROWS).contains(&m)
        && q.cols % 32 == 0
        && q.segments
            .iter()
            .all(|s| matches!(s.kind, QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q8_0))
        && detected()
}

#[cfg(target_arch = "x86_64")]
fn detected() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> bool {
    false
}

/// `x [m, k] · Wᵀ` for `W [n, k]` in Q4_0 / Q4_1 / Q8_0 blocks; call only where [`applies`].
pub(super) fn linear(x: &[f32], q: &QuantMatrix, m: usize) -> Vec<f32> {
    assert!(applies(q, m), "direct quantized product: unsupported case");
    let (n, k) = (q.rows(), q.cols);
    assert_eq!(x.len(), m * k, "direct quantized product: sizes");
    let blocks = k / 32;
    // Σx of each input row's blocks, lane-wise: [m, blocks, 8]
    let mut xl = vec![0f32; m * blocks * 8];
    for r in 0..m {
        for b in 0..blocks {
            let xs = &x[r * k + b * 32..][..32];
            let out = &mut xl[(r * blocks + b) * 8..][..8];
            for g in 0..4 {
                for l in 0..8 {
                    out[l] += xs[g * 8 + l];
                }
            }
        }
    }
    // (segment, first row of the segment) of every weight row
    let mut starts = Vec::with_capacity(q.segments.len());
    let mut first = 0;
    for s in &q.segments {
        starts.push(first);
        first += s.rows;
    }
    let tasks: Vec<Vec<f32>> = (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let (lo, hi) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(n));
            let mut out = vec![0f32; (hi - lo) * m];
            for o in lo..hi {
                let si = starts.partition_point(|s| *s <= o) - 1;
                let seg = &q.segments[si];
                let rb = seg.kind.row_bytes(k);
                let row = &seg.bytes[(o - starts[si]) * rb..][..rb];
                let dst = &mut out[(o - lo) * m..][..m];
                // SAFETY: `applies` checked AVX2 and FMA; `row` holds `blocks` blocks of
                // `seg.kind`, `x` is [m, k] and `xl` [m, blocks, 8] (checked in `row_dot`)
                unsafe { avx2::row_dot(seg.kind, row, x, &xl, k, dst) };
            }
            out
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (t, out) in tasks.iter().enumerate() {
        for (j, col) in out.chunks(m).enumerate() {
            for (r, v) in col.iter().enumerate() {
                y[r * n + t * ROWS_PER_TASK + j] = *v;
            }
        }
    }
    y
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use softprompt_core::QuantKind;

    fn f16(b: &[u8], at: usize) -> f32 {
        half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
    }

    /// `out[r] = Σ_b (d_b·(q_b · x_r,b) + m_b·Σx_r,b)` over the blocks of one weight row.
    ///
    /// # Safety
    /// AVX2 and FMA present (the sizes are asserted).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_dot(
        kind: QuantKind,
        row: &[u8],
        x: &[f32],
        xl: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        let m = out.len();
        let blocks = k / 32;
        let bb = kind.block_bytes();
        assert!(
            row.len() == blocks * bb && x.len() >= m * k && xl.len() >= m * blocks * 8 && m <= 4,
            "row_dot: sizes"
        );
        let mut acc = [_mm256_setzero_ps(); 4];
        let nib = _mm_set1_epi8(0x0F);
        for b in 0..blocks {
            let blk = &row[b * bb..(b + 1) * bb];
            // the block's 32 values as four groups of eight f32, its scale and its offset term
            let (q, d, mn) = match kind {
                QuantKind::Q8_0 => {
                    let qs = &blk[2..34];
                    // SAFETY: `qs` holds 32 bytes: four loads of eight
                    let q = unsafe {
                        let p = qs.as_ptr() as *const __m128i;
                        [0, 1, 2, 3].map(|g| {
                            let v = _mm_loadl_epi64((p as *const u8).add(8 * g) as *const __m128i);
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
                        })
                    };
                    (q, f16(blk, 0), None)
                }
                QuantKind::Q4_0 | QuantKind::Q4_1 => {
                    let (qs, d, mn) = if kind == QuantKind::Q4_1 {
                        (&blk[4..20], f16(blk, 0), f16(blk, 2))
                    } else {
                        let d = f16(blk, 0);
                        (&blk[2..18], d, -8.0 * d)
                    };
                    // SAFETY: `qs` holds 16 bytes
                    let v = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
                    let lo = _mm_and_si128(v, nib);
                    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
                    let f = |w: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(w));
                    let q = [
                        f(lo),
                        f(_mm_srli_si128(lo, 8)),
                        f(hi),
                        f(_mm_srli_si128(hi, 8)),
                    ];
                    (q, d, Some(mn))
                }
                _ => unreachable!("row_dot: {kind:?} is not a direct format"),
            };
            let dv = _mm256_set1_ps(d);
            for (r, a) in acc.iter_mut().enumerate().take(m) {
                let xs = &x[r * k + b * 32..][..32];
                // SAFETY: `xs` holds 32 floats: four loads of eight; `xl`'s entry holds eight
                unsafe {
                    let p = xs.as_ptr();
                    let mut prod = _mm256_mul_ps(q[0], _mm256_loadu_ps(p));
                    prod = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(p.add(8)), prod);
                    prod = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(p.add(16)), prod);
                    prod = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(p.add(24)), prod);
                    *a = _mm256_fmadd_ps(dv, prod, *a);
                    if let Some(mn) = mn {
                        let s = _mm256_loadu_ps(xl[(r * blocks + b) * 8..][..8].as_ptr());
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(mn), s, *a);
                    }
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            *o = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    use softprompt_core::QuantKind;

    /// Never called: [`super::detected`] is false off x86-64.
    ///
    /// # Safety
    /// Never unsafe to call: it panics.
    pub(super) unsafe fn row_dot(
        _: QuantKind,
        _: &[u8],
        _: &[f32],
        _: &[f32],
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("direct quantized product without AVX2")
    }
}
