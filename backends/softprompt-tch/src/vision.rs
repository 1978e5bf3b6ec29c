//! libtorch's vision backbone: the shared ViT ([`softprompt_nn::models::Vit`]) over libtorch
//! ops, class-token features for visual prompts, and their gradient through libtorch's autograd.

use std::collections::HashMap;
use std::sync::Mutex;

use softprompt_core::vision::{check_call, FeatureLoss};
use softprompt_core::{
    BackboneSpec, Error, Images, Placement, SoftPrompt, VisionBackbone, VisionSource, VitConfig,
};
use softprompt_nn::models::{Vit, VitPrompt};
use tch::{Kind, Tensor};

use crate::backbone::to_f32;
use crate::runtime::{Handle, TchOps};
use crate::{to_core, Result, TResult, TchOptions, BACKEND};

/// The model's tensors and the per-grid inputs: libtorch tensors are `Send`, not `Sync`.
struct State {
    vit: Vit<Handle>,
    positions: HashMap<usize, (Tensor, Tensor)>,
}

/// A frozen vision transformer on one libtorch device in one kind.
pub struct TchVision {
    state: Mutex<State>,
    config: VitConfig,
    spec: BackboneSpec,
    ops: TchOps,
}

impl std::fmt::Debug for TchVision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TchVision({})", self.spec.name)
    }
}

impl TchVision {
    /// From weights already read (a Hugging Face folder or an ONNX file).
    pub fn from_source(source: VisionSource, options: TchOptions) -> Result<Self> {
        let VisionSource {
            config,
            mut weights,
            spec,
            ..
        } = source;
        let ops = TchOps {
            device: options.device,
            kind: options.kind,
        };
        let mut l = softprompt_nn::Loader::new(&ops, &mut weights);
        let vit = Vit::load(&config, &mut l)?;
        Ok(TchVision {
            state: Mutex::new(State {
                vit,
                positions: HashMap::new(),
            }),
            config,
            spec,
            ops,
        })
    }

    fn host(&self, values: Vec<f32>, shape: &[i64]) -> TResult<Tensor> {
        Ok(Tensor::f_from_slice(&values)?
            .f_view(shape)?
            .f_to_kind(self.ops.kind)?
            .f_to_device(self.ops.device)?)
    }

    /// Features `[rows, d]` of `images` with the prompt rows `rows [rows, N, width]`.
    fn forward(
        &self,
        state: &mut State,
        rows: Option<&Tensor>,
        n: usize,
        placement: Placement,
        images: &Images,
        taps: Option<&mut Vec<Handle>>,
    ) -> TResult<Tensor> {
        let c = &self.config;
        let (d, g) = (c.hidden_size as i64, images.grid(c.patch_size));
        let np = g * g;
        if !state.positions.contains_key(&g) {
            let (cls, pos) = state.vit.inputs_for(g)?;
            let made = (
                self.host(cls, &[1, 1, d])?,
                self.host(pos, &[1, np as i64, d])?,
            );
            state.positions.insert(g, made);
        }
        let (cls, pos) = &state.positions[&g];
        let patches = match (rows, placement) {
            // a pattern added to the pixels: patches cut in the graph, so that it gets a gradient
            (Some(pattern), Placement::Pixels) => {
                let s = images.size as i64;
                let shape = [images.rows as i64, images.channels as i64, s, s];
                let px = self.host(images.pixels.clone(), &shape)?;
                let x = px.f_add(&pattern.f_reshape(shape)?)?;
                state.vit.patchify(&self.ops, &Handle(x), g)?.0
            }
            _ => self.host(
                images.patches(c.patch_size),
                &[images.rows as i64, np as i64, c.patch_dim() as i64],
            )?,
        };
        let cls = Handle(cls.f_repeat([images.rows as i64, 1, 1])?);
        let rows = rows.map(|r| Handle(r.shallow_clone()));
        let prompt = match (&rows, placement) {
            (None, _) | (_, Placement::Pixels) => VitPrompt::None,
            (Some(p), Placement::DeepAfterClassToken) => VitPrompt::Deep(p, n),
            (Some(p), _) => VitPrompt::Shallow(p, n),
        };
        let f = state.vit.features(
            &self.ops,
            &Handle(patches),
            np,
            &cls,
            &Handle(pos.shallow_clone()),
            prompt,
            taps,
        )?;
        Ok(f.0)
    }

    /// `prompts` stacked `[P, N, width]`, gathered to one row per image.
    fn rows(
        &self,
        prompts: &[SoftPrompt],
        prompt_index: &[usize],
        n: usize,
    ) -> TResult<(Tensor, Tensor)> {
        let width = prompts[0].hidden_size() as i64;
        let values: Vec<f32> = prompts.iter().flat_map(|p| p.values().to_vec()).collect();
        let stacked = self.host(values, &[prompts.len() as i64, n as i64, width])?;
        let idx: Vec<i64> = prompt_index.iter().map(|i| *i as i64).collect();
        let idx = Tensor::f_from_slice(&idx)?.f_to_device(self.ops.device)?;
        Ok((stacked, idx))
    }
}

impl VisionBackbone for TchVision {
    fn backend_name(&self) -> &str {
        BACKEND
    }

    fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    fn config(&self) -> &VitConfig {
        &self.config
    }

    fn features(
        &self,
        prompts: &[SoftPrompt],
        prompt_index: &[usize],
        images: &Images,
    ) -> Result<Vec<f32>> {
        let (n, placement) = check_call(&self.config, prompts, prompt_index, images)?;
        let _guard = tch::no_grad_guard();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut run = || -> TResult<Tensor> {
            let rows = if n == 0 {
                None
            } else {
                let (stacked, idx) = self.rows(prompts, prompt_index, n)?;
                Some(stacked.f_index_select(0, &idx)?)
            };
            self.forward(&mut state, rows.as_ref(), n, placement, images, None)
        };
        to_f32(&run().map_err(to_core)?)
    }

    fn features_grad(
        &self,
        prompts: &[SoftPrompt],
        prompt_index: &[usize],
        images: &Images,
        loss: &mut FeatureLoss<'_>,
    ) -> Result<(f32, Vec<Vec<f32>>)> {
        let (n, placement) = check_call(&self.config, prompts, prompt_index, images)?;
        if n == 0 {
            return Err(Error::InvalidArgument(
                "a prompt of zero virtual tokens has no gradient".into(),
            ));
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (mut stacked, idx) = self.rows(prompts, prompt_index, n).map_err(to_core)?;
        // the only tensor of the graph that requires a gradient
        let leaf = stacked.f_requires_grad_(true).map_err(to_core)?;
        let f = leaf
            .f_index_select(0, &idx)
            .map_err(to_core)
            .and_then(|rows| {
                self.forward(&mut state, Some(&rows), n, placement, images, None)
                    .map_err(to_core)
            })?;
        let host = to_f32(&f.detach())?;
        let (value, dfeat) = loss(&host)?;
        if dfeat.len() != host.len() {
            return Err(Error::Shape(format!(
                "the loss gave {} feature gradients for {} features",
                dfeat.len(),
                host.len()
            )));
        }
        let run = || -> TResult<Vec<f32>> {
            let dfeat = self.host(dfeat, &f.size())?;
            // the gradient of <features, dL/dfeatures> is the vector-Jacobian product
            f.f_mul(&dfeat)?.f_sum(None::<Kind>)?.f_backward()?;
            let g = leaf.grad();
            if !g.defined() {
                return Err(Error::backend(BACKEND, "no gradient reached the prompt").into());
            }
            Ok(to_f32(&g)?)
        };
        let flat = run().map_err(to_core)?;
        let per = n * prompts[0].hidden_size();
        Ok((value, flat.chunks(per).map(<[f32]>::to_vec).collect()))
    }

    fn block_inputs(&self, images: &Images) -> Result<Vec<f32>> {
        let none = [SoftPrompt::empty(self.config.hidden_size)];
        check_call(&self.config, &none, &vec![0; images.rows], images)?;
        let _guard = tch::no_grad_guard();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut run = || -> TResult<Tensor> {
            let mut taps = Vec::with_capacity(self.config.num_hidden_layers);
            // the features themselves are not wanted, the blocks' inputs are
            let _features = self.forward(
                &mut state,
                None,
                0,
                Placement::AfterClassToken,
                images,
                Some(&mut taps),
            )?;
            let taps: Vec<&Tensor> = taps.iter().map(|h| &h.0).collect();
            Ok(Tensor::f_stack(&taps, 0)?)
        };
        to_f32(&run().map_err(to_core)?)
    }
}
