//! Directory store: round trips, PEFT files, atomicity, name safety, malformed input.

use std::path::PathBuf;

use softprompt_core::{
    Architecture, BackboneSpec, Error, PromptConfig, PromptStore, SoftPrompt, StoredPrompt,
};
use softprompt_store::{read_prompt_dir, DirectoryStore, ADAPTER_CONFIG, ADAPTER_WEIGHTS};

fn spec(fingerprint: &str, d: usize) -> BackboneSpec {
    BackboneSpec {
        architecture: Architecture::llama(),
        hidden_size: d,
        vocab_size: 320,
        num_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 0,
        head_dim: 0,
        fingerprint: fingerprint.into(),
        name: "tiny-llama".into(),
    }
}

fn stored(values: Vec<f32>, d: usize) -> StoredPrompt {
    let prompt = SoftPrompt::new(values.len() / d, d, values).unwrap();
    let mut config = PromptConfig::for_backbone(&prompt, &spec("ab12", d));
    let prov = config.softprompt.as_mut().unwrap();
    prov.template = Some("Review: {text}\nSentiment:".into());
    prov.labels = vec![
        ("negative".into(), " negative".into()),
        ("positive".into(), " positive".into()),
    ];
    prov.metrics.insert("dev_accuracy".into(), 0.75);
    prov.softprompt_version = "0.1.0".into();
    StoredPrompt {
        prompt,
        config,
        metadata: [("step".to_string(), "10".to_string())].into(),
    }
}

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(path)
}

#[tokio::test]
async fn save_load_round_trip_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirectoryStore::new(dir.path());
    let s = stored((0..64).map(|i| i as f32 * 0.25 - 3.0).collect(), 32);
    store.save("sentiment", &s).await.unwrap();
    let back = store.load("sentiment").await.unwrap();
    assert_eq!(back, s);
    let list = store.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "sentiment");
    assert_eq!(list[0].labels, vec![" negative", " positive"]);
    // overwriting replaces atomically and leaves no temporary files behind
    let s2 = stored(vec![1.0; 96], 32);
    store.save("sentiment", &s2).await.unwrap();
    assert_eq!(
        store
            .load("sentiment")
            .await
            .unwrap()
            .prompt
            .num_virtual_tokens(),
        3
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("sentiment"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    store.remove("sentiment").await.unwrap();
    assert!(matches!(
        store.load("sentiment").await,
        Err(Error::PromptNotFound(_))
    ));
}

#[tokio::test]
async fn saved_adapter_config_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirectoryStore::new(dir.path());
    store.save("p", &stored(vec![0.5; 64], 32)).await.unwrap();
    let text = std::fs::read_to_string(dir.path().join("p").join(ADAPTER_CONFIG)).unwrap();
    insta::assert_snapshot!("adapter_config", text);
}

#[tokio::test]
async fn loads_a_prompt_saved_by_peft() {
    let s = read_prompt_dir(&fixture("tiny-llama/peft-prompt"))
        .await
        .unwrap();
    assert_eq!(
        (s.prompt.num_virtual_tokens(), s.prompt.hidden_size()),
        (3, 32)
    );
    assert_eq!(s.config.peft_type, "PROMPT_TUNING");
    assert!(
        s.config.other.contains_key("peft_version"),
        "unknown PEFT keys are preserved"
    );
    // PEFT prompts carry no fingerprint: only the hidden size is checked
    assert!(s.check_backbone(&spec("anything", 32)).is_ok());
    assert!(matches!(
        s.check_backbone(&spec("x", 64)),
        Err(Error::HiddenSizeMismatch { .. })
    ));
}

#[tokio::test]
async fn mismatched_backbone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirectoryStore::new(dir.path());
    store.save("p", &stored(vec![0.5; 64], 32)).await.unwrap();
    assert!(store.load_for("p", &spec("ab12", 32)).await.is_ok());
    let err = store.load_for("p", &spec("ffff", 32)).await.unwrap_err();
    assert!(matches!(err, Error::FingerprintMismatch { .. }), "{err}");
    insta::assert_snapshot!("fingerprint_mismatch", err.to_string());
}

#[tokio::test]
async fn traversal_and_odd_names_are_refused() {
    let store = DirectoryStore::new("/nonexistent");
    for bad in ["../etc", "a/b", ".hidden", "", "x\\y", "a b"] {
        let err = store.load(bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
    }
}

#[tokio::test]
async fn malformed_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirectoryStore::new(dir.path());
    store.save("p", &stored(vec![0.5; 64], 32)).await.unwrap();
    let w = dir.path().join("p").join(ADAPTER_WEIGHTS);
    let good = std::fs::read(&w).unwrap();
    // truncated weights
    std::fs::write(&w, &good[..good.len() - 7]).unwrap();
    assert!(matches!(
        store.load("p").await,
        Err(Error::Safetensors { .. })
    ));
    // shape disagreeing with the config
    std::fs::write(&w, &good).unwrap();
    let c = dir.path().join("p").join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&c)
        .unwrap()
        .replace("\"num_virtual_tokens\": 2", "\"num_virtual_tokens\": 5");
    std::fs::write(&c, text).unwrap();
    let err = store.load("p").await.unwrap_err();
    assert!(matches!(err, Error::InvalidPrompt { .. }), "{err}");
    // not JSON
    std::fs::write(&c, "{").unwrap();
    assert!(matches!(store.load("p").await, Err(Error::Json { .. })));
    // another PEFT method
    std::fs::write(
        &c,
        r#"{"peft_type":"LORA","num_virtual_tokens":2,"token_dim":32}"#,
    )
    .unwrap();
    let err = store.load("p").await.unwrap_err();
    assert!(err.to_string().contains("PROMPT_TUNING"), "{err}");
}

#[tokio::test]
async fn etag_changes_when_a_prompt_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirectoryStore::new(dir.path());
    assert!(matches!(
        store.etag("sentiment").await,
        Err(Error::PromptNotFound(_))
    ));
    assert!(store.etag("../etc").await.is_err());
    store
        .save("sentiment", &stored(vec![0.5; 64], 32))
        .await
        .unwrap();
    let first = store.etag("sentiment").await.unwrap().unwrap();
    assert_eq!(store.etag("sentiment").await.unwrap().unwrap(), first);
    store
        .save("sentiment", &stored(vec![0.25; 96], 32))
        .await
        .unwrap();
    let second = store.etag("sentiment").await.unwrap().unwrap();
    assert_ne!(first, second, "a replaced prompt has a new tag");
    store.remove("sentiment").await.unwrap();
    assert!(matches!(
        store.etag("sentiment").await,
        Err(Error::PromptNotFound(_))
    ));
}

#[tokio::test]
async fn prompts_of_other_placements_are_not_written_as_prompt_tuning() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirectoryStore::new(dir.path());
    let mut s = stored(vec![0.5; 64], 32);
    s.prompt = s
        .prompt
        .with_placement(softprompt_core::Placement::KeyValuePrefix);
    // a prefix under a PROMPT_TUNING config is refused, and nothing is written
    let err = store.save("prefix", &s).await.unwrap_err();
    assert!(matches!(err, Error::InvalidPrompt { .. }), "{err}");
    assert!(err.to_string().contains("key_value_prefix"), "{err}");
    assert!(!dir.path().join("prefix").exists());
}

#[tokio::test]
async fn prefix_tuning_round_trips_in_peft_layout() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirectoryStore::new(dir.path());
    // 2 layers × (keys, values) × 8 per layer: width 32, PEFT's token_dim 8
    let values: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
    let prompt = SoftPrompt::new(2, 32, values)
        .unwrap()
        .with_placement(softprompt_core::Placement::KeyValuePrefix);
    let mut backbone = spec("ab12", 16);
    backbone.num_key_value_heads = 2;
    backbone.head_dim = 4;
    let method = softprompt_core::PromptMethod::PrefixTuning {
        projection: Some(12),
    };
    let config = PromptConfig::for_method(&prompt, &backbone, &method);
    let s = StoredPrompt {
        prompt: prompt.clone(),
        config,
        metadata: Default::default(),
    };
    store.save("prefix", &s).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("prefix").join(ADAPTER_CONFIG)).unwrap(),
    )
    .unwrap();
    assert_eq!(json["peft_type"], "PREFIX_TUNING");
    assert_eq!(json["token_dim"], 8);
    assert_eq!(json["num_attention_heads"], 2);
    assert_eq!(json["prefix_projection"], true);
    assert_eq!(json["encoder_hidden_size"], 12);
    let back = store.load("prefix").await.unwrap();
    assert_eq!(back.prompt, prompt);
    assert_eq!(back.config.method().unwrap(), method);
    assert!(back.check_backbone(&backbone).is_ok());
    // a config whose layers do not match the tensor's width is refused on read
    let cfg_path = dir.path().join("prefix").join(ADAPTER_CONFIG);
    let mut bad = json.clone();
    bad["num_layers"] = 3.into();
    std::fs::write(&cfg_path, serde_json::to_vec(&bad).unwrap()).unwrap();
    let err = store.load("prefix").await.unwrap_err();
    assert!(err.to_string().contains("num_layers 3"), "{err}");
    // and an unknown method is a clear error
    bad["peft_type"] = "LORA".into();
    std::fs::write(&cfg_path, serde_json::to_vec(&bad).unwrap()).unwrap();
    let err = store.load("prefix").await.unwrap_err();
    assert!(err.to_string().contains("LORA"), "{err}");
}
