//! The frozen model behind every runtime.

use crate::{BackboneSpec, Batch, Error, Placement, Result, SoftPrompt};

/// What a backend can do beyond scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `loss_and_grad` returns the gradient with respect to the prompts.
    pub gradients: bool,
    /// `start_decode` returns a KV-cached decoding session.
    pub generation: bool,
    /// Where prompts may enter the backbone ([`SoftPrompt::placement`]).
    pub placements: &'static [Placement],
}

impl Capabilities {
    /// Prompts prepended to the input embeddings, the placement every backbone takes.
    pub const INPUT_EMBEDDINGS: &'static [Placement] = &[Placement::InputEmbeddings];
    /// Input embeddings and per-layer key/value prefixes (what a decoder with a key/value
    /// cache takes).
    pub const DECODER: &'static [Placement] =
        &[Placement::InputEmbeddings, Placement::KeyValuePrefix];
}

/// Per-row log-likelihood of the target tokens of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RowScores {
    /// Sum over the row's targets of `log p(target | prefix)`.
    pub logprob_sum: Vec<f64>,
    /// Number of targets of the row.
    pub num_targets: Vec<usize>,
}

impl RowScores {
    /// Mean negative log-likelihood over every target of the batch (Hugging Face's loss).
    pub fn mean_loss(&self) -> Result<f32> {
        let n: usize = self.num_targets.iter().sum();
        if n == 0 {
            return Err(Error::InvalidBatch("the batch has no target tokens".into()));
        }
        Ok((-self.logprob_sum.iter().sum::<f64>() / n as f64) as f32)
    }
}

/// Loss of a batch and its gradient with respect to each prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LossAndGrad {
    /// Mean negative log-likelihood over every target of the batch.
    pub loss: f32,
    /// `grads[i]` has the layout of `prompts[i].values()`; zero for prompts no row used.
    pub grads: Vec<Vec<f32>>,
}

/// A decoding session holding the KV cache of one sequence.
pub trait DecodeSession {
    /// Logits over the vocabulary for the next token.
    fn logits(&self) -> &[f32];
    /// Appends `token` and computes the next logits in one cached step.
    fn advance(&mut self, token: u32) -> Result<()>;
    /// Number of positions in the cache (virtual tokens included).
    fn position(&self) -> usize;
    /// The most positions the sequence may reach (the model's context), when known.
    fn max_positions(&self) -> Option<usize> {
        None
    }
}

/// A frozen language model that takes soft prompts.
///
/// Rows of a batch are `[prompt][tokens]`; each row names its prompt through
/// [`Batch::prompt_index`], so one call may mix prompts of different tasks (all prompts of one
/// call have the same number of virtual tokens). Backbone weights never change.
pub trait Backbone: Send + Sync {
    /// Short name of the runtime (`candle`, `tch`, `ort`, …), used in messages.
    fn backend_name(&self) -> &str;

    /// Identity of the loaded weights.
    fn spec(&self) -> &BackboneSpec;

    /// Optional capabilities.
    fn capabilities(&self) -> Capabilities;

    /// Input embeddings of `ids`, row-major `[ids.len(), hidden_size]`.
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>>;

    /// Per-row log-likelihood of the batch's target tokens.
    fn score(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<RowScores>;

    /// Mean negative log-likelihood of the batch's targets.
    fn loss(&self, prompts: &[SoftPrompt], batch: &Batch) -> Result<f32> {
        self.score(prompts, batch)?.mean_loss()
    }

    /// Log-probability of each of `candidates` as the next token after each row's last real
    /// token: rank classification with single-token labels in one pass. `out[row][k]` is
    /// `log p(candidates[k] | row)`. The provided method scores one expanded row per candidate;
    /// backends override it to share the prefix.
    fn next_token_logprobs(
        &self,
        prompts: &[SoftPrompt],
        batch: &Batch,
        candidates: &[u32],
    ) -> Result<Vec<Vec<f64>>> {
        let t = batch.seq_len();
        let mut rows = Vec::with_capacity(batch.rows() * candidates.len());
        for r in 0..batch.rows() {
            let ids = &batch.input_ids()[r * t..r * t + batch.row_len(r)];
            for c in candidates {
                rows.push(crate::BatchRow::with_continuation(
                    ids,
                    &[*c],
                    batch.prompt_index()[r],
                ));
            }
        }
        let scores = self.score(prompts, &Batch::from_rows(&rows, 0)?)?;
        Ok(scores
            .logprob_sum
            .chunks(candidates.len().max(1))
            .map(<[f64]>::to_vec)
            .collect())
    }

    /// Loss and its gradient with respect to the prompts. Backends without gradients answer
    /// with [`Error::Unsupported`].
    fn loss_and_grad(&self, _prompts: &[SoftPrompt], _batch: &Batch) -> Result<LossAndGrad> {
        Err(Error::unsupported(
            self.backend_name(),
            "gradients",
            Some("train with a gradient-free optimizer (spsa, cma-es) instead"),
        ))
    }

    /// Logits at every position, row-major `[rows, N + seq_len, vocab_size]`; `[rows, seq_len,
    /// vocab_size]` for key/value prefixes, whose virtual tokens have no positions of their own.
    fn logits(&self, _prompts: &[SoftPrompt], _batch: &Batch) -> Result<Vec<f32>> {
        Err(Error::unsupported(self.backend_name(), "full logits", None))
    }

    /// Starts KV-cached decoding after `[prompt][ids]`. The provided method decodes one
    /// sequence through [`Backbone::batch_decoder`] (unsupported without one).
    fn start_decode<'a>(
        &'a self,
        prompt: &SoftPrompt,
        ids: &[u32],
    ) -> Result<Box<dyn DecodeSession + 'a>> {
        match self.batch_decoder() {
            Some(decoder) => Ok(Box::new(crate::decode::OneSequence::start(
                decoder, prompt, ids,
            )?)),
            None => Err(Error::unsupported(self.backend_name(), "generation", None)),
        }
    }

    /// The key/value prefix that acts as `prompt` (input embeddings): every layer's keys and
    /// values of its virtual tokens, in PEFT's `past_key_values` layout `[N, layers·2·kv·hd]`
    /// ([`Placement::KeyValuePrefix`]). A batch behind the returned prefix scores as behind
    /// `prompt` (the tokens attend to the same keys and values at the same positions); prefix
    /// tuning starts from it to begin at a text's activations (Li & Liang's initialisation)
    /// rather than from noise. Backends without a key/value cache answer with
    /// [`Error::Unsupported`].
    fn key_value_prefix(&self, _prompt: &SoftPrompt) -> Result<SoftPrompt> {
        Err(Error::unsupported(
            self.backend_name(),
            "key/value prefixes of a prompt",
            Some("use the candle or tch backend"),
        ))
    }

    /// A decoder that advances many sequences (each with its own prompt) in one forward pass
    /// per step. `None` (the default) lets [`crate::batch_decoder`] fall back to one
    /// [`DecodeSession`] per sequence.
    fn batch_decoder(&self) -> Option<Box<dyn crate::BatchDecoder + '_>> {
        None
    }
}

/// Checks a prompt for [`Backbone::key_value_prefix`]: input embeddings of the backbone's
/// width, at least one virtual token. Returns its number of virtual tokens.
pub fn check_prefix_source<B: Backbone + ?Sized>(
    backbone: &B,
    prompt: &SoftPrompt,
) -> Result<usize> {
    if prompt.placement() != Placement::InputEmbeddings {
        return Err(Error::InvalidArgument(format!(
            "a key/value prefix is made from input embeddings, not from a prompt placed at `{}`",
            prompt.placement().as_str()
        )));
    }
    prompt.check_fits(backbone.spec())?;
    match prompt.num_virtual_tokens() {
        0 => Err(Error::InvalidArgument(
            "a key/value prefix needs at least one virtual token".into(),
        )),
        n => Ok(n),
    }
}

/// Lays out per-layer keys and values as PEFT's `past_key_values` prefix: `layers[l]` holds
/// layer `l`'s keys and values, each row-major `[kv_heads, N, head_dim]`; the result is `[N,
/// layers·2·kv_heads·head_dim]` (per virtual token: layer-major, keys before values, then
/// heads), a [`Placement::KeyValuePrefix`] prompt.
pub fn pack_key_value_prefix(
    layers: &[(Vec<f32>, Vec<f32>)],
    n: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<SoftPrompt> {
    let part = kv_heads * head_dim;
    if let Some((k, v)) = layers
        .iter()
        .find(|(k, v)| k.len() != n * part || v.len() != n * part)
    {
        return Err(Error::InvalidArgument(format!(
            "keys/values of {} and {} values, not {n}·{kv_heads}·{head_dim}",
            k.len(),
            v.len()
        )));
    }
    let width = layers.len() * 2 * part;
    let mut out = vec![0f32; n * width];
    for (l, (k, v)) in layers.iter().enumerate() {
        for (which, src) in [k, v].into_iter().enumerate() {
            for h in 0..kv_heads {
                for t in 0..n {
                    let from = (h * n + t) * head_dim;
                    let to = t * width + (2 * l + which) * part + h * head_dim;
                    out[to..to + head_dim].copy_from_slice(&src[from..from + head_dim]);
                }
            }
        }
    }
    Ok(SoftPrompt::new(n, width, out)?.with_placement(Placement::KeyValuePrefix))
}

/// Errors ([`Error::InvalidBatch`]) on the first token id outside a vocabulary of `vocab_size`.
pub fn check_token_ids(ids: impl IntoIterator<Item = u32>, vocab_size: usize) -> Result<()> {
    match ids.into_iter().find(|id| *id as usize >= vocab_size) {
        Some(id) => Err(Error::InvalidBatch(format!(
            "token id {id} is outside the vocabulary of {vocab_size}"
        ))),
        None => Ok(()),
    }
}

/// Checks that `prompts` fit `backbone` (a placement it takes, the width that placement needs on
/// it) and share one length and placement, and that `batch` is valid for them; returns the
/// length.
pub fn check_prompts<B: Backbone + ?Sized>(
    backbone: &B,
    prompts: &[SoftPrompt],
    batch: &Batch,
) -> Result<usize> {
    if prompts.is_empty() {
        return Err(Error::InvalidBatch(
            "no prompts given (use SoftPrompt::empty for none)".into(),
        ));
    }
    let spec = backbone.spec();
    check_placements(
        prompts,
        backbone.backend_name(),
        backbone.capabilities().placements,
    )?;
    for p in prompts {
        p.check_fits(spec)?;
    }
    let n = prompts[0].num_virtual_tokens();
    if let Some(p) = prompts.iter().find(|p| p.num_virtual_tokens() != n) {
        return Err(Error::InvalidBatch(format!(
            "prompts of one batch must have equal lengths ({n} and {} virtual tokens)",
            p.num_virtual_tokens()
        )));
    }
    batch.validate(prompts.len(), spec.vocab_size)?;
    Ok(n)
}

/// Errors unless every prompt's placement is one of `supported` (a typed
/// [`Error::Unsupported`] naming the backend) and all prompts share one placement.
pub fn check_placements(
    prompts: &[SoftPrompt],
    backend: &str,
    supported: &[Placement],
) -> Result<()> {
    if let Some(p) = prompts.iter().find(|p| !supported.contains(&p.placement())) {
        return Err(Error::unsupported(
            backend,
            &format!("prompts placed at `{}`", p.placement().as_str()),
            None,
        ));
    }
    if let Some(p) = prompts.first() {
        if prompts.iter().any(|q| q.placement() != p.placement()) {
            return Err(Error::InvalidBatch(
                "prompts of one batch must share one placement".into(),
            ));
        }
    }
    Ok(())
}

/// [`check_prompts`] for [`Backbone::next_token_logprobs`]: also every candidate must be in the
/// vocabulary and every row must have a last position (a real token or a prompt).
pub fn check_next_token<B: Backbone + ?Sized>(
    backbone: &B,
    prompts: &[SoftPrompt],
    batch: &Batch,
    candidates: &[u32],
) -> Result<usize> {
    let n = check_prompts(backbone, prompts, batch)?;
    let spec = backbone.spec();
    if let Some(c) = candidates.iter().find(|c| **c as usize >= spec.vocab_size) {
        return Err(Error::InvalidBatch(format!(
            "candidate {c} is outside the vocabulary"
        )));
    }
    if let Some(r) = (0..batch.rows()).find(|r| n + batch.row_len(*r) == 0) {
        return Err(Error::InvalidBatch(format!(
            "row {r} is empty and there is no prompt"
        )));
    }
    if prompts[0].placement() == Placement::KeyValuePrefix {
        if let Some(r) = (0..batch.rows()).find(|r| batch.row_len(*r) == 0) {
            return Err(Error::InvalidBatch(format!(
                "row {r} is empty: a key/value prefix predicts nothing by itself"
            )));
        }
    }
    Ok(n)
}

impl std::fmt::Debug for dyn Backbone + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backbone")
            .field("backend", &self.backend_name())
            .field("spec", self.spec())
            .finish()
    }
}
