//! How a candle backbone is loaded: device and dtype.

use candle_core::{DType, Device};
use softprompt_core::Error;

use crate::{Result, BACKEND};

/// Parses `cpu` or `cuda:N` (`cuda` means `cuda:0`).
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s.strip_prefix("cuda:").unwrap_or("0");
            let ordinal: usize = ordinal.parse().map_err(|_| {
                Error::InvalidArgument(format!("bad CUDA device `{s}`: expected cuda:N"))
            })?;
            cuda_device(ordinal)
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown device `{other}`: expected cpu or cuda:N"
        ))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(crate::to_core)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    Err(Error::unsupported(
        BACKEND,
        "CUDA devices",
        Some("rebuild with the `cuda` Cargo feature (softprompt/cuda)"),
    ))
}

/// How to load a backbone.
#[derive(Debug, Clone)]
pub struct CandleOptions {
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    pub(crate) int8_decode: bool,
}

impl Default for CandleOptions {
    fn default() -> Self {
        CandleOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            int8_decode: false,
        }
    }
}

impl CandleOptions {
    /// CPU, f32.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs on `device`.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Stores the frozen weights and computes in `dtype` (f32 default; f64 for exact
    /// gradient checks; bf16/f16 to save memory). Prompts and gradients stay f32 on the host.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Rounds a decode step's activations to 8 bits per block of 32 before they meet weights
    /// held in Q4_0, Q4_1 or Q8_0 blocks, and multiplies the codes as integers (llama.cpp's
    /// scheme: about twice as fast a decode step, outputs within `Σ_blocks max|x|/254 · Σ|w|`
    /// of the f32 product). Only decode steps (one new token per sequence, at most four
    /// sequences per product) and only quantized weights: prefill, scoring and training stay
    /// exact. Off by default.
    pub fn with_int8_decode(mut self, on: bool) -> Self {
        self.int8_decode = on;
        self
    }
}
