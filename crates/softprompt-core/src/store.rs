//! Persisting soft prompts: the async [`PromptStore`] trait and the PEFT-compatible config.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{BackboneSpec, EncoderKind, Error, Placement, PromptMethod, Result, SoftPrompt};

/// The `adapter_config.json` of a PEFT prompt-tuning adapter, plus softprompt's own keys.
///
/// Field names and values are PEFT's (`PromptTuningConfig`) so that PEFT loads what we save;
/// PEFT keys we do not model are kept in `other` and written back unchanged. Our provenance
/// lives under the `softprompt` key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptConfig {
    /// `PROMPT_TUNING`, `PREFIX_TUNING` or `P_TUNING` ([`PromptMethod::peft_type`]).
    pub peft_type: String,
    /// PEFT task type, `CAUSAL_LM` for decoder-only models.
    pub task_type: Option<String>,
    /// Number of virtual tokens `N`.
    pub num_virtual_tokens: usize,
    /// Hidden size `d`; for prefix tuning the width of one layer's keys (`kv heads · head dim`,
    /// as PEFT records it for grouped-query attention).
    pub token_dim: usize,
    /// 1 for decoder-only models.
    pub num_transformer_submodules: Option<usize>,
    /// Attention heads of the backbone (key/value heads for prefix tuning, as PEFT records it).
    pub num_attention_heads: Option<usize>,
    /// Transformer blocks of the backbone.
    pub num_layers: Option<usize>,
    /// Base model as PEFT records it.
    pub base_model_name_or_path: Option<String>,
    /// `TEXT`, `RANDOM` or `SAMPLE_VOCAB`.
    pub prompt_tuning_init: Option<String>,
    /// The initialisation text for `TEXT`.
    pub prompt_tuning_init_text: Option<String>,
    /// Tokenizer used for the initialisation text.
    pub tokenizer_name_or_path: Option<String>,
    /// PEFT loads adapters for inference unless told otherwise.
    pub inference_mode: Option<bool>,
    /// softprompt's provenance; PEFT ignores this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softprompt: Option<Provenance>,
    /// Any other PEFT keys, preserved.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// What softprompt records about how a prompt was made and for which backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Provenance {
    /// Backbone the prompt was trained for.
    pub backbone_fingerprint: String,
    /// Model family of that backbone.
    pub architecture: String,
    /// Input template, e.g. `Review: {text}\nSentiment:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Label → verbalizer word, in class order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<(String, String)>,
    /// Final metrics (`dev_accuracy`, `train_loss`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// softprompt version that wrote the prompt.
    #[serde(default)]
    pub softprompt_version: String,
    /// SHA-256 of the `adapter_model.safetensors` written with this config: a reader that finds
    /// other weights beside it (one file replaced alone, or a folder read while it was swapped)
    /// refuses the pair rather than mixing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
}

impl PromptConfig {
    /// A PEFT config for `prompt` on `spec`: prompt tuning, or prefix tuning without projection
    /// for a key/value prefix.
    pub fn for_backbone(prompt: &SoftPrompt, spec: &BackboneSpec) -> Self {
        let method = match prompt.placement() {
            Placement::KeyValuePrefix => PromptMethod::PrefixTuning { projection: None },
            _ => PromptMethod::PromptTuning,
        };
        Self::for_method(prompt, spec, &method)
    }

    /// A PEFT config of `method` for `prompt` on `spec`, with the method's own fields
    /// (`prefix_projection`, `encoder_*`).
    pub fn for_method(prompt: &SoftPrompt, spec: &BackboneSpec, method: &PromptMethod) -> Self {
        let mut other = BTreeMap::new();
        let (token_dim, heads) = match method {
            PromptMethod::PrefixTuning { projection } => {
                let kv = spec.num_key_value_heads * spec.head_dim;
                other.insert("prefix_projection".into(), projection.is_some().into());
                other.insert(
                    "encoder_hidden_size".into(),
                    projection.unwrap_or(kv).into(),
                );
                (kv, spec.num_key_value_heads)
            }
            PromptMethod::PTuning {
                encoder,
                hidden_size,
                num_layers,
                dropout,
            } => {
                other.insert(
                    "encoder_reparameterization_type".into(),
                    encoder.peft_name().into(),
                );
                other.insert("encoder_hidden_size".into(), (*hidden_size).into());
                other.insert("encoder_num_layers".into(), (*num_layers).into());
                other.insert("encoder_dropout".into(), f64::from(*dropout).into());
                (prompt.hidden_size(), spec.num_attention_heads)
            }
            PromptMethod::PromptTuning => (prompt.hidden_size(), spec.num_attention_heads),
        };
        PromptConfig {
            peft_type: method.peft_type().into(),
            task_type: Some("CAUSAL_LM".into()),
            num_virtual_tokens: prompt.num_virtual_tokens(),
            token_dim,
            num_transformer_submodules: Some(1),
            num_attention_heads: Some(heads),
            num_layers: Some(spec.num_layers),
            base_model_name_or_path: Some(spec.name.clone()),
            prompt_tuning_init: Some("RANDOM".into()),
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            inference_mode: Some(true),
            softprompt: Some(Provenance {
                backbone_fingerprint: spec.fingerprint.clone(),
                architecture: spec.architecture.as_str().to_string(),
                softprompt_version: env!("CARGO_PKG_VERSION").to_string(),
                ..Provenance::default()
            }),
            other,
        }
    }

    /// The method this config describes (its `peft_type` and the method's fields, PEFT's
    /// defaults where absent); errors on a `peft_type` softprompt does not read.
    pub fn method(&self) -> Result<PromptMethod> {
        let usize_of = |key: &str| self.other.get(key).and_then(serde_json::Value::as_u64);
        match self.peft_type.as_str() {
            "PROMPT_TUNING" => Ok(PromptMethod::PromptTuning),
            "PREFIX_TUNING" => {
                let projected = self
                    .other
                    .get("prefix_projection")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
                let hidden = usize_of("encoder_hidden_size").unwrap_or(self.token_dim as u64);
                Ok(PromptMethod::PrefixTuning {
                    projection: projected.then_some(hidden as usize),
                })
            }
            "P_TUNING" => {
                let encoder = match self
                    .other
                    .get("encoder_reparameterization_type")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("MLP")
                {
                    "MLP" => EncoderKind::Mlp,
                    "LSTM" => EncoderKind::Lstm,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "encoder_reparameterization_type `{other}` is not MLP or LSTM"
                        )))
                    }
                };
                Ok(PromptMethod::PTuning {
                    encoder,
                    hidden_size: usize_of("encoder_hidden_size").unwrap_or(self.token_dim as u64)
                        as usize,
                    num_layers: usize_of("encoder_num_layers").unwrap_or(2) as usize,
                    dropout: self
                        .other
                        .get("encoder_dropout")
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(0.0) as f32,
                })
            }
            other => Err(Error::InvalidArgument(format!(
                "peft_type `{other}` is not a prompt-learning method softprompt reads \
                 (PROMPT_TUNING, PREFIX_TUNING, P_TUNING)"
            ))),
        }
    }
}

/// A prompt with everything saved alongside it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPrompt {
    /// The values.
    pub prompt: SoftPrompt,
    /// `adapter_config.json`.
    pub config: PromptConfig,
    /// Extra string metadata stored in the safetensors header.
    pub metadata: BTreeMap<String, String>,
}

impl StoredPrompt {
    /// Errors unless this prompt was made for `spec`: width always, fingerprint when the
    /// prompt records one (prompts saved by PEFT do not).
    pub fn check_backbone(&self, spec: &BackboneSpec) -> Result<()> {
        self.prompt.check_fits(spec)?;
        if let Some(p) = &self.config.softprompt {
            if !p.backbone_fingerprint.is_empty() && p.backbone_fingerprint != spec.fingerprint {
                return Err(Error::FingerprintMismatch {
                    prompt: p.backbone_fingerprint.clone(),
                    backbone: spec.fingerprint.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Summary of a stored prompt for listings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptInfo {
    /// Name in the store.
    pub name: String,
    /// Number of virtual tokens.
    pub num_virtual_tokens: usize,
    /// Hidden size.
    pub token_dim: usize,
    /// Fingerprint of the backbone it was trained for, if recorded.
    pub backbone_fingerprint: Option<String>,
    /// Label words, if it is a classifier.
    pub labels: Vec<String>,
}

/// Saves, loads and lists soft prompts. Async so that remote stores fit the same trait.
#[async_trait::async_trait]
pub trait PromptStore: Send + Sync {
    /// Writes `prompt` under `name`, atomically replacing any previous one.
    async fn save(&self, name: &str, prompt: &StoredPrompt) -> Result<()>;

    /// Reads the prompt stored under `name`.
    async fn load(&self, name: &str) -> Result<StoredPrompt>;

    /// Lists the stored prompts.
    async fn list(&self) -> Result<Vec<PromptInfo>>;

    /// The names of the stored prompts, sorted, without reading them: a reader that lists the
    /// store and then loads each prompt itself (a server) is not stopped by one unreadable
    /// prompt and reads each only once. The default goes through [`PromptStore::list`].
    async fn names(&self) -> Result<Vec<String>> {
        Ok(self.list().await?.into_iter().map(|i| i.name).collect())
    }

    /// Removes the prompt stored under `name`.
    async fn remove(&self, name: &str) -> Result<()>;

    /// A tag that changes whenever the prompt stored under `name` is replaced, so that a
    /// long-running reader (a server) can keep a parsed copy and reread only on change.
    /// `None` means the store cannot tell cheaply and readers must reload every time.
    /// A missing prompt is [`Error::PromptNotFound`].
    async fn etag(&self, name: &str) -> Result<Option<String>> {
        self.load(name).await.map(|_| None)
    }

    /// Reads `name` and checks it fits the backbone `spec`.
    async fn load_for(&self, name: &str, spec: &BackboneSpec) -> Result<StoredPrompt> {
        let stored = self.load(name).await?;
        stored.check_backbone(spec)?;
        Ok(stored)
    }
}

/// Whether the process `pid` still runs (writers name their temporary files after their pid;
/// a file of a process that is gone is stale). Where this cannot be known, `true`.
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return false;
        };
        match rustix::process::test_kill_process(pid) {
            Ok(()) => true,
            Err(e) => e == rustix::io::Errno::PERM,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}
