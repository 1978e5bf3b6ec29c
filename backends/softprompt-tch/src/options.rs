//! How a libtorch backbone is loaded: device, kind, threads.

use softprompt_core::Error;
use tch::{Device, Kind};

use crate::Result;

/// Parses `cpu` or `cuda:N` (`cuda` means `cuda:0`); a CUDA device libtorch cannot see is an
/// error, never a silent fall back to the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .map_err(|_| {
                    Error::InvalidArgument(format!("bad CUDA device `{s}`: expected cuda:N"))
                })?;
            let count = tch::Cuda::device_count();
            if ordinal as i64 >= count {
                return Err(Error::InvalidArgument(format!(
                    "CUDA device {ordinal} is not available to libtorch ({count} CUDA devices visible{})",
                    if tch::Cuda::is_available() { "" } else { "; no CUDA driver or GPU found" }
                )));
            }
            Ok(Device::Cuda(ordinal))
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown device `{other}`: expected cpu or cuda:N"
        ))),
    }
}

/// Parses a weight precision: `f32`, `f64`, `bf16` or `f16`.
pub fn parse_kind(name: &str) -> Result<Kind> {
    match name {
        "f32" => Ok(Kind::Float),
        "f64" => Ok(Kind::Double),
        "bf16" => Ok(Kind::BFloat16),
        "f16" => Ok(Kind::Half),
        other => Err(Error::InvalidArgument(format!(
            "unknown dtype `{other}`: expected f32, f64, bf16 or f16"
        ))),
    }
}

/// Sets libtorch's intra-op thread count for the whole process.
pub fn set_num_threads(threads: usize) {
    tch::set_num_threads(threads.max(1) as i32);
}

/// How to load a backbone.
#[derive(Debug, Clone, Copy)]
pub struct TchOptions {
    pub(crate) device: Device,
    pub(crate) kind: Kind,
}

impl Default for TchOptions {
    fn default() -> Self {
        TchOptions {
            device: Device::Cpu,
            kind: Kind::Float,
        }
    }
}

impl TchOptions {
    /// CPU, f32.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs on `device`.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Stores the frozen weights and computes in `kind` (f32 default; f64 for exact gradient
    /// checks; bf16/f16 to save memory and time). Prompts and gradients stay f32.
    pub fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }
}
