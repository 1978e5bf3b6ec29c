//! The libtorch backend of softprompt, through `tch`: CPU and CUDA (`cuda:N`, chosen at run
//! time), f32 / f64 / bf16 / f16 frozen weights with the prompt and its gradient in f32.
//!
//! Implements [`softprompt_core::Backbone`] with gradients with respect to the prompt only (weights never require
//! a gradient), per-row prompts, rank-classification scores from one pass, full logits and
//! KV-cached decoding. libtorch comes from the pinned `torch==2.13.0` wheel: build with
//! `bash tools/setup-python.sh && source tools/libtorch-env.sh`.
//!
//! `tch::Tensor` is `Send` but not `Sync`; the model sits behind a mutex so that a
//! `TchBackbone` is `Sync` without unsafe code. Calls on one backbone run one at a time, each
//! using libtorch's intra-op threads.

mod backbone;
mod decoding;
mod model;
mod options;
mod runtime;
mod vision;

use softprompt_core::Error;
pub use tch::{Device, Kind};
use tch::{TchError, Tensor};

pub(crate) use crate::backbone::to_f32;
pub use crate::backbone::TchBackbone;
pub use crate::options::{parse_device, parse_kind, set_num_threads, TchOptions};
pub use crate::vision::TchVision;

/// Result with softprompt's error type.
pub type Result<T> = softprompt_core::Result<T>;

const BACKEND: &str = "tch";

/// A failure inside the backend: libtorch's own, or softprompt's from the shared model code.
#[derive(Debug)]
pub(crate) enum Fail {
    Tch(TchError),
    Core(Error),
}

impl From<TchError> for Fail {
    fn from(e: TchError) -> Self {
        Fail::Tch(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Core(e)
    }
}

impl From<Fail> for Error {
    fn from(e: Fail) -> Self {
        match e {
            Fail::Tch(e) => Error::backend(BACKEND, e),
            Fail::Core(e) => e,
        }
    }
}

/// Result of code that mixes libtorch calls and the shared model code.
pub(crate) type TResult<T> = std::result::Result<T, Fail>;

pub(crate) fn to_core(e: impl Into<Fail>) -> Error {
    e.into().into()
}

/// Achieved f32 FLOP/s of an `n × n` by `n × n` matrix product on `device`: the practical
/// ceiling of the machine for this runtime (the fastest of `repeats` after one warm-up).
pub fn matmul_flops(device: Device, n: usize, repeats: usize) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let size = [n as i64, n as i64];
    let a = Tensor::f_randn(size, (Kind::Float, device)).map_err(to_core)?;
    let b = Tensor::f_randn(size, (Kind::Float, device)).map_err(to_core)?;
    let mut times = Vec::with_capacity(repeats);
    for i in 0..repeats.max(1) + 1 {
        let t0 = std::time::Instant::now();
        let c = a.f_matmul(&b).map_err(to_core)?;
        if let Device::Cuda(ordinal) = device {
            tch::Cuda::synchronize(ordinal as i64);
        }
        drop(c);
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(2.0 * (n as f64).powi(3) / best)
}
