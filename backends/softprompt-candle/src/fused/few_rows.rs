//! Frozen-weight products of 1 to [`few_rows::MAX_ROWS`] rows (a decode step of a few
//! sequences): `gemm` pads such a product to its 16-row micro-kernel, so two rows cost about
//! twice one. This kernel streams each weight row once and multiplies it into every input row
//! (AVX2 + FMA, detected at run time; elsewhere `gemm` keeps the job).

use rayon::prelude::*;

/// Most rows this kernel takes.
pub(super) const MAX_ROWS: usize = 4;

/// Output columns per parallel task.
const BLOCK: usize = 64;

/// `x [m, k] · Wᵀ` (`W [n, k]`, `m ≤ MAX_ROWS`, `k % 8 == 0`) when this machine has AVX2 and
/// FMA; `None` otherwise.
pub(super) fn linear(x: &[f32], w: &[f32], n: usize) -> Option<Vec<f32>> {
    let k = w.len() / n.max(1);
    let m = x.len() / k.max(1);
    if n == 0 || k == 0 || k % 8 != 0 || m == 0 || m > MAX_ROWS || !detected() {
        return None;
    }
    assert!(
        x.len() == m * k && w.len() == n * k,
        "few-rows linear: sizes"
    );
    // each task: BLOCK columns, column-major `[cols, m]`
    let blocks: Vec<Vec<f32>> = w
        .par_chunks(BLOCK * k)
        .map(|wb| {
            let mut out = vec![0f32; wb.len() / k * m];
            // SAFETY: `detected()` checked AVX2 and FMA; `x` is [m, k] and `wb` [cols, k]
            // with k a multiple of 8 (asserted above), `out` is [cols, m]
            unsafe { avx2::block(x, wb, m, k, &mut out) };
            out
        })
        .collect();
    Some(gather_columns(&blocks, m, n, BLOCK))
}

/// `y [m, n]` from per-task blocks of `width` output columns, each column-major `[cols, m]`.
pub(super) fn gather_columns(blocks: &[Vec<f32>], m: usize, n: usize, width: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for (b, out) in blocks.iter().enumerate() {
        for (j, col) in out.chunks(m.max(1)).enumerate() {
            for (r, v) in col.iter().enumerate() {
                y[r * n + b * width + j] = *v;
            }
        }
    }
    y
}

/// `x [m, k] · wbᵀ` for one block of weight rows `wb [cols, k]`, column-major `[cols, m]`, when
/// [`linear`] would take it (AVX2 and FMA, `1 ≤ m ≤ MAX_ROWS`, `k % 8 == 0`); `false` (and
/// `out` untouched) otherwise.
pub(super) fn block_into(x: &[f32], wb: &[f32], m: usize, k: usize, out: &mut [f32]) -> bool {
    if k == 0 || k % 8 != 0 || m == 0 || m > MAX_ROWS || !detected() {
        return false;
    }
    assert!(
        x.len() == m * k && wb.len() % k == 0 && out.len() == wb.len() / k * m,
        "few-rows block: sizes"
    );
    // SAFETY: `detected()` checked AVX2 and FMA; the sizes are asserted above
    unsafe { avx2::block(x, wb, m, k, out) };
    true
}

#[cfg(target_arch = "x86_64")]
fn detected() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA present; `x` is `[m, k]`, `w` `[cols, k]`, `k % 8 == 0`, `out` is
    /// `[cols, m]`, `1 ≤ m ≤ 4`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(x: &[f32], w: &[f32], m: usize, k: usize, out: &mut [f32]) {
        // SAFETY: the features are enabled (this function's own contract) and `rows` checks
        // the sizes it reads and writes
        unsafe {
            match m {
                1 => rows::<1>(x, w, k, out),
                2 => rows::<2>(x, w, k, out),
                3 => rows::<3>(x, w, k, out),
                _ => rows::<4>(x, w, k, out),
            }
        }
    }

    /// Two weight rows at a time against all `M` input rows: 2·M accumulators in registers.
    ///
    /// # Safety
    /// AVX2 and FMA present; `k % 8 == 0` (the sizes themselves are asserted).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const M: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
        assert!(k % 8 == 0 && w.len() % k == 0 && x.len() >= M * k && out.len() >= w.len() / k * M);
        let cols = w.len() / k;
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut o = 0;
        while o < cols {
            let two = o + 1 < cols;
            // SAFETY: `o < cols`, so rows `o` and `o + 1` (when `two`) lie inside `w`
            let (w0, w1) = unsafe {
                let w0 = wp.add(o * k);
                (w0, if two { wp.add((o + 1) * k) } else { w0 })
            };
            let mut a0 = [_mm256_setzero_ps(); M];
            let mut a1 = [_mm256_setzero_ps(); M];
            let mut kk = 0;
            while kk < k {
                // SAFETY: `kk + 8 <= k` (k is a multiple of 8), so the eight floats read from
                // each weight row and each of the `M` input rows (`x` holds `M·k`) are in bounds;
                // the features are enabled
                unsafe {
                    let v0 = _mm256_loadu_ps(w0.add(kk));
                    let v1 = _mm256_loadu_ps(w1.add(kk));
                    for r in 0..M {
                        let xv = _mm256_loadu_ps(xp.add(r * k + kk));
                        a0[r] = _mm256_fmadd_ps(xv, v0, a0[r]);
                        a1[r] = _mm256_fmadd_ps(xv, v1, a1[r]);
                    }
                }
                kk += 8;
            }
            for r in 0..M {
                // SAFETY: the features are enabled
                out[o * M + r] = unsafe { hsum(a0[r]) };
                if two {
                    // SAFETY: as above
                    out[(o + 1) * M + r] = unsafe { hsum(a1[r]) };
                }
            }
            o += 2;
        }
    }

    /// Sum of the eight lanes.
    ///
    /// # Safety
    /// AVX2 present.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    /// Never called: [`super::detected`] is false off x86-64.
    ///
    /// # Safety
    /// Never unsafe to call: it panics.
    pub(super) unsafe fn block(_: &[f32], _: &[f32], _: usize, _: usize, _: &mut [f32]) {
        unreachable!("few-rows kernel without AVX2")
    }
}
