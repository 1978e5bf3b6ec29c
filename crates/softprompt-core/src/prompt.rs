//! The soft prompt: `N` learnable vectors of the backbone's hidden size.

use serde::{Deserialize, Serialize};

use crate::{Backbone, BackboneSpec, Error, Result, Rng, TextTokenizer};

/// Where a prompt's values enter the backbone. The values are always one tensor
/// `[num_virtual_tokens, width]` (PEFT stores every prompt-learning method that way); the
/// placement says what a row means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Prepended to the embedded input (prompt tuning; P-tuning's encoder output): a row is an
    /// input embedding, `width = hidden_size`.
    #[default]
    InputEmbeddings,
    /// Keys and values prepended at every layer (prefix tuning, P-tuning v2), PEFT's
    /// `past_key_values` layout: `width = layers · 2 · kv_heads · head_dim`.
    KeyValuePrefix,
    /// Tokens inserted after a vision transformer's class token (visual prompt tuning):
    /// `width = hidden_size`.
    AfterClassToken,
    /// Fresh tokens after the class token at every block of a vision transformer (VPT-deep):
    /// block `l` takes columns `l·d..(l+1)·d`, `width = layers · hidden_size`.
    DeepAfterClassToken,
    /// A learned pattern added to the normalised pixels of an image (visual prompting, Bahng et
    /// al.; trained as a frame along the border): one row of `width = channels · size · size` for
    /// images of `size` pixels.
    Pixels,
}

impl Placement {
    /// Width of one virtual token for a backbone of `spec`.
    pub fn width(&self, spec: &BackboneSpec) -> usize {
        match self {
            Placement::InputEmbeddings | Placement::AfterClassToken => spec.hidden_size,
            Placement::KeyValuePrefix => {
                spec.num_layers * 2 * spec.num_key_value_heads * spec.head_dim
            }
            Placement::DeepAfterClassToken => spec.num_layers * spec.hidden_size,
            // sized by the images, not by the backbone
            Placement::Pixels => 0,
        }
    }

    /// Lower-case name, as in messages and configs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Placement::InputEmbeddings => "input_embeddings",
            Placement::KeyValuePrefix => "key_value_prefix",
            Placement::AfterClassToken => "after_class_token",
            Placement::DeepAfterClassToken => "deep_after_class_token",
            Placement::Pixels => "pixels",
        }
    }
}

/// The reparameterising encoder of P-tuning (PEFT's `encoder_reparameterization_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EncoderKind {
    /// Three linear layers with ReLU between them.
    Mlp,
    /// A bidirectional LSTM followed by a two-layer MLP.
    Lstm,
}

impl EncoderKind {
    /// PEFT's name (`MLP`, `LSTM`).
    pub fn peft_name(&self) -> &'static str {
        match self {
            EncoderKind::Mlp => "MLP",
            EncoderKind::Lstm => "LSTM",
        }
    }
}

/// A prompt-learning method: which parameters are trained and how they become the values a
/// backbone reads ([`SoftPrompt`] at [`PromptMethod::placement`]). Every method saves those
/// values, as PEFT does, so a backbone never needs to know the method.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum PromptMethod {
    /// Lester et al.: the values are the parameters, prepended to the input embeddings.
    #[default]
    PromptTuning,
    /// Li & Liang: keys and values prepended at every layer (P-tuning v2 is the same), trained
    /// directly or, with `projection`, as the output of an MLP over `[N, kv width]` embeddings
    /// (`Linear(kv width, projection) → tanh → Linear(projection, layers·2·kv width)`).
    PrefixTuning {
        /// Hidden width of the reparameterising MLP (`None`: no projection).
        projection: Option<usize>,
    },
    /// Liu et al.: prompt embeddings that are the output of an encoder (MLP or LSTM) over
    /// trainable virtual-token embeddings, prepended to the input embeddings.
    PTuning {
        /// MLP or LSTM.
        encoder: EncoderKind,
        /// Hidden width of the encoder.
        hidden_size: usize,
        /// LSTM layers (the MLP always has three linear layers, as in PEFT).
        num_layers: usize,
        /// Dropout between LSTM layers during training (PEFT's `encoder_dropout`).
        dropout: f32,
    },
}

impl PromptMethod {
    /// Where the method's values enter the backbone.
    pub fn placement(&self) -> Placement {
        match self {
            PromptMethod::PrefixTuning { .. } => Placement::KeyValuePrefix,
            PromptMethod::PromptTuning | PromptMethod::PTuning { .. } => Placement::InputEmbeddings,
        }
    }

    /// PEFT's `peft_type`.
    pub fn peft_type(&self) -> &'static str {
        match self {
            PromptMethod::PromptTuning => "PROMPT_TUNING",
            PromptMethod::PrefixTuning { .. } => "PREFIX_TUNING",
            PromptMethod::PTuning { .. } => "P_TUNING",
        }
    }

    /// Short name, as on the command line (`prompt`, `prefix`, `p-tuning`).
    pub fn name(&self) -> &'static str {
        match self {
            PromptMethod::PromptTuning => "prompt",
            PromptMethod::PrefixTuning { .. } => "prefix",
            PromptMethod::PTuning { .. } => "p-tuning",
        }
    }
}

/// Host-side soft prompt, row-major `[num_virtual_tokens, width]` f32, and where it enters
/// the backbone ([`Placement`]; the width is the hidden size for input embeddings).
#[derive(Debug, Clone, PartialEq)]
pub struct SoftPrompt {
    num_virtual_tokens: usize,
    hidden_size: usize,
    values: Vec<f32>,
    placement: Placement,
}

impl SoftPrompt {
    /// Wraps `values`; errors unless `values.len() == num_virtual_tokens * hidden_size`.
    pub fn new(num_virtual_tokens: usize, hidden_size: usize, values: Vec<f32>) -> Result<Self> {
        if values.len() != num_virtual_tokens * hidden_size {
            return Err(Error::Shape(format!(
                "soft prompt [{num_virtual_tokens}, {hidden_size}] needs {} values, got {}",
                num_virtual_tokens * hidden_size,
                values.len()
            )));
        }
        Ok(SoftPrompt {
            num_virtual_tokens,
            hidden_size,
            values,
            placement: Placement::InputEmbeddings,
        })
    }

    /// The same values placed at `placement`.
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Where the values enter the backbone.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// A prompt of zero virtual tokens: the plain (zero-shot) model.
    pub fn empty(hidden_size: usize) -> Self {
        SoftPrompt {
            num_virtual_tokens: 0,
            hidden_size,
            values: Vec::new(),
            placement: Placement::InputEmbeddings,
        }
    }

    /// Number of virtual tokens `N`.
    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    /// Width of each virtual token (`d` for input embeddings; see [`Placement::width`]).
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Row-major values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Mutable row-major values (what an [`crate::Optimizer`] updates).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Consumes the prompt, returning its values.
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    /// Errors unless this prompt's width is what its placement needs on a backbone of `spec`.
    pub fn check_fits(&self, spec: &BackboneSpec) -> Result<()> {
        self.check_hidden_size(self.placement.width(spec))
    }

    /// Errors unless this prompt fits a backbone of `hidden_size`.
    pub fn check_hidden_size(&self, hidden_size: usize) -> Result<()> {
        if self.hidden_size != hidden_size {
            return Err(Error::HiddenSizeMismatch {
                prompt: self.hidden_size,
                backbone: hidden_size,
            });
        }
        Ok(())
    }

    /// Builds a prompt as `init` prescribes.
    pub fn initialize(
        init: &PromptInit,
        num_virtual_tokens: usize,
        backbone: &dyn Backbone,
        tokenizer: Option<&dyn TextTokenizer>,
        rng: &mut Rng,
    ) -> Result<Self> {
        let spec = backbone.spec();
        let d = spec.hidden_size;
        let ids: Vec<u32> = match init {
            PromptInit::Uniform { range } => {
                let values = (0..num_virtual_tokens * d)
                    .map(|_| rng.uniform(-range, *range))
                    .collect();
                return SoftPrompt::new(num_virtual_tokens, d, values);
            }
            PromptInit::Vocab => (0..num_virtual_tokens)
                .map(|_| rng.below(spec.vocab_size) as u32)
                .collect(),
            PromptInit::Text { text } => {
                let tok = tokenizer.ok_or_else(|| {
                    Error::InvalidArgument("text initialisation needs a tokenizer".into())
                })?;
                let ids = tok.encode(text, false)?;
                tile_to(&ids, num_virtual_tokens, "init text")?
            }
            PromptInit::Labels { labels } => {
                let tok = tokenizer.ok_or_else(|| {
                    Error::InvalidArgument("label initialisation needs a tokenizer".into())
                })?;
                let mut ids = Vec::new();
                for label in labels {
                    ids.extend(tok.encode(label, false)?);
                }
                // Lester et al.: label embeddings first, the rest from sampled vocabulary rows.
                ids.truncate(num_virtual_tokens);
                while ids.len() < num_virtual_tokens {
                    ids.push(rng.below(spec.vocab_size) as u32);
                }
                ids
            }
        };
        let values = backbone.embed(&ids)?;
        SoftPrompt::new(num_virtual_tokens, d, values)
    }
}

/// PEFT's rule for text initialisation: repeat the token ids until there are enough, then truncate.
fn tile_to(ids: &[u32], n: usize, what: &str) -> Result<Vec<u32>> {
    if ids.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{what} encodes to no tokens"
        )));
    }
    Ok(ids.iter().cycle().take(n).copied().collect())
}

/// How the prompt values are initialised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PromptInit {
    /// Uniform in `[-range, range]` (Lester et al. use 0.5).
    Uniform {
        /// Half-width of the interval.
        range: f32,
    },
    /// Embeddings of vocabulary rows sampled uniformly.
    Vocab,
    /// Embeddings of the tokens of `text`, tiled and truncated to `N` (PEFT's `TEXT` init).
    Text {
        /// Initialisation text.
        text: String,
    },
    /// Embeddings of the class-label words, then sampled vocabulary rows (Lester et al.).
    Labels {
        /// Label words, e.g. `[" negative", " positive"]`.
        labels: Vec<String>,
    },
}

impl PromptInit {
    /// PEFT's `prompt_tuning_init` name for this initialisation.
    pub fn peft_name(&self) -> &'static str {
        match self {
            PromptInit::Text { .. } => "TEXT",
            PromptInit::Vocab => "SAMPLE_VOCAB",
            PromptInit::Uniform { .. } | PromptInit::Labels { .. } => "RANDOM",
        }
    }
}

/// What a backend computed from a prompt and reuses while serving (the keys and values of its
/// virtual tokens): looked up by the prompt's values, bounded, oldest entry evicted first. A
/// server scoring or generating for the same prompts call after call then pays only for the
/// input tokens.
pub struct PrefixCache<V> {
    entries: std::collections::VecDeque<(Placement, Vec<f32>, V)>,
    capacity: usize,
}

impl<V> PrefixCache<V> {
    /// Keeps up to `capacity` prompts (0 keeps none).
    pub fn new(capacity: usize) -> Self {
        PrefixCache {
            entries: std::collections::VecDeque::new(),
            capacity,
        }
    }

    /// What was stored for a prompt with exactly these values (and placement).
    pub fn get(&self, prompt: &SoftPrompt) -> Option<&V> {
        self.entries
            .iter()
            .find(|(p, v, _)| *p == prompt.placement() && v.as_slice() == prompt.values())
            .map(|(_, _, x)| x)
    }

    /// Stores `value` for `prompt` (replacing an entry with the same values), evicting the oldest
    /// entries beyond the capacity.
    pub fn insert(&mut self, prompt: &SoftPrompt, value: V) {
        self.entries
            .retain(|(p, v, _)| *p != prompt.placement() || v.as_slice() != prompt.values());
        self.entries
            .push_back((prompt.placement(), prompt.values().to_vec(), value));
        while self.entries.len() > self.capacity {
            self.entries.pop_front();
        }
    }

    /// Prompts stored.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<V> std::fmt::Debug for PrefixCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PrefixCache({} of {} prompts)",
            self.entries.len(),
            self.capacity
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_cache_matches_by_value_and_evicts_the_oldest() {
        let p = |x: f32| SoftPrompt::new(1, 2, vec![x, 1.0]).unwrap();
        let mut cache = PrefixCache::new(2);
        cache.insert(&p(1.0), "one");
        cache.insert(&p(2.0), "two");
        assert_eq!(cache.get(&p(1.0)), Some(&"one"));
        assert_eq!(cache.get(&p(3.0)), None);
        cache.insert(&p(1.0), "one again"); // replaces, and becomes the newest
        assert_eq!(cache.len(), 2);
        cache.insert(&p(3.0), "three"); // evicts "two", the oldest
        assert_eq!(cache.get(&p(2.0)), None);
        assert_eq!(cache.get(&p(1.0)), Some(&"one again"));
        assert_eq!(cache.get(&p(3.0)), Some(&"three"));
        let mut none = PrefixCache::new(0);
        none.insert(&p(1.0), 1);
        assert!(none.is_empty());
    }

    #[test]
    fn new_checks_length() {
        assert!(SoftPrompt::new(2, 3, vec![0.0; 6]).is_ok());
        let err = SoftPrompt::new(2, 3, vec![0.0; 5]).unwrap_err();
        assert!(err.to_string().contains("needs 6 values, got 5"), "{err}");
    }

    #[test]
    fn tiling_follows_peft() {
        assert_eq!(
            tile_to(&[1, 2, 3], 7, "t").unwrap(),
            vec![1, 2, 3, 1, 2, 3, 1]
        );
        assert_eq!(tile_to(&[1, 2, 3], 2, "t").unwrap(), vec![1, 2]);
        assert!(tile_to(&[], 2, "t").is_err());
    }

    #[test]
    fn placement_widths_and_cache_keys() {
        let spec = BackboneSpec {
            architecture: crate::Architecture::llama(),
            hidden_size: 8,
            vocab_size: 10,
            num_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 2,
            fingerprint: "f".into(),
            name: "n".into(),
        };
        assert_eq!(Placement::InputEmbeddings.width(&spec), 8);
        assert_eq!(Placement::AfterClassToken.width(&spec), 8);
        assert_eq!(Placement::KeyValuePrefix.width(&spec), 3 * 2 * 2 * 2);
        let p = SoftPrompt::new(1, 8, vec![0.5; 8]).unwrap();
        assert!(p.check_fits(&spec).is_ok());
        let kv = SoftPrompt::new(1, 8, vec![0.5; 8])
            .unwrap()
            .with_placement(Placement::KeyValuePrefix);
        assert!(matches!(
            kv.check_fits(&spec),
            Err(Error::HiddenSizeMismatch {
                prompt: 8,
                backbone: 24
            })
        ));
        // equal values at another placement are another prompt
        let mut cache = PrefixCache::new(4);
        cache.insert(&p, 1);
        assert_eq!(cache.get(&kv), None);
        assert_eq!(cache.get(&p), Some(&1));
    }

    #[test]
    fn hidden_size_mismatch_is_typed() {
        let p = SoftPrompt::new(1, 4, vec![0.0; 4]).unwrap();
        assert!(matches!(
            p.check_hidden_size(8),
            Err(Error::HiddenSizeMismatch {
                prompt: 4,
                backbone: 8
            })
        ));
    }
}
