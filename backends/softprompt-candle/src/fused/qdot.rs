//! A decode step's product with quantized weights, straight from the blocks: each weight row's
//! 4-bit or 8-bit values are unpacked in registers and multiplied into the few input rows (AVX2
//! FMA and F16C, detected at run time), with no dequantized copy of the row. Q4_0, Q4_1 and Q8_0;
//! other formats go through a dequantized tile ([`super::qmatmul`]).
//!
//! Per block of 32 values and input row `x`: `Σ (d·q + m)·x = d·(q·x) + m·Σx`. The partial sums
//! stay lane-wise (eight lanes) until the row ends; `Σx` per block is computed once per call.
//!
//! [`linear_q8`] is the faster variant llama.cpp uses for a decode step: the input rows are
//! first rounded to 8 bits per block of 32 (`x ≈ d_x·q_x`, `d_x = max|x|/127`), and each block's
//! product is an integer dot product of the weight's and the input's codes (`vpmaddubsw`,
//! 32 values per instruction), scaled once: `d·d_x·(q·q_x) + m·d_x·Σq_x`. Its error against
//! the f32 product is at most `Σ_blocks (max|x| / 254)·Σ|w|` per output (the input's rounding);
//! the weights are used exactly.

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

/// A few input rows rounded to 8 bits per block of 32: codes `[m, k]`, each block's scale
/// `d_x` and `d_x·Σq_x` (`[m, k / 32]`).
pub(super) struct Q8Rows {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
}

/// Rounds `x [m, k]` (`k % 32 == 0`) to 8-bit codes per block of 32: `d = max|x| / 127`,
/// `q = round(x / d)` (ties away from zero), as llama.cpp's Q8_0/Q8_1 activations.
pub(super) fn quantize_rows(x: &[f32], k: usize) -> Q8Rows {
    assert!(k % 32 == 0 && x.len() % k.max(1) == 0, "8-bit rows: sizes");
    let blocks = x.len() / 32;
    let mut out = Q8Rows {
        q: vec![0; x.len()],
        d: vec![0.0; blocks],
        s: vec![0.0; blocks],
    };
    for (b, (xs, qs)) in x
        .chunks_exact(32)
        .zip(out.q.chunks_exact_mut(32))
        .enumerate()
    {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qs.iter_mut().zip(xs) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
            sum += *q as i32;
        }
        out.d[b] = d;
        out.s[b] = d * sum as f32;
    }
    out
}

/// `x [m, k] · Wᵀ` for `W [n, k]` in Q4_0 / Q4_1 / Q8_0 blocks with the input rows rounded to
/// 8 bits per block (see the module's note); call only where [`applies`].
pub(super) fn linear_q8(x: &[f32], q: &QuantMatrix, m: usize) -> Vec<f32> {
    assert!(applies(q, m), "direct quantized product: unsupported case");
    let k = q.cols;
    assert_eq!(x.len(), m * k, "direct quantized product: sizes");
    let xq = quantize_rows(x, k);
    for_rows(q, m, |kind, row, dst| {
        // SAFETY: `applies` checked AVX2, FMA and F16C; `row` holds `k / 32` blocks of `kind`,
        // `xq` holds `m` rows of `k` codes (checked in `row_dot_q8`)
        unsafe { avx2::row_dot_q8(kind, row, &xq, k, dst) }
    })
}

/// Runs `dot(kind, row bytes, out[m])` for every weight row of `q` in parallel tasks and
/// gathers the outputs as `[m, n]`.
fn for_rows(
    q: &QuantMatrix,
    m: usize,
    dot: impl Fn(QuantKind, &[u8], &mut [f32]) + Sync,
) -> Vec<f32> {
    let (n, k) = (q.rows(), q.cols);
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
                dot(seg.kind, row, &mut out[(o - lo) * m..][..m]);
            }
            out
        })
        .collect();
    super::few_rows::gather_columns(&tasks, m, n, ROWS_PER_TASK)
}

/// `x [m, k] · Wᵀ` for `W [n, k]` in Q4_0 / Q4_1 / Q8_0 blocks; call only where [`applies`].
pub(super) fn linear(x: &[f32], q: &QuantMatrix, m: usize) -> Vec<f32> {
    assert!(applies(q, m), "direct quantized product: unsupported case");
    let k = q.cols;
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
    for_rows(q, m, |kind, row, dst| {
        // SAFETY: `applies` checked AVX2, FMA and F16C; `row` holds `blocks` blocks of `kind`,
        // `x` is [m, k] and `xl` [m, blocks, 8] (checked in `row_dot`)
        unsafe { avx2::row_dot(kind, row, x, &xl, k, dst) }
    })
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
            // see `rows_q8`
            _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(PREFETCH_BYTES) as *const i8);
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
            *o = hsum(a);
        }
    }

    /// The sum of the eight lanes of `a`.
    #[inline]
    #[target_feature(enable = "avx")]
    fn hsum(a: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// `out[r] = Σ_b d_b·d_x·(q_b · q_x) (+ m_b·d_x·Σq_x, or − 8·d_b·d_x·Σq_x for Q4_0)` over the
    /// blocks of one weight row, with 8-bit input codes (`xq`, rows of `k`): integer products
    /// of 32 values at a time (`vpmaddubsw`: unsigned weight codes × signed input codes, and
    /// for Q8_0's signed weights `|w|` × `x·sign(w)`), summed in 32 bits per block.
    ///
    /// # Safety
    /// AVX2, FMA and F16C present (the sizes are asserted).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_dot_q8(
        kind: QuantKind,
        row: &[u8],
        xq: &super::Q8Rows,
        k: usize,
        out: &mut [f32],
    ) {
        let m = out.len();
        let blocks = k / 32;
        assert!(
            row.len() == blocks * kind.block_bytes()
                && xq.q.len() >= m * k
                && xq.d.len() >= m * blocks
                && xq.s.len() >= m * blocks
                && (1..=4).contains(&m)
                && matches!(kind, QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q8_0),
            "row_dot_q8: sizes"
        );
        // SAFETY: sizes checked above; the features are this function's
        unsafe {
            macro_rules! rows {
                ($kind:expr) => {
                    match m {
                        1 => rows_q8::<1, { $kind }>(row, xq, k, out),
                        2 => rows_q8::<2, { $kind }>(row, xq, k, out),
                        3 => rows_q8::<3, { $kind }>(row, xq, k, out),
                        _ => rows_q8::<4, { $kind }>(row, xq, k, out),
                    }
                };
            }
            match kind {
                QuantKind::Q4_0 => rows!(Q4_0),
                QuantKind::Q4_1 => rows!(Q4_1),
                _ => rows!(Q8_0),
            }
        }
    }

    /// How far ahead of the block being multiplied [`rows_q8`] prefetches the weights.
    const PREFETCH_BYTES: usize = 4096;

    /// The formats [`rows_q8`] is compiled for.
    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    /// [`row_dot_q8`] for `M` input rows and one format `KIND` ([`Q4_0`], [`Q4_1`] or [`Q8_0`]),
    /// the accumulators in registers.
    ///
    /// # Safety
    /// AVX2, FMA and F16C present; `row` holds `k / 32` blocks of `KIND`, `xq` at least `M`
    /// rows of `k` codes and `out` `M` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows_q8<const M: usize, const KIND: u8>(
        row: &[u8],
        xq: &super::Q8Rows,
        k: usize,
        out: &mut [f32],
    ) {
        let blocks = k / 32;
        let bb = match KIND {
            Q4_0 => 18,
            Q4_1 => 20,
            _ => 34,
        };
        let ones = _mm256_set1_epi16(1);
        let nib = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); M];
        let mut extra = [0f32; M];
        let (wp, xp, dp, sp) = (row.as_ptr(), xq.q.as_ptr(), xq.d.as_ptr(), xq.s.as_ptr());
        for b in 0..blocks {
            // SAFETY: block `b` of the row and block `b` of each of the `M` input rows lie
            // inside the slices (the caller's contract)
            unsafe {
                let blk = wp.add(b * bb);
                // the weights stream through once: ask for the bytes a few blocks ahead (past
                // the row's end too: the next row follows; a prefetch never faults)
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH_BYTES) as *const i8);
                // the block's scale(s): one F16C conversion of its first four bytes
                let scales = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
                let d = _mm_cvtss_f32(scales);
                // the weight codes: unsigned nibbles in GGUF's order (low halves are values
                // 0..16, high halves 16..32), or signed bytes; the offset per unit of d_x·Σq_x
                let (w, off) = match KIND {
                    Q8_0 => (_mm256_loadu_si256(blk.add(2) as *const __m256i), 0.0),
                    Q4_1 => {
                        let v = _mm_loadu_si128(blk.add(4) as *const __m128i);
                        let lo = _mm_and_si128(v, nib);
                        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
                        let mn = _mm_cvtss_f32(_mm_movehdup_ps(scales));
                        (_mm256_set_m128i(hi, lo), mn)
                    }
                    _ => {
                        let v = _mm_loadu_si128(blk.add(2) as *const __m128i);
                        let lo = _mm_and_si128(v, nib);
                        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
                        (_mm256_set_m128i(hi, lo), -8.0 * d)
                    }
                };
                let signed = KIND == Q8_0;
                let wu = if signed { _mm256_sign_epi8(w, w) } else { w };
                for r in 0..M {
                    let at = r * blocks + b;
                    let xv = _mm256_loadu_si256(xp.add(r * k + b * 32) as *const __m256i);
                    let xv = if signed { _mm256_sign_epi8(xv, w) } else { xv };
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xv), ones);
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(dot),
                        _mm256_set1_ps(d * *dp.add(at)),
                        acc[r],
                    );
                    extra[r] += off * *sp.add(at);
                }
            }
        }
        for r in 0..M {
            out[r] = hsum(acc[r]) + extra[r];
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
    pub(super) unsafe fn row_dot_q8(
        _: QuantKind,
        _: &[u8],
        _: &super::Q8Rows,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("direct quantized product without AVX2")
    }

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
