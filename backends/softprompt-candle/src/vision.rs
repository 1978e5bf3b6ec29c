//! candle's vision backbone: the shared ViT ([`softprompt_nn::models::Vit`]) over candle ops,
//! class-token features for visual prompts, and their gradient through candle's autograd.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use softprompt_core::vision::{check_call, FeatureLoss};
use softprompt_core::{
    BackboneSpec, Error, Images, Placement, SoftPrompt, VisionBackbone, VisionSource, VitConfig,
};
use softprompt_nn::models::{Vit, VitPrompt};

use crate::runtime::CandleOps;
use crate::{to_core, CResult, CandleOptions, Result, BACKEND};

/// A frozen vision transformer on one device in one dtype.
pub struct CandleVision {
    vit: Vit<Tensor>,
    spec: BackboneSpec,
    device: Device,
    dtype: DType,
    /// The class token plus its position and the patch positions of each grid seen so far.
    positions: Mutex<HashMap<usize, (Tensor, Tensor)>>,
}

impl std::fmt::Debug for CandleVision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CandleVision({})", self.spec.name)
    }
}

impl CandleVision {
    /// Loads a Hugging Face `Dinov2Model` directory.
    pub fn load(path: impl AsRef<std::path::Path>, options: CandleOptions) -> Result<Self> {
        Self::from_source(VisionSource::load(path.as_ref())?, options)
    }

    /// From weights already read (any file format).
    pub fn from_source(source: VisionSource, options: CandleOptions) -> Result<Self> {
        let VisionSource {
            config,
            mut weights,
            spec,
            ..
        } = source;
        let ops = CandleOps::new(&options.device, options.dtype);
        let mut l = softprompt_nn::Loader::new(&ops, &mut weights);
        let vit = Vit::load(&config, &mut l)?;
        Ok(CandleVision {
            vit,
            spec,
            device: options.device,
            dtype: options.dtype,
            positions: Mutex::new(HashMap::new()),
        })
    }

    fn ops(&self) -> CandleOps<'static> {
        CandleOps::new(&self.device, self.dtype)
    }

    /// `(cls [1, 1, d], positions [1, g², d])` of a `g × g` grid, resized once per grid.
    fn inputs_for(&self, grid: usize) -> Result<(Tensor, Tensor)> {
        let mut cache = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = cache.get(&grid) {
            return Ok(hit.clone());
        }
        let d = self.spec.hidden_size;
        let (cls, pos) = self.vit.inputs_for(grid)?;
        let make = || -> CResult<(Tensor, Tensor)> {
            Ok((
                Tensor::from_vec(cls, (1, 1, d), &self.device)?.to_dtype(self.dtype)?,
                Tensor::from_vec(pos, (1, grid * grid, d), &self.device)?.to_dtype(self.dtype)?,
            ))
        };
        let made = make().map_err(to_core)?;
        cache.insert(grid, made.clone());
        Ok(made)
    }

    /// The prompt rows `[rows, N, width]` gathered from `stacked [P, N, width]`.
    fn gather(stacked: &Tensor, prompt_index: &[usize], device: &Device) -> CResult<Tensor> {
        let idx: Vec<u32> = prompt_index.iter().map(|i| *i as u32).collect();
        let idx = Tensor::from_vec(idx, prompt_index.len(), device)?;
        Ok(stacked.index_select(&idx, 0)?)
    }

    /// Features `[rows, d]` of the images with the prompt rows `rows [rows, N, width]`.
    fn forward(
        &self,
        rows: Option<&Tensor>,
        n: usize,
        placement: Placement,
        images: &Images,
        taps: Option<&mut Vec<Tensor>>,
    ) -> CResult<Tensor> {
        let c = &self.vit.cfg;
        let g = images.grid(c.patch_size);
        let np = g * g;
        let (cls, pos) = self.inputs_for(g)?;
        let patches = match (rows, placement) {
            // a pattern added to the pixels: patches cut in the graph, so that it gets a gradient
            (Some(pattern), Placement::Pixels) => {
                let shape = (images.rows, images.channels, images.size, images.size);
                let px = Tensor::from_slice(&images.pixels, shape, &self.device)?
                    .to_dtype(self.dtype)?;
                let x = (px + pattern.reshape(shape)?)?;
                self.vit.patchify(&self.ops(), &x, g)?
            }
            _ => Tensor::from_vec(
                images.patches(c.patch_size),
                (images.rows, np, c.patch_dim()),
                &self.device,
            )?
            .to_dtype(self.dtype)?,
        };
        let cls = cls.repeat((images.rows, 1, 1))?;
        let prompt = match (rows, placement) {
            (None, _) | (_, Placement::Pixels) => VitPrompt::None,
            (Some(p), Placement::DeepAfterClassToken) => VitPrompt::Deep(p, n),
            (Some(p), _) => VitPrompt::Shallow(p, n),
        };
        Ok(self
            .vit
            .features(&self.ops(), &patches, np, &cls, &pos, prompt, taps)?)
    }

    fn stacked(&self, prompts: &[SoftPrompt], n: usize) -> CResult<Tensor> {
        let width = prompts[0].hidden_size();
        let values: Vec<f32> = prompts.iter().flat_map(|p| p.values().to_vec()).collect();
        Ok(
            Tensor::from_vec(values, (prompts.len(), n, width), &self.device)?
                .to_dtype(self.dtype)?,
        )
    }
}

impl VisionBackbone for CandleVision {
    fn backend_name(&self) -> &str {
        BACKEND
    }

    fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    fn config(&self) -> &VitConfig {
        &self.vit.cfg
    }

    fn features(
        &self,
        prompts: &[SoftPrompt],
        prompt_index: &[usize],
        images: &Images,
    ) -> Result<Vec<f32>> {
        let (n, placement) = check_call(&self.vit.cfg, prompts, prompt_index, images)?;
        let run = || -> CResult<Vec<f32>> {
            let rows = if n == 0 {
                None
            } else {
                Some(Self::gather(
                    &self.stacked(prompts, n)?,
                    prompt_index,
                    &self.device,
                )?)
            };
            let f = self.forward(rows.as_ref(), n, placement, images, None)?;
            Ok(f.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        run().map_err(to_core)
    }

    fn features_grad(
        &self,
        prompts: &[SoftPrompt],
        prompt_index: &[usize],
        images: &Images,
        loss: &mut FeatureLoss<'_>,
    ) -> Result<(f32, Vec<Vec<f32>>)> {
        let (n, placement) = check_call(&self.vit.cfg, prompts, prompt_index, images)?;
        if n == 0 {
            return Err(Error::InvalidArgument(
                "a prompt of zero virtual tokens has no gradient".into(),
            ));
        }
        let var = Var::from_tensor(&self.stacked(prompts, n).map_err(to_core)?).map_err(to_core)?;
        let rows = Self::gather(var.as_tensor(), prompt_index, &self.device).map_err(to_core)?;
        let f = self
            .forward(Some(&rows), n, placement, images, None)
            .map_err(to_core)?;
        let host: Vec<f32> = f
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all()?.to_vec1())
            .map_err(to_core)?;
        let (value, dfeat) = loss(&host)?;
        if dfeat.len() != host.len() {
            return Err(Error::Shape(format!(
                "the loss gave {} feature gradients for {} features",
                dfeat.len(),
                host.len()
            )));
        }
        let run = || -> CResult<Vec<f32>> {
            let dfeat = Tensor::from_vec(dfeat, f.dims(), &self.device)?.to_dtype(self.dtype)?;
            // the gradient of <features, dL/dfeatures> is the vector-Jacobian product
            let grads = (&f * &dfeat)?.sum_all()?.backward()?;
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("no gradient reached the prompt".into()))?;
            Ok(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let flat = run().map_err(to_core)?;
        let per = n * prompts[0].hidden_size();
        Ok((value, flat.chunks(per).map(<[f32]>::to_vec).collect()))
    }

    fn block_inputs(&self, images: &Images) -> Result<Vec<f32>> {
        let none = [SoftPrompt::empty(self.spec.hidden_size)];
        check_call(&self.vit.cfg, &none, &vec![0; images.rows], images)?;
        let run = || -> CResult<Vec<f32>> {
            let mut taps = Vec::with_capacity(self.vit.blocks.len());
            // the features themselves are not wanted, the blocks' inputs are
            let _features =
                self.forward(None, 0, Placement::AfterClassToken, images, Some(&mut taps))?;
            let all = Tensor::stack(&taps, 0)?;
            Ok(all.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        run().map_err(to_core)
    }
}
