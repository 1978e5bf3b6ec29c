//! Continuous batching: many KV-cached sequences, each with its own soft prompt, advanced
//! together one token at a time. Sequences join and leave between steps.

use std::collections::BTreeMap;

use crate::{Backbone, DecodeSession, Error, Result, SoftPrompt};

/// Identifies a sequence inside a [`BatchDecoder`].
pub type SeqId = u64;

/// KV-cached decoding of many sequences at once (continuous batching).
///
/// Each sequence has its own prompt (prompts of different tasks and lengths may be mixed) and
/// its own cache; [`BatchDecoder::step`] advances any subset of them in one forward pass.
pub trait BatchDecoder {
    /// Adds the sequence `[prompt][ids]`, runs its prefill and returns its id and the logits of
    /// its next token.
    fn add(&mut self, prompt: &SoftPrompt, ids: &[u32]) -> Result<(SeqId, Vec<f32>)>;

    /// Adds several sequences (any prompts) at once; backends batch their prefills. Results
    /// in order; on error none of them is added.
    fn add_many(&mut self, seqs: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqId, Vec<f32>)>> {
        let mut out = Vec::with_capacity(seqs.len());
        for (prompt, ids) in seqs {
            match self.add(prompt, ids) {
                Ok(x) => out.push(x),
                Err(e) => {
                    for (id, _) in out {
                        self.remove(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Appends `token` to each listed sequence (each at most once) and returns, in the same order,
    /// the logits of every sequence's next token.
    fn step(&mut self, tokens: &[(SeqId, u32)]) -> Result<Vec<Vec<f32>>>;

    /// Drops a sequence and its cache; unknown ids are ignored.
    fn remove(&mut self, id: SeqId);

    /// Number of live sequences.
    fn len(&self) -> usize;

    /// Whether no sequence is live.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions cached for `id` (virtual tokens included).
    fn position(&self, id: SeqId) -> Option<usize>;
}

/// The batch decoder of `backbone`: its own batched implementation when it has one
/// ([`Backbone::batch_decoder`]), otherwise [`SessionDecoder`], which advances one
/// [`DecodeSession`] per sequence in turn (correct for every backend with generation, not
/// batched).
pub fn batch_decoder(backbone: &dyn Backbone) -> Box<dyn BatchDecoder + '_> {
    backbone
        .batch_decoder()
        .unwrap_or_else(|| Box::new(SessionDecoder::new(backbone)))
}

/// A [`BatchDecoder`] built on a backend's single-sequence [`DecodeSession`]s: a step is one
/// cached forward pass per sequence.
pub struct SessionDecoder<'a> {
    backbone: &'a dyn Backbone,
    next_id: SeqId,
    sessions: BTreeMap<SeqId, Box<dyn DecodeSession + 'a>>,
}

impl<'a> SessionDecoder<'a> {
    /// An empty decoder over `backbone`.
    pub fn new(backbone: &'a dyn Backbone) -> Self {
        SessionDecoder {
            backbone,
            next_id: 0,
            sessions: BTreeMap::new(),
        }
    }
}

impl std::fmt::Debug for SessionDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionDecoder")
            .field("backend", &self.backbone.backend_name())
            .field("sequences", &self.sessions.len())
            .finish()
    }
}

/// Errors when `tokens` names a sequence twice or one that is not live.
pub fn check_step<T>(tokens: &[(SeqId, u32)], live: &BTreeMap<SeqId, T>) -> Result<()> {
    for (i, (id, _)) in tokens.iter().enumerate() {
        if !live.contains_key(id) {
            return Err(Error::InvalidArgument(format!(
                "sequence {id} is not in the decoder"
            )));
        }
        if tokens[..i].iter().any(|(other, _)| other == id) {
            return Err(Error::InvalidArgument(format!(
                "sequence {id} appears twice in one step"
            )));
        }
    }
    Ok(())
}

impl BatchDecoder for SessionDecoder<'_> {
    fn add(&mut self, prompt: &SoftPrompt, ids: &[u32]) -> Result<(SeqId, Vec<f32>)> {
        let session = self.backbone.start_decode(prompt, ids)?;
        let logits = session.logits().to_vec();
        let id = self.next_id;
        self.next_id += 1;
        self.sessions.insert(id, session);
        Ok((id, logits))
    }

    fn step(&mut self, tokens: &[(SeqId, u32)]) -> Result<Vec<Vec<f32>>> {
        check_step(tokens, &self.sessions)?;
        let mut out = Vec::with_capacity(tokens.len());
        for (id, token) in tokens {
            let s = self.sessions.get_mut(id).expect("checked above");
            s.advance(*token)?;
            out.push(s.logits().to_vec());
        }
        Ok(out)
    }

    fn remove(&mut self, id: SeqId) {
        self.sessions.remove(&id);
    }

    fn len(&self) -> usize {
        self.sessions.len()
    }

    fn position(&self, id: SeqId) -> Option<usize> {
        self.sessions.get(&id).map(|s| s.position())
    }
}
