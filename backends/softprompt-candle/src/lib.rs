//! The candle backend of softprompt: pure Rust, CPU by default, CUDA behind the `cuda` feature.
//!
//! Implements [`softprompt_core::Backbone`] with gradients with respect to the prompt (candle autograd over
//! differentiable ops only), per-row prompts, rank-classification scores and KV-cached decoding.

mod backbone;
mod decoding;
mod fused;
mod model;
pub mod ops;
mod options;
mod runtime;
mod vision;

use candle_core::Tensor;
pub use candle_core::{DType, Device};
use softprompt_core::Error;

pub use crate::backbone::CandleBackbone;
pub use crate::options::{parse_device, CandleOptions};
pub use crate::vision::CandleVision;

/// Result with softprompt's error type.
pub type Result<T> = softprompt_core::Result<T>;

const BACKEND: &str = "candle";

/// A failure inside the backend: candle's own, or softprompt's from the shared model code.
#[derive(Debug)]
pub(crate) enum Fail {
    Candle(candle_core::Error),
    Core(Error),
}

impl From<candle_core::Error> for Fail {
    fn from(e: candle_core::Error) -> Self {
        Fail::Candle(e)
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
            Fail::Candle(e) => Error::backend(BACKEND, e),
            Fail::Core(e) => e,
        }
    }
}

/// Result of code that mixes candle calls and the shared model code.
pub(crate) type CResult<T> = std::result::Result<T, Fail>;

pub(crate) fn to_core(e: impl Into<Fail>) -> Error {
    e.into().into()
}

/// Achieved f32 FLOP/s of an `n × n` by `n × n` matrix product on `device`: the practical
/// ceiling of the machine for this runtime (the fastest of `repeats` after one warm-up).
pub fn matmul_flops(device: &Device, n: usize, repeats: usize) -> Result<f64> {
    let run = || -> CResult<f64> {
        let a = Tensor::randn(0f32, 1f32, (n, n), device)?;
        let b = Tensor::randn(0f32, 1f32, (n, n), device)?;
        let mut times = Vec::with_capacity(repeats);
        for i in 0..repeats.max(1) + 1 {
            let t0 = std::time::Instant::now();
            let c = a.matmul(&b)?;
            device.synchronize()?;
            drop(c);
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        Ok(2.0 * (n as f64).powi(3) / best)
    };
    run().map_err(to_core)
}

/// Runs `f` on a thread of rayon's pool, so that the kernels' parallel loops inside it start
/// from a worker (the other workers steal while awake) instead of each handing its work to the
/// pool from outside and waiting to be woken: one hand-over per call instead of one per op,
/// which on two cores was a third of a decode step's product time.
pub(crate) fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
