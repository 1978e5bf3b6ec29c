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

    /// The most positions a sequence may reach (the model's context), when known.
    fn max_positions(&self) -> Option<usize> {
        None
    }
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

/// How a [`Batcher`] groups the sequences it prefills together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillPlan {
    /// Sequences whose prompts have the same number of virtual tokens and the same placement, in
    /// right-padded passes of at most `rows` sequences (a padded batch needs one prompt length
    /// and one placement).
    EqualPromptLength {
        /// Most sequences per pass.
        rows: usize,
    },
    /// Any sequences, packed without padding, up to `tokens` input tokens per pass (at least
    /// one sequence).
    Packed {
        /// Most input tokens per pass.
        tokens: usize,
    },
}

/// What a runtime supplies to continuous batching: the prefill of a group of sequences and one
/// decode step over many sequences' caches. Everything else — checking inputs, grouping and
/// chunking prefills, per-sequence bookkeeping, rolling back a failed pass — is [`Batcher`]'s.
pub trait DecodeKernels {
    /// One sequence's keys and values.
    type Cache;

    /// Identity of the backbone (hidden size and vocabulary checked against every input).
    fn spec(&self) -> &crate::BackboneSpec;

    /// Longest sequence (virtual tokens included) the model supports.
    fn max_positions(&self) -> usize;

    /// Where prompts may enter (input embeddings unless the kernels say more).
    fn placements(&self) -> &'static [crate::Placement] {
        crate::Capabilities::INPUT_EMBEDDINGS
    }

    /// Name of the runtime, in messages.
    fn backend_name(&self) -> &str;

    /// How prefills are grouped.
    fn plan(&self) -> PrefillPlan;

    /// Prefills a group the plan formed (or one sequence alone, possibly without input
    /// tokens): each sequence's cache and the logits of its next token, in order.
    fn prefill(&self, group: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(Self::Cache, Vec<f32>)>>;

    /// Appends `tokens[r]` to `caches[r]` and returns the logits of each sequence's next token.
    /// On error the caches may hold partial appends: the batcher truncates them back.
    fn step(&self, caches: &mut [&mut Self::Cache], tokens: &[u32]) -> Result<Vec<Vec<f32>>>;

    /// Positions held by `cache` (virtual tokens included).
    fn cache_len(&self, cache: &Self::Cache) -> usize;

    /// Drops every position of `cache` from `len` on. A cache that already dropped positions
    /// a sequence of `len` would see (sliding-window layers keep only the window) refuses.
    fn truncate(&self, cache: &mut Self::Cache, len: usize) -> Result<()>;
}

/// Continuous batching over a runtime's [`DecodeKernels`]: sequences join (prefills grouped
/// as the kernels' [`PrefillPlan`] says), advance together one step at a time and leave.
pub struct Batcher<K: DecodeKernels> {
    kernels: K,
    next_id: SeqId,
    seqs: BTreeMap<SeqId, K::Cache>,
}

impl<K: DecodeKernels> std::fmt::Debug for Batcher<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("sequences", &self.seqs.len())
            .field("plan", &self.kernels.plan())
            .finish()
    }
}

impl<K: DecodeKernels> Batcher<K> {
    /// An empty batcher over `kernels`.
    pub fn new(kernels: K) -> Self {
        Batcher {
            kernels,
            next_id: 0,
            seqs: BTreeMap::new(),
        }
    }

    fn check_length(&self, positions: usize) -> Result<()> {
        let max = self.kernels.max_positions();
        if positions > max {
            return Err(Error::InvalidBatch(format!(
                "{positions} positions (virtual tokens included) exceed the model's maximum of {max}"
            )));
        }
        Ok(())
    }

    /// Groups of sequence indices, each prefilled in one kernel call.
    fn groups(&self, seqs: &[(&SoftPrompt, &[u32])]) -> Vec<Vec<usize>> {
        // a sequence without input tokens is its prompt alone: prefilled by itself
        let mut groups: Vec<Vec<usize>> = (0..seqs.len())
            .filter(|i| seqs[*i].1.is_empty())
            .map(|i| vec![i])
            .collect();
        let with_input: Vec<usize> = (0..seqs.len()).filter(|i| !seqs[*i].1.is_empty()).collect();
        match self.kernels.plan() {
            PrefillPlan::EqualPromptLength { rows } => {
                // a padded pass takes one prompt length and one placement
                let mut by_len: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
                for i in with_input {
                    let p = seqs[i].0;
                    by_len
                        .entry((p.num_virtual_tokens(), p.placement().as_str()))
                        .or_default()
                        .push(i);
                }
                for members in by_len.into_values() {
                    groups.extend(members.chunks(rows.max(1)).map(<[usize]>::to_vec));
                }
            }
            PrefillPlan::Packed { tokens } => {
                let mut group: Vec<usize> = Vec::new();
                let mut used = 0;
                for i in with_input {
                    let n = seqs[i].1.len();
                    if !group.is_empty() && used + n > tokens {
                        groups.push(std::mem::take(&mut group));
                        used = 0;
                    }
                    group.push(i);
                    used += n;
                }
                if !group.is_empty() {
                    groups.push(group);
                }
            }
        }
        groups
    }
}

impl<K: DecodeKernels> BatchDecoder for Batcher<K> {
    fn max_positions(&self) -> Option<usize> {
        Some(self.kernels.max_positions())
    }

    fn add(&mut self, prompt: &SoftPrompt, ids: &[u32]) -> Result<(SeqId, Vec<f32>)> {
        let mut out = self.add_many(&[(prompt, ids)])?;
        Ok(out.remove(0))
    }

    /// Checks every sequence, prefills the groups of the kernels' plan, then adds them all (on
    /// error none is added).
    fn add_many(&mut self, seqs: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(SeqId, Vec<f32>)>> {
        let spec = self.kernels.spec();
        for (prompt, ids) in seqs {
            crate::backbone::check_placements(
                std::slice::from_ref(*prompt),
                self.kernels.backend_name(),
                self.kernels.placements(),
            )?;
            prompt.check_fits(spec)?;
            if prompt.num_virtual_tokens() + ids.len() == 0 {
                return Err(Error::InvalidArgument(
                    "generation needs a prompt or at least one input token".into(),
                ));
            }
            if ids.is_empty() && prompt.placement() == crate::Placement::KeyValuePrefix {
                return Err(Error::InvalidArgument(
                    "a key/value prefix predicts nothing by itself: give at least one input token"
                        .into(),
                ));
            }
            self.check_length(prompt.num_virtual_tokens() + ids.len())?;
            crate::backbone::check_token_ids(ids.iter().copied(), spec.vocab_size)?;
        }
        let mut done: Vec<Option<(K::Cache, Vec<f32>)>> = (0..seqs.len()).map(|_| None).collect();
        for group in self.groups(seqs) {
            let members: Vec<(&SoftPrompt, &[u32])> = group.iter().map(|i| seqs[*i]).collect();
            let out = self.kernels.prefill(&members)?;
            if out.len() != group.len() {
                return Err(Error::backend(
                    "batcher",
                    format!("a prefill of {} sequences gave {}", group.len(), out.len()),
                ));
            }
            for (i, seq) in group.into_iter().zip(out) {
                done[i] = Some(seq);
            }
        }
        Ok(done
            .into_iter()
            .map(|d| {
                let (cache, logits) = d.expect("every sequence is in one group");
                let id = self.next_id;
                self.next_id += 1;
                self.seqs.insert(id, cache);
                (id, logits)
            })
            .collect())
    }

    fn step(&mut self, tokens: &[(SeqId, u32)]) -> Result<Vec<Vec<f32>>> {
        check_step(tokens, &self.seqs)?;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let lens: Vec<usize> = tokens
            .iter()
            .map(|(id, _)| self.kernels.cache_len(&self.seqs[id]))
            .collect();
        for len in &lens {
            self.check_length(len + 1)?;
        }
        let ids: Vec<u32> = tokens.iter().map(|(_, t)| *t).collect();
        crate::backbone::check_token_ids(ids.iter().copied(), self.kernels.spec().vocab_size)?;
        // the listed sequences' caches in the order of `tokens` (distinct: checked)
        let mut by_id: BTreeMap<SeqId, &mut K::Cache> = self
            .seqs
            .iter_mut()
            .filter(|(id, _)| tokens.iter().any(|(t, _)| t == *id))
            .map(|(id, c)| (*id, c))
            .collect();
        let mut caches: Vec<&mut K::Cache> = tokens
            .iter()
            .map(|(id, _)| by_id.remove(id).expect("checked above"))
            .collect();
        let err = match self.kernels.step(&mut caches, &ids) {
            Ok(logits) => return Ok(logits),
            Err(e) => e,
        };
        // undo whatever the failed pass appended; a cache that cannot be restored is dropped
        // with its sequence rather than left inconsistent
        let broken: Vec<SeqId> = caches
            .into_iter()
            .zip(&lens)
            .zip(tokens)
            .filter_map(|((cache, len), (id, _))| {
                self.kernels.truncate(cache, *len).err().map(|_| *id)
            })
            .collect();
        for id in broken {
            self.seqs.remove(&id);
        }
        Err(err)
    }

    fn remove(&mut self, id: SeqId) {
        self.seqs.remove(&id);
    }

    fn len(&self) -> usize {
        self.seqs.len()
    }

    fn position(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|c| self.kernels.cache_len(c))
    }
}

/// One sequence decoded through a [`BatchDecoder`]: the [`DecodeSession`] of every backend that
/// has a batch decoder.
pub struct OneSequence<'a> {
    decoder: Box<dyn BatchDecoder + 'a>,
    id: SeqId,
    logits: Vec<f32>,
}

impl<'a> OneSequence<'a> {
    /// Prefills `[prompt][ids]` in `decoder`.
    pub fn start(
        mut decoder: Box<dyn BatchDecoder + 'a>,
        prompt: &SoftPrompt,
        ids: &[u32],
    ) -> Result<Self> {
        let (id, logits) = decoder.add(prompt, ids)?;
        Ok(OneSequence {
            decoder,
            id,
            logits,
        })
    }
}

impl std::fmt::Debug for OneSequence<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OneSequence(at {})", self.position())
    }
}

impl DecodeSession for OneSequence<'_> {
    fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn advance(&mut self, token: u32) -> Result<()> {
        let mut out = self.decoder.step(&[(self.id, token)])?;
        self.logits = out.pop().unwrap_or_default();
        Ok(())
    }

    fn position(&self) -> usize {
        self.decoder.position(self.id).unwrap_or(0)
    }

    fn max_positions(&self) -> Option<usize> {
        self.decoder.max_positions()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::{Architecture, BackboneSpec};

    /// A cache is the list of positions seen (prompt values' first entries, then tokens);
    /// logits are `[len, last token]`. Token 99 makes a step fail after appending.
    struct Toy {
        spec: BackboneSpec,
        plan: PrefillPlan,
        calls: RefCell<Vec<Vec<usize>>>,
    }

    fn toy(plan: PrefillPlan) -> Toy {
        Toy {
            spec: BackboneSpec {
                architecture: Architecture::llama(),
                hidden_size: 1,
                vocab_size: 100,
                num_layers: 1,
                num_attention_heads: 1,
                num_key_value_heads: 1,
                head_dim: 1,
                fingerprint: "toy".into(),
                name: "toy".into(),
            },
            plan,
            calls: RefCell::new(Vec::new()),
        }
    }

    impl DecodeKernels for Toy {
        type Cache = Vec<u32>;
        fn spec(&self) -> &BackboneSpec {
            &self.spec
        }
        fn max_positions(&self) -> usize {
            8
        }
        fn backend_name(&self) -> &str {
            "toy"
        }
        fn plan(&self) -> PrefillPlan {
            self.plan
        }
        fn placements(&self) -> &'static [crate::Placement] {
            crate::Capabilities::DECODER
        }
        fn prefill(&self, group: &[(&SoftPrompt, &[u32])]) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
            self.calls
                .borrow_mut()
                .push(group.iter().map(|(_, ids)| ids.len()).collect());
            group
                .iter()
                .map(|(p, ids)| {
                    if ids.contains(&98) {
                        return Err(Error::InvalidBatch("token 98".into()));
                    }
                    let mut c: Vec<u32> = p.values().iter().map(|v| *v as u32).collect();
                    c.extend_from_slice(ids);
                    let logits = vec![c.len() as f32, *c.last().unwrap_or(&0) as f32];
                    Ok((c, logits))
                })
                .collect()
        }
        fn step(&self, caches: &mut [&mut Vec<u32>], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
            for (c, t) in caches.iter_mut().zip(tokens) {
                c.push(*t);
            }
            if tokens.contains(&99) {
                return Err(Error::InvalidBatch("token 99".into()));
            }
            Ok(caches
                .iter()
                .map(|c| vec![c.len() as f32, *c.last().unwrap() as f32])
                .collect())
        }
        fn cache_len(&self, cache: &Vec<u32>) -> usize {
            cache.len()
        }
        fn truncate(&self, cache: &mut Vec<u32>, len: usize) -> Result<()> {
            cache.truncate(len);
            Ok(())
        }
    }

    fn prompt(n: usize) -> SoftPrompt {
        SoftPrompt::new(n, 1, vec![7.0; n]).unwrap()
    }

    #[test]
    fn equal_prompt_length_plan_groups_and_chunks() {
        let (p1, p2) = (prompt(1), prompt(2));
        let mut b = Batcher::new(toy(PrefillPlan::EqualPromptLength { rows: 2 }));
        let seqs: Vec<(&SoftPrompt, &[u32])> = vec![
            (&p1, &[1]),
            (&p2, &[2, 3]),
            (&p1, &[4, 5, 6]),
            (&p2, &[]),
            (&p1, &[7]),
        ];
        let out = b.add_many(&seqs).unwrap();
        // the prompt-only sequence alone; prompt length 1: [1, 3] then [1]; length 2: [2]
        assert_eq!(
            *b.kernels.calls.borrow(),
            vec![vec![0], vec![1, 3], vec![1], vec![2]]
        );
        // results in the caller's order
        let lens: Vec<f32> = out.iter().map(|(_, l)| l[0]).collect();
        assert_eq!(lens, vec![2.0, 4.0, 4.0, 2.0, 2.0]);
        assert_eq!(b.len(), 5);
        assert_eq!(b.position(out[2].0), Some(4));
    }

    #[test]
    fn padded_groups_take_one_placement() {
        let p = prompt(1);
        // a prefix of one virtual token on the toy: layers·2·kv·hd = 2 values
        let k = SoftPrompt::new(1, 2, vec![5.0, 6.0])
            .unwrap()
            .with_placement(crate::Placement::KeyValuePrefix);
        let mut b = Batcher::new(toy(PrefillPlan::EqualPromptLength { rows: 4 }));
        let seqs: Vec<(&SoftPrompt, &[u32])> = vec![(&p, &[1]), (&k, &[2, 3]), (&p, &[4])];
        b.add_many(&seqs).unwrap();
        // same length, two placements: two passes
        assert_eq!(*b.kernels.calls.borrow(), vec![vec![1, 1], vec![2]]);
        // and a prefix alone predicts nothing
        assert!(matches!(
            b.add(&k, &[]),
            Err(Error::InvalidArgument(m)) if m.contains("key/value prefix")
        ));
    }

    #[test]
    fn packed_plan_fills_a_token_budget() {
        let p = prompt(1);
        let mut b = Batcher::new(toy(PrefillPlan::Packed { tokens: 4 }));
        let seqs: Vec<(&SoftPrompt, &[u32])> = vec![
            (&p, &[1, 2]),
            (&p, &[3]),
            (&p, &[4, 5]),
            (&p, &[6, 6, 6, 6, 6]),
        ];
        b.add_many(&seqs).unwrap();
        assert_eq!(
            *b.kernels.calls.borrow(),
            vec![vec![2, 1], vec![2], vec![5]]
        );
    }

    #[test]
    fn a_failed_prefill_adds_nothing_and_a_failed_step_rolls_back() {
        let p = prompt(1);
        let mut b = Batcher::new(toy(PrefillPlan::EqualPromptLength { rows: 1 }));
        let err = b.add_many(&[(&p, &[1][..]), (&p, &[98][..])]).unwrap_err();
        assert!(matches!(err, Error::InvalidBatch(_)), "{err}");
        assert!(b.is_empty());
        let out = b.add_many(&[(&p, &[1][..]), (&p, &[2, 3][..])]).unwrap();
        let (a, c) = (out[0].0, out[1].0);
        assert!(b.step(&[(a, 5), (c, 99)]).is_err());
        // both caches back to their lengths before the step
        assert_eq!((b.position(a), b.position(c)), (Some(2), Some(3)));
        let logits = b.step(&[(c, 4), (a, 6)]).unwrap();
        assert_eq!(logits, vec![vec![4.0, 4.0], vec![3.0, 6.0]]);
    }

    #[test]
    fn inputs_are_checked_before_any_work() {
        let p = prompt(1);
        let mut b = Batcher::new(toy(PrefillPlan::Packed { tokens: 8 }));
        let wide = SoftPrompt::new(1, 2, vec![0.0; 2]).unwrap();
        let empty = SoftPrompt::empty(1);
        assert!(matches!(
            b.add(&wide, &[1]),
            Err(Error::HiddenSizeMismatch { .. })
        ));
        assert!(matches!(b.add(&empty, &[]), Err(Error::InvalidArgument(_))));
        assert!(matches!(b.add(&p, &[100]), Err(Error::InvalidBatch(_))));
        assert!(matches!(b.add(&p, &[1; 8]), Err(Error::InvalidBatch(_))));
        assert!(b.kernels.calls.borrow().is_empty());
        let (id, _) = b.add(&p, &[1; 7]).unwrap();
        // a step past the model's positions is refused before the kernel runs
        assert!(matches!(b.step(&[(id, 1)]), Err(Error::InvalidBatch(_))));
        assert!(matches!(
            b.step(&[(id + 1, 1)]),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(b.position(id), Some(8));
    }
}
