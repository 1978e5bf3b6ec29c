//! The tokenizer embedded in a GGUF file, built as transformers builds it for the same file.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use softprompt_core::{Error, HfTokenizer, Result};

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex of a `tokenizer.ggml.pre` type, where transformers knows one; other types
/// keep GPT-2's byte-level regex, as transformers does.
fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" => {
            Some(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// GPT-2's byte → printable character table.
fn byte_alphabet() -> HashMap<u8, char> {
    let mut bytes: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = bytes.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    bytes
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("valid char")))
        .collect()
}

fn strings(v: Option<&Value>, key: &str, path: &Path) -> Result<Vec<String>> {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| {
                x.to_string()
                    .cloned()
                    .map_err(|e| Error::Tokenizer(format!("{}: `{key}`: {e}", path.display())))
            })
            .collect(),
        _ => Err(Error::Tokenizer(format!(
            "{}: missing `{key}`",
            path.display()
        ))),
    }
}

fn id(meta: &HashMap<String, Value>, key: &str) -> Option<u32> {
    meta.get(key).and_then(|v| {
        v.to_u32()
            .ok()
            .or_else(|| v.to_u64().ok().map(|x| x as u32))
    })
}

/// Builds the tokenizer from GGUF metadata; `path` is used in messages. Byte-level BPE
/// (`tokenizer.ggml.model = gpt2`) and, for Gemma files, SentencePiece-style BPE (`llama`).
pub fn tokenizer_from_metadata(meta: &HashMap<String, Value>, path: &Path) -> Result<HfTokenizer> {
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let arch = meta
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let tokens = strings(
        meta.get("tokenizer.ggml.tokens"),
        "tokenizer.ggml.tokens",
        path,
    )?;
    let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let spec = match model.as_str() {
        "gpt2" => byte_level(meta, &tokens, &types, path)?,
        "llama" if matches!(arch.as_str(), "gemma" | "gemma2" | "gemma3") => {
            gemma_sentencepiece(meta, &tokens, &types)
        }
        other => {
            return Err(Error::Tokenizer(format!(
                "{}: tokenizer model `{other}` of architecture `{arch}` is not supported yet \
                 (byte-level BPE `gpt2`, and Gemma's SentencePiece-style `llama`)",
                path.display()
            )))
        }
    };
    let inner = tokenizers::Tokenizer::from_str(&spec.to_string()).map_err(|e| {
        Error::Tokenizer(format!("{}: building the tokenizer: {e}", path.display()))
    })?;
    Ok(HfTokenizer::from_tokenizer(inner)
        .with_eos(id(meta, "tokenizer.ggml.eos_token_id"))
        .with_pad(id(meta, "tokenizer.ggml.padding_token_id")))
}

/// transformers' post-processor: the BOS token first when the file says to add it.
fn post_processor(meta: &HashMap<String, Value>, tokens: &[String], default_add: bool) -> Json {
    let bos = id(meta, "tokenizer.ggml.bos_token_id");
    let add_bos = meta
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(default_add);
    let (single, specials) = match (add_bos, bos) {
        (true, Some(b)) => {
            let name = tokens.get(b as usize).cloned().unwrap_or_default();
            (
                json!([{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]),
                json!({ name.clone(): {"id": name, "ids": [b], "tokens": [name]} }),
            )
        }
        _ => (json!([{"Sequence": {"id": "A", "type_id": 0}}]), json!({})),
    };
    json!({"type": "TemplateProcessing", "single": single,
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": specials})
}

/// Control tokens as special added tokens, user-defined ones as plain added tokens (llama.cpp
/// matches both whole in the text); `keep` filters both (a token the vocabulary spells another
/// way is not added, as in transformers).
fn added_tokens(tokens: &[String], types: &[i64], keep: impl Fn(usize, &str) -> bool) -> Vec<Json> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter_map(|(i, (t, ty))| {
            let is_control = *ty == CONTROL && keep(i, t);
            (is_control || (*ty == USER_DEFINED && keep(i, t))).then(|| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": is_control})
            })
        })
        .collect()
}

/// Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): the file's vocabulary and merges.
fn byte_level(
    meta: &HashMap<String, Value>,
    tokens: &[String],
    types: &[i64],
    path: &Path,
) -> Result<Json> {
    let merges = strings(
        meta.get("tokenizer.ggml.merges"),
        "tokenizer.ggml.merges",
        path,
    )?;
    let alphabet = byte_alphabet();
    let spelled: std::collections::HashSet<char> = alphabet.values().copied().collect();
    let respell = |t: &str| -> String {
        if t.chars().all(|c| spelled.contains(&c)) {
            t.to_string()
        } else {
            t.bytes().map(|b| alphabet[&b]).collect()
        }
    };
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (respell(t), json!(i)))
        .collect();
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| Error::Tokenizer(format!("merge `{m}` is not a pair")))?;
            Ok(json!([a, b]))
        })
        .collect::<Result<_>>()?;
    // a control token outside the byte alphabet is a llama.cpp mislabel (transformers skips it)
    let added = added_tokens(tokens, types, |_, t| {
        t.chars().all(|c| spelled.contains(&c))
    });
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let pre_tokenizer = match split_regex(&pre) {
        Some(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
    };
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(meta, tokens, false),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    }))
}

/// Gemma's SentencePiece-style BPE as transformers builds it from the file: spaces become `▁`
/// (no prefix space), byte fallback for characters outside the vocabulary, and merges recovered
/// from the vocabulary (the file lists none) — every split of a token into two tokens of the
/// vocabulary, best first by the token's position in the file, since Gemma's scores do not
/// follow its merge order. Tokens of whitespace with a space are stored as real spaces and
/// respelled with `▁` first.
fn gemma_sentencepiece(meta: &HashMap<String, Value>, tokens: &[String], types: &[i64]) -> Json {
    let respelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.chars().all(char::is_whitespace) {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.clone()
            }
        })
        .collect();
    let vocab: HashMap<&str, usize> = respelled
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let vocab_json: serde_json::Map<String, Json> = respelled
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let merges: Vec<Json> = recovered_merges(&respelled, &vocab)
        .into_iter()
        .map(|(a, b)| json!([a, b]))
        .collect();
    let added = added_tokens(tokens, types, |i, t| respelled[i] == t);
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": post_processor(meta, tokens, true),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": tokens.get(id(meta, "tokenizer.ggml.unknown_token_id").unwrap_or(3) as usize),
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocab_json, "merges": merges},
    })
}

/// transformers' `generate_merges` with each token's score its (negated) position: for every
/// token in file order, its splits into two vocabulary tokens (ordered by the pieces' ids);
/// then all of them, best first by score, then longer left piece, then longer right piece.
fn recovered_merges<'a>(
    tokens: &'a [String],
    vocab: &HashMap<&str, usize>,
) -> Vec<(&'a str, &'a str)> {
    // (score, left length, right length, left, right); the score of a repeated token is its last
    // position, its place in the order its first (a Python dict's behaviour)
    let mut merges: Vec<(i64, usize, usize, &str, &str)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for token in tokens {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let score = -(vocab[token.as_str()] as i64);
        let mut local: Vec<(&str, &str)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r)| (vocab[l], vocab[r]));
        merges.extend(
            local
                .into_iter()
                .map(|(l, r)| (score, l.chars().count(), r.chars().count(), l, r)),
        );
    }
    // a stable sort, descending on (score, left length, right length), as Python's
    merges.sort_by_key(|m| std::cmp::Reverse((m.0, m.1, m.2)));
    merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
}

/// Reads only the metadata of a GGUF file and builds its tokenizer.
pub fn load_tokenizer(path: impl AsRef<Path>) -> Result<HfTokenizer> {
    let path = path.as_ref();
    let (content, _) = crate::read_content(path)?;
    tokenizer_from_metadata(&content.metadata, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        assert_eq!(a.len(), 256);
        assert_eq!(a[&b' '], 'Ġ');
        assert_eq!(a[&b'\n'], 'Ċ');
        assert_eq!(a[&b'a'], 'a');
    }

    #[test]
    fn builds_a_byte_level_bpe() {
        let s = |x: &str| Value::String(x.to_string());
        let mut meta = HashMap::new();
        meta.insert("tokenizer.ggml.model".to_string(), s("gpt2"));
        let toks = ["<|endoftext|>", "a", "b", "Ġ", "ab", "Ġab"];
        meta.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(toks.iter().map(|t| s(t)).collect()),
        );
        meta.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![s("a b"), s("Ġ ab")]),
        );
        meta.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(vec![
                Value::I32(3),
                Value::I32(1),
                Value::I32(1),
                Value::I32(1),
                Value::I32(1),
                Value::I32(1),
            ]),
        );
        meta.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(0));
        let tok = tokenizer_from_metadata(&meta, Path::new("t.gguf")).unwrap();
        use softprompt_core::TextTokenizer;
        assert_eq!(
            tok.encode("ab ab<|endoftext|>", true).unwrap(),
            vec![4, 5, 0]
        );
        assert_eq!(tok.eos_id(), Some(0));
        meta.insert("tokenizer.ggml.model".into(), s("bert"));
        assert!(tokenizer_from_metadata(&meta, Path::new("t.gguf"))
            .unwrap_err()
            .to_string()
            .contains("not supported"));
    }
}
