//! Fused CPU kernels (f32 and f64) with hand-written backward passes.
//!
//! candle's autograd records every elementary op of a composition (RMSNorm is six ops, softmax
//! five), keeps each op's output alive until the backward pass, and accumulates every gradient
//! into a fresh zero tensor. On the CPU that bookkeeping, not the matrix products, dominated a
//! training step. These ops compute a whole block in one pass over the data, store only their
//! inputs for the backward pass, and compute that backward in one pass too. The matrix products
//! inside them go straight to `gemm` (the crate candle itself calls), on the rows of the
//! tensors in place: no transposed or packed copies. Independent rows / heads run on rayon's
//! pool (`RAYON_NUM_THREADS`, like candle's own kernels).
//!
//! One file per op (its forward and hand-written backward): [`matmul`] (the frozen-weight
//! product, with [`few_rows`] for decode-sized products), [`norm`], [`swiglu`], [`heads`]
//! (split q/k/v into heads with RoPE), [`attention`] (training and the decode row over a host
//! cache), [`layer`] (a whole Llama block in training) and [`vit`] (a whole vision-transformer
//! block, with LayerNorm and exact GELU). Each op is checked against the
//! composition it replaces and against central finite differences in [`tests`].
//!
//! `unsafe` is allowed here only: `gemm` takes raw pointers, the few-rows kernel uses AVX2
//! intrinsics, and parallel tasks write disjoint parts of one buffer through [`Shared`]. Every
//! unsafe block states why it is sound.

#![allow(unsafe_code)]

macro_rules! dispatch {
    ($storage:expr, $f:ident ( $($arg:expr),* )) => {
        match $storage {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("fused kernels run on f32 and f64"),
        }
    };
}

mod attention;
mod few_rows;
mod geglu;
mod heads;
mod layer;
mod matmul;
mod norm;
mod qdot;
mod qmatmul;
mod rope;
mod swiglu;
#[cfg(test)]
mod tests;
mod vit;

pub(crate) use attention::{decode_attention_row, Attention};
pub(crate) use geglu::GeGlu;
pub(crate) use heads::SplitHeads;
pub(crate) use layer::{LayerWeights, TokenLayer};
pub(crate) use matmul::FrozenMatmul;
pub(crate) use norm::RmsNorm;
pub(crate) use qmatmul::{QuantMatmul, Weight};
pub(crate) use rope::Rope;
pub(crate) use swiglu::SwiGlu;
pub(crate) use vit::{VitLayer, VitWeights};
// what the ops share with each other (the whole layer reuses every slice kernel)
#[allow(unused_imports)]
use self::attention::{
    attention_bwd, attention_fwd, attention_grads, attention_rows, dot, probabilities,
    softmax_in_place, AttentionBwd, Dims,
};
#[allow(unused_imports)]
use self::heads::{
    rotate, split_heads_bwd, split_heads_fwd, split_heads_grad, split_heads_into, HeadLayout,
    SplitHeadsBwd, Tables,
};
#[allow(unused_imports)]
use self::layer::{
    add_into, place_prefix, token_layer_bwd, token_layer_fwd, with_all, LayerGrads, Parts, Saved,
};
#[allow(unused_imports)]
use self::matmul::{frozen_matmul_fwd, linear_grad, linear_rows, COLUMN_MAJOR_ROWS};
#[allow(unused_imports)]
use self::norm::{rms_bwd, rms_bwd_rows, rms_fwd, rms_rows, RmsNormBwd};
#[allow(unused_imports)]
use self::qmatmul::{linear_grad_w, linear_w, q_linear_grad, q_linear_rows};
#[allow(unused_imports)]
use self::swiglu::{
    half_width, sigmoid, swiglu_bwd, swiglu_bwd_rows, swiglu_fwd, swiglu_rows, SwiGluBwd,
};

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType};
use gemm::Parallelism;
use num_traits::Float;

/// Element types the fused kernels run on.
pub(crate) trait Elem:
    WithDType + Float + Send + Sync + std::iter::Sum + std::ops::AddAssign + std::ops::MulAssign
{
    /// `x [m, k] · Wᵀ` (`W [n, k]`) by a kernel for a few rows, where there is one for this
    /// type and machine; `None` leaves it to `gemm`.
    fn few_rows(_x: &[Self], _w: &[Self], _n: usize) -> Option<Vec<Self>> {
        None
    }
    /// The values as f32, when `Self` is f32.
    fn as_f32(_x: &[Self]) -> Option<&[f32]> {
        None
    }
    /// The values as f32 to write, when `Self` is f32.
    fn as_f32_mut(_x: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    /// Runs `f` on a scratch buffer of `len` values (contents unspecified): f32 reuses one
    /// per thread, so that the dequantized tiles of every product do not fault in fresh pages.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        f(&mut vec![Self::zero(); len])
    }
    /// f32 values as `Self`.
    /// The error function.
    fn erf(self) -> Self {
        let x = self.to_f64();
        Self::from(candle_core::cpu::erf::erf_f64(x)).unwrap_or_else(Self::zero)
    }
    fn from_f32_vec(v: Vec<f32>) -> Vec<Self> {
        v.into_iter()
            .map(|x| Self::from(x).unwrap_or_else(Self::zero))
            .collect()
    }
}
impl Elem for f32 {
    fn few_rows(x: &[f32], w: &[f32], n: usize) -> Option<Vec<f32>> {
        few_rows::linear(x, w, n)
    }
    fn as_f32(x: &[f32]) -> Option<&[f32]> {
        Some(x)
    }
    fn as_f32_mut(x: &mut [f32]) -> Option<&mut [f32]> {
        Some(x)
    }
    fn from_f32_vec(v: Vec<f32>) -> Vec<f32> {
        v
    }
    fn erf(self) -> f32 {
        candle_core::cpu::erf::erf_f32(self)
    }
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => {
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
                f(&mut buf[..len])
            }
            // re-entered on this thread (a nested product): a buffer of its own
            Err(_) => f(&mut vec![0f32; len]),
        })
    }
}
impl Elem for f64 {}

/// Whether the fused kernels handle tensors like `t` (CPU, f32 or f64).
pub(crate) fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The contiguous slice of a storage a layout describes.
fn view<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernel needs contiguous inputs".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Runs `f` on the contiguous data of a captured (frozen) tensor.
fn with_data<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    match &*guard {
        Storage::Cpu(cpu) => f(view::<T>(cpu, layout)?),
        _ => candle_core::bail!("fused kernel: tensor is not on the CPU"),
    }
}

fn threads() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: a `Shared` is handed only to tasks that write disjoint ranges of a buffer that
// outlives them (rayon joins every task before the buffer is read or dropped).
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as for `Send`: no two tasks touch the same element.
unsafe impl<T> Sync for Shared<T> {}
impl<T> Shared<T> {
    /// The pointer `offset` elements in. Computing it is safe (`wrapping_add`); writing through
    /// it is the caller's `unsafe`, in bounds and disjoint from every other task's range.
    fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// Row-major strides of one matrix operand: element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: usize,
    cs: usize,
}

impl<T> Mat<T> {
    fn rows(ptr: *const T, rs: usize) -> Self {
        Mat { ptr, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    fn t(ptr: *const T, rs: usize) -> Self {
        Mat { ptr, rs: 1, cs: rs }
    }
}

/// Where a product goes: a pointer and its row and column strides.
struct Out<T> {
    ptr: *mut T,
    rs: usize,
    cs: usize,
}

impl<T> Out<T> {
    /// Row-major with row stride `rs`.
    fn rows(ptr: *mut T, rs: usize) -> Self {
        Out { ptr, rs, cs: 1 }
    }
    /// Column-major with column stride `cs` (the transpose lies row-major).
    fn cols(ptr: *mut T, cs: usize) -> Self {
        Out { ptr, rs: 1, cs }
    }
}

/// `dst [m, n] = a [m, k] · b [k, n]`, or `+=` with `accumulate`.
///
/// # Safety
/// Every pointer must address a buffer that holds the described matrix.
unsafe fn matmul<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: Out<T>,
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    par: Parallelism,
) {
    // SAFETY: the caller guarantees every pointer addresses its whole described matrix
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            a.ptr,
            a.cs as isize,
            a.rs as isize,
            b.ptr,
            b.cs as isize,
            b.rs as isize,
            if accumulate { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}
