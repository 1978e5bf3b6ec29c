//! Reading and writing one prompt directory in PEFT's layout, atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use softprompt_core::{Error, Placement, PromptConfig, Result, SoftPrompt, StoredPrompt};

/// PEFT's config file name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's weights file name.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The tensor PEFT stores a prompt-tuning adapter under.
pub const PROMPT_TENSOR: &str = "prompt_embeddings";

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidPrompt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Removes the temporary folders `.<name>.<pid>.<nanos>.tmp` that writers which no longer run
/// left in `parent` (a writer killed before its swap).
pub fn clean_stale(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        if !rest.ends_with(".tmp") {
            continue;
        }
        let pid = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !softprompt_core::process_alive(p)) {
            // a writer killed after its swap left the old folder here, maybe still holding
            // entries it was carrying over (a run directory): they go back first
            let dir = parent.join(name);
            if dir.is_dir() {
                carry_over(&entry.path(), &dir);
            }
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Moves the entries of `from` that are not a prompt's own files (a run directory, a README,
/// anything a user keeps beside the prompt) into `to`, where `to` lacks them.
fn carry_over(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let name = file.to_string_lossy();
        if name == ADAPTER_CONFIG || name == ADAPTER_WEIGHTS {
            continue;
        }
        let target = to.join(&file);
        if std::fs::symlink_metadata(&target).is_err() {
            let _ = std::fs::rename(entry.path(), target);
        }
    }
}

/// A fresh temporary path beside `dir` for this process.
fn temp_beside(parent: &Path, name: &str, what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    parent.join(format!(".{name}.{}.{nanos}{what}.tmp", std::process::id()))
}

/// Swaps the paths `a` and `b` in one step (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Puts the complete folder `new` in place of `dir`: a plain rename when `dir` does not exist,
/// otherwise one atomic exchange (readers see the old folder or the new one, never a mix), and
/// where the file system cannot exchange, the old folder moved aside first (readers may then
/// briefly find no folder, still never a mix). Afterwards `new` holds what `dir` held, if
/// anything.
fn swap_in(new: &Path, dir: &Path, aside: &Path) -> std::io::Result<()> {
    for _ in 0..8 {
        match std::fs::rename(new, dir) {
            Ok(()) => return Ok(()),
            Err(e) if dir.is_dir() => match exchange(new, dir) {
                Ok(()) => return Ok(()),
                Err(x) if x.kind() == std::io::ErrorKind::NotFound => continue,
                Err(_) => {
                    // no exchange here: move the old folder aside, then rename
                    match std::fs::rename(dir, aside) {
                        Ok(()) => {}
                        Err(a) if a.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(_) => return Err(e),
                    }
                    return std::fs::rename(new, dir);
                }
            },
            // the folder vanished between the two calls (another writer's swap): try again
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && new.is_dir() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "another writer kept replacing the folder",
    ))
}

/// Flushes a directory's entries (a rename inside it) to disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Writes `files` as the whole folder `dir`, replacing it as one unit: the files go to a fresh
/// temporary folder beside it (each synced), which is then swapped in (one `renameat2` exchange); entries of
/// the old folder that are not the prompt's files (a run directory) are moved into the new one,
/// and the old folder, or on failure the new one, is removed. Stale temporary folders of killed
/// writers are cleaned first (handing back what they carried). Two concurrent writers each swap
/// in a complete folder; the last one stays.
pub fn write_folder(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| invalid(dir, "a prompt folder needs a name"))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    if let Ok(m) = std::fs::symlink_metadata(dir) {
        if !m.is_dir() {
            return Err(invalid(dir, "exists and is not a folder"));
        }
    }
    clean_stale(&parent, &name);
    let tmp = temp_beside(&parent, &name, "");
    let aside = temp_beside(&parent, &name, ".old");
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = (|| -> Result<()> {
        for (file, bytes) in files {
            let path = tmp.join(file);
            let mut f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            std::io::Write::write_all(&mut f, bytes).map_err(|e| Error::io(&path, e))?;
            f.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        sync_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        swap_in(&tmp, dir, &aside).map_err(|e| Error::io(dir, e))?;
        // what else the old folder held (a run directory) stays with the prompt
        carry_over(&tmp, dir);
        carry_over(&aside, dir);
        sync_dir(&parent).map_err(|e| Error::io(&parent, e))
    })();
    // the old folder (exchanged into `tmp` or moved `aside`), or the unused new one
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&aside);
    result
}

/// Serializes a prompt's safetensors file (f32 `prompt_embeddings` `[N, d]`). Byte for byte
/// reproducible: the header's keys are sorted (the format allows any order), so equal prompts
/// make equal files.
pub fn prompt_safetensors(stored: &StoredPrompt) -> Result<Vec<u8>> {
    let p = &stored.prompt;
    let data: Vec<u8> = p.values().iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut meta: BTreeMap<String, String> = stored.metadata.clone();
    meta.insert("format".into(), "pt".into());
    let mut header: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
    header.insert(
        "__metadata__",
        serde_json::to_value(&meta).expect("strings"),
    );
    header.insert(
        PROMPT_TENSOR,
        serde_json::json!({
            "dtype": "F32",
            "shape": [p.num_virtual_tokens(), p.hidden_size()],
            "data_offsets": [0, data.len()],
        }),
    );
    let mut json = serde_json::to_string(&header).map_err(|e| Error::Shape(e.to_string()))?;
    // the data starts 8-byte aligned, as safetensors writes it
    while (8 + json.len()) % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&data);
    Ok(out)
}

/// Writes `stored` as the folder `dir`, replacing any previous prompt there as one unit
/// ([`write_folder`]); the config records the weights' SHA-256.
pub async fn write_prompt_dir(dir: &Path, stored: &StoredPrompt) -> Result<()> {
    let mut config = stored.config.clone();
    let method = config.method()?;
    let placement = stored.prompt.placement();
    if placement != method.placement() {
        return Err(invalid(
            dir,
            format!(
                "a {} config for a prompt placed at `{}`",
                config.peft_type,
                placement.as_str()
            ),
        ));
    }
    config.num_virtual_tokens = stored.prompt.num_virtual_tokens();
    config.token_dim = match placement {
        Placement::KeyValuePrefix => {
            let layers = config.num_layers.unwrap_or(0);
            let width = stored.prompt.hidden_size();
            if layers == 0 || width % (2 * layers) != 0 {
                return Err(invalid(
                    dir,
                    format!("a key/value prefix of width {width} does not split into {layers} layers' keys and values"),
                ));
            }
            width / (2 * layers)
        }
        _ => stored.prompt.hidden_size(),
    };
    let weights = prompt_safetensors(stored)?;
    if let Some(p) = config.softprompt.as_mut() {
        p.weights_sha256 = Some(sha256_hex(&weights));
    }
    let json = serde_json::to_vec_pretty(&config).map_err(|e| Error::Json {
        path: dir.join(ADAPTER_CONFIG),
        reason: e.to_string(),
    })?;
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        write_folder(
            &dir,
            &[(ADAPTER_WEIGHTS, &weights[..]), (ADAPTER_CONFIG, &json[..])],
        )
    })
    .await
    .map_err(|e| Error::InvalidArgument(format!("the prompt writer stopped: {e}")))?
}

/// The bytes of a prompt folder's config and of its weights (`None` when the folder has no
/// weights file), as one save wrote them. On Unix both files are opened through one handle of the folder, so a writer that
/// swaps a new folder in between cannot hand over the config of one save and the weights of
/// another (a saved folder's files never change; a new save is a new folder); a file missing
/// from a folder that is no longer the one at `dir` (the old folder, being removed after a
/// swap) sends the reader to the folder now there.
pub fn read_folder_pair(dir: &Path) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let not_found = |r: &std::io::Result<Vec<u8>>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    #[cfg(unix)]
    {
        use rustix::fs::{fstat, open, openat, stat, Mode, OFlags};
        let mut attempt = 0;
        loop {
            let flags = OFlags::RDONLY | OFlags::CLOEXEC;
            let folder = open(dir, flags | OFlags::DIRECTORY, Mode::empty())
                .map_err(|e| Error::io(dir, e.into()))?;
            let slurp = |name: &str| -> std::io::Result<Vec<u8>> {
                let fd = openat(&folder, name, flags, Mode::empty())?;
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes)?;
                Ok(bytes)
            };
            let (cfg, weights) = (slurp(ADAPTER_CONFIG), slurp(ADAPTER_WEIGHTS));
            if (not_found(&cfg) || not_found(&weights)) && attempt < 16 {
                let held = fstat(&folder).map(|m| (m.st_dev, m.st_ino));
                let there = stat(dir).map(|m| (m.st_dev, m.st_ino));
                if held.ok() != there.ok() {
                    attempt += 1;
                    continue;
                }
            }
            let cfg = cfg.map_err(|e| Error::io(&cfg_path, e))?;
            let weights = match weights {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(Error::io(&w_path, e)),
            };
            return Ok((cfg, weights));
        }
    }
    #[cfg(not(unix))]
    {
        let cfg = std::fs::read(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let weights = std::fs::read(&w_path);
        if !not_found(&weights) {
            let weights = weights.map_err(|e| Error::io(&w_path, e))?;
            return Ok((cfg, Some(weights)));
        }
        Ok((cfg, None))
    }
}

/// Reads a prompt directory written by softprompt or by PEFT's `save_pretrained`.
pub async fn read_prompt_dir(dir: &Path) -> Result<StoredPrompt> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let read = |dir: PathBuf| async move {
        tokio::task::spawn_blocking(move || read_folder_pair(&dir))
            .await
            .map_err(|e| Error::InvalidArgument(format!("the prompt reader stopped: {e}")))?
    };
    let parse = |text: &[u8]| -> Result<PromptConfig> {
        serde_json::from_slice(text).map_err(|e| Error::Json {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })
    };
    let (text, weights) = read(dir.to_path_buf()).await?;
    let mut config = parse(&text)?;
    let mut method = config
        .method()
        .map_err(|e| invalid(&cfg_path, e.to_string()))?;
    if config.num_transformer_submodules.unwrap_or(1) != 1 {
        return Err(invalid(
            &cfg_path,
            "num_transformer_submodules != 1 (encoder-decoder prompts) is not supported",
        ));
    }
    let missing = |weights: Option<Vec<u8>>| match weights {
        Some(bytes) => Ok(bytes),
        None if dir.join("adapter_model.bin").is_file() => Err(invalid(
            dir,
            "only adapter_model.bin (pickle) found: re-save with safe_serialization=True",
        )),
        None => Err(Error::io(
            &w_path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )),
    };
    let mut bytes = missing(weights)?;
    // both files come from one folder (see [`read_folder_pair`]), so weights that are not the config's
    // were replaced alone; where folders cannot be held open the pair is read again first
    let recorded = |c: &PromptConfig| c.softprompt.as_ref().and_then(|p| p.weights_sha256.clone());
    let mut attempts = 0;
    while let Some(want) = recorded(&config) {
        if sha256_hex(&bytes) == want {
            break;
        }
        attempts += 1;
        if cfg!(unix) || attempts > 3 {
            // a damaged file says so; a whole one that is not the config's is the mix
            parse_prompt_safetensors(&bytes, &w_path)?;
            return Err(invalid(
                dir,
                format!(
                    "{ADAPTER_WEIGHTS} is not the file {ADAPTER_CONFIG} was written with \
                     (weights_sha256 differs): one of them was replaced alone"
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let (text, weights) = read(dir.to_path_buf()).await?;
        config = parse(&text)?;
        method = config
            .method()
            .map_err(|e| invalid(&cfg_path, e.to_string()))?;
        bytes = missing(weights)?;
    }
    // checked: a property of the file pair, recomputed by every save
    if let Some(p) = config.softprompt.as_mut() {
        p.weights_sha256 = None;
    }
    let (prompt, metadata) = parse_prompt_safetensors(&bytes, &w_path)?;
    let prompt = prompt.with_placement(method.placement());
    // PEFT stores a prefix as `[N, layers · 2 · token_dim]`
    let (width, what) = match method.placement() {
        Placement::KeyValuePrefix => {
            let layers = config
                .num_layers
                .ok_or_else(|| invalid(&cfg_path, "a PREFIX_TUNING config without num_layers"))?;
            (
                layers * 2 * config.token_dim,
                format!("num_layers {layers} × 2 × token_dim {}", config.token_dim),
            )
        }
        _ => (config.token_dim, format!("token_dim {}", config.token_dim)),
    };
    if prompt.num_virtual_tokens() != config.num_virtual_tokens || prompt.hidden_size() != width {
        return Err(invalid(
            dir,
            format!(
                "{PROMPT_TENSOR} is [{}, {}] but {ADAPTER_CONFIG} says num_virtual_tokens {} and {what}",
                prompt.num_virtual_tokens(),
                prompt.hidden_size(),
                config.num_virtual_tokens,
            ),
        ));
    }
    Ok(StoredPrompt {
        prompt,
        config,
        metadata,
    })
}

/// Parses `adapter_model.safetensors`: the prompt and the header metadata (without `format`).
pub fn parse_prompt_safetensors(
    bytes: &[u8],
    path: &Path,
) -> Result<(SoftPrompt, BTreeMap<String, String>)> {
    let st_err = |e: safetensors::SafeTensorError| Error::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(st_err)?;
    let st = SafeTensors::deserialize(bytes).map_err(st_err)?;
    let view = st
        .tensor(PROMPT_TENSOR)
        .map_err(|_| invalid(path, format!("no `{PROMPT_TENSOR}` tensor")))?;
    let shape = view.shape();
    if shape.len() != 2 {
        return Err(invalid(
            path,
            format!("{PROMPT_TENSOR} has shape {shape:?}, expected [N, d]"),
        ));
    }
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half_f16(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        other => {
            return Err(invalid(
                path,
                format!("{PROMPT_TENSOR} has dtype {other:?}, expected F32"),
            ))
        }
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(invalid(
            path,
            format!("{PROMPT_TENSOR} holds a non-finite value at index {i}"),
        ));
    }
    let prompt = SoftPrompt::new(shape[0], shape[1], values)?;
    let mut metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    metadata.remove("format");
    Ok((prompt, metadata))
}

/// IEEE half → f32 without a dependency.
fn half_f16(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal
            let v = f as f32 * 2f32.powi(-24);
            return if sign != 0 { -v } else { v };
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | (((e - 15 + 127) as u32) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversion() {
        assert_eq!(half_f16(0x3c00), 1.0);
        assert_eq!(half_f16(0xc000), -2.0);
        assert_eq!(half_f16(0x0001), 2f32.powi(-24));
    }
}
