//! Picking a backend by name at run time, among those compiled in.

use std::path::Path;

use crate::model::ModelSource;
use crate::{Backbone, Error, HfTokenizer, ModelConfig, Result};

/// Reads a model (a Hugging Face directory or a `.gguf` file) into host memory.
pub fn load_model_source(path: impl AsRef<Path>) -> Result<ModelSource> {
    let path = path.as_ref();
    if softprompt_gguf::is_gguf(path) {
        softprompt_gguf::load_model(path)
    } else {
        ModelSource::load(path)
    }
}

/// [`load_model_source`] for a GGUF file whose projection matrices stay in their quantized
/// blocks (`--dtype quantized`); anything else is refused.
pub fn load_quantized_model_source(path: impl AsRef<Path>) -> Result<ModelSource> {
    let path = path.as_ref();
    if !softprompt_gguf::is_gguf(path) {
        return Err(Error::InvalidArgument(format!(
            "--dtype quantized keeps a GGUF file's quantized blocks; {} is not a .gguf file",
            path.display()
        )));
    }
    softprompt_gguf::load_model_with(path, true)
}

/// The configuration of a model (a Hugging Face directory or a `.gguf` file) without its weights.
pub fn load_model_config(path: impl AsRef<Path>) -> Result<ModelConfig> {
    let path = path.as_ref();
    if softprompt_gguf::is_gguf(path) {
        softprompt_gguf::load_config(path)
    } else {
        ModelConfig::from_file(path.join("config.json"))
    }
}

/// The tokenizer of a model: `tokenizer.json` of a directory, or the vocabulary embedded in a GGUF.
pub fn load_tokenizer(path: impl AsRef<Path>) -> Result<HfTokenizer> {
    let path = path.as_ref();
    if softprompt_gguf::is_gguf(path) {
        softprompt_gguf::load_tokenizer(path)
    } else {
        HfTokenizer::from_model_dir(path)
    }
}

/// Every backend softprompt implements, with the Cargo feature that compiles it in.
pub const BACKENDS: &[(&str, &str)] = &[("candle", "candle"), ("tch", "tch"), ("ort", "ort")];

/// Names of the backends compiled into this build.
pub fn available_backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "candle") {
        v.push("candle");
    }
    if cfg!(feature = "tch") {
        v.push("tch");
    }
    if cfg!(feature = "ort") {
        v.push("ort");
    }
    v
}

/// Options shared by every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOptions {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32` (default), `f64`, `bf16` or `f16` for the frozen weights; on candle (CPU) also
    /// `quantized` (a GGUF file's blocks stay in memory; decode steps round activations to
    /// 8 bits before Q4_0/Q4_1/Q8_0 blocks, as llama.cpp does) or `quantized-exact` (the blocks,
    /// with f32 activations everywhere: the f32 path's results to float rounding).
    pub dtype: String,
    /// Intra-op threads of the runtime (`None`: the runtime's default). libtorch's setting is
    /// process-wide; candle reads `RAYON_NUM_THREADS` once, before its first operation.
    pub threads: Option<usize>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            device: "cpu".into(),
            dtype: "f32".into(),
            threads: None,
        }
    }
}

/// Loads the model at `path` (directory or `.gguf`) on backend `name` and device `device`, in f32.
pub fn load_backbone(
    name: &str,
    path: impl AsRef<Path>,
    device: &str,
) -> Result<Box<dyn Backbone>> {
    load_backbone_with(
        name,
        path,
        &BackendOptions {
            device: device.into(),
            ..Default::default()
        },
    )
}

/// Loads the model at `path` (directory or `.gguf`) on backend `name` with `options`.
pub fn load_backbone_with(
    name: &str,
    path: impl AsRef<Path>,
    options: &BackendOptions,
) -> Result<Box<dyn Backbone>> {
    let quantized = matches!(options.dtype.as_str(), "quantized" | "quantized-exact");
    if quantized && name != "candle" {
        return Err(Error::unsupported(
            name,
            "quantized frozen weights",
            Some("run --dtype quantized with --backend candle, or --dtype f32 here"),
        ));
    }
    match name {
        #[cfg(feature = "candle")]
        "candle" => {
            let dtype = match options.dtype.as_str() {
                "f32" | "quantized" | "quantized-exact" => candle_core_dtype::F32,
                "f64" => candle_core_dtype::F64,
                "bf16" => candle_core_dtype::BF16,
                "f16" => candle_core_dtype::F16,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown dtype `{other}`: expected f32, f64, bf16, f16, quantized or quantized-exact"
                    )))
                }
            };
            let device = softprompt_candle::parse_device(&options.device)?;
            let source = if quantized {
                if !device.is_cpu() {
                    return Err(Error::unsupported(
                        "candle",
                        "quantized weights on a GPU",
                        Some("run --dtype quantized on the CPU, or --dtype f32 on the GPU"),
                    ));
                }
                load_quantized_model_source(path)?
            } else {
                load_model_source(path)?
            };
            let opts = softprompt_candle::CandleOptions::new()
                .with_device(device)
                .with_dtype(dtype)
                .with_int8_decode(options.dtype == "quantized");
            Ok(Box::new(softprompt_candle::CandleBackbone::from_source(source, opts)?))
        }
        #[cfg(feature = "tch")]
        "tch" => {
            let kind = softprompt_tch::parse_kind(&options.dtype)?;
            let device = softprompt_tch::parse_device(&options.device)?;
            if let Some(t) = options.threads {
                softprompt_tch::set_num_threads(t);
            }
            let opts = softprompt_tch::TchOptions::new().with_device(device).with_kind(kind);
            Ok(Box::new(softprompt_tch::TchBackbone::from_source(load_model_source(path)?, opts)?))
        }
        #[cfg(feature = "ort")]
        "ort" => {
            if options.dtype != "f32" {
                return Err(Error::InvalidArgument(format!(
                    "the ort backend runs f32 graphs only (asked for `{}`)",
                    options.dtype
                )));
            }
            let device = softprompt_ort::parse_device(&options.device)?;
            let opts = softprompt_ort::OrtOptions::new().with_device(device).with_threads(options.threads);
            Ok(Box::new(softprompt_ort::OrtBackbone::from_source(load_model_source(path)?, opts)?))
        }
        other => match BACKENDS.iter().find(|(n, _)| *n == other) {
            Some((_, feature)) => Err(Error::InvalidArgument(format!(
                "backend `{other}` is not compiled into this build (available: {}); rebuild with the Cargo feature `{feature}`, e.g. `cargo build --features {feature}`{}",
                available_backends().join(", "),
                match *feature {
                    "tch" => " after `bash tools/setup-python.sh && source tools/libtorch-env.sh` (libtorch 2.13.0)",
                    "ort" => "; at run time it loads ONNX Runtime 1.31.1: `bash tools/setup-python.sh && source tools/ort-env.sh`",
                    _ => "",
                }
            ))),
            None => Err(Error::InvalidArgument(format!(
                "unknown backend `{other}` (known: {})",
                BACKENDS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))),
        },
    }
}

#[cfg(feature = "candle")]
use softprompt_candle::DType as candle_core_dtype;

/// Reads a vision transformer: a Hugging Face `Dinov2Model` directory, or an `.onnx` file that
/// PyTorch exported from one (its weights read back under Hugging Face names).
pub fn load_vision_source(path: impl AsRef<Path>) -> Result<crate::VisionSource> {
    let path = path.as_ref();
    if softprompt_onnx::is_onnx(path) {
        softprompt_onnx::load_vit(path)
    } else {
        crate::VisionSource::load(path)
    }
}

/// Whether `path` names a vision transformer this build reads: an `.onnx` file, or a folder
/// whose `config.json` says `model_type: "dinov2"` (text models are GGUF files or folders of
/// other model types).
pub fn is_vision_model(path: impl AsRef<Path>) -> bool {
    let path = path.as_ref();
    if softprompt_onnx::is_onnx(path) {
        return true;
    }
    std::fs::read(path.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|c| c["model_type"] == "dinov2")
}

/// Loads the vision transformer at `path` on backend `name` and `device`, in f32. Vision
/// transformers run on candle and tch (with gradients) and ort (forward only).
pub fn load_vision_backbone(
    name: &str,
    path: impl AsRef<Path>,
    device: &str,
) -> Result<Box<dyn crate::VisionBackbone>> {
    match name {
        #[cfg(feature = "candle")]
        "candle" => {
            let device = softprompt_candle::parse_device(device)?;
            let opts = softprompt_candle::CandleOptions::new().with_device(device);
            Ok(Box::new(softprompt_candle::CandleVision::from_source(
                load_vision_source(path)?,
                opts,
            )?))
        }
        #[cfg(feature = "tch")]
        "tch" => {
            let device = softprompt_tch::parse_device(device)?;
            let opts = softprompt_tch::TchOptions::new().with_device(device);
            Ok(Box::new(softprompt_tch::TchVision::from_source(
                load_vision_source(path)?,
                opts,
            )?))
        }
        #[cfg(feature = "ort")]
        "ort" => {
            let device = softprompt_ort::parse_device(device)?;
            let opts = softprompt_ort::OrtOptions::new().with_device(device);
            Ok(Box::new(softprompt_ort::OrtVision::from_source(
                load_vision_source(path)?,
                opts,
            )?))
        }
        other => Err(Error::unsupported(
            other,
            "vision transformers",
            Some("run them with --backend candle, tch or ort"),
        )),
    }
}

/// Exports the model at `model` (directory or `.gguf`) to the ONNX graph the ort backend runs
/// (token ids, attention bias and per-row prompt embeddings in; label log-probabilities, logits
/// at picked positions and the KV cache out); returns the number of bytes written.
#[cfg(feature = "ort")]
pub fn export_onnx(model: impl AsRef<Path>, out: impl AsRef<Path>) -> Result<usize> {
    softprompt_ort::export::export_to_file(load_model_source(model)?, out.as_ref())
}

/// Exporting needs the `ort` feature.
#[cfg(not(feature = "ort"))]
pub fn export_onnx(_model: impl AsRef<Path>, _out: impl AsRef<Path>) -> Result<usize> {
    Err(Error::InvalidArgument(
        "ONNX export is part of the ort backend: rebuild with the Cargo feature `ort`".into(),
    ))
}

/// Whether libtorch sees a CUDA device (false when the `tch` backend is not compiled in).
pub fn tch_cuda_available() -> bool {
    #[cfg(feature = "tch")]
    {
        softprompt_tch::Device::cuda_if_available().is_cuda()
    }
    #[cfg(not(feature = "tch"))]
    {
        false
    }
}

/// Achieved f32 FLOP/s of an `n × n` matrix product on backend `name` and `device`, measured in
/// this process: the ceiling that `softprompt bench` compares train steps against.
pub fn matmul_flops(name: &str, device: &str, n: usize, repeats: usize) -> Result<f64> {
    match name {
        #[cfg(feature = "candle")]
        "candle" => {
            softprompt_candle::matmul_flops(&softprompt_candle::parse_device(device)?, n, repeats)
        }
        #[cfg(feature = "tch")]
        "tch" => softprompt_tch::matmul_flops(softprompt_tch::parse_device(device)?, n, repeats),
        other => Err(Error::InvalidArgument(format!(
            "backend `{other}` is not compiled into this build (available: {})",
            available_backends().join(", ")
        ))),
    }
}
