//! The prompts a server can use: read from the store on demand, kept parsed while the store's
//! tag for them is unchanged, so prompts added, replaced or removed while the server runs are
//! picked up on the next request without a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use softprompt_core::{BackboneSpec, Error, PromptStore, SoftPrompt, StoredPrompt, TextTokenizer};

use softprompt_train::Template;

use crate::error::ApiError;

/// One loaded prompt version.
#[derive(Debug)]
pub struct Entry {
    /// Name in the store.
    pub name: String,
    /// Distinct for every loaded version: rows with the same key share one prompt slot.
    pub key: u64,
    /// The prompt.
    pub prompt: SoftPrompt,
    /// Stored input template, if any.
    pub template: Option<Template>,
    /// `(label, verbalizer word)` in class order.
    pub labels: Vec<(String, String)>,
    /// Token ids of each verbalizer word.
    pub label_ids: Vec<Vec<u32>>,
    /// What the prompt is for (`classification` when it has labels, else `generation`).
    pub task: &'static str,
    /// Bytes of the prompt values (f32).
    pub size_bytes: usize,
    /// The backbone the prompt was trained for, as recorded in its provenance.
    pub backbone_fingerprint: Option<String>,
    /// PEFT's `peft_type` of the prompt's method (`PROMPT_TUNING`, `PREFIX_TUNING`, `P_TUNING`).
    pub peft_type: String,
    etag: Option<String>,
}

impl Entry {
    /// Applies the stored template to `text` (the text unchanged when there is none).
    pub fn render(&self, text: &str) -> String {
        match &self.template {
            Some(t) => t.render(text),
            None => text.to_string(),
        }
    }
}

/// Resolves prompt names to loaded, checked prompts.
/// One row of [`Registry::list`].
#[derive(Debug)]
pub struct Listed {
    pub name: String,
    /// The servable entry, or why the prompt cannot be served.
    pub entry: Result<Arc<Entry>, ApiError>,
    /// The stored prompt of a row that cannot be served, when it can be read at all.
    pub stored: Option<StoredPrompt>,
}

pub struct Registry {
    store: Arc<dyn PromptStore>,
    spec: BackboneSpec,
    tokenizer: Arc<dyn TextTokenizer>,
    cache: Mutex<HashMap<String, Arc<Entry>>>,
    next_key: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("backbone", &self.spec.fingerprint)
            .finish_non_exhaustive()
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("model `{name}` is not in the prompt store"))
}

impl Registry {
    /// A registry over `store` for prompts that fit `spec`.
    pub fn new(
        store: Arc<dyn PromptStore>,
        spec: BackboneSpec,
        tokenizer: Arc<dyn TextTokenizer>,
    ) -> Self {
        Registry {
            store,
            spec,
            tokenizer,
            cache: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
        }
    }

    fn cached(&self, name: &str) -> Option<Arc<Entry>> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn forget(&self, name: &str) {
        let gone = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if gone.is_some() {
            tracing::info!(prompt = name, "prompt removed from the store: forgotten");
        }
    }

    /// The current version of prompt `name`.
    pub async fn get(&self, name: &str) -> Result<Arc<Entry>, ApiError> {
        softprompt_store::validate_name(name)
            .map_err(|e| ApiError::bad_request(e.to_string()).param("model"))?;
        let etag = match self.store.etag(name).await {
            Ok(t) => t,
            Err(Error::PromptNotFound(_)) => {
                self.forget(name);
                return Err(not_found(name));
            }
            Err(e) => return Err(ApiError::internal(e.to_string())),
        };
        if let (Some(old), Some(tag)) = (self.cached(name), &etag) {
            if old.etag.as_ref() == Some(tag) {
                return Ok(old);
            }
        }
        let stored = match self.store.load(name).await {
            Ok(s) => s,
            Err(Error::PromptNotFound(_)) => {
                self.forget(name);
                return Err(not_found(name));
            }
            // unreadable now: keep serving the last good version, if there is one
            Err(e) => {
                tracing::warn!(prompt = name, error = %e, "stored prompt cannot be read");
                return self.cached(name).ok_or_else(|| {
                    ApiError::unprocessable(format!("stored prompt `{name}` cannot be read: {e}"))
                });
            }
        };
        let replaced = self.cached(name).is_some();
        let entry = Arc::new(self.entry(name, stored, etag)?);
        tracing::info!(
            prompt = name,
            peft_type = entry.peft_type.as_str(),
            virtual_tokens = entry.prompt.num_virtual_tokens(),
            "{}",
            if replaced {
                "prompt reloaded"
            } else {
                "prompt loaded"
            }
        );
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), entry.clone());
        Ok(entry)
    }

    fn entry(
        &self,
        name: &str,
        stored: StoredPrompt,
        etag: Option<String>,
    ) -> Result<Entry, ApiError> {
        stored.check_backbone(&self.spec).map_err(|e| {
            ApiError::unprocessable(format!(
                "prompt `{name}` cannot run on this server's backbone ({}): {e}",
                self.spec.name
            ))
            .param("model")
        })?;
        let prov = stored.config.softprompt.clone().unwrap_or_default();
        let label_ids = prov
            .labels
            .iter()
            .map(|(label, word)| {
                let ids = self
                    .tokenizer
                    .encode(word, false)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                if ids.is_empty() {
                    return Err(ApiError::unprocessable(format!(
                        "prompt `{name}`: the word of label `{label}` encodes to no tokens"
                    )));
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let template = prov
            .template
            .map(Template::new)
            .transpose()
            .map_err(|e| ApiError::unprocessable(format!("prompt `{name}`: {e}")))?;
        let size_bytes = stored.prompt.values().len() * 4;
        let peft_type = stored.config.peft_type.clone();
        Ok(Entry {
            name: name.to_string(),
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            task: if prov.labels.is_empty() {
                "generation"
            } else {
                "classification"
            },
            prompt: stored.prompt,
            template,
            labels: prov.labels,
            label_ids,
            size_bytes,
            backbone_fingerprint: Some(prov.backbone_fingerprint.clone()).filter(|f| !f.is_empty()),
            peft_type,
            etag,
        })
    }

    /// Every prompt in the store, with its entry or the reason it cannot be served (an
    /// unreadable or foreign prompt is one row, not a failed listing). A prompt whose tag is
    /// unchanged is not read again; a prompt that cannot be served is read once more for the
    /// row's shape fields (`None` when it cannot be read at all).
    pub async fn list(&self) -> Result<Vec<Listed>, ApiError> {
        let names = self
            .store
            .names()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let entry = self.get(&name).await;
            let stored = match &entry {
                Ok(_) => None,
                Err(_) => self.store.load(&name).await.ok(),
            };
            out.push(Listed {
                name,
                entry,
                stored,
            });
        }
        Ok(out)
    }
}
