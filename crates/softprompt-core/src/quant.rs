//! Frozen weight matrices kept in GGUF's quantized blocks (llama.cpp's formats), dequantized a
//! few rows at a time where a kernel needs them.
//!
//! A row of a matrix `[rows, cols]` is `cols / block` consecutive blocks; rows follow each other,
//! so any run of rows is a contiguous byte range. A [`QuantMatrix`] is one or more
//! [`QuantSegment`]s stacked along the rows (fused q/k/v may mix types: Gemma's Q4_K_M file
//! stores q and k as Q5_0 and v as Q8_0 in some layers).

use crate::{Error, Result};

/// The block formats kept quantized (others are dequantized to f32 at load).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    /// 32 values: f16 scale, 4-bit values − 8.
    Q4_0,
    /// 32 values: f16 scale and minimum, 4-bit values.
    Q4_1,
    /// 32 values: f16 scale, 5-bit values − 16.
    Q5_0,
    /// 32 values: f16 scale and minimum, 5-bit values.
    Q5_1,
    /// 32 values: f16 scale, 8-bit signed values.
    Q8_0,
    /// 256 values: f16 scale and minimum, 8 sub-blocks with 6-bit scales/minima, 4-bit values.
    Q4K,
    /// 256 values: as Q4_K with a fifth bit per value.
    Q5K,
    /// 256 values: f16 scale, 16 sub-blocks with 8-bit scales, 6-bit values − 32.
    Q6K,
}

impl QuantKind {
    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q5_0 => 22,
            QuantKind::Q5_1 => 24,
            QuantKind::Q8_0 => 34,
            QuantKind::Q4K => 144,
            QuantKind::Q5K => 176,
            QuantKind::Q6K => 210,
        }
    }

    /// llama.cpp's name of the type (`Q4_1`, `Q6_K`, …).
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q4_0 => "Q4_0",
            QuantKind::Q4_1 => "Q4_1",
            QuantKind::Q5_0 => "Q5_0",
            QuantKind::Q5_1 => "Q5_1",
            QuantKind::Q8_0 => "Q8_0",
            QuantKind::Q4K => "Q4_K",
            QuantKind::Q5K => "Q5_K",
            QuantKind::Q6K => "Q6_K",
        }
    }

    /// The kind named `name` (llama.cpp's spelling, any case).
    pub fn parse(name: &str) -> Option<QuantKind> {
        let all = [
            QuantKind::Q4_0,
            QuantKind::Q4_1,
            QuantKind::Q5_0,
            QuantKind::Q5_1,
            QuantKind::Q8_0,
            QuantKind::Q4K,
            QuantKind::Q5K,
            QuantKind::Q6K,
        ];
        all.into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
    }

    /// Bytes of one row of `cols` values.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_values() * self.block_bytes()
    }

    /// Dequantizes whole blocks `bytes` into `out` (`bytes.len() / block_bytes · block_values`
    /// values).
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        let (bb, bv) = (self.block_bytes(), self.block_values());
        debug_assert_eq!(bytes.len() / bb * bv, out.len());
        for (b, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
            match self {
                QuantKind::Q4_0 => q4_0(b, y),
                QuantKind::Q4_1 => q4_1(b, y),
                QuantKind::Q5_0 => q5_0(b, y),
                QuantKind::Q5_1 => q5_1(b, y),
                QuantKind::Q8_0 => q8_0(b, y),
                QuantKind::Q4K => q4_k(b, y),
                QuantKind::Q5K => q5_k(b, y),
                QuantKind::Q6K => q6_k(b, y),
            }
        }
    }
}

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 0xF) as i32 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0xF) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = d * (((qs[j] & 0xF) | h0) as i32 - 16) as f32;
        y[j + 16] = d * (((qs[j] >> 4) | h1) as i32 - 16) as f32;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = d * ((qs[j] & 0xF) | h0) as f32 + m;
        y[j + 16] = d * ((qs[j] >> 4) | h1) as f32 + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    for (v, q) in y.iter_mut().zip(&b[2..34]) {
        *v = d * (*q as i8) as f32;
    }
}

/// Scale and minimum of sub-block `j` of a K-quant's 12 packed 6-bit values.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (n, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * n, scales);
        let (sc2, m2) = scale_min_k4(2 * n + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - min1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (n, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * n, scales);
        let (sc2, m2) = scale_min_k4(2 * n + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * n), 2u8 << (2 * n));
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0xF) + h1) as f32 - min1;
            y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - min2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = f16(b, 208);
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
        let y = &mut y[128 * n..128 * (n + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Rows of one block format.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantSegment {
    /// Block format.
    pub kind: QuantKind,
    /// Rows in this segment.
    pub rows: usize,
    /// `rows · kind.row_bytes(cols)` bytes.
    pub bytes: Vec<u8>,
}

/// A frozen matrix `[rows, cols]` in quantized blocks (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    /// Values per row.
    pub cols: usize,
    /// Row segments, in order.
    pub segments: Vec<QuantSegment>,
}

impl QuantMatrix {
    /// A matrix of one kind from its raw blocks; errors unless the sizes agree.
    pub fn new(kind: QuantKind, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self> {
        if cols % kind.block_values() != 0 || bytes.len() != rows * kind.row_bytes(cols) {
            return Err(Error::Shape(format!(
                "{} blocks of a [{rows}, {cols}] matrix: {} bytes (rows of {} values)",
                kind.name(),
                bytes.len(),
                kind.block_values()
            )));
        }
        Ok(QuantMatrix {
            cols,
            segments: vec![QuantSegment { kind, rows, bytes }],
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.segments.iter().map(|s| s.rows).sum()
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows(), self.cols]
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.segments.iter().map(|s| s.bytes.len()).sum()
    }

    /// The block formats, in row order (one per segment).
    pub fn kinds(&self) -> Vec<QuantKind> {
        self.segments.iter().map(|s| s.kind).collect()
    }

    /// `self`'s rows followed by `other`'s (same columns); adjacent segments of one kind merge.
    pub fn stack(mut self, other: QuantMatrix) -> Result<Self> {
        if other.cols != self.cols {
            return Err(Error::Shape(format!(
                "stacking a [{}, {}] quantized matrix under one of {} columns",
                other.rows(),
                other.cols,
                self.cols
            )));
        }
        for s in other.segments {
            match self.segments.last_mut() {
                Some(last) if last.kind == s.kind => {
                    last.rows += s.rows;
                    last.bytes.extend(s.bytes);
                }
                _ => self.segments.push(s),
            }
        }
        Ok(self)
    }

    /// Reorders the rows: row `i` of the result is row `order[i]` of `self` (one segment only:
    /// llama.cpp's Q/K row permutation is undone per matrix, before any stacking).
    pub fn permute_rows(&mut self, order: &[usize]) -> Result<()> {
        let [seg] = self.segments.as_mut_slice() else {
            return Err(Error::Shape(
                "rows of a stacked quantized matrix cannot be permuted".into(),
            ));
        };
        let rb = seg.kind.row_bytes(self.cols);
        if order.len() != seg.rows || order.iter().any(|r| *r >= seg.rows) {
            return Err(Error::Shape(format!(
                "a permutation of {} rows for {} rows",
                order.len(),
                seg.rows
            )));
        }
        let mut out = Vec::with_capacity(seg.bytes.len());
        for r in order {
            out.extend_from_slice(&seg.bytes[r * rb..(r + 1) * rb]);
        }
        seg.bytes = out;
        Ok(())
    }

    /// Dequantizes rows `lo..hi` into `out` (`(hi − lo) · cols` values).
    pub fn dequantize_rows(&self, lo: usize, hi: usize, out: &mut [f32]) {
        self.dequantize_rows_with(lo, hi, out, |kind, bytes, out| kind.dequantize(bytes, out));
    }

    /// [`Self::dequantize_rows`] with the per-segment kernel given: `kernel(kind, blocks, out)`
    /// fills `out` from whole blocks of one kind (a runtime's SIMD version of
    /// [`QuantKind::dequantize`]).
    pub fn dequantize_rows_with(
        &self,
        lo: usize,
        hi: usize,
        out: &mut [f32],
        kernel: impl Fn(QuantKind, &[u8], &mut [f32]),
    ) {
        debug_assert_eq!(out.len(), (hi - lo) * self.cols);
        let mut first = 0;
        let mut at = 0;
        for s in &self.segments {
            let (a, b) = (lo.max(first), hi.min(first + s.rows));
            if a < b {
                let rb = s.kind.row_bytes(self.cols);
                let bytes = &s.bytes[(a - first) * rb..(b - first) * rb];
                kernel(s.kind, bytes, &mut out[at..at + (b - a) * self.cols]);
                at += (b - a) * self.cols;
            }
            first += s.rows;
        }
    }

    /// Every value as f32, `[rows, cols]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows() * self.cols];
        self.dequantize_rows(0, self.rows(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_stack_permute_and_dequantize_rows() {
        // Q8_0: scale 0.5 (f16 0x3800), values 0..32 per row
        let row = |base: i8| -> Vec<u8> {
            let mut b = vec![0x00, 0x38];
            b.extend((0..32).map(|i| (base + i as i8) as u8));
            b
        };
        let bytes: Vec<u8> = [0i8, 40, -60].iter().flat_map(|b| row(*b)).collect();
        let mut m = QuantMatrix::new(QuantKind::Q8_0, 3, 32, bytes).unwrap();
        assert_eq!(m.shape(), [3, 32]);
        assert_eq!(m.dequantize()[32 + 5], 0.5 * 45.0);
        m.permute_rows(&[2, 0, 1]).unwrap();
        let d = m.dequantize();
        assert_eq!((d[0], d[32], d[64]), (-30.0, 0.0, 20.0));
        assert!(QuantMatrix::new(QuantKind::Q8_0, 3, 32, vec![0; 10]).is_err());
        assert!(QuantMatrix::new(QuantKind::Q4K, 1, 32, vec![0; 144]).is_err());
        // Q4_0 rows below: a second segment; rows across the boundary come out in order
        let mut q4 = vec![0x00, 0x3C]; // scale 1.0
        q4.extend(std::iter::repeat_n(0x98u8, 16)); // low nibble 8 → 0, high 9 → 1
        let stacked = m
            .clone()
            .stack(QuantMatrix::new(QuantKind::Q4_0, 1, 32, q4).unwrap())
            .unwrap();
        assert_eq!(stacked.kinds(), vec![QuantKind::Q8_0, QuantKind::Q4_0]);
        let mut out = vec![0f32; 64];
        stacked.dequantize_rows(2, 4, &mut out);
        assert_eq!(&out[..32], &d[64..96]);
        assert_eq!((out[32], out[63]), (0.0, 1.0));
        assert!(stacked.clone().permute_rows(&[0, 1, 2, 3]).is_err());
        // same kinds merge into one segment
        let twice = m.clone().stack(m.clone()).unwrap();
        assert_eq!(twice.segments.len(), 1);
        assert_eq!(twice.rows(), 6);
        assert_eq!(QuantKind::parse("q6_k"), Some(QuantKind::Q6K));
    }
}
