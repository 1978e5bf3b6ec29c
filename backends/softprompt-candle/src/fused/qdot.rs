//! A decode step's product with quantized weights, straight from the blocks: each weight row's
//! 4-bit or 8-bit values are unpacked in registers and multiplied into the few input rows (AVX2
//! FMA and F16C, detected at run time), with no dequantized copy of the row. Q4_0, Q4_1 and Q8_0;
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
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> bool {
    false
}

/// Dequantizes whole blocks `bytes` of `kind` into `out` with AVX2 where this machine has it
/// and `kind` is Q4_0, Q4_1 or Q8_0; `false` (and `out` untouched) otherwise.
pub(super) fn dequantize(kind: QuantKind, bytes: &[u8], out: &mut [f32]) -> bool {
    if !matches!(kind, QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q8_0) || !detected() {
        return false;
    }
    // SAFETY: `detected()` checked AVX2, FMA and F16C; the sizes are asserted inside
    unsafe { avx2::dequantize(kind, bytes, out) };
    true
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
                // SAFETY: `applies` checked AVX2, FMA and F16C; `row` holds `blocks` blocks of
                // `seg.kind`, `x` is [m, k] and `xl` [m, blocks, 8] (checked in `row_dot`)
                unsafe { avx2::row_dot(seg.kind, row, x, &xl, k, dst) };
            }
            out
        })
        .collect();
    super::few_rows::gather_columns(&tasks, m, n, ROWS_PER_TASK)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use softprompt_core::QuantKind;

    /// The f16 at `b[at..at + 2]` (F16C's conversion, in registers).
    ///
    /// # Safety
    /// F16C present.
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16(b: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([b[at], b[at + 1]]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// One block `$blk` of `$kind` as four groups of eight f32 values, its scale `d` and the
    /// offset `m` of `d·q + m` (`None` for Q8_0). A macro so that it inlines into the
    /// `target_feature` functions that use it (a function call per block cost a third of a
    /// decode step). Use only in functions with AVX2 and F16C enabled; `$blk` is one whole
    /// block (asserted).
    macro_rules! unpack {
        ($kind:expr, $blk:expr) => {{
            let (kind, blk): (QuantKind, &[u8]) = ($kind, $blk);
            assert_eq!(blk.len(), kind.block_bytes(), "unpack: one block");
            let nib = _mm_set1_epi8(0x0F);
            match kind {
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
                    // SAFETY: F16C is enabled (this function's contract)
                    (q, unsafe { f16(blk, 0) }, None)
                }
                QuantKind::Q4_0 | QuantKind::Q4_1 => {
                    let (qs, d, mn) = if kind == QuantKind::Q4_1 {
                        // SAFETY: F16C is enabled (this function's contract)
                        unsafe { (&blk[4..20], f16(blk, 0), f16(blk, 2)) }
                    } else {
                        // SAFETY: F16C is enabled (this function's contract)
                        let d = unsafe { f16(blk, 0) };
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
            }
        }};
    }

    /// Dequantizes whole blocks of a Q4_0, Q4_1 or Q8_0 row into `out`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C present (the sizes are asserted).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize(kind: QuantKind, bytes: &[u8], out: &mut [f32]) {
        let bb = kind.block_bytes();
        assert_eq!(bytes.len() / bb * 32, out.len(), "dequantize: sizes");
        for (blk, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
            // the macro's unsafe blocks rely on the features this function enables; `blk` is
            // one block
            let (q, d, mn) = unpack!(kind, blk);
            let (dv, mv) = (_mm256_set1_ps(d), _mm256_set1_ps(mn.unwrap_or(0.0)));
            for (g, qg) in q.iter().enumerate() {
                // SAFETY: `y` holds 32 floats: four stores of eight
                unsafe {
                    _mm256_storeu_ps(y.as_mut_ptr().add(8 * g), _mm256_fmadd_ps(*qg, dv, mv))
                };
            }
        }
    }

    /// `out[r] = Σ_b (d_b·(q_b · x_r,b) + m_b·Σx_r,b)` over the blocks of one weight row.
    ///
    /// # Safety
    /// AVX2, FMA and F16C present (the sizes are asserted).
    #[target_feature(enable = "avx2,fma,f16c")]
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
        for b in 0..blocks {
            let blk = &row[b * bb..(b + 1) * bb];
            // the block's 32 values as four groups of eight f32, its scale and its offset term
            // the macro's unsafe blocks rely on the features this function enables; `blk` is
            // one block
            let (q, d, mn) = unpack!(kind, blk);
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
