//! The vision transformer (one model file over the op seam), on every backend that runs it,
//! against transformers' Dinov2Model on the tiny random fixture: class-token features with no prompt, VPT-shallow and VPT-deep
//! prompts, at the pretraining grid and at another (the position table resized bicubically),
//! and the gradient of <features, dfeat> with respect to every prompt, also checked against
//! finite differences.

use safetensors::SafeTensors;
use softprompt::{Images, Placement, SoftPrompt, VisionBackbone};
use softprompt_tests::fixture_model;

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load() -> Self {
        let path = fixture_model("tiny-dinov2").join("vit-reference.safetensors");
        Reference {
            bytes: std::fs::read(path).unwrap(),
        }
    }

    fn f64s(&self, name: &str) -> (Vec<usize>, Vec<f64>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        self.f64s(name).1.into_iter().map(|x| x as f32).collect()
    }

    fn index(&self) -> Vec<usize> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        st.tensor("prompt_index")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize)
            .collect()
    }

    fn prompts(&self, kind: &str) -> Vec<SoftPrompt> {
        let (shape, v) = self.f64s(kind);
        let (n, w) = (shape[1], shape[2]);
        let placement = if kind == "deep" {
            Placement::DeepAfterClassToken
        } else if kind.starts_with("pattern") {
            Placement::Pixels
        } else {
            Placement::AfterClassToken
        };
        v.chunks(n * w)
            .map(|c| {
                SoftPrompt::new(n, w, c.iter().map(|x| *x as f32).collect())
                    .unwrap()
                    .with_placement(placement)
            })
            .collect()
    }

    fn images(&self, size: usize) -> Images {
        Images::new(3, 3, size, self.f32s(&format!("pixels_{size}"))).unwrap()
    }
}

/// The reference tensor holding a kind's prompts (pixel patterns are per image size).
fn table(kind: &str, size: usize) -> String {
    if kind == "pixels" {
        format!("pattern_{size}")
    } else {
        kind.to_string()
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The fixture on every compiled-in backend (`gradients`: those that compute them, not ort).
fn backbones(gradients: bool) -> Vec<Box<dyn VisionBackbone>> {
    softprompt::available_backends()
        .into_iter()
        .filter(|b| !gradients || *b != "ort")
        .map(|b| softprompt::load_vision_backbone(b, fixture_model("tiny-dinov2"), "cpu").unwrap())
        .collect()
}

#[test]
fn features_match_transformers_with_and_without_prompts_at_two_resolutions() {
    let r = Reference::load();
    for b in backbones(false) {
        let b = b.as_ref();
        let index = r.index();
        for size in [16, 24] {
            let images = r.images(size);
            let empty = [SoftPrompt::empty(32).with_placement(Placement::AfterClassToken)];
            let none = b.features(&empty, &[0, 0, 0], &images).unwrap();
            let diff = max_diff(&none, &r.f32s(&format!("features_none_{size}")));
            eprintln!("{size} px, no prompt: max |Δ| = {diff:e}");
            assert!(diff <= 1e-4, "{size} px, no prompt: {diff:e}");
            for kind in ["shallow", "deep", "pixels"] {
                let prompts = r.prompts(&table(kind, size));
                let f = b.features(&prompts, &index, &images).unwrap();
                let diff = max_diff(&f, &r.f32s(&format!("features_{kind}_{size}")));
                eprintln!("{} {size} px, {kind}: max |Δ| = {diff:e}", b.backend_name());
                assert!(diff <= 1e-4, "{size} px, {kind}: {diff:e}");
            }
        }
    }
}

#[test]
fn prompt_gradients_match_transformers_and_finite_differences() {
    let r = Reference::load();
    for b in backbones(true) {
        let b = b.as_ref();
        let index = r.index();
        for size in [16, 24] {
            let images = r.images(size);
            let dfeat = r.f32s(&format!("dfeat_{size}"));
            for kind in ["shallow", "deep", "pixels"] {
                let prompts = r.prompts(&table(kind, size));
                let mut loss = |f: &[f32]| -> softprompt::Result<(f32, Vec<f32>)> {
                    let l = f.iter().zip(&dfeat).map(|(a, b)| a * b).sum();
                    Ok((l, dfeat.clone()))
                };
                let (_, grads) = b
                    .features_grad(&prompts, &index, &images, &mut loss)
                    .unwrap();
                let want = r.f32s(&format!("grad_{kind}_{size}"));
                let got: Vec<f32> = grads.concat();
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = max_diff(&got, &want);
                eprintln!("{size} px, {kind}: max |Δgrad| = {diff:e} (max |grad| {scale:e})");
                assert!(diff <= 1e-4 * scale, "{size} px, {kind}: {diff:e}");

                // central differences on a few coordinates of each prompt, in f64 over f32 features
                let value = |ps: &[SoftPrompt]| -> f64 {
                    let f = b.features(ps, &index, &images).unwrap();
                    f.iter()
                        .zip(&dfeat)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum()
                };
                let eps = 1e-2f32;
                for (p, g) in grads.iter().enumerate() {
                    for k in [0, g.len() / 2, g.len() - 1] {
                        let mut plus = prompts.clone();
                        plus[p].values_mut()[k] += eps;
                        let mut minus = prompts.clone();
                        minus[p].values_mut()[k] -= eps;
                        let fd = (value(&plus) - value(&minus)) / (2.0 * eps as f64);
                        let err = (fd - g[k] as f64).abs();
                        assert!(
                            err <= 2e-3 * (1.0 + fd.abs()),
                            "{size} px {kind} prompt {p}[{k}]: fd {fd} vs {}",
                            g[k]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bad_visual_inputs_are_refused_by_name() {
    let r = Reference::load();
    for b in backbones(false) {
        let b = b.as_ref();
        let images = r.images(16);
        // a text placement, a wrong width, mismatched indices, images of another channel count
        let text = SoftPrompt::new(2, 32, vec![0.0; 64]).unwrap();
        let err = b.features(&[text], &[0, 0, 0], &images).unwrap_err();
        assert!(err.to_string().contains("input_embeddings"), "{err}");
        let wide = SoftPrompt::new(2, 64, vec![0.0; 128])
            .unwrap()
            .with_placement(Placement::AfterClassToken);
        assert!(b.features(&[wide], &[0, 0, 0], &images).is_err());
        let p = r.prompts("shallow");
        assert!(b.features(&p, &[0, 2, 0], &images).is_err());
        assert!(b.features(&p, &[0, 1], &images).is_err());
        let grey = Images::new(1, 1, 16, vec![0.0; 256]).unwrap();
        assert!(b.features(&p, &[0], &grey).is_err());
    }
}

#[test]
fn a_backend_without_gradients_says_so() {
    for b in backbones(false) {
        if b.backend_name() != "ort" {
            continue;
        }
        let r = Reference::load();
        let images = r.images(16);
        let p = r.prompts("shallow");
        let mut loss = |f: &[f32]| -> softprompt::Result<(f32, Vec<f32>)> { Ok((0.0, f.to_vec())) };
        let err = b
            .features_grad(&p, &[0, 1, 0], &images, &mut loss)
            .unwrap_err();
        assert!(err.to_string().contains("gradients"), "{err}");
    }
}

/// Every block's input (what `--init patches` starts visual prompt tokens from) equals
/// transformers' `hidden_states[..layers]` on every backend, and features asked for after it
/// are untouched.
#[test]
fn block_inputs_match_transformers_hidden_states() {
    let r = Reference::load();
    for b in backbones(false) {
        let name = b.backend_name().to_string();
        for size in [16, 24] {
            let images = r.images(size);
            let h = b.block_inputs(&images).unwrap();
            let want = r.f32s(&format!("hidden_{size}"));
            assert_eq!(h.len(), want.len(), "{name} {size} px");
            let diff = max_diff(&h, &want);
            eprintln!("{name} {size} px, block inputs: max |Δ| = {diff:e}");
            assert!(diff <= 1e-4, "{name} {size} px: {diff:e}");
            let empty = [SoftPrompt::empty(32).with_placement(Placement::AfterClassToken)];
            let none = b.features(&empty, &[0, 0, 0], &images).unwrap();
            let diff = max_diff(&none, &r.f32s(&format!("features_none_{size}")));
            assert!(diff <= 1e-4, "{name} {size} px, features after: {diff:e}");
        }
    }
}

/// `--init patches`: every VPT token starts, at every block, as the hidden state that one
/// patch of one training image has there (the same patch at every block), the uniform start is
/// untouched by it, and a method without prompt tokens refuses it.
#[test]
fn visual_prompt_tokens_start_as_real_patches() {
    use softprompt::train::vision::{
        read_classifier, save_classifier, train_classifier, PromptOptimizer, VisionConfig,
        VisionMethod, VptInit,
    };
    let set = two_class_images(6);
    let train: Vec<usize> = (0..4).collect();
    let (d, layers, tokens) = (32, 2, 17);
    for b in backbones(false) {
        let images = set.prepare(
            &train,
            16,
            softprompt::train::vision::IMAGENET_MEAN,
            softprompt::train::vision::IMAGENET_STD,
        );
        let states = b.block_inputs(&images).unwrap();
        let state = |l: usize, i: usize, t: usize| {
            let at = ((l * train.len() + i) * tokens + t) * d;
            &states[at..at + d]
        };
        for (method, width) in [
            (VisionMethod::VptDeep(3), layers),
            (VisionMethod::VptShallow(3), 1),
        ] {
            let config = VisionConfig {
                method,
                steps: 0,
                batch_size: 2,
                image_size: 16,
                seed: 7,
                head_warmup: 1,
                prompt_optimizer: PromptOptimizer::AdamW,
                vpt_init: VptInit::Patches,
                ..VisionConfig::default()
            };
            let model = train_classifier(b.as_ref(), &set, &train, &config).unwrap();
            assert_eq!(model.init, Some(VptInit::Patches));
            // the start is recorded in the saved folder and read back; an unknown one is refused
            let dir = tempfile::tempdir().unwrap();
            save_classifier(dir.path(), &model, b.as_ref(), "tiny-dinov2").unwrap();
            let (cfg, back) = read_classifier(dir.path()).unwrap();
            assert_eq!(cfg["prompt_tuning_init"], "PATCHES");
            assert_eq!(back.init, Some(VptInit::Patches));
            assert_eq!(back.prompt, model.prompt);
            let path = dir.path().join("adapter_config.json");
            let edited = std::fs::read_to_string(&path)
                .unwrap()
                .replace("\"PATCHES\"", "\"NOISE\"");
            std::fs::write(&path, edited).unwrap();
            let err = read_classifier(dir.path()).unwrap_err();
            assert!(
                matches!(err, softprompt::Error::Data { .. })
                    && err.to_string().contains("prompt_tuning_init"),
                "{err}"
            );
            let values = model.prompt.values();
            assert_eq!(values.len(), 3 * width * d);
            let mut patches = Vec::new();
            for j in 0..3 {
                let token = &values[j * width * d..(j + 1) * width * d];
                // the (image, patch) whose hidden states at every block are this token's
                let found = (0..train.len())
                    .flat_map(|i| (1..tokens).map(move |t| (i, t)))
                    .find(|&(i, t)| {
                        (0..width)
                            .all(|l| max_diff(&token[l * d..(l + 1) * d], state(l, i, t)) <= 1e-6)
                    });
                let found = found.unwrap_or_else(|| {
                    panic!(
                        "{} {method:?}: token {j} is no patch's hidden states",
                        b.backend_name()
                    )
                });
                patches.push(found);
            }
            assert!(
                patches.windows(2).any(|w| w[0] != w[1]),
                "{method:?}: three draws of one patch {patches:?}"
            );
            let uniform = train_classifier(
                b.as_ref(),
                &set,
                &train,
                &VisionConfig {
                    vpt_init: VptInit::Uniform,
                    ..config.clone()
                },
            )
            .unwrap();
            let bound = (6.0f32 / (48 + d) as f32).sqrt();
            assert!(uniform.prompt.values().iter().all(|v| v.abs() <= bound));
            assert!(
                values.iter().any(|v| v.abs() > bound),
                "{method:?}: patches look uniform"
            );
        }
        for method in [VisionMethod::Linear, VisionMethod::PixelFrame(2)] {
            let config = VisionConfig {
                method,
                image_size: 16,
                vpt_init: VptInit::Patches,
                ..VisionConfig::default()
            };
            let err = train_classifier(b.as_ref(), &set, &train, &config).unwrap_err();
            assert!(
                matches!(err, softprompt::Error::InvalidArgument(_))
                    && err.to_string().contains("patches"),
                "{method:?}: {err}"
            );
        }
    }
}

/// Two classes of 8×8 grey images: dark (class 0) and light (class 1), with a pattern.
fn two_class_images(n: usize) -> softprompt::train::vision::ImageSet {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let class = i % 2;
        for p in 0..64 {
            let base = if class == 0 { 40 } else { 200 };
            pixels.push((base + (p * 7 + i * 13) % 40) as u8);
        }
        labels.push(class);
    }
    softprompt::train::vision::ImageSet {
        height: 8,
        width: 8,
        channels: 1,
        pixels,
        labels,
        classes: vec!["dark".into(), "light".into()],
    }
}

/// Gradient-free visual prompts (SPSA from forward passes) train on every backend, ort included:
/// the prompt moves (a pixel pattern only in its frame), and the same seed gives the same prompt,
/// head and losses on every backend (the runs see the same losses to float rounding).
#[test]
fn visual_prompts_train_without_gradients_on_every_backend() {
    use softprompt::train::vision::{
        frame_mask, train_classifier, PromptOptimizer, VisionConfig, VisionMethod, VptInit,
    };
    let set = two_class_images(12);
    let train: Vec<usize> = (0..8).collect();
    for method in [
        VisionMethod::VptShallow(2),
        VisionMethod::VptDeep(2),
        VisionMethod::PixelFrame(3),
    ] {
        let config = VisionConfig {
            method,
            steps: 6,
            batch_size: 4,
            lr: 0.05,
            head_lr: 0.05,
            image_size: 16,
            seed: 3,
            eval_batch_size: 8,
            head_warmup: 5,
            prompt_optimizer: PromptOptimizer::Spsa {
                eps: 0.01,
                perturbations: 2,
            },
            vpt_init: VptInit::Uniform,
            ..VisionConfig::default()
        };
        let mut runs = Vec::new();
        for b in backbones(false) {
            let model = train_classifier(b.as_ref(), &set, &train, &config).unwrap();
            assert_eq!(model.losses.len(), 6, "{}", b.backend_name());
            assert!(model.losses.iter().all(|l| l.is_finite()));
            runs.push((b.backend_name().to_string(), model));
        }
        // where it started: the same run with no prompt step
        let start = train_classifier(
            backbones(false)[0].as_ref(),
            &set,
            &train,
            &VisionConfig {
                steps: 0,
                ..config.clone()
            },
        )
        .unwrap();
        let (first, reference) = &runs[0];
        let moved = max_diff(reference.prompt.values(), start.prompt.values());
        assert!(moved > 1e-4, "{method:?}: the prompt moved by {moved}");
        if let VisionMethod::PixelFrame(w) = method {
            let mask = frame_mask(3, 16, w);
            let outside = reference
                .prompt
                .values()
                .iter()
                .zip(&mask)
                .filter(|(_, m)| !**m)
                .map(|(v, _)| v.abs())
                .fold(0f32, f32::max);
            assert_eq!(outside, 0.0, "the pattern is trained in its frame only");
        }
        for (name, model) in &runs[1..] {
            let dp = max_diff(model.prompt.values(), reference.prompt.values());
            let dw = max_diff(&model.head_w, &reference.head_w);
            let dl = max_diff(&model.losses, &reference.losses);
            assert!(
                dp < 1e-3 && dw < 1e-3 && dl < 1e-4,
                "{method:?}: {name} vs {first}: prompt {dp}, head {dw}, losses {dl}"
            );
        }
    }
}

/// Data-parallel visual prompt tuning over in-process ranks (`ThreadGroup`): each rank takes
/// its share of every global batch (5 images over 2 ranks: shares of 3 and 2; over 3 ranks:
/// 2, 2, 1) and every rank ends with the classifier one process trains, to float rounding of
/// the weighted sums; the ranks agree bit for bit. Sharded accuracy counts equal one process's.
#[test]
fn data_parallel_ranks_train_the_visual_prompt_one_process_trains() {
    use softprompt::train::vision::{
        accuracy, accuracy_with, train_classifier, train_classifier_with, PromptOptimizer,
        VisionConfig, VisionMethod, VisualClassifier, VptInit,
    };
    use softprompt::{Collective, ThreadGroup};
    let set = two_class_images(12);
    let train: Vec<usize> = (0..10).collect();
    let test: Vec<usize> = (0..12).collect();
    let spsa = PromptOptimizer::Spsa {
        eps: 0.01,
        perturbations: 2,
    };
    for b in backbones(false) {
        let gradients = b.backend_name() != "ort";
        for (method, optimizer) in [
            (VisionMethod::Linear, PromptOptimizer::AdamW),
            (VisionMethod::VptShallow(2), PromptOptimizer::AdamW),
            (VisionMethod::VptDeep(2), PromptOptimizer::AdamW),
            (VisionMethod::PixelFrame(3), PromptOptimizer::AdamW),
            (VisionMethod::VptDeep(2), spsa),
        ] {
            if !gradients && optimizer == PromptOptimizer::AdamW && method != VisionMethod::Linear {
                continue;
            }
            let config = VisionConfig {
                method,
                steps: 6,
                batch_size: 5,
                lr: 0.05,
                head_lr: 0.05,
                image_size: 16,
                seed: 5,
                eval_batch_size: 4,
                head_warmup: 4,
                prompt_optimizer: optimizer,
                vpt_init: VptInit::Uniform,
                ..VisionConfig::default()
            };
            let one = train_classifier(b.as_ref(), &set, &train, &config).unwrap();
            // the prompt moved: the comparison is not of two untouched starts
            if method != VisionMethod::Linear {
                let start = VisionConfig {
                    steps: 0,
                    ..config.clone()
                };
                let start = train_classifier(b.as_ref(), &set, &train, &start).unwrap();
                let moved = max_diff(one.prompt.values(), start.prompt.values());
                assert!(moved > 1e-3, "{method:?}: the prompt moved by {moved}");
            }
            let acc = accuracy(b.as_ref(), &one, &set, &test, 4).unwrap();
            for ranks in [2, 3] {
                let group = ThreadGroup::new(ranks, std::time::Duration::from_secs(60));
                let runs: Vec<(VisualClassifier, f64)> = std::thread::scope(|scope| {
                    let handles: Vec<_> = group
                        .into_iter()
                        .map(|g| {
                            let (b, set, train, test, config) =
                                (b.as_ref(), &set, &train, &test, &config);
                            scope.spawn(move || {
                                let m = train_classifier_with(b, set, train, config, &g).unwrap();
                                let a = accuracy_with(b, &m, set, test, 4, &g).unwrap();
                                assert_eq!(g.world_size(), ranks);
                                (m, a)
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let what = format!(
                    "{} {method:?} {optimizer:?} on {ranks} ranks",
                    b.backend_name()
                );
                for (m, a) in &runs[1..] {
                    assert_eq!(m, &runs[0].0, "{what}: the ranks differ");
                    assert_eq!(*a, runs[0].1, "{what}");
                }
                let (m, a) = &runs[0];
                let scale = one.prompt.values().iter().fold(1f32, |s, v| s.max(v.abs()));
                let dp = max_diff(m.prompt.values(), one.prompt.values());
                let dw = max_diff(&m.head_w, &one.head_w);
                let db = max_diff(&m.head_b, &one.head_b);
                let dl = max_diff(&m.losses, &one.losses);
                assert!(
                    dp <= 2e-6 * scale && dw <= 1e-6 && db <= 1e-6 && dl <= 1e-6,
                    "{what}: prompt {dp}, head {dw} / {db}, losses {dl}"
                );
                assert_eq!(m.losses.len(), one.losses.len());
                assert_eq!(*a, acc, "{what}: sharded accuracy");
                eprintln!("{what}: prompt {dp:.2e}, head {dw:.2e}, losses {dl:.2e}");
            }
        }
    }
}

/// Training with validation images keeps the first best evaluation: the curve has the steps
/// asked for (a prompt method's start at step 0), the classifier returned is the run stopped at
/// the kept step and scores the curve's best on the validation images, ranks keep the same one;
/// a schedule whose rate is zero after step 1 leaves the prompt and head where step 1 put them;
/// the validation draw is disjoint from the unchanged few-shot draw.
#[test]
fn validation_keeps_the_best_step_and_schedules_scale_the_rates() {
    use softprompt::train::vision::{
        accuracy, train_classifier, train_classifier_selecting, PromptOptimizer, VisionConfig,
        VisionMethod,
    };
    use softprompt::train::Schedule;
    use softprompt::{SingleProcess, ThreadGroup};
    let set = two_class_images(24);
    let (train, val) = set.balanced_split(5, 4, 11);
    assert_eq!(train, set.balanced(5, 11), "the shots do not change");
    assert_eq!((train.len(), val.len()), (10, 8));
    assert!(val.iter().all(|i| !train.contains(i)));
    assert_eq!(val.iter().filter(|i| set.labels[**i] == 0).count(), 4);
    // a class with fewer images than asked gives what it has
    let (_, few) = set.balanced_split(10, 5, 11);
    assert_eq!(few.len(), 4);
    for b in backbones(true) {
        for method in [
            VisionMethod::Linear,
            VisionMethod::VptDeep(2),
            VisionMethod::PixelFrame(3),
        ] {
            let config = VisionConfig {
                method,
                steps: 30,
                batch_size: 4,
                lr: 0.05,
                head_lr: 0.1,
                image_size: 16,
                seed: 2,
                eval_batch_size: 4,
                head_warmup: 0,
                prompt_optimizer: PromptOptimizer::AdamW,
                eval_every: 5,
                ..VisionConfig::default()
            };
            let what = format!("{} {method:?}", b.backend_name());
            let m =
                train_classifier_selecting(b.as_ref(), &set, &train, &val, &config, &SingleProcess)
                    .unwrap();
            let steps: Vec<usize> = m.validation.iter().map(|(s, _)| *s).collect();
            let expected: Vec<usize> = if method == VisionMethod::Linear {
                (1..=6).map(|k| 5 * k).collect()
            } else {
                (0..=6).map(|k| 5 * k).collect()
            };
            assert_eq!(steps, expected, "{what}");
            let best = m.validation.iter().map(|(_, a)| *a).fold(0.0, f64::max);
            let kept = m.validation.iter().find(|(_, a)| *a == best).unwrap().0;
            assert_eq!(m.kept_step(), Some(kept), "{what}");
            eprintln!("{what}: validation {:?}, kept step {kept}", m.validation);
            assert_eq!(
                accuracy(b.as_ref(), &m, &set, &val, 4).unwrap(),
                best,
                "{what}"
            );
            let stopped = train_classifier(
                b.as_ref(),
                &set,
                &train,
                &VisionConfig {
                    steps: kept,
                    ..config.clone()
                },
            )
            .unwrap();
            assert_eq!(m.prompt, stopped.prompt, "{what}: kept step {kept}");
            assert_eq!(
                (&m.head_w, &m.head_b),
                (&stopped.head_w, &stopped.head_b),
                "{what}"
            );
            assert_eq!(m.losses.len(), 30, "{what}: every step's loss");
            // without validation images: the plain run, the whole of it
            let plain = train_classifier(b.as_ref(), &set, &train, &config).unwrap();
            let unselected =
                train_classifier_selecting(b.as_ref(), &set, &train, &[], &config, &SingleProcess)
                    .unwrap();
            assert_eq!(plain, unselected, "{what}");
            if kept != 30 {
                assert_ne!(m.head_w, plain.head_w, "{what}: the last step was not kept");
            }
            assert!(plain.validation.is_empty());
            // two ranks keep the same step and classifier as one process
            let group = ThreadGroup::new(2, std::time::Duration::from_secs(60));
            let runs: Vec<_> = std::thread::scope(|scope| {
                let handles: Vec<_> = group
                    .into_iter()
                    .map(|g| {
                        let (b, set, train, val, config) =
                            (b.as_ref(), &set, &train, &val, &config);
                        scope.spawn(move || {
                            train_classifier_selecting(b, set, train, val, config, &g).unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in &runs {
                assert_eq!(r.validation, m.validation, "{what}: ranks' curves");
                assert!(max_diff(&r.head_w, &m.head_w) <= 1e-5, "{what}");
            }
            // a rate that is zero after the first step: the run ends where step 1 left it
            let one_step = VisionConfig {
                steps: 1,
                ..config.clone()
            };
            let decayed = VisionConfig {
                schedule: Schedule::WarmupLinear {
                    warmup: 0,
                    total: 1,
                },
                ..config.clone()
            };
            let (a, z) = (
                train_classifier(b.as_ref(), &set, &train, &one_step).unwrap(),
                train_classifier(b.as_ref(), &set, &train, &decayed).unwrap(),
            );
            assert_eq!(a.prompt, z.prompt, "{what}");
            assert_eq!((&a.head_w, &a.head_b), (&z.head_w, &z.head_b), "{what}");
            assert_ne!(plain.head_w, z.head_w, "{what}: the constant rate moves on");
        }
    }
}
