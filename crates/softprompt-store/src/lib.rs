//! Prompt stores for softprompt.
//!
//! [`DirectoryStore`] keeps one folder per prompt in Hugging Face PEFT's layout:
//! `adapter_config.json` + `adapter_model.safetensors` holding one f32 tensor
//! `prompt_embeddings` `[num_virtual_tokens, token_dim]`. A prompt saved here loads with
//! `PeftModel.from_pretrained`, and a prompt saved by PEFT loads here.

mod peft;

use std::path::{Path, PathBuf};

pub use peft::{
    clean_stale, parse_prompt_safetensors, prompt_safetensors, read_folder_pair, read_prompt_dir,
    sha256_hex, write_folder, write_prompt_dir, ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROMPT_TENSOR,
};
use softprompt_core::{Error, PromptInfo, PromptStore, Result, StoredPrompt};

/// A directory of prompts, one sub-directory each, on `tokio::fs`.
#[derive(Debug, Clone)]
pub struct DirectoryStore {
    root: PathBuf,
}

/// Errors unless `name` is a plain, safe folder name: ASCII letters, digits, `.`, `_`, `-`,
/// not starting with `.`, at most 128 bytes. This keeps every prompt inside the store.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid prompt name `{name}`: use 1-128 ASCII letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

impl DirectoryStore {
    /// A store rooted at `root` (created on first save).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirectoryStore { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of prompt `name`.
    pub fn path_of(&self, name: &str) -> Result<PathBuf> {
        validate_name(name)?;
        Ok(self.root.join(name))
    }
}

#[async_trait::async_trait]
impl PromptStore for DirectoryStore {
    async fn save(&self, name: &str, prompt: &StoredPrompt) -> Result<()> {
        let dir = self.path_of(name)?;
        write_prompt_dir(&dir, prompt).await
    }

    async fn load(&self, name: &str) -> Result<StoredPrompt> {
        let dir = self.path_of(name)?;
        if !tokio::fs::try_exists(dir.join(ADAPTER_CONFIG))
            .await
            .unwrap_or(false)
        {
            return Err(Error::PromptNotFound(name.to_string()));
        }
        read_prompt_dir(&dir).await
    }

    /// Modification time and length of both files: an atomic replace renames new files into
    /// place, so either changes.
    async fn etag(&self, name: &str) -> Result<Option<String>> {
        let dir = self.path_of(name)?;
        let mut tag = String::new();
        for file in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
            let path = dir.join(file);
            let meta = match tokio::fs::metadata(&path).await {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::PromptNotFound(name.to_string()))
                }
                Err(e) => return Err(Error::io(path, e)),
            };
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            tag.push_str(&format!("{modified:x}-{:x};", meta.len()));
        }
        Ok(Some(tag))
    }

    async fn names(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut entries = match tokio::fs::read_dir(&self.root).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&self.root, e)),
        };
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| Error::io(&self.root, e))?
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_name(&name).is_ok() && entry.path().join(ADAPTER_CONFIG).is_file() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn list(&self) -> Result<Vec<PromptInfo>> {
        let mut out = Vec::new();
        for name in self.names().await? {
            let stored = read_prompt_dir(&self.root.join(&name)).await?;
            let prov = stored.config.softprompt.as_ref();
            out.push(PromptInfo {
                name,
                num_virtual_tokens: stored.prompt.num_virtual_tokens(),
                token_dim: stored.prompt.hidden_size(),
                backbone_fingerprint: prov
                    .map(|p| p.backbone_fingerprint.clone())
                    .filter(|f| !f.is_empty()),
                labels: prov
                    .map(|p| p.labels.iter().map(|(_, w)| w.clone()).collect())
                    .unwrap_or_default(),
            });
        }
        Ok(out)
    }

    async fn remove(&self, name: &str) -> Result<()> {
        let dir = self.path_of(name)?;
        // renamed away in one step first: a reader sees the prompt whole or not at all
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let gone = self.root.join(format!(
            ".{name}.{}.{nanos}.removed.tmp",
            std::process::id()
        ));
        match tokio::fs::rename(&dir, &gone).await {
            Ok(()) => tokio::fs::remove_dir_all(&gone)
                .await
                .map_err(|e| Error::io(gone, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::PromptNotFound(name.to_string()))
            }
            Err(e) => Err(Error::io(dir, e)),
        }
    }
}
