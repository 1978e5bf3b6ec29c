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

/// Runs `f` on a thread of rayon's pool with the pool's other threads kept awake until it
/// returns: each of them runs a helper that takes whatever parallel work `f`'s kernels hand out
/// (`rayon::yield_now`) and otherwise spins. A decode step is ~120 parallel products of tens of
/// microseconds each; started from outside the pool each paid a hand-over, and even from inside
/// it a sleeping worker's wake-up (a third of a decode step's product time on two cores before
/// this). The spinning lasts only while `f` runs.
pub(crate) fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    let helpers = rayon::current_num_threads().saturating_sub(1);
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let owner = rayon::current_thread_index();
        let done = &done;
        for _ in 0..helpers {
            s.spawn(move |_| {
                // a helper that `f`'s own thread picks up while it waits inside `f` must not
                // spin there: `done` is set only when `f` returns
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        // set however `f` ends (a panic too), or the scope would wait on spinning helpers
        struct Release<'a>(&'a AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _release = Release(done);
        f()
    })
}

#[cfg(test)]
mod pool_tests {
    use rayon::prelude::*;

    /// Work inside [`super::in_pool`] gives the same results as outside, nested calls and
    /// a panic inside end (the helpers stop) instead of hanging.
    #[test]
    fn in_pool_runs_nested_work_and_ends_on_panic() {
        let sum = |n: u64| (0..n).into_par_iter().map(|i| i * i).sum::<u64>();
        let want = sum(100_000);
        let got = super::in_pool(|| {
            (0..50)
                .map(|_| super::in_pool(|| sum(100_000)))
                .collect::<Vec<_>>()
        });
        assert!(got.iter().all(|g| *g == want));
        let caught = std::panic::catch_unwind(|| super::in_pool(|| panic!("inside the pool")));
        assert!(caught.is_err());
        assert_eq!(super::in_pool(|| sum(1000)), sum(1000));
    }
}
