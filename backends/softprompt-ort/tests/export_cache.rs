//! The export cache: a model is exported once per weights fingerprint, reused afterwards, and
//! exported again when the cached file is damaged or belongs to other weights. Needs ONNX Runtime
//! (`source tools/ort-env.sh`).

use std::path::PathBuf;

use softprompt_core::model::ModelSource;
use softprompt_core::{Backbone, Batch, BatchRow, SoftPrompt};
use softprompt_ort::{export, OrtBackbone, OrtOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn logits(b: &OrtBackbone) -> Vec<f32> {
    let d = b.spec().hidden_size;
    let prompt =
        SoftPrompt::new(2, d, (0..2 * d).map(|i| (i as f32 * 0.37).sin()).collect()).unwrap();
    let batch = Batch::from_rows(&[BatchRow::with_continuation(&[5, 9, 2], &[7], 0)], 0).unwrap();
    b.logits(&[prompt], &batch).unwrap()
}

#[test]
fn exports_once_reuses_the_cache_and_redoes_a_damaged_or_foreign_file() {
    let cache = tempfile::tempdir().unwrap();
    let opts = || OrtOptions::new().with_cache_dir(cache.path());
    let first = OrtBackbone::load(fixture("tiny-llama"), opts()).unwrap();
    let path = first.onnx_path().to_path_buf();
    assert!(path.starts_with(cache.path()));
    let reference = logits(&first);
    let written = std::fs::metadata(&path).unwrap();
    drop(first);

    // the same weights: the file is opened, not rewritten
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = OrtBackbone::load(fixture("tiny-llama"), opts()).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        written.modified().unwrap(),
        "a cached export of the same weights is reused"
    );
    assert_eq!(logits(&again), reference);
    drop(again);

    // a truncated file (a killed export of an older version, a full disk) is exported again
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let repaired = OrtBackbone::load(fixture("tiny-llama"), opts()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap().len(), bytes.len());
    assert_eq!(logits(&repaired), reference);
    drop(repaired);

    // a valid export of other weights under this name is detected by its fingerprint metadata
    let other = ModelSource::load(fixture("tiny-qwen2")).unwrap();
    export::export_to_file(other, &path).unwrap();
    let redone = OrtBackbone::load(fixture("tiny-llama"), opts()).unwrap();
    assert_eq!(logits(&redone), reference);
    assert_eq!(std::fs::read(&path).unwrap().len(), bytes.len());
    // no temporary files are left behind
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn the_exported_file_declares_prompts_as_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let n = export::export_to_file(ModelSource::load(fixture("tiny-gpt2")).unwrap(), &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len(), n);
    use onnx_protobuf::Message;
    let model = onnx_protobuf::ModelProto::parse_from_bytes(&bytes).unwrap();
    let graph = model.graph.as_ref().unwrap();
    let inputs: Vec<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    for want in [
        "input_ids",
        "prompt_embeds",
        "position_ids",
        "attention_bias",
        "gather_index",
        "candidate_ids",
        "past_key.0",
    ] {
        assert!(inputs.contains(&want), "{want} missing from {inputs:?}");
    }
    assert_eq!(model.opset_import[0].version, export::OPSET);
    let fingerprint = ModelSource::load(fixture("tiny-gpt2"))
        .unwrap()
        .spec
        .fingerprint;
    assert!(model
        .metadata_props
        .iter()
        .any(|m| m.key == export::META_FINGERPRINT && m.value == fingerprint));
    // every weight is stored once: the tied head reuses the embedding initializer
    let mut names: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let total = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), total);
    assert!(!names.contains(&"lm_head.weight"));
}
