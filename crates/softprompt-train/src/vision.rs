//! Image classification on a frozen vision transformer: data sets (Fashion-MNIST's IDX files,
//! scikit-learn's digits, a folder of PNG/JPEG images per class),
//! preprocessing (bilinear resize, grey to RGB, the model's normalisation), and training of a
//! linear head alone (a linear probe) or with visual prompt tokens (VPT-shallow, VPT-deep).
//!
//! The head lives on the host: the backbone returns class-token features and, for prompts, the
//! gradient of the host's cross-entropy through them ([`VisionBackbone::features_grad`]). A
//! linear probe computes every training image's features once and trains the head on them.

use std::io::Read;
use std::path::Path;

use softprompt_core::{
    shard, Collective, Error, Images, Optimizer, Placement, Result, Rng, SingleProcess, SoftPrompt,
    VisionBackbone,
};

use crate::free::Spsa;
use crate::optim::{AdamW, Schedule};

/// ImageNet's per-channel mean and standard deviation (what DINOv2 models expect).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Labelled 8-bit images of one size (grey or RGB), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    /// Height and width in pixels.
    pub height: usize,
    /// See `height`.
    pub width: usize,
    /// 1 (grey) or 3 (RGB, channel-last).
    pub channels: usize,
    /// `len · height · width · channels` values.
    pub pixels: Vec<u8>,
    /// Class of each image.
    pub labels: Vec<usize>,
    /// Class names, by index.
    pub classes: Vec<String>,
}

/// Fashion-MNIST's class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Reads a gzip-compressed IDX file: its dimensions and bytes.
fn read_idx(path: &Path, magic: u32) -> Result<(Vec<usize>, Vec<u8>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::Data {
        path: path.to_path_buf(),
        line: 0,
        reason,
    };
    let word = |i: usize| -> Result<usize> {
        bytes
            .get(4 * i..4 * i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| bad("truncated IDX header".into()))
    };
    if word(0)? != magic as usize {
        return Err(bad(format!(
            "IDX magic {:#x}, expected {magic:#x}",
            word(0)?
        )));
    }
    let dims: Vec<usize> = (1..=(magic & 0xff) as usize)
        .map(word)
        .collect::<Result<_>>()?;
    let start = 4 * (1 + dims.len());
    let n: usize = dims.iter().product();
    if bytes.len() != start + n {
        return Err(bad(format!(
            "{} data bytes for dimensions {dims:?}",
            bytes.len() - start
        )));
    }
    Ok((dims, bytes[start..].to_vec()))
}

/// Fashion-MNIST from a folder of its four IDX files (Debian's `dataset-fashion-mnist`:
/// `/usr/share/datasets/fashion-mnist`): the 60,000 training or the 10,000 test images.
pub fn load_fashion_mnist(dir: &Path, train: bool) -> Result<ImageSet> {
    let prefix = if train { "train" } else { "t10k" };
    let (dims, pixels) = read_idx(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), 0x803)?;
    let (ldims, labels) = read_idx(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), 0x801)?;
    if ldims[0] != dims[0] {
        return Err(Error::InvalidArgument(format!(
            "{} Fashion-MNIST images but {} labels",
            dims[0], ldims[0]
        )));
    }
    let labels: Vec<usize> = labels.into_iter().map(usize::from).collect();
    if let Some(l) = labels.iter().find(|l| **l >= 10) {
        return Err(Error::InvalidArgument(format!(
            "Fashion-MNIST label {l} (0..10)"
        )));
    }
    Ok(ImageSet {
        height: dims[1],
        width: dims[2],
        channels: 1,
        pixels,
        labels,
        classes: FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    })
}

/// Every `HELD_OUT`-th image (in file order) is a test image in data sets that come as one
/// collection (scikit-learn's digits, an image folder without `train/` and `test/`).
pub const HELD_OUT: usize = 5;

/// Splits `n` items in file order into (train, test) indices: every [`HELD_OUT`]-th is test.
fn fixed_split(n: usize) -> (Vec<usize>, Vec<usize>) {
    (0..n).partition(|i| i % HELD_OUT != HELD_OUT - 1)
}

/// scikit-learn's handwritten digits (`sklearn/datasets/data/digits.csv.gz`: 1,797 rows of 64
/// pixel values 0..=16 and the digit), gzip-compressed or plain, as 8×8 grey images scaled to
/// 0..=255, split in file order: every fifth image is a test image (the fixed held-out split:
/// 1,438 train, 359 test).
pub fn load_digits(path: &Path) -> Result<(ImageSet, ImageSet)> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut out)
            .map_err(|e| Error::io(path, e))?;
        out
    } else {
        String::from_utf8(raw).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: 0,
            reason: format!("not UTF-8 text: {e}"),
        })?
    };
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let values: Vec<u8> = line
            .split(',')
            .map(|v| v.trim().parse::<f64>().ok().filter(|x| x.fract() == 0.0))
            .map(|v| v.filter(|x| (0.0..=16.0).contains(x)).map(|x| x as u8))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("values must be whole numbers 0..=16".into()))?;
        if values.len() != 65 || values[64] > 9 {
            return Err(bad(format!(
                "{} values (64 pixels and a digit 0..=9 expected)",
                values.len()
            )));
        }
        pixels.extend(
            values[..64]
                .iter()
                .map(|&v| ((u32::from(v) * 255 + 8) / 16) as u8),
        );
        labels.push(usize::from(values[64]));
    }
    if labels.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            line: 0,
            reason: "no images".into(),
        });
    }
    let all = ImageSet {
        height: 8,
        width: 8,
        channels: 1,
        pixels,
        labels,
        classes: (0..10).map(|d| d.to_string()).collect(),
    };
    let (train, test) = fixed_split(all.len());
    Ok((all.subset(&train), all.subset(&test)))
}

/// Whether `path` names a PNG or JPEG file (by extension, any case).
fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Sorted entries of a folder (folders or image files).
fn sorted_entries(dir: &Path, folders: bool) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let keep = if folders {
            path.is_dir()
        } else {
            path.is_file() && is_image_file(&path)
        };
        if keep {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Decodes one image file, converted to RGB and resized (bilinear) to `size × size`.
fn read_image(path: &Path, size: usize) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, size).map_err(|reason| Error::Data {
        path: path.to_path_buf(),
        line: 0,
        reason,
    })
}

/// Decodes a PNG or JPEG image held in memory (the format is read from its first bytes), converts
/// it to RGB and resizes it (bilinear) to `size × size`: `size · size · 3` bytes, channel-last.
/// The error says why it is not a readable image.
pub fn decode_image(bytes: &[u8], size: usize) -> std::result::Result<Vec<u8>, String> {
    let side = u32::try_from(size)
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("image size {size}"))?;
    let format = image::guess_format(bytes)
        .ok()
        .filter(|f| matches!(f, image::ImageFormat::Png | image::ImageFormat::Jpeg))
        .ok_or("not a PNG or JPEG image")?;
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| format!("not a readable PNG/JPEG image: {e}"))?
        .to_rgb8();
    Ok(image::imageops::resize(&img, side, side, image::imageops::FilterType::Triangle).into_raw())
}

/// The images of a folder with one sub-folder per class (class names: the sub-folders' names,
/// sorted), as RGB `size × size` images. `classes` fixes the class list (a test folder must
/// name the training folder's classes); files other than PNG/JPEG are skipped.
fn read_class_folders(
    dir: &Path,
    size: usize,
    classes: Option<&[String]>,
) -> Result<(ImageSet, Vec<usize>)> {
    let folders = sorted_entries(dir, true)?;
    let names: Vec<String> = folders
        .iter()
        .map(|f| {
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let classes = match classes {
        Some(c) => {
            if let Some(n) = names.iter().find(|n| !c.contains(n)) {
                return Err(Error::InvalidArgument(format!(
                    "{}: class folder `{n}` is not one of the training classes {c:?}",
                    dir.display()
                )));
            }
            c.to_vec()
        }
        None => names.clone(),
    };
    if classes.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "{}: {} class folders (one sub-folder per class, two at least)",
            dir.display(),
            classes.len()
        )));
    }
    let mut set = ImageSet {
        height: size,
        width: size,
        channels: 3,
        pixels: Vec::new(),
        labels: Vec::new(),
        classes: classes.clone(),
    };
    // position of each image within its class (for the fixed held-out split)
    let mut rank = Vec::new();
    for (folder, name) in folders.iter().zip(&names) {
        let label = classes.iter().position(|c| c == name).unwrap_or_default();
        let files = sorted_entries(folder, false)?;
        if files.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: no PNG or JPEG image",
                folder.display()
            )));
        }
        for (k, file) in files.iter().enumerate() {
            set.pixels.extend(read_image(file, size)?);
            set.labels.push(label);
            rank.push(k);
        }
    }
    Ok((set, rank))
}

/// A user's images: `dir/train/<class>/*` and `dir/test/<class>/*` where both exist, else
/// `dir/<class>/*` split per class in file-name order (every fifth image of a class is a test
/// image, as [`HELD_OUT`] says). PNG and JPEG, any size, converted to RGB and resized to
/// `size × size` as they are read.
pub fn load_image_folder(dir: &Path, size: usize) -> Result<(ImageSet, ImageSet)> {
    let (train_dir, test_dir) = (dir.join("train"), dir.join("test"));
    if train_dir.is_dir() && test_dir.is_dir() {
        let (train, _) = read_class_folders(&train_dir, size, None)?;
        let (test, _) = read_class_folders(&test_dir, size, Some(&train.classes))?;
        return Ok((train, test));
    }
    let (all, rank) = read_class_folders(dir, size, None)?;
    let (train, test): (Vec<usize>, Vec<usize>) =
        (0..all.len()).partition(|&i| rank[i] % HELD_OUT != HELD_OUT - 1);
    if test.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: too few images for a held-out split (every {HELD_OUT}th of a class is a test \
             image); give train/ and test/ folders",
            dir.display()
        )));
    }
    Ok((all.subset(&train), all.subset(&test)))
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images at `indices`, in that order, with the same classes.
    pub fn subset(&self, indices: &[usize]) -> ImageSet {
        let size = self.height * self.width * self.channels;
        ImageSet {
            height: self.height,
            width: self.width,
            channels: self.channels,
            pixels: indices
                .iter()
                .flat_map(|&i| &self.pixels[i * size..(i + 1) * size])
                .copied()
                .collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes.clone(),
        }
    }

    /// `per_class` images of every class (fewer where a class has fewer), drawn with `seed`,
    /// in a shuffled order: a few-shot training set or a balanced test subset.
    pub fn balanced(&self, per_class: usize, seed: u64) -> Vec<usize> {
        self.balanced_split(per_class, 0, seed).0
    }

    /// [`balanced`](Self::balanced)`(per_class, seed)` and, disjoint from it, `extra` more
    /// images of every class (fewer where a class runs out): a validation set drawn beside the
    /// same few-shot training set.
    pub fn balanced_split(
        &self,
        per_class: usize,
        extra: usize,
        seed: u64,
    ) -> (Vec<usize>, Vec<usize>) {
        let mut rng = Rng::seed_from_u64(seed);
        let (mut picked, mut rest) = (Vec::new(), Vec::new());
        for c in 0..self.classes.len() {
            let mut of: Vec<usize> = (0..self.len()).filter(|i| self.labels[*i] == c).collect();
            rng.shuffle(&mut of);
            let cut = per_class.min(of.len());
            rest.extend(of[cut..].iter().take(extra).copied());
            picked.extend(of.into_iter().take(cut));
        }
        rng.shuffle(&mut picked);
        (picked, rest)
    }

    /// Images `indices` resized (bilinear, half-pixel centres) to `size × size`, grey copied to
    /// three channels, scaled to [0, 1] and normalised with `mean`/`std`.
    pub fn prepare(&self, indices: &[usize], size: usize, mean: [f32; 3], std: [f32; 3]) -> Images {
        let (h, w, c) = (self.height, self.width, self.channels);
        let taps = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
            let scale = inp as f32 / out as f32;
            (0..out)
                .map(|o| {
                    let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                    let i0 = (src.floor() as usize).min(inp - 1);
                    let i1 = (i0 + 1).min(inp - 1);
                    (i0, i1, src - i0 as f32)
                })
                .collect()
        };
        let (ty, tx) = (taps(size, h), taps(size, w));
        let mut pixels = Vec::with_capacity(indices.len() * 3 * size * size);
        for &i in indices {
            let img = &self.pixels[i * h * w * c..(i + 1) * h * w * c];
            for ch in 0..3 {
                let src_ch = if c == 1 { 0 } else { ch };
                let at = |y: usize, x: usize| img[(y * w + x) * c + src_ch] as f32 / 255.0;
                for &(y0, y1, fy) in &ty {
                    for &(x0, x1, fx) in &tx {
                        let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                        let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                        let v = top * (1.0 - fy) + bottom * fy;
                        pixels.push((v - mean[ch]) / std[ch]);
                    }
                }
            }
        }
        Images {
            rows: indices.len(),
            channels: 3,
            size,
            pixels,
        }
    }
}

/// What is trained besides the linear head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionMethod {
    /// The head alone, on frozen features (the baseline).
    Linear,
    /// `n` prompt tokens after the class token at the input.
    VptShallow(usize),
    /// `n` fresh prompt tokens after the class token at every block.
    VptDeep(usize),
    /// A pattern added to the pixels, trained in a frame `w` pixels wide along the border
    /// (visual prompting, Bahng et al.: `w = 30` at 224 px).
    PixelFrame(usize),
}

impl VisionMethod {
    /// Name as in the CLI.
    pub fn name(&self) -> &'static str {
        match self {
            VisionMethod::Linear => "linear",
            VisionMethod::VptShallow(_) => "vpt-shallow",
            VisionMethod::VptDeep(_) => "vpt-deep",
            VisionMethod::PixelFrame(_) => "pixel-frame",
        }
    }
}

/// Where VPT's prompt tokens start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VptInit {
    /// VPT's uniform initialisation `±√(6 / (3·p² + d))` (Jia et al.).
    #[default]
    Uniform,
    /// Real patches' hidden states: token `j` is, at the input (VPT-shallow) or at every block
    /// (VPT-deep), the hidden state that a patch drawn at random from a training image has at
    /// that block's input ([`VisionBackbone::block_inputs`]), so that the prompt starts among
    /// the tokens the blocks were trained on instead of as noise that moves the class token.
    /// Every backend returns them (ort from a graph that also outputs them).
    Patches,
}

impl VptInit {
    /// Name as in the CLI (`--init uniform|patches`) and the training report.
    pub fn name(&self) -> &'static str {
        match self {
            VptInit::Uniform => "uniform",
            VptInit::Patches => "patches",
        }
    }

    /// Value of a saved folder's `prompt_tuning_init` (PEFT's field; its values are upper case).
    pub fn config_value(&self) -> &'static str {
        match self {
            VptInit::Uniform => "UNIFORM",
            VptInit::Patches => "PATCHES",
        }
    }
}

/// Settings of an image-classification run.
#[derive(Debug, Clone)]
pub struct VisionConfig {
    /// What is trained.
    pub method: VisionMethod,
    /// Optimizer steps (mini-batches).
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW learning rate of the prompt.
    pub lr: f32,
    /// AdamW learning rate of the head.
    pub head_lr: f32,
    /// Input resolution (the model's native one, or less to save compute).
    pub image_size: usize,
    /// Seed of the initialisation and of the batch order.
    pub seed: u64,
    /// Images per forward pass when computing features without gradients.
    pub eval_batch_size: usize,
    /// Steps of the head alone, on the features under the initial prompt, before a prompt
    /// method trains (a warm start; a linear probe's head is all `steps`).
    pub head_warmup: usize,
    /// How the prompt learns (the head always takes AdamW on its exact gradient).
    pub prompt_optimizer: PromptOptimizer,
    /// Where VPT's prompt tokens start (the pixel frame always starts at zero).
    pub vpt_init: VptInit,
    /// Learning-rate schedule over the training steps (a linear probe's head steps, a prompt
    /// method's prompt steps — both the prompt's and the head's rate —; the head's warm start
    /// keeps its constant rate). Its `total` is the run's steps.
    pub schedule: Schedule,
    /// With validation images ([`train_classifier_selecting`]): evaluate every this many steps
    /// (0: at the start and the end only) and keep the best.
    pub eval_every: usize,
}

/// How a visual prompt is trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PromptOptimizer {
    /// AdamW on the backbone's prompt gradient ([`VisionBackbone::features_grad`]).
    AdamW,
    /// SPSA / MeZO two-point estimates from forward passes only (backends without gradients,
    /// such as ONNX Runtime): every step runs the batch once per candidate prompt `θ ± ε z` in
    /// one call, the prompt moves by `lr` times the estimate, and the head takes the mean of
    /// its gradients at the candidates. A pixel pattern is perturbed in its frame only.
    Spsa {
        /// Perturbation scale `ε`.
        eps: f32,
        /// Two-point estimates per step.
        perturbations: usize,
    },
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            method: VisionMethod::VptShallow(10),
            steps: 100,
            batch_size: 16,
            lr: 0.01,
            head_lr: 0.01,
            image_size: 224,
            seed: 0,
            eval_batch_size: 32,
            head_warmup: 0,
            prompt_optimizer: PromptOptimizer::AdamW,
            vpt_init: VptInit::Uniform,
            schedule: Schedule::Constant,
            eval_every: 0,
        }
    }
}

/// A trained visual prompt and its linear head.
#[derive(Debug, Clone, PartialEq)]
pub struct VisualClassifier {
    /// Prompt tokens (zero of them for a linear probe).
    pub prompt: SoftPrompt,
    /// Head weight `[classes, d]`.
    pub head_w: Vec<f32>,
    /// Head bias `[classes]`.
    pub head_b: Vec<f32>,
    /// Class names.
    pub classes: Vec<String>,
    /// Input resolution it was trained at.
    pub image_size: usize,
    /// Where VPT's prompt tokens started (`None`: a linear probe, a pixel frame — it always
    /// starts at zero — or a folder saved before this was recorded).
    pub init: Option<VptInit>,
    /// Mean training loss of each step.
    pub losses: Vec<f32>,
    /// Validation accuracy by step, when trained with validation images (step 0: a prompt
    /// method's start, its head warm-started); the classifier is the first best of these.
    pub validation: Vec<(usize, f64)>,
}

impl VisualClassifier {
    /// The step whose prompt and head were kept: the first best of [`validation`](Self::validation)
    /// (`None` without validation images).
    pub fn kept_step(&self) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for &(step, acc) in &self.validation {
            if best.is_none_or(|(_, b)| acc > b) {
                best = Some((step, acc));
            }
        }
        best.map(|(step, _)| step)
    }
}

/// `logits [rows, C]` of `features [rows, d]`.
fn head_logits(f: &[f32], w: &[f32], b: &[f32], d: usize) -> Vec<f32> {
    let c = b.len();
    let rows = f.len() / d;
    let mut out = vec![0f32; rows * c];
    for r in 0..rows {
        let x = &f[r * d..(r + 1) * d];
        for k in 0..c {
            let wk = &w[k * d..(k + 1) * d];
            out[r * c + k] = b[k] + x.iter().zip(wk).map(|(a, b)| a * b).sum::<f32>();
        }
    }
    out
}

/// Mean cross-entropy of `labels` under the head, and its gradients: to the features
/// (`[rows, d]`), the weight and the bias.
fn head_loss(
    f: &[f32],
    labels: &[usize],
    w: &[f32],
    b: &[f32],
    d: usize,
) -> (f32, Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = b.len();
    let rows = labels.len();
    let logits = head_logits(f, w, b, d);
    let (mut loss, mut df, mut dw, mut db) =
        (0f64, vec![0f32; rows * d], vec![0f32; c * d], vec![0f32; c]);
    for r in 0..rows {
        let z = &logits[r * c..(r + 1) * c];
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = z.iter().map(|v| ((v - max) as f64).exp()).sum();
        loss += sum.ln() + max as f64 - z[labels[r]] as f64;
        for k in 0..c {
            let p = (((z[k] - max) as f64).exp() / sum) as f32;
            let g = (p - f32::from(k == labels[r])) / rows as f32;
            db[k] += g;
            for j in 0..d {
                dw[k * d + j] += g * f[r * d + j];
                df[r * d + j] += g * w[k * d + j];
            }
        }
    }
    ((loss / rows.max(1) as f64) as f32, df, dw, db)
}

/// Features of `indices` in batches, with `prompt`.
fn features(
    backbone: &dyn VisionBackbone,
    prompt: &SoftPrompt,
    set: &ImageSet,
    indices: &[usize],
    config: &VisionConfig,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(indices.len() * backbone.spec().hidden_size);
    for chunk in indices.chunks(config.eval_batch_size.max(1)) {
        let images = set.prepare(chunk, config.image_size, IMAGENET_MEAN, IMAGENET_STD);
        let f = backbone.features(std::slice::from_ref(prompt), &vec![0; chunk.len()], &images)?;
        out.extend(f);
    }
    Ok(out)
}

/// Writes `values` into the prompt's values at `at`.
fn set_values(prompt: &mut SoftPrompt, at: &[usize], values: &[f32]) {
    let all = prompt.values_mut();
    for (&i, &v) in at.iter().zip(values) {
        all[i] = v;
    }
}

/// Which values of a `channels × size × size` pattern lie in the frame `w` pixels wide.
pub fn frame_mask(channels: usize, size: usize, w: usize) -> Vec<bool> {
    let edge = |v: usize| v < w || v + w >= size;
    (0..channels)
        .flat_map(|_| (0..size).flat_map(move |y| (0..size).map(move |x| edge(y) || edge(x))))
        .collect()
}

/// The prompt a method starts from: VPT's tokens as `init` says; a pixel pattern starts at
/// zero.
fn initial_prompt(
    backbone: &dyn VisionBackbone,
    config: &VisionConfig,
    set: &ImageSet,
    train: &[usize],
    rng: &mut Rng,
) -> Result<SoftPrompt> {
    let (method, image_size, init) = (config.method, config.image_size, config.vpt_init);
    let c = backbone.config();
    let d = c.hidden_size;
    if init != VptInit::Uniform
        && !matches!(
            method,
            VisionMethod::VptShallow(_) | VisionMethod::VptDeep(_)
        )
    {
        return Err(Error::InvalidArgument(format!(
            "{} has no prompt tokens to start from patches (vpt-shallow or vpt-deep)",
            method.name()
        )));
    }
    let (n, placement, width) = match method {
        VisionMethod::Linear => {
            return Ok(SoftPrompt::empty(d).with_placement(Placement::AfterClassToken))
        }
        VisionMethod::PixelFrame(w) => {
            if w == 0 || 2 * w >= image_size {
                return Err(Error::InvalidArgument(format!(
                    "a frame of {w} pixels in {image_size}-pixel images (1 ≤ width < size / 2)"
                )));
            }
            let width = 3 * image_size * image_size;
            return Ok(
                SoftPrompt::new(1, width, vec![0.0; width])?.with_placement(Placement::Pixels)
            );
        }
        VisionMethod::VptShallow(n) => (n, Placement::AfterClassToken, d),
        VisionMethod::VptDeep(n) => (n, Placement::DeepAfterClassToken, d * c.num_hidden_layers),
    };
    if n == 0 {
        return Err(Error::InvalidArgument(format!(
            "{} needs at least one prompt token",
            method.name()
        )));
    }
    let values = match init {
        VptInit::Uniform => {
            let bound = (6.0 / (c.patch_dim() + d) as f64).sqrt() as f32;
            (0..n * width).map(|_| rng.uniform(-bound, bound)).collect()
        }
        VptInit::Patches => patch_states(backbone, set, train, n, width / d, image_size, rng)?,
    };
    Ok(SoftPrompt::new(n, width, values)?.with_placement(placement))
}

/// `[n, layers · d]`: for each of `n` patches drawn at random (an image of `train`, a patch of
/// its grid), the hidden state it has at the input of blocks `0..layers`, side by side.
fn patch_states(
    backbone: &dyn VisionBackbone,
    set: &ImageSet,
    train: &[usize],
    n: usize,
    layers: usize,
    image_size: usize,
    rng: &mut Rng,
) -> Result<Vec<f32>> {
    if train.is_empty() {
        return Err(Error::InvalidArgument(
            "prompt tokens from patches need training images".into(),
        ));
    }
    let d = backbone.spec().hidden_size;
    let picks: Vec<usize> = (0..n).map(|_| train[rng.below(train.len())]).collect();
    let images = set.prepare(&picks, image_size, IMAGENET_MEAN, IMAGENET_STD);
    let np = images.grid(backbone.config().patch_size).pow(2);
    let states = backbone.block_inputs(&images)?;
    let all = backbone.config().num_hidden_layers;
    let tokens = 1 + np;
    if states.len() != all * n * tokens * d {
        return Err(Error::Shape(format!(
            "{} block inputs for {all} blocks of {n} images of {tokens} tokens × {d}",
            states.len()
        )));
    }
    let mut out = Vec::with_capacity(n * layers * d);
    for j in 0..n {
        // a patch, never the class token
        let t = 1 + rng.below(np);
        for l in 0..layers {
            let at = ((l * n + j) * tokens + t) * d;
            out.extend_from_slice(&states[at..at + d]);
        }
    }
    Ok(out)
}

/// Trains `config.method` on the images `train` of `set`.
pub fn train_classifier(
    backbone: &dyn VisionBackbone,
    set: &ImageSet,
    train: &[usize],
    config: &VisionConfig,
) -> Result<VisualClassifier> {
    train_classifier_with(backbone, set, train, config, &SingleProcess)
}

/// Sums `parts` (each scaled by `weight`) over the ranks of `group` and splits the sums back
/// into vectors of the same lengths (exact with one rank: f32 → f64 → f32 round-trips).
fn reduce_scaled(group: &dyn Collective, weight: f64, parts: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
    if group.world_size() == 1 {
        return Ok(parts.iter().map(|p| p.to_vec()).collect());
    }
    let mut buf: Vec<f64> = parts
        .iter()
        .flat_map(|p| p.iter().map(|v| *v as f64 * weight))
        .collect();
    group.all_reduce_sum(&mut buf)?;
    let mut out = Vec::with_capacity(parts.len());
    let mut at = 0;
    for p in parts {
        out.push(buf[at..at + p.len()].iter().map(|v| *v as f32).collect());
        at += p.len();
    }
    Ok(out)
}

/// Trains `config.method` data-parallel with the other ranks of `group`: every step's global
/// batch (the same images, in the same order, as one process draws) is split into contiguous
/// shares; each rank computes the loss and gradients of its share, the sums weighted by the
/// share's size are all-reduced, and every rank applies the same update (SPSA: every rank runs
/// all candidates on its share). The head's warm-start features are computed a share per rank
/// and gathered. Every rank returns the same classifier; with one rank this is
/// [`train_classifier`].
pub fn train_classifier_with(
    backbone: &dyn VisionBackbone,
    set: &ImageSet,
    train: &[usize],
    config: &VisionConfig,
    group: &dyn Collective,
) -> Result<VisualClassifier> {
    train_classifier_selecting(backbone, set, train, &[], config, group)
}

/// Correct predictions of the head on `features [rows, d]`.
fn correct(f: &[f32], labels: &[usize], w: &[f32], b: &[f32], d: usize) -> usize {
    let logits = head_logits(f, w, b, d);
    logits
        .chunks(b.len().max(1))
        .zip(labels)
        .filter(|(z, y)| softprompt_core::generate::argmax(z) as usize == **y)
        .count()
}

/// [`train_classifier_with`] that also evaluates on the images `validation` of `set` (after
/// the head's warm start, every `config.eval_every` steps and at the end; a linear probe at its
/// head steps) and returns the classifier of the first best evaluation, with the accuracies in
/// [`VisualClassifier::validation`]. Each rank classifies its share of `validation`; the counts
/// are summed, so every rank keeps the same step. Without validation images it is
/// [`train_classifier_with`].
pub fn train_classifier_selecting(
    backbone: &dyn VisionBackbone,
    set: &ImageSet,
    train: &[usize],
    validation: &[usize],
    config: &VisionConfig,
    group: &dyn Collective,
) -> Result<VisualClassifier> {
    if train.is_empty() {
        return Err(Error::InvalidArgument("no training images".into()));
    }
    let d = backbone.spec().hidden_size;
    let classes = set.classes.len();
    let mut rng = Rng::seed_from_u64(config.seed);
    let mut prompt = initial_prompt(backbone, config, set, train, &mut rng)?;
    // a pixel pattern is trained in its frame only: the rest of it gets no gradient
    let frame = match config.method {
        VisionMethod::PixelFrame(w) => Some(frame_mask(3, config.image_size, w)),
        _ => None,
    };
    let (mut w, mut b) = (vec![0f32; classes * d], vec![0f32; classes]);
    let (mut opt_w, mut opt_b, mut opt_p) = (AdamW::new(), AdamW::new(), AdamW::new());
    let mut order: Vec<usize> = train.to_vec();
    let bs = config.batch_size.clamp(1, train.len());
    let mut cursor = train.len();
    let mut next = |rng: &mut Rng| -> Vec<usize> {
        if cursor + bs > order.len() {
            rng.shuffle(&mut order);
            cursor = 0;
        }
        cursor += bs;
        order[cursor - bs..cursor].to_vec()
    };
    let mut losses = Vec::with_capacity(config.steps);
    // validation: this rank's share, its labels, and (a linear probe's) features, computed once
    let (vlo, vhi) = shard(validation.len(), group.rank(), group.world_size());
    let val_mine = &validation[vlo..vhi];
    let val_labels: Vec<usize> = val_mine.iter().map(|i| set.labels[*i]).collect();
    let probe_val = if config.method == VisionMethod::Linear && !val_mine.is_empty() {
        features(backbone, &prompt, set, val_mine, config)?
    } else {
        Vec::new()
    };
    let mut curve: Vec<(usize, f64)> = Vec::new();
    let mut best: Option<(f64, SoftPrompt, Vec<f32>, Vec<f32>)> = None;
    // the validation accuracy of (prompt, w, b), the same on every rank; kept when best so far
    let mut validate = |step: usize,
                        prompt: &SoftPrompt,
                        w: &[f32],
                        b: &[f32],
                        curve: &mut Vec<(usize, f64)>|
     -> Result<()> {
        let right = if val_mine.is_empty() {
            0
        } else if config.method == VisionMethod::Linear {
            correct(&probe_val, &val_labels, w, b, d)
        } else {
            let f = features(backbone, prompt, set, val_mine, config)?;
            correct(&f, &val_labels, w, b, d)
        };
        let mut sum = [right as f64];
        if group.world_size() > 1 {
            group.all_reduce_sum(&mut sum)?;
        }
        let acc = sum[0] / validation.len() as f64;
        curve.push((step, acc));
        if best.as_ref().is_none_or(|(a, ..)| acc > *a) {
            best = Some((acc, prompt.clone(), w.to_vec(), b.to_vec()));
        }
        Ok(())
    };
    let checkpoint = |step: usize, last: usize| {
        !validation.is_empty()
            && (step == last || (config.eval_every > 0 && step % config.eval_every == 0))
    };
    // the head alone first, on the features without a prompt (computed once): a linear probe's
    // whole training, a warm start for the prompt methods
    let (warm, prompt_steps) = match config.method {
        VisionMethod::Linear => (config.steps, 0),
        _ => (config.head_warmup, config.steps),
    };
    if warm > 0 {
        // the features the prompt starts from (a linear probe's: no prompt), so that the head
        // fits where prompt training begins: random deep prompts move the features
        let all = if group.world_size() == 1 {
            features(backbone, &prompt, set, train, config)?
        } else {
            let (lo, hi) = shard(train.len(), group.rank(), group.world_size());
            let mine = features(backbone, &prompt, set, &train[lo..hi], config)?;
            // gathered: each rank fills its rows of a zero table and the tables are summed
            let mut table = vec![0f64; train.len() * d];
            for (slot, v) in table[lo * d..hi * d].iter_mut().zip(&mine) {
                *slot = *v as f64;
            }
            group.all_reduce_sum(&mut table)?;
            table.into_iter().map(|v| v as f32).collect()
        };
        let position: std::collections::HashMap<usize, usize> =
            train.iter().enumerate().map(|(k, i)| (*i, k)).collect();
        for step in 0..warm {
            let batch = next(&mut rng);
            let labels: Vec<usize> = batch.iter().map(|i| set.labels[*i]).collect();
            let f: Vec<f32> = batch
                .iter()
                .flat_map(|i| all[position[i] * d..(position[i] + 1) * d].iter().copied())
                .collect();
            let (loss, _, dw, db) = head_loss(&f, &labels, &w, &b, d);
            if !loss.is_finite() {
                return Err(Error::NonFinite {
                    what: "loss".into(),
                    step: step as u64 + 1,
                });
            }
            // a probe's steps follow the schedule; a warm start keeps the constant rate
            let head_lr = if config.method == VisionMethod::Linear {
                config.head_lr * config.schedule.factor(step as u64)
            } else {
                config.head_lr
            };
            opt_w.step(&mut w, &dw, head_lr)?;
            opt_b.step(&mut b, &db, head_lr)?;
            if config.method == VisionMethod::Linear {
                losses.push(loss);
                if checkpoint(step + 1, warm) {
                    validate(step + 1, &prompt, &w, &b, &mut curve)?;
                }
            }
        }
    }
    // the values the prompt optimizer moves: all of them, or a pixel pattern's frame
    let trainable: Vec<usize> = match &frame {
        Some(mask) => (0..mask.len()).filter(|i| mask[*i]).collect(),
        None => (0..prompt.values().len()).collect(),
    };
    let mut spsa = match config.prompt_optimizer {
        PromptOptimizer::AdamW => None,
        PromptOptimizer::Spsa { eps, perturbations } => {
            let mut o = Spsa::new(eps, config.seed);
            o.perturbations = perturbations;
            Some(o)
        }
    };
    if prompt_steps > 0 && checkpoint(0, prompt_steps) {
        validate(0, &prompt, &w, &b, &mut curve)?;
    }
    for step in 0..prompt_steps {
        let factor = config.schedule.factor(step as u64);
        let global = next(&mut rng);
        // this rank's share of the global batch, and its weight in the global mean
        let (lo, hi) = shard(global.len(), group.rank(), group.world_size());
        let batch = &global[lo..hi];
        let weight = batch.len() as f64 / global.len() as f64;
        let labels: Vec<usize> = batch.iter().map(|i| set.labels[*i]).collect();
        let images = set.prepare(batch, config.image_size, IMAGENET_MEAN, IMAGENET_STD);
        let non_finite = || Error::NonFinite {
            what: "loss or prompt gradient".into(),
            step: step as u64 + 1,
        };
        let (loss, dw, db) = match spsa.as_mut() {
            None => {
                let (mut dw, mut db) = (vec![0f32; w.len()], vec![0f32; b.len()]);
                let (mut loss, mut g) = (0f32, vec![0f32; trainable.len()]);
                // a rank whose share is empty (more ranks than images) adds zeros
                if !batch.is_empty() {
                    let mut host = |f: &[f32]| -> Result<(f32, Vec<f32>)> {
                        let (loss, df, gw, gb) = head_loss(f, &labels, &w, &b, d);
                        dw = gw;
                        db = gb;
                        Ok((loss, df))
                    };
                    let (l, grads) = backbone.features_grad(
                        std::slice::from_ref(&prompt),
                        &vec![0; batch.len()],
                        &images,
                        &mut host,
                    )?;
                    let all = grads.into_iter().next().unwrap_or_default();
                    g = trainable.iter().map(|&i| all[i]).collect();
                    loss = l;
                }
                let mut sums = reduce_scaled(group, weight, &[&[loss], &g, &dw, &db])?;
                let (db, dw, g) = (sums.pop(), sums.pop(), sums.pop());
                let (dw, db, g) = (
                    dw.unwrap_or_default(),
                    db.unwrap_or_default(),
                    g.unwrap_or_default(),
                );
                let loss = sums[0][0];
                if !loss.is_finite() || g.iter().any(|v| !v.is_finite()) {
                    return Err(non_finite());
                }
                let mut theta: Vec<f32> = trainable.iter().map(|&i| prompt.values()[i]).collect();
                opt_p.step(&mut theta, &g, config.lr * factor)?;
                set_values(&mut prompt, &trainable, &theta);
                (loss, dw, db)
            }
            Some(spsa) => {
                let mut theta: Vec<f32> = trainable.iter().map(|&i| prompt.values()[i]).collect();
                let candidates = spsa.ask(&theta)?;
                let prompts: Vec<SoftPrompt> = candidates
                    .iter()
                    .map(|c| {
                        let mut p = prompt.clone();
                        set_values(&mut p, &trainable, c);
                        p
                    })
                    .collect();
                // every candidate sees the same images, in one call
                let k = candidates.len();
                let repeated = Images {
                    rows: images.rows * k,
                    channels: images.channels,
                    size: images.size,
                    pixels: images.pixels.repeat(k),
                };
                let index: Vec<usize> = (0..k).flat_map(|c| vec![c; batch.len()]).collect();
                let (mut losses, mut dw, mut db) =
                    (vec![0f32; k], vec![0f32; w.len()], vec![0f32; b.len()]);
                if !batch.is_empty() {
                    let f = backbone.features(&prompts, &index, &repeated)?;
                    for (c, fc) in f.chunks(batch.len() * d).enumerate() {
                        let (l, _, gw, gb) = head_loss(fc, &labels, &w, &b, d);
                        losses[c] = l;
                        dw.iter_mut().zip(&gw).for_each(|(a, g)| *a += g / k as f32);
                        db.iter_mut().zip(&gb).for_each(|(a, g)| *a += g / k as f32);
                    }
                }
                let mut sums = reduce_scaled(group, weight, &[&losses, &dw, &db])?;
                let (db, dw, losses) = (sums.pop(), sums.pop(), sums.pop());
                let (dw, db, losses) = (
                    dw.unwrap_or_default(),
                    db.unwrap_or_default(),
                    losses.unwrap_or_default(),
                );
                if losses.iter().any(|l| !l.is_finite()) {
                    return Err(non_finite());
                }
                spsa.tell(&mut theta, &losses, config.lr * factor)?;
                set_values(&mut prompt, &trainable, &theta);
                (losses.iter().sum::<f32>() / k as f32, dw, db)
            }
        };
        opt_w.step(&mut w, &dw, config.head_lr * factor)?;
        opt_b.step(&mut b, &db, config.head_lr * factor)?;
        losses.push(loss);
        if checkpoint(step + 1, prompt_steps) {
            validate(step + 1, &prompt, &w, &b, &mut curve)?;
        }
    }
    if let Some((_, p, bw, bb)) = best {
        (prompt, w, b) = (p, bw, bb);
    }
    Ok(VisualClassifier {
        prompt,
        head_w: w,
        head_b: b,
        classes: set.classes.clone(),
        image_size: config.image_size,
        init: matches!(
            config.method,
            VisionMethod::VptShallow(_) | VisionMethod::VptDeep(_)
        )
        .then_some(config.vpt_init),
        losses,
        validation: curve,
    })
}

/// `peft_type` of a saved visual classifier (no PEFT type exists for visual prompts).
pub const VISUAL_PEFT_TYPE: &str = "VISUAL_PROMPT_TUNING";

/// Writes a trained classifier as a prompt folder, atomically (the folder changes as one unit):
/// `adapter_model.safetensors` (`prompt_embeddings [N, width]`, `head.weight [classes, d]`,
/// `head.bias [classes]`) and `adapter_config.json` (PEFT's field names where they apply, the
/// placement, resolution and classes, where the prompt started — `prompt_tuning_init`:
/// `UNIFORM` or `PATCHES` for VPT, `ZEROS` for a pixel frame —, the backbone's fingerprint and
/// the weights' SHA-256).
pub fn save_classifier(
    dir: &Path,
    model: &VisualClassifier,
    backbone: &dyn VisionBackbone,
    base_model: &str,
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let d = backbone.spec().hidden_size;
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (p, w, b) = (
        bytes(model.prompt.values()),
        bytes(&model.head_w),
        bytes(&model.head_b),
    );
    let n = model.prompt.num_virtual_tokens();
    let width = model.prompt.hidden_size();
    let c = model.head_b.len();
    fn view(shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>> {
        TensorView::new(Dtype::F32, shape, data).map_err(|e| Error::Shape(e.to_string()))
    }
    let tensors = vec![
        ("prompt_embeddings", view(vec![n, width], &p)?),
        ("head.weight", view(vec![c, d], &w)?),
        ("head.bias", view(vec![c], &b)?),
    ];
    let weights = safetensors::serialize(tensors, None)
        .map_err(|e| Error::InvalidArgument(format!("serializing the classifier: {e}")))?;
    let config = serde_json::json!({
        "peft_type": VISUAL_PEFT_TYPE,
        "task_type": "IMAGE_CLASSIFICATION",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": n,
        "token_dim": d,
        "num_layers": backbone.config().num_hidden_layers,
        "placement": model.prompt.placement().as_str(),
        "image_size": model.image_size,
        "classes": model.classes,
        "prompt_tuning_init": match (model.init, model.prompt.placement()) {
            (Some(init), _) => Some(init.config_value()),
            (None, Placement::Pixels) => Some("ZEROS"),
            (None, _) => None,
        },
        "softprompt": {
            "backbone_fingerprint": backbone.spec().fingerprint,
            "weights_sha256": softprompt_store::sha256_hex(&weights),
        },
    });
    let json = serde_json::to_vec_pretty(&config)
        .map_err(|e| Error::InvalidArgument(format!("writing the config: {e}")))?;
    softprompt_store::write_folder(
        dir,
        &[
            (softprompt_store::ADAPTER_WEIGHTS, &weights),
            (softprompt_store::ADAPTER_CONFIG, &json),
        ],
    )
}

/// Whether `dir` holds a visual classifier (its config's `peft_type` says so).
pub fn is_visual_folder(dir: &Path) -> bool {
    std::fs::read(dir.join(softprompt_store::ADAPTER_CONFIG))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|c| c["peft_type"] == VISUAL_PEFT_TYPE)
}

/// Reads a folder [`save_classifier`] wrote, without a backbone: its config and classifier,
/// checking that the weights are the ones the config names and that the shapes agree. Use
/// [`check_classifier`] before running it on a backbone.
pub fn read_classifier(dir: &Path) -> Result<(serde_json::Value, VisualClassifier)> {
    let cfg_path = dir.join(softprompt_store::ADAPTER_CONFIG);
    let bad = |path: &Path, reason: String| Error::Data {
        path: path.to_path_buf(),
        line: 0,
        reason,
    };
    let weights_path = dir.join(softprompt_store::ADAPTER_WEIGHTS);
    // both files of one save, even while another save replaces the folder
    let (raw, bytes) = softprompt_store::read_folder_pair(dir)?;
    let cfg: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|e| bad(&cfg_path, format!("not JSON: {e}")))?;
    if cfg["peft_type"] != VISUAL_PEFT_TYPE {
        return Err(bad(
            &cfg_path,
            format!("a {} prompt, not a visual one", cfg["peft_type"]),
        ));
    }
    let bytes = bytes.ok_or_else(|| {
        Error::io(
            &weights_path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })?;
    if cfg["softprompt"]["weights_sha256"].as_str()
        != Some(softprompt_store::sha256_hex(&bytes).as_str())
    {
        return Err(bad(
            &weights_path,
            "not the weights its config names (weights_sha256 differs)".into(),
        ));
    }
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(&weights_path, format!("not safetensors: {e}")))?;
    let tensor = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(&weights_path, format!("no `{name}`")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(bad(&weights_path, format!("`{name}` is not f32")));
        }
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((t.shape().to_vec(), v))
    };
    let placement = match cfg["placement"].as_str() {
        Some("after_class_token") => Placement::AfterClassToken,
        Some("deep_after_class_token") => Placement::DeepAfterClassToken,
        Some("pixels") => Placement::Pixels,
        other => {
            return Err(bad(
                &cfg_path,
                format!("unknown visual prompt placement {other:?}"),
            ))
        }
    };
    let (shape, values) = tensor("prompt_embeddings")?;
    let [n, width] = shape[..] else {
        return Err(bad(
            &weights_path,
            format!("prompt_embeddings of shape {shape:?}"),
        ));
    };
    let prompt = SoftPrompt::new(n, width, values)?.with_placement(placement);
    let (_, head_w) = tensor("head.weight")?;
    let (_, head_b) = tensor("head.bias")?;
    let classes: Vec<String> = cfg["classes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let d = cfg["token_dim"].as_u64().unwrap_or(0) as usize;
    if classes.is_empty() || head_b.len() != classes.len() || head_w.len() != classes.len() * d {
        return Err(bad(
            &weights_path,
            format!(
                "a head of {} values and {} biases for {} classes of width {d}",
                head_w.len(),
                head_b.len(),
                classes.len()
            ),
        ));
    }
    let image_size = cfg["image_size"]
        .as_u64()
        .filter(|s| *s > 0)
        .ok_or_else(|| bad(&cfg_path, "no image_size".into()))? as usize;
    // informational (nothing at inference depends on it): absent in older folders
    let init = match &cfg["prompt_tuning_init"] {
        serde_json::Value::Null => None,
        serde_json::Value::String(v) if v == "ZEROS" => None,
        serde_json::Value::String(v) if v == "UNIFORM" => Some(VptInit::Uniform),
        serde_json::Value::String(v) if v == "PATCHES" => Some(VptInit::Patches),
        other => {
            return Err(bad(
                &cfg_path,
                format!("unknown prompt_tuning_init {other} (UNIFORM, PATCHES or ZEROS)"),
            ))
        }
    };
    let model = VisualClassifier {
        prompt,
        head_w,
        head_b,
        classes,
        image_size,
        init,
        losses: Vec::new(),
        validation: Vec::new(),
    };
    Ok((cfg, model))
}

/// Checks that a classifier [`read_classifier`] returned was trained on `backbone` (its
/// recorded fingerprint) and fits its width.
pub fn check_classifier(
    cfg: &serde_json::Value,
    model: &VisualClassifier,
    backbone: &dyn VisionBackbone,
) -> Result<()> {
    let spec = backbone.spec();
    let fp = cfg["softprompt"]["backbone_fingerprint"]
        .as_str()
        .unwrap_or("");
    if fp != spec.fingerprint {
        return Err(Error::FingerprintMismatch {
            prompt: fp.to_string(),
            backbone: spec.fingerprint.clone(),
        });
    }
    if model.head_w.len() != model.classes.len() * spec.hidden_size {
        return Err(Error::HiddenSizeMismatch {
            prompt: model.head_w.len() / model.classes.len().max(1),
            backbone: spec.hidden_size,
        });
    }
    Ok(())
}

/// Class log-probabilities (log-softmax of the head's logits) of `features [rows, d]`.
pub fn class_logprobs(model: &VisualClassifier, features: &[f32], d: usize) -> Vec<Vec<f64>> {
    let logits = head_logits(features, &model.head_w, &model.head_b, d);
    logits
        .chunks(model.head_b.len().max(1))
        .map(|z| {
            let m = z.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)) as f64;
            let lse = m + z.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln();
            z.iter().map(|v| *v as f64 - lse).collect()
        })
        .collect()
}

/// Predicted class of each image `indices` of `set`.
pub fn predict(
    backbone: &dyn VisionBackbone,
    model: &VisualClassifier,
    set: &ImageSet,
    indices: &[usize],
    eval_batch_size: usize,
) -> Result<Vec<usize>> {
    let d = backbone.spec().hidden_size;
    let config = VisionConfig {
        image_size: model.image_size,
        eval_batch_size,
        ..VisionConfig::default()
    };
    let f = features(backbone, &model.prompt, set, indices, &config)?;
    let logits = head_logits(&f, &model.head_w, &model.head_b, d);
    let c = model.head_b.len();
    let mut out = Vec::with_capacity(indices.len());
    for z in logits.chunks(c) {
        if z.iter().any(|v| v.is_nan()) {
            return Err(Error::NonFiniteScores {
                what: "class logits".into(),
            });
        }
        out.push(softprompt_core::generate::argmax(z) as usize);
    }
    Ok(out)
}

/// Fraction of `indices` classified correctly.
pub fn accuracy(
    backbone: &dyn VisionBackbone,
    model: &VisualClassifier,
    set: &ImageSet,
    indices: &[usize],
    eval_batch_size: usize,
) -> Result<f64> {
    accuracy_with(
        backbone,
        model,
        set,
        indices,
        eval_batch_size,
        &SingleProcess,
    )
}

/// [`accuracy`] with the images shared among the ranks of `group` (each classifies its
/// contiguous share; the counts are summed): every rank returns the same figure.
pub fn accuracy_with(
    backbone: &dyn VisionBackbone,
    model: &VisualClassifier,
    set: &ImageSet,
    indices: &[usize],
    eval_batch_size: usize,
    group: &dyn Collective,
) -> Result<f64> {
    let (lo, hi) = shard(indices.len(), group.rank(), group.world_size());
    let mine = &indices[lo..hi];
    let right = if mine.is_empty() {
        0
    } else {
        let pred = predict(backbone, model, set, mine, eval_batch_size)?;
        pred.iter()
            .zip(mine)
            .filter(|(p, i)| **p == set.labels[**i])
            .count()
    };
    let mut counts = [right as f64];
    group.all_reduce_sum(&mut counts)?;
    Ok(counts[0] / indices.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One digits row: 64 pixel values and the digit.
    fn digits_row(fill: u8, digit: u8) -> String {
        let mut v: Vec<String> = (0..64)
            .map(|i| ((i as u8 + fill) % 17).to_string())
            .collect();
        v.push(digit.to_string());
        v.join(",")
    }

    #[test]
    fn digits_load_split_and_refuse_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<String> = (0..12).map(|i| digits_row(i, i % 10)).collect();
        let plain = dir.path().join("digits.csv");
        std::fs::write(&plain, rows.join("\n") + "\n").unwrap();
        let (train, test) = load_digits(&plain).unwrap();
        // every fifth row (4, 9) is held out
        assert_eq!((train.len(), test.len()), (10, 2));
        assert_eq!(test.labels, vec![4, 9]);
        assert_eq!((test.height, test.width, test.channels), (8, 8, 1));
        // 0..=16 scaled to 0..=255: row 4's first pixel is 4 -> 64, its last (67 % 17 = 16) -> 255
        assert_eq!(test.pixels[0], 64);
        assert_eq!(test.pixels[63], ((16u32 * 255 + 8) / 16) as u8);
        assert_eq!(test.pixels[63], 255);
        assert_eq!(train.classes.len(), 10);

        // gzip-compressed: the same images
        let gz = dir.path().join("digits.csv.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, (rows.join("\n") + "\n").as_bytes()).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(load_digits(&gz).unwrap(), (train, test));

        for (bad, line) in [
            (digits_row(0, 10), 2),                       // digit out of range
            (digits_row(0, 3).replace(",3", ""), 2),      // 64 values
            (digits_row(0, 3).replacen("0", "17", 1), 2), // pixel over 16
            (digits_row(0, 3).replacen("0", "x", 1), 2),  // not a number
        ] {
            let f = dir.path().join("bad.csv");
            std::fs::write(&f, format!("{}\n{bad}\n", rows[0])).unwrap();
            match load_digits(&f) {
                Err(Error::Data { line: l, .. }) => assert_eq!(l, line, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let empty = dir.path().join("empty.csv");
        std::fs::write(&empty, "\n").unwrap();
        assert!(matches!(load_digits(&empty), Err(Error::Data { .. })));
    }

    /// Writes a `w × h` PNG (or JPEG, by extension) filled with one colour.
    fn write_image(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
            .save(path)
            .unwrap();
    }

    #[test]
    fn image_folders_load_resized_in_either_layout() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("flat");
        // two classes, sorted by name: "cat" (label 0) red PNGs, "dog" (label 1) blue JPEGs
        for i in 0..5 {
            write_image(&root.join(format!("cat/{i}.png")), 20 + i, 10, [255, 0, 0]);
            write_image(&root.join(format!("dog/{i}.JPG")), 7, 9 + i, [0, 0, 255]);
        }
        std::fs::write(root.join("cat/notes.txt"), "not an image").unwrap();
        let (train, test) = load_image_folder(&root, 6).unwrap();
        assert_eq!(train.classes, vec!["cat".to_string(), "dog".to_string()]);
        // the fifth image of each class is held out
        assert_eq!((train.len(), test.len()), (8, 2));
        assert_eq!(test.labels, vec![0, 1]);
        assert_eq!((train.height, train.width, train.channels), (6, 6, 3));
        assert_eq!(train.pixels.len(), 8 * 6 * 6 * 3);
        let px = |set: &ImageSet, i: usize| set.pixels[i * 108..i * 108 + 3].to_vec();
        assert_eq!(px(&test, 0), vec![255, 0, 0]);
        // JPEG is lossy: blue within a few levels
        let blue = px(&test, 1);
        assert!(blue[0] < 10 && blue[1] < 10 && blue[2] > 245, "{blue:?}");

        // train/ and test/ folders: used as they are
        let split = dir.path().join("split");
        write_image(&split.join("train/a/1.png"), 4, 4, [1, 2, 3]);
        write_image(&split.join("train/b/1.png"), 4, 4, [4, 5, 6]);
        write_image(&split.join("test/b/1.png"), 4, 4, [4, 5, 6]);
        let (train, test) = load_image_folder(&split, 4).unwrap();
        assert_eq!((train.len(), test.len()), (2, 1));
        assert_eq!(test.labels, vec![1]);
        assert_eq!(test.classes, train.classes);

        // a test class the training folder lacks
        write_image(&split.join("test/c/1.png"), 4, 4, [0, 0, 0]);
        let err = load_image_folder(&split, 4).unwrap_err().to_string();
        assert!(err.contains("`c`"), "{err}");
        // a file named .png that is not one
        std::fs::write(root.join("dog/broken.png"), b"not a png").unwrap();
        match load_image_folder(&root, 6) {
            Err(Error::Data { path, .. }) => assert!(path.ends_with("dog/broken.png")),
            other => panic!("{other:?}"),
        }
        // one class only
        let one = dir.path().join("one");
        write_image(&one.join("x/1.png"), 4, 4, [0, 0, 0]);
        assert!(load_image_folder(&one, 4).is_err());
        // an empty class folder
        std::fs::create_dir_all(one.join("y")).unwrap();
        let err = load_image_folder(&one, 4).unwrap_err().to_string();
        assert!(err.contains("no PNG or JPEG"), "{err}");
    }

    #[test]
    fn head_gradients_match_finite_differences() {
        let d = 3;
        let f = vec![0.5, -1.0, 2.0, 0.1, 0.3, -0.7];
        let w = vec![0.2, -0.1, 0.4, 0.0, 0.3, -0.2];
        let b = vec![0.1, -0.3];
        let labels = [1, 0];
        let (_, df, dw, db) = head_loss(&f, &labels, &w, &b, d);
        let eps = 1e-3;
        let fd = |g: &dyn Fn(f32) -> f32| (g(eps) - g(-eps)) / (2.0 * eps);
        for i in 0..f.len() {
            let num = fd(&|e| {
                let mut f2 = f.clone();
                f2[i] += e;
                head_loss(&f2, &labels, &w, &b, d).0
            });
            assert!((num - df[i]).abs() < 1e-3, "df[{i}]: {num} vs {}", df[i]);
        }
        for i in 0..w.len() {
            let num = fd(&|e| {
                let mut w2 = w.clone();
                w2[i] += e;
                head_loss(&f, &labels, &w2, &b, d).0
            });
            assert!((num - dw[i]).abs() < 1e-3, "dw[{i}]: {num} vs {}", dw[i]);
        }
        for i in 0..b.len() {
            let num = fd(&|e| {
                let mut b2 = b.clone();
                b2[i] += e;
                head_loss(&f, &labels, &w, &b2, d).0
            });
            assert!((num - db[i]).abs() < 1e-3, "db[{i}]: {num} vs {}", db[i]);
        }
    }

    #[test]
    fn frame_masks_the_border_only() {
        let m = frame_mask(1, 5, 1);
        let inner: Vec<usize> = (0..25).filter(|i| !m[*i]).collect();
        assert_eq!(inner, vec![6, 7, 8, 11, 12, 13, 16, 17, 18]);
        assert_eq!(frame_mask(3, 6, 3).iter().filter(|v| **v).count(), 3 * 36);
    }

    #[test]
    fn prepare_resizes_and_normalises() {
        // one 2×2 grey image: a constant image stays constant after resizing
        let set = ImageSet {
            height: 2,
            width: 2,
            channels: 1,
            pixels: vec![255, 255, 255, 255],
            labels: vec![0],
            classes: vec!["a".into()],
        };
        let img = set.prepare(&[0], 5, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]);
        assert_eq!((img.rows, img.channels, img.size), (1, 3, 5));
        assert!(img.pixels.iter().all(|v| (v - 1.0).abs() < 1e-6));
        // balanced picks: per class, no repeats
        let set = ImageSet {
            labels: vec![0, 1, 0, 1, 1],
            classes: vec!["a".into(), "b".into()],
            pixels: vec![0; 5 * 4],
            ..set
        };
        let mut p = set.balanced(2, 3);
        assert_eq!(p.len(), 4);
        p.sort();
        p.dedup();
        assert_eq!(p.len(), 4);
    }
}
