//! ONNX Runtime's vision backbone: the shared ViT ([`softprompt_nn::models::Vit`]) recorded as
//! ONNX graphs (one per kind of prompt, its length and the input grid, exported on first use
//! and kept in memory) and run forward only: class-token features for a linear probe and for
//! visual prompts, and every block's input (a graph that also outputs them). No gradients:
//! [`VisionBackbone::features_grad`] says so.

use std::collections::HashMap;
use std::sync::Mutex;

use onnx_protobuf::{Message, ModelProto, OperatorSetIdProto};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use softprompt_core::model::ModelWeights;
use softprompt_core::vision::check_call;
use softprompt_core::{
    BackboneSpec, Error, Images, Placement, Result, SoftPrompt, VisionBackbone, VisionSource,
    VitConfig,
};
use softprompt_nn::models::{Vit, VitPrompt};

use crate::graph::{value_info, Dim, GraphOps, FLOAT};
use crate::{environment, ort_err, register_device, OrtOptions, BACKEND};

/// What one exported graph takes: the prompt's kind, its length and the patch grid; and
/// whether it also returns every block's input.
type Key = (Placement, usize, usize, bool);

/// A frozen vision transformer on ONNX Runtime.
pub struct OrtVision {
    config: VitConfig,
    spec: BackboneSpec,
    /// The weights, kept to export a graph per key.
    weights: ModelWeights,
    options: OrtOptions,
    sessions: Mutex<HashMap<Key, Session>>,
}

impl std::fmt::Debug for OrtVision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OrtVision({})", self.spec.name)
    }
}

impl OrtVision {
    /// From weights already read (a Hugging Face folder or an ONNX file).
    pub fn from_source(source: VisionSource, options: OrtOptions) -> Result<Self> {
        environment()?;
        Ok(OrtVision {
            config: source.config,
            spec: source.spec,
            weights: source.weights,
            options,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// The graph of `key`: inputs `patches [rows, np, c·p·p]` (or `pixels [rows, c, s, s]` and
    /// `pattern [rows, 1, c·s·s]`), `cls [rows, 1, d]`, `positions [1, np, d]`, `prompt [rows,
    /// N, width]`; output `features [rows, d]` (and, `tapped`, `block_inputs [layers, rows,
    /// 1 + N + np, d]`).
    fn export(&self, (placement, n, grid, tapped): Key) -> Result<Vec<u8>> {
        use Dim::{Fixed, Named};
        let c = &self.config;
        let (d, np) = (c.hidden_size, grid * grid);
        let g = GraphOps::default();
        let mut weights = self.weights.clone();
        let vit = Vit::load(c, &mut softprompt_nn::Loader::new(&g, &mut weights))?;
        let mut inputs = vec![
            value_info("cls", FLOAT, &[Named("rows"), Fixed(1), Fixed(d)]),
            value_info("positions", FLOAT, &[Fixed(1), Fixed(np), Fixed(d)]),
        ];
        let side = grid * c.patch_size;
        let patches = if placement == Placement::Pixels && n > 0 {
            let px = c.num_channels * side * side;
            inputs.push(value_info(
                "pixels",
                FLOAT,
                &[
                    Named("rows"),
                    Fixed(c.num_channels),
                    Fixed(side),
                    Fixed(side),
                ],
            ));
            inputs.push(value_info(
                "pattern",
                FLOAT,
                &[Named("rows"), Fixed(1), Fixed(px)],
            ));
            let pattern = g.op(
                "Reshape",
                &[
                    "pattern",
                    &g.ints(&[-1, c.num_channels as i64, side as i64, side as i64]),
                ],
                vec![],
            );
            let x = g.op("Add", &["pixels", &pattern], vec![]);
            vit.patchify(&g, &x, grid)?
        } else {
            inputs.push(value_info(
                "patches",
                FLOAT,
                &[Named("rows"), Fixed(np), Fixed(c.patch_dim())],
            ));
            "patches".to_string()
        };
        let width = match placement {
            Placement::DeepAfterClassToken => d * c.num_hidden_layers,
            _ => d,
        };
        let prompt_name = "prompt".to_string();
        let prompt = match placement {
            _ if n == 0 => VitPrompt::None,
            Placement::Pixels => VitPrompt::None,
            Placement::DeepAfterClassToken => VitPrompt::Deep(&prompt_name, n),
            _ => VitPrompt::Shallow(&prompt_name, n),
        };
        if !matches!(prompt, VitPrompt::None) {
            inputs.push(value_info(
                "prompt",
                FLOAT,
                &[Named("rows"), Fixed(n), Fixed(width)],
            ));
        }
        let mut outputs = vec![value_info("features", FLOAT, &[Named("rows"), Fixed(d)])];
        let tokens = 1 + np + if placement == Placement::Pixels { 0 } else { n };
        if tapped {
            outputs.push(value_info(
                "block_inputs",
                FLOAT,
                &[
                    Fixed(c.num_hidden_layers),
                    Named("rows"),
                    Fixed(tokens),
                    Fixed(d),
                ],
            ));
        }
        g.declare(inputs, outputs);
        let mut taps = Vec::new();
        let f = vit.features(
            &g,
            &patches,
            np,
            &"cls".to_string(),
            &"positions".to_string(),
            prompt,
            tapped.then_some(&mut taps),
        )?;
        g.rename(&f, "features");
        if tapped {
            let zero = g.ints(&[0]);
            let stacked: Vec<String> = taps
                .iter()
                .map(|t| g.op("Unsqueeze", &[t, &zero], vec![]))
                .collect();
            let stacked: Vec<&str> = stacked.iter().map(String::as_str).collect();
            g.op_into(
                "Concat",
                &stacked,
                vec![crate::graph::attr_int("axis", 0)],
                &["block_inputs"],
            );
        }
        let mut model = ModelProto::new();
        model.ir_version = 8;
        let mut opset = OperatorSetIdProto::new();
        opset.version = crate::export::OPSET;
        model.opset_import.push(opset);
        model.producer_name = "softprompt".into();
        model.graph = Some(g.into_graph()).into();
        model
            .write_to_bytes()
            .map_err(|e| Error::backend(BACKEND, format!("serializing the ViT graph: {e}")))
    }

    fn session<'a>(
        &self,
        sessions: &'a mut HashMap<Key, Session>,
        key: Key,
    ) -> Result<&'a mut Session> {
        if let std::collections::hash_map::Entry::Vacant(slot) = sessions.entry(key) {
            let bytes = self.export(key)?;
            let mut builder = Session::builder(environment()?)
                .map_err(|e| ort_err("session options", e))?
                .with_optimization_level(GraphOptimizationLevel::All)
                .map_err(|e| ort_err("session options", e))?;
            if let Some(t) = self.options.threads {
                builder = builder
                    .with_intra_threads(t)
                    .map_err(|e| ort_err("session options", e))?;
            }
            let mut builder = register_device(builder, self.options.device)?;
            let session = builder
                .commit_from_memory(&bytes)
                .map_err(|e| ort_err("loading the ViT graph", e))?;
            slot.insert(session);
        }
        Ok(sessions.get_mut(&key).expect("inserted above"))
    }
}

fn value(shape: Vec<usize>, data: Vec<f32>) -> Result<DynValue> {
    Tensor::from_array((shape, data))
        .map(|t| t.into_dyn())
        .map_err(|e| ort_err("input tensor", e))
}

impl VisionBackbone for OrtVision {
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
        self.run(prompts, prompt_index, images, "features")
    }

    fn block_inputs(&self, images: &Images) -> Result<Vec<f32>> {
        let none = [SoftPrompt::empty(self.config.hidden_size)];
        self.run(&none, &vec![0; images.rows], images, "block_inputs")
    }
}

impl OrtVision {
    /// Runs the graph of this call's prompts and grid and returns its output `output`
    /// (`features`, or `block_inputs` from the graph that also returns them).
    fn run(
        &self,
        prompts: &[SoftPrompt],
        prompt_index: &[usize],
        images: &Images,
        output: &str,
    ) -> Result<Vec<f32>> {
        let (n, placement) = check_call(&self.config, prompts, prompt_index, images)?;
        let c = &self.config;
        let (d, rows) = (c.hidden_size, images.rows);
        let grid = images.grid(c.patch_size);
        let (cls_row, positions) = {
            let (cls, pos) = softprompt_core::vision::positions_for(
                self.weights
                    .get(softprompt_core::vision::vit_names::POSITIONS)
                    .ok_or_else(|| Error::MissingTensor {
                        name: softprompt_core::vision::vit_names::POSITIONS.into(),
                    })?,
                c.grid(),
                grid,
                grid,
            )?;
            let token = self
                .weights
                .get(softprompt_core::vision::vit_names::CLS)
                .ok_or_else(|| Error::MissingTensor {
                    name: softprompt_core::vision::vit_names::CLS.into(),
                })?;
            let row: Vec<f32> = token.data.iter().zip(&cls).map(|(a, b)| a + b).collect();
            (row, pos)
        };
        let mut values: Vec<(String, DynValue)> = vec![
            ("cls".into(), value(vec![rows, 1, d], cls_row.repeat(rows))?),
            (
                "positions".into(),
                value(vec![1, grid * grid, d], positions)?,
            ),
        ];
        let gathered = |w: usize| -> Vec<f32> {
            prompt_index
                .iter()
                .flat_map(|i| prompts[*i].values().iter().copied())
                .take(rows * n * w)
                .collect()
        };
        if placement == Placement::Pixels && n > 0 {
            let s = images.size;
            let px = c.num_channels * s * s;
            values.push((
                "pixels".into(),
                value(vec![rows, c.num_channels, s, s], images.pixels.clone())?,
            ));
            values.push(("pattern".into(), value(vec![rows, 1, px], gathered(px))?));
        } else {
            values.push((
                "patches".into(),
                value(
                    vec![rows, grid * grid, c.patch_dim()],
                    images.patches(c.patch_size),
                )?,
            ));
            if n > 0 {
                let w = prompts[0].hidden_size();
                values.push(("prompt".into(), value(vec![rows, n, w], gathered(w))?));
            }
        }
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let tapped = output == "block_inputs";
        let session = self.session(&mut sessions, (placement, n, grid, tapped))?;
        let out = session
            .run(values)
            .map_err(|e| ort_err("running the ViT graph", e))?;
        let (_, data) = out[output]
            .try_extract_tensor::<f32>()
            .map_err(|e| ort_err(output, e))?;
        Ok(data.to_vec())
    }
}
