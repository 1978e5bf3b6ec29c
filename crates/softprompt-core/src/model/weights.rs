//! Weights read from safetensors into host f32 tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// A dense host tensor, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Wraps `data`; errors unless its length matches `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape(format!(
                "shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(HostTensor { shape, data })
    }
}

/// All weights of a model, keyed by Hugging Face tensor name.
#[derive(Debug, Default, Clone)]
pub struct ModelWeights {
    tensors: BTreeMap<String, HostTensor>,
    /// Matrices kept in quantized blocks (names disjoint from `tensors`'): [`Self::take`]
    /// dequantizes them, [`Self::take_quantized`] hands them over as they are.
    quantized: BTreeMap<String, crate::QuantMatrix>,
}

/// Converts little-endian bytes of `dtype` to f32.
fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(Error::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    };
    Ok(out)
}

impl ModelWeights {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses one safetensors buffer; `path` is used in messages.
    pub fn read_safetensors_bytes(&mut self, bytes: &[u8], path: &Path) -> Result<()> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        for (name, view) in st.tensors() {
            let data = to_f32(&name, view.dtype(), view.data())?;
            self.tensors.insert(
                name,
                HostTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Ok(())
    }

    /// Reads one safetensors file.
    pub fn read_safetensors_file(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        self.read_safetensors_bytes(&bytes, path)
    }

    /// Reads `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let mut w = ModelWeights::new();
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            w.read_safetensors_file(&single)?;
        } else if index.is_file() {
            for shard in shard_files(&index)? {
                w.read_safetensors_file(&dir.join(shard))?;
            }
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ),
            ));
        }
        Ok(w)
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// The tensor `name`, if present.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// True when `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.quantized.contains_key(name)
    }

    /// Adds or replaces a matrix kept in quantized blocks.
    pub fn insert_quantized(&mut self, name: impl Into<String>, matrix: crate::QuantMatrix) {
        let name = name.into();
        self.tensors.remove(&name);
        self.quantized.insert(name, matrix);
    }

    /// Whether `name` is held in quantized blocks.
    pub fn is_quantized(&self, name: &str) -> bool {
        self.quantized.contains_key(name)
    }

    /// Bytes of the matrices held in quantized blocks.
    pub fn quantized_bytes(&self) -> usize {
        self.quantized.values().map(|q| q.nbytes()).sum()
    }

    /// Removes and returns `name` as quantized blocks, checking its shape; `None` (and nothing
    /// removed) when it is held as f32.
    pub fn take_quantized(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<crate::QuantMatrix>> {
        let Some(q) = self.quantized.get(name) else {
            return Ok(None);
        };
        if q.shape() != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: q.shape().to_vec(),
            });
        }
        Ok(self.quantized.remove(name))
    }

    /// Removes and returns `name`, checking its shape (a quantized matrix is dequantized).
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        if let Some(q) = self.take_quantized(name, shape)? {
            return HostTensor::new(q.shape().to_vec(), q.dequantize());
        }
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
            })?;
        if t.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.shape,
            });
        }
        Ok(t)
    }

    /// A copy of `name`, checking its shape (for tensors used twice, like tied embeddings).
    pub fn get_checked(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        if let Some(q) = self.quantized.get(name) {
            if q.shape() != shape {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    actual: q.shape().to_vec(),
                });
            }
            return HostTensor::new(q.shape().to_vec(), q.dequantize());
        }
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        if t.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.shape.clone(),
            });
        }
        Ok(t.clone())
    }

    /// Tensor names (f32 and quantized), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let mut all: Vec<&str> = self
            .tensors
            .keys()
            .chain(self.quantized.keys())
            .map(String::as_str)
            .collect();
        all.sort_unstable();
        all.into_iter()
    }

    /// Renames `prefix.x` to `x` (GPT-2 checkpoints come with and without `transformer.`).
    pub fn strip_prefix(&mut self, prefix: &str) {
        let tensors = std::mem::take(&mut self.tensors);
        self.tensors = tensors
            .into_iter()
            .map(|(k, v)| (k.strip_prefix(prefix).map(str::to_string).unwrap_or(k), v))
            .collect();
        let quantized = std::mem::take(&mut self.quantized);
        self.quantized = quantized
            .into_iter()
            .map(|(k, v)| (k.strip_prefix(prefix).map(str::to_string).unwrap_or(k), v))
            .collect();
    }

    /// Renames every `…{from}…` to `…{to}…` (the first occurrence): one spelling for modules
    /// that library versions name differently.
    pub fn rename_part(&mut self, from: &str, to: &str) {
        let tensors = std::mem::take(&mut self.tensors);
        self.tensors = tensors
            .into_iter()
            .map(|(k, v)| (k.replacen(from, to, 1), v))
            .collect();
        let quantized = std::mem::take(&mut self.quantized);
        self.quantized = quantized
            .into_iter()
            .map(|(k, v)| (k.replacen(from, to, 1), v))
            .collect();
    }

    /// Total number of values.
    pub fn num_parameters(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum::<usize>()
            + self
                .quantized
                .values()
                .map(|q| q.rows() * q.cols)
                .sum::<usize>()
    }

    /// Hex SHA-256 over every tensor's name, shape and f32 values, in name order: the same
    /// weights give the same fingerprint whatever file format or dtype they came from.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        let mut buf = Vec::with_capacity(1 << 16);
        let mut values = |h: &mut Sha256, data: &[f32]| {
            for chunk in data.chunks(1 << 14) {
                buf.clear();
                buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                h.update(&buf);
            }
        };
        // one name order over both maps; a quantized matrix hashes as its f32 values, a few
        // rows at a time (the same fingerprint as the dequantized weights)
        for name in self.names() {
            let shape = match (self.tensors.get(name), self.quantized.get(name)) {
                (Some(t), _) => t.shape.clone(),
                (None, Some(q)) => q.shape().to_vec(),
                (None, None) => continue,
            };
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((shape.len() as u64).to_le_bytes());
            for d in &shape {
                h.update((*d as u64).to_le_bytes());
            }
            if let Some(t) = self.tensors.get(name) {
                values(&mut h, &t.data);
            } else if let Some(q) = self.quantized.get(name) {
                let step = (1 << 16) / q.cols.max(1) + 1;
                let mut rows = vec![0f32; step * q.cols];
                for lo in (0..q.rows()).step_by(step) {
                    let hi = (lo + step).min(q.rows());
                    let out = &mut rows[..(hi - lo) * q.cols];
                    q.dequantize_rows(lo, hi, out);
                    values(&mut h, out);
                }
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: index.to_path_buf(),
        reason: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Json {
            path: index.to_path_buf(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| Error::Json {
            path: index.to_path_buf(),
            reason: format!("shard of `{name}` is not a string"),
        })?;
        let file = PathBuf::from(file);
        if file.components().count() != 1 {
            return Err(Error::Json {
                path: index.to_path_buf(),
                reason: format!("shard path `{}` must be a plain file name", file.display()),
            });
        }
        if !files.contains(&file) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn sample_bytes() -> Vec<u8> {
        let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [half::bf16::from_f32(0.5)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let views = vec![
            (
                "a".to_string(),
                TensorView::new(Dtype::F32, vec![2, 2], &a).unwrap(),
            ),
            (
                "b".to_string(),
                TensorView::new(Dtype::BF16, vec![1], &b).unwrap(),
            ),
        ];
        safetensors::serialize(views, None).unwrap()
    }

    #[test]
    fn reads_f32_and_bf16() {
        let mut w = ModelWeights::new();
        w.read_safetensors_bytes(&sample_bytes(), Path::new("x"))
            .unwrap();
        assert_eq!(w.get("a").unwrap().data, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(w.get("b").unwrap().data, vec![0.5]);
        assert!(matches!(w.take("a", &[4]), Err(Error::TensorShape { .. })));
        assert!(matches!(
            w.take("zz", &[4]),
            Err(Error::MissingTensor { .. })
        ));
    }

    #[test]
    fn truncated_and_corrupt_files_are_typed_errors() {
        let bytes = sample_bytes();
        for cut in [0, 4, 8, 20, bytes.len() - 1] {
            let mut w = ModelWeights::new();
            let err = w
                .read_safetensors_bytes(&bytes[..cut], Path::new("m.safetensors"))
                .unwrap_err();
            assert!(matches!(err, Error::Safetensors { .. }), "cut {cut}: {err}");
        }
        let mut corrupt = bytes.clone();
        corrupt[10] = b'{';
        corrupt[11] = b'{';
        let mut w = ModelWeights::new();
        assert!(matches!(
            w.read_safetensors_bytes(&corrupt, Path::new("m")),
            Err(Error::Safetensors { .. })
        ));
    }

    #[test]
    fn fingerprint_depends_on_values() {
        let mut w = ModelWeights::new();
        w.insert("x", HostTensor::new(vec![2], vec![1.0, 2.0]).unwrap());
        let f1 = w.fingerprint();
        w.insert("x", HostTensor::new(vec![2], vec![1.0, 2.5]).unwrap());
        assert_ne!(f1, w.fingerprint());
        assert_eq!(f1.len(), 64);
    }
}
