//! The prompts a server can use: read from the store on demand, kept parsed while the store's
//! tag for them is unchanged, so prompts added, replaced or removed while the server runs are
//! picked up on the next request without a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use softprompt_core::{
    BackboneSpec, Error, PromptInfo, PromptStore, SoftPrompt, StoredPrompt, TextTokenizer,
};

use softprompt_train::Template;

use crate::api::ApiError;

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
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
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
            // caught mid-replace (new weights, old config): keep serving the last good version
            Err(e) => {
                return self
                    .cached(name)
                    .ok_or_else(|| ApiError::internal(format!("reading prompt `{name}`: {e}")))
            }
        };
        let entry = Arc::new(self.entry(name, stored, etag)?);
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
            etag,
        })
    }

    /// Every prompt in the store, with its entry or the reason it cannot be served.
    pub async fn list(&self) -> Result<Vec<(PromptInfo, Result<Arc<Entry>, ApiError>)>, ApiError> {
        let infos = self
            .store
            .list()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut out = Vec::with_capacity(infos.len());
        for info in infos {
            let entry = self.get(&info.name).await;
            out.push((info, entry));
        }
        Ok(out)
    }
}
