//! Data sets: JSONL rows, templates, verbalizers, and their encoding into token ids.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use softprompt_core::{Error, Result, TextTokenizer};

/// A classification row: `{"text": ..., "label": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassificationRow {
    /// 1-based line of the row in its file.
    pub line: usize,
    /// Input text.
    pub text: String,
    /// Gold label (strings; numbers are converted).
    pub label: String,
}

/// A generation row: `{"input": ..., "target": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationRow {
    /// 1-based line of the row in its file.
    pub line: usize,
    /// Input text.
    pub input: String,
    /// Expected output.
    pub target: String,
}

fn data_err(path: &Path, line: usize, reason: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

/// Reads a JSONL file into objects; blank lines are skipped, anything else that is not a JSON
/// object is an error naming the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, serde_json::Value>)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // a UTF-8 byte-order mark (what some editors write first) is not part of the data
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|e| {
            data_err(
                path,
                i + 1,
                format!("not UTF-8 text (byte {} of the line)", e.valid_up_to() + 1),
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| data_err(path, i + 1, format!("not valid JSON: {e}")))?;
        match v {
            serde_json::Value::Object(m) => out.push((i + 1, m)),
            other => {
                return Err(data_err(
                    path,
                    i + 1,
                    format!("expected a JSON object, found {other}"),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(data_err(path, 0, "the file holds no rows"));
    }
    Ok(out)
}

fn field(
    path: &Path,
    line: usize,
    m: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<String> {
    match m.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        // labels are often class numbers (`"label": 1`); texts never are
        Some(serde_json::Value::Number(n)) if key == "label" => Ok(n.to_string()),
        Some(serde_json::Value::Bool(b)) if key == "label" => Ok(b.to_string()),
        Some(other) => Err(data_err(
            path,
            line,
            format!("field `{key}` must be a string, found {other}"),
        )),
        None => Err(data_err(path, line, format!("missing field `{key}`"))),
    }
}

/// Reads classification rows (`text`, `label`).
pub fn read_classification(path: &Path) -> Result<Vec<ClassificationRow>> {
    read_jsonl(path)?
        .into_iter()
        .map(|(line, m)| {
            Ok(ClassificationRow {
                line,
                text: field(path, line, &m, "text")?,
                label: field(path, line, &m, "label")?,
            })
        })
        .collect()
}

/// Reads generation rows (`input`, `target`).
pub fn read_generation(path: &Path) -> Result<Vec<GenerationRow>> {
    read_jsonl(path)?
        .into_iter()
        .map(|(line, m)| {
            Ok(GenerationRow {
                line,
                input: field(path, line, &m, "input")?,
                target: field(path, line, &m, "target")?,
            })
        })
        .collect()
}

/// An input template with one `{text}` (or `{input}`) placeholder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template(String);

impl Template {
    /// Errors unless the pattern has exactly one `{text}` or `{input}` placeholder.
    pub fn new(pattern: impl Into<String>) -> Result<Self> {
        let p = pattern.into();
        let count = p.matches("{text}").count() + p.matches("{input}").count();
        if count != 1 {
            return Err(Error::InvalidArgument(format!(
                "template `{p}` must contain exactly one {{text}} or {{input}} placeholder, found {count}"
            )));
        }
        Ok(Template(p))
    }

    /// The pattern.
    pub fn pattern(&self) -> &str {
        &self.0
    }

    /// The pattern with `text` in place of the placeholder.
    pub fn render(&self, text: &str) -> String {
        self.0
            .replacen("{text}", text, 1)
            .replacen("{input}", text, 1)
    }
}

/// Label → verbalizer word, in class order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verbalizer {
    labels: Vec<(String, String)>,
}

impl Verbalizer {
    /// From `(label, word)` pairs; labels must be distinct and words non-empty.
    pub fn new(labels: Vec<(String, String)>) -> Result<Self> {
        if labels.len() < 2 {
            return Err(Error::InvalidArgument(
                "a verbalizer needs at least two labels".into(),
            ));
        }
        for (i, (l, w)) in labels.iter().enumerate() {
            if w.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "label `{l}` has an empty verbalizer word"
                )));
            }
            if labels[..i].iter().any(|(x, _)| x == l) {
                return Err(Error::InvalidArgument(format!("label `{l}` appears twice")));
            }
            if let Some((x, _)) = labels[..i].iter().find(|(_, v)| v == w) {
                return Err(Error::InvalidArgument(format!(
                    "labels `{x}` and `{l}` have the same word {w:?}: rank classification could not tell them apart"
                )));
            }
        }
        Ok(Verbalizer { labels })
    }

    /// Parses `label=word,label=word` (e.g. `negative= negative,positive= positive`).
    pub fn parse(spec: &str) -> Result<Self> {
        let labels = spec
            .split(',')
            .map(|pair| {
                pair.split_once('=')
                    .map(|(l, w)| (l.trim().to_string(), w.to_string()))
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "verbalizer entry `{pair}` is not label=word"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(labels)
    }

    /// `(label, word)` pairs.
    pub fn labels(&self) -> &[(String, String)] {
        &self.labels
    }

    /// Class index of `label`.
    pub fn index_of(&self, label: &str) -> Result<usize> {
        self.labels
            .iter()
            .position(|(l, _)| l == label)
            .ok_or_else(|| Error::UnknownLabel {
                label: label.to_string(),
                known: self
                    .labels
                    .iter()
                    .map(|(l, _)| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// One example as token ids: `context` is given, `target` is predicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedExample {
    /// Input ids (template applied, special tokens added).
    pub context: Vec<u32>,
    /// Ids the model is trained to produce.
    pub target: Vec<u32>,
    /// Class index, for classification.
    pub label: Option<usize>,
}

/// A task: how rows become ids, and how they are evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    /// Rank classification over verbalizer words.
    Classification {
        /// Input template.
        template: Template,
        /// Label words.
        verbalizer: Verbalizer,
    },
    /// Free generation judged by exact match.
    Generation {
        /// Input template.
        template: Template,
    },
}

/// Encoded examples plus what evaluation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedSet {
    /// Examples.
    pub examples: Vec<EncodedExample>,
    /// For classification: ids of each label word, in class order.
    pub candidates: Vec<Vec<u32>>,
    /// Where the rows came from (for messages).
    pub source: PathBuf,
}

/// Keeps the last `max` ids (the end of a template, e.g. `Answer:`, matters most).
fn keep_tail(mut ids: Vec<u32>, max: usize) -> Vec<u32> {
    if ids.len() > max {
        ids.drain(..ids.len() - max);
    }
    ids
}

impl Task {
    /// The template.
    pub fn template(&self) -> &Template {
        match self {
            Task::Classification { template, .. } | Task::Generation { template } => template,
        }
    }

    /// Reads and encodes `path`; contexts longer than `max_context` keep their last tokens.
    pub fn load(
        &self,
        path: &Path,
        tok: &dyn TextTokenizer,
        max_context: usize,
    ) -> Result<EncodedSet> {
        match self {
            Task::Classification {
                template,
                verbalizer,
            } => {
                let candidates = verbalizer
                    .labels()
                    .iter()
                    .map(|(l, w)| {
                        let ids = tok.encode(w, false)?;
                        if ids.is_empty() {
                            return Err(Error::InvalidArgument(format!(
                                "label word of `{l}` encodes to no tokens"
                            )));
                        }
                        Ok(ids)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let rows = read_classification(path)?;
                let mut examples = Vec::with_capacity(rows.len());
                for row in &rows {
                    let label = verbalizer
                        .index_of(&row.label)
                        .map_err(|e| data_err(path, row.line, e.to_string()))?;
                    let context =
                        keep_tail(tok.encode(&template.render(&row.text), true)?, max_context);
                    examples.push(EncodedExample {
                        context,
                        target: candidates[label].clone(),
                        label: Some(label),
                    });
                }
                Ok(EncodedSet {
                    examples,
                    candidates,
                    source: path.to_path_buf(),
                })
            }
            Task::Generation { template } => {
                let mut examples = Vec::new();
                for row in read_generation(path)? {
                    let context =
                        keep_tail(tok.encode(&template.render(&row.input), true)?, max_context);
                    let mut target = tok.encode(&row.target, false)?;
                    if let Some(eos) = tok.eos_id() {
                        target.push(eos);
                    }
                    examples.push(EncodedExample {
                        context,
                        target,
                        label: None,
                    });
                }
                Ok(EncodedSet {
                    examples,
                    candidates: Vec::new(),
                    source: path.to_path_buf(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn bom_non_utf8_numbers_and_duplicate_words() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.jsonl");
        // a byte-order mark is skipped
        std::fs::write(&path, b"\xef\xbb\xbf{\"text\": \"a\", \"label\": 1}\n").unwrap();
        let rows = read_classification(&path).unwrap();
        assert_eq!((rows[0].text.as_str(), rows[0].label.as_str()), ("a", "1"));
        // a line that is not UTF-8 is named
        std::fs::write(
            &path,
            b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"\xff\"}\n",
        )
        .unwrap();
        let err = read_classification(&path).unwrap_err();
        assert!(matches!(err, Error::Data { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("UTF-8"), "{err}");
        // a number where text belongs is refused, not converted
        std::fs::write(&path, b"{\"text\": 12345, \"label\": \"x\"}\n").unwrap();
        let err = read_classification(&path).unwrap_err();
        assert!(err.to_string().contains("must be a string"), "{err}");
        // two labels cannot share a word
        let err = Verbalizer::parse("good= yes,bad= yes").unwrap_err();
        assert!(err.to_string().contains("same word"), "{err}");
    }

    fn file(lines: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(lines.as_bytes()).unwrap();
        f
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let f = file("{\"text\":\"a\",\"label\":\"x\"}\n\nnot json\n");
        let e = read_classification(f.path()).unwrap_err();
        assert!(matches!(e, Error::Data { line: 3, .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("{}:3: not valid JSON", f.path().display())),
            "{e}"
        );
        let f = file("{\"text\":\"a\"}\n");
        let e = read_classification(f.path()).unwrap_err();
        assert!(e.to_string().ends_with(":1: missing field `label`"), "{e}");
        let f = file("[1,2]\n");
        assert!(read_jsonl(f.path())
            .unwrap_err()
            .to_string()
            .contains("expected a JSON object"));
        let f = file("\n\n");
        assert!(read_jsonl(f.path()).is_err());
        let f = file("{\"text\":\"a\",\"label\":1}\n");
        assert_eq!(read_classification(f.path()).unwrap()[0].label, "1");
    }

    #[test]
    fn templates_and_verbalizers() {
        let t = Template::new("Review: {text}\nSentiment:").unwrap();
        assert_eq!(t.render("great"), "Review: great\nSentiment:");
        assert!(Template::new("no placeholder").is_err());
        let v = Verbalizer::parse("negative= negative,positive= positive").unwrap();
        assert_eq!(
            v.labels()[1],
            ("positive".to_string(), " positive".to_string())
        );
        assert_eq!(v.index_of("positive").unwrap(), 1);
        let e = v.index_of("neutral").unwrap_err();
        assert!(matches!(e, Error::UnknownLabel { .. }));
        assert_eq!(
            e.to_string(),
            "unknown label `neutral` (known labels: negative, positive)"
        );
        assert!(Verbalizer::parse("a=x").is_err());
        assert!(Verbalizer::parse("a=x,a=y").is_err());
        assert!(Verbalizer::parse("a=x,b").is_err());
    }

    #[test]
    fn keep_tail_truncates_from_the_left() {
        assert_eq!(keep_tail(vec![1, 2, 3, 4], 2), vec![3, 4]);
        assert_eq!(keep_tail(vec![1, 2], 5), vec![1, 2]);
    }
}
