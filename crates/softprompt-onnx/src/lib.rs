//! Frozen weights from ONNX files: a DINOv2-style vision transformer that PyTorch exported (the
//! graph of `torch.onnx.export` over a Hugging Face `Dinov2Model`, possibly inside a larger
//! model), read back into host f32 tensors under Hugging Face names.
//!
//! PyTorch's exporter keeps the names of parameters it uses directly (`….cls_token`, biases,
//! norms, LayerScale) but stores the weights of `nn.Linear` layers transposed (`[in, out]`)
//! under anonymous names (`onnx::MatMul_N`); those are tied back to their layer by the name of
//! the `MatMul` node that consumes them (`/backbone/encoder/layer.3/mlp/fc1/MatMul`). The
//! position table is split by the exporter into the class token's row and the patch rows (the
//! inputs of the position Concat and Reshape); the attention scale constant gives the head
//! width, the LayerNorm's added constant its epsilon.

use std::collections::HashMap;
use std::path::Path;

use onnx_protobuf::{Message, ModelProto, NodeProto, TensorProto};
use softprompt_core::model::{HostTensor, ModelWeights};
use softprompt_core::vision::vit_names;
use softprompt_core::{Error, Result, VisionSource, VitConfig};

/// ONNX's FLOAT element type.
const FLOAT: i32 = 1;

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Whether `path` looks like an ONNX file (by extension).
pub fn is_onnx(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// A float tensor's values (raw little-endian bytes or `float_data`); other types and external
/// data are refused by name.
fn floats(path: &Path, t: &TensorProto) -> Result<HostTensor> {
    if t.data_type != FLOAT {
        return Err(bad(
            path,
            format!(
                "initializer {} has element type {} (only float)",
                t.name, t.data_type
            ),
        ));
    }
    if !t.external_data.is_empty() {
        return Err(bad(
            path,
            format!("initializer {} keeps its data in another file", t.name),
        ));
    }
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|d| usize::try_from(*d))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            bad(
                path,
                format!("initializer {} has a negative dimension", t.name),
            )
        })?;
    let n: usize = shape.iter().product();
    let data: Vec<f32> = if !t.raw_data.is_empty() {
        if t.raw_data.len() != 4 * n {
            return Err(bad(
                path,
                format!(
                    "initializer {} holds {} bytes for {n} floats",
                    t.name,
                    t.raw_data.len()
                ),
            ));
        }
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    HostTensor::new(shape, data).map_err(|e| bad(path, format!("initializer {}: {e}", t.name)))
}

/// The scalar value of a `Constant` node's output, if `name` is one.
fn constant(nodes: &[NodeProto], name: &str, path: &Path) -> Option<f32> {
    let node = nodes
        .iter()
        .find(|n| n.op_type == "Constant" && n.output.iter().any(|o| o == name))?;
    let t = node
        .attribute
        .iter()
        .find(|a| a.name == "value")?
        .t
        .as_ref()?;
    floats(path, t).ok()?.data.first().copied()
}

/// Reads the vision transformer of an ONNX file.
pub fn load_vit(path: &Path) -> Result<VisionSource> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let model = ModelProto::parse_from_bytes(&bytes)
        .map_err(|e| bad(path, format!("not an ONNX model: {e}")))?;
    drop(bytes);
    let graph = model.graph.as_ref().ok_or_else(|| bad(path, "no graph"))?;
    let inits: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    // the module path of the transformer inside the exported model (`backbone.` or none)
    let cls_name = inits
        .keys()
        .find(|k| k.ends_with(vit_names::CLS))
        .copied()
        .ok_or_else(|| {
            bad(
                path,
                format!("no `{}` initializer: not a ViT", vit_names::CLS),
            )
        })?;
    let prefix = cls_name.trim_end_matches(vit_names::CLS).to_string();
    let node_prefix = format!("/{}", prefix.replace('.', "/"));
    let mut weights = ModelWeights::new();
    for (name, t) in &inits {
        if let Some(hf) = name.strip_prefix(prefix.as_str()) {
            if !prefix.is_empty()
                || hf.starts_with("embeddings.")
                || hf.starts_with("encoder.")
                || hf.starts_with("layernorm.")
            {
                weights.insert(hf.to_string(), floats(path, t)?);
            }
        }
    }
    let mut eps = None;
    let mut scale = None;
    let mut class_pos = None;
    let mut patch_pos = None;
    for node in &graph.node {
        let Some(local) = node.name.strip_prefix(node_prefix.as_str()) else {
            continue;
        };
        match node.op_type.as_str() {
            // `encoder/layer.3/mlp/fc1/MatMul` with an `[in, out]` initializer
            "MatMul" => {
                if let (Some(module), Some(w)) = (
                    local.strip_suffix("/MatMul"),
                    node.input.get(1).and_then(|i| inits.get(i.as_str())),
                ) {
                    let t = floats(path, w)?;
                    let [inp, out] = t.shape[..] else {
                        return Err(bad(
                            path,
                            format!("{} multiplies by a {:?} weight", node.name, t.shape),
                        ));
                    };
                    let mut data = vec![0f32; inp * out];
                    for i in 0..inp {
                        for o in 0..out {
                            data[o * inp + i] = t.data[i * out + o];
                        }
                    }
                    let hf = format!("{}.weight", module.replace('/', "."));
                    weights.insert(hf, HostTensor::new(vec![out, inp], data)?);
                }
            }
            "Concat" if local.starts_with("embeddings/") => {
                if let Some(t) = node.input.iter().find_map(|i| inits.get(i.as_str())) {
                    if t.dims.len() == 3 && t.dims[1] == 1 {
                        class_pos = Some(floats(path, t)?);
                    }
                }
            }
            "Reshape" if local.starts_with("embeddings/") => {
                if let Some(t) = node.input.first().and_then(|i| inits.get(i.as_str())) {
                    patch_pos = Some(floats(path, t)?);
                }
            }
            "Add" if local == "encoder/layer.0/norm1/Add" => {
                eps = node
                    .input
                    .iter()
                    .find_map(|i| constant(&graph.node, i, path));
            }
            "Mul" if local == "encoder/layer.0/attention/attention/Mul" => {
                scale = node
                    .input
                    .iter()
                    .find_map(|i| constant(&graph.node, i, path));
            }
            _ => {}
        }
    }
    let (class_pos, patch_pos) = match (class_pos, patch_pos) {
        (Some(c), Some(p)) => (c, p),
        _ => {
            return Err(bad(
                path,
                "the position table (class and patch rows) was not found",
            ))
        }
    };
    let d = *class_pos.shape.last().unwrap_or(&0);
    let cells = patch_pos.data.len() / d.max(1);
    let grid = (cells as f64).sqrt().round() as usize;
    if d == 0 || grid * grid * d != patch_pos.data.len() {
        return Err(bad(
            path,
            format!(
                "patch positions of shape {:?} are not a square grid",
                patch_pos.shape
            ),
        ));
    }
    let mut table = class_pos.data;
    table.extend(patch_pos.data);
    weights.insert(
        vit_names::POSITIONS,
        HostTensor::new(vec![1, 1 + cells, d], table)?,
    );
    let layers = (0..)
        .take_while(|i| weights.contains(&format!("{}.norm1.weight", vit_names::layer(*i))))
        .count();
    let patch = weights
        .get(&format!("{}.weight", vit_names::PATCH))
        .ok_or_else(|| bad(path, "no patch projection"))?;
    let (channels, p) = match patch.shape[..] {
        [_, c, p, q] if p == q => (c, p),
        _ => {
            return Err(bad(
                path,
                format!("patch projection of shape {:?}", patch.shape),
            ))
        }
    };
    let inter = weights
        .get(&format!("{}.mlp.fc1.weight", vit_names::layer(0)))
        .map(|t| t.shape[0])
        .ok_or_else(|| bad(path, "no MLP in block 0"))?;
    // q and k are each scaled by head_dim^-1/4
    let scale = scale.ok_or_else(|| bad(path, "the attention scale constant was not found"))?;
    let head_dim = (1.0 / (scale as f64).powi(4)).round() as usize;
    if head_dim == 0 || d % head_dim != 0 {
        return Err(bad(
            path,
            format!("attention scale {scale} gives head width {head_dim} for width {d}"),
        ));
    }
    let config = VitConfig {
        hidden_size: d,
        num_hidden_layers: layers,
        num_attention_heads: d / head_dim,
        intermediate_size: inter,
        patch_size: p,
        image_size: grid * p,
        num_channels: channels,
        layer_norm_eps: eps.ok_or_else(|| bad(path, "the LayerNorm epsilon was not found"))? as f64,
        layerscale: weights.contains(&format!("{}.layer_scale1.lambda1", vit_names::layer(0))),
        qkv_bias: weights.contains(&format!(
            "{}.attention.attention.query.bias",
            vit_names::layer(0)
        )),
    };
    config.check().map_err(|e| bad(path, e.to_string()))?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(VisionSource::from_parts(
        config,
        weights,
        name,
        path.to_path_buf(),
    ))
}
