//! A batch of rows `[prompt][tokens]`, right padded, with per-row prompt selection.

use crate::{Error, Result, SoftPrompt};

/// One row before padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    /// Token ids of the row (without the virtual tokens).
    pub ids: Vec<u32>,
    /// `targets[t]` is true when token `t` is predicted and counted in the loss / score.
    pub targets: Vec<bool>,
    /// Which of the prompts passed alongside the batch this row is prefixed with.
    pub prompt: usize,
}

impl BatchRow {
    /// A row whose tokens from `first_target` on are targets: `context ++ continuation`.
    pub fn with_continuation(context: &[u32], continuation: &[u32], prompt: usize) -> Self {
        let mut ids = context.to_vec();
        ids.extend_from_slice(continuation);
        let mut targets = vec![false; context.len()];
        targets.extend(std::iter::repeat_n(true, continuation.len()));
        BatchRow {
            ids,
            targets,
            prompt,
        }
    }
}

/// Right-padded batch, row-major `[rows, seq_len]`.
///
/// Target token `t` of a row is predicted from the hidden state at full position
/// `N + t - 1`, where `N` is the number of virtual tokens (the convention of Hugging Face's
/// shifted labels with PEFT's prompt prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    rows: usize,
    seq_len: usize,
    input_ids: Vec<u32>,
    attention_mask: Vec<bool>,
    loss_mask: Vec<bool>,
    prompt_index: Vec<usize>,
}

impl Batch {
    /// Pads `rows` on the right with `pad_id` to the longest row.
    pub fn from_rows(rows: &[BatchRow], pad_id: u32) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::InvalidBatch("a batch needs at least one row".into()));
        }
        let seq_len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        if seq_len == 0 {
            return Err(Error::InvalidBatch("every row is empty".into()));
        }
        let n = rows.len() * seq_len;
        let mut batch = Batch {
            rows: rows.len(),
            seq_len,
            input_ids: vec![pad_id; n],
            attention_mask: vec![false; n],
            loss_mask: vec![false; n],
            prompt_index: Vec::with_capacity(rows.len()),
        };
        for (r, row) in rows.iter().enumerate() {
            if row.targets.len() != row.ids.len() {
                return Err(Error::InvalidBatch(format!(
                    "row {r}: {} ids but {} target flags",
                    row.ids.len(),
                    row.targets.len()
                )));
            }
            let base = r * seq_len;
            batch.input_ids[base..base + row.ids.len()].copy_from_slice(&row.ids);
            batch.attention_mask[base..base + row.ids.len()].fill(true);
            batch.loss_mask[base..base + row.ids.len()].copy_from_slice(&row.targets);
            batch.prompt_index.push(row.prompt);
        }
        Ok(batch)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Padded length in tokens (without virtual tokens).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Token ids, `[rows, seq_len]`.
    pub fn input_ids(&self) -> &[u32] {
        &self.input_ids
    }

    /// True for real tokens, false for padding.
    pub fn attention_mask(&self) -> &[bool] {
        &self.attention_mask
    }

    /// True for target tokens.
    pub fn loss_mask(&self) -> &[bool] {
        &self.loss_mask
    }

    /// Prompt index of each row.
    pub fn prompt_index(&self) -> &[usize] {
        &self.prompt_index
    }

    /// Number of real tokens of row `r`.
    pub fn row_len(&self, r: usize) -> usize {
        self.attention_mask[r * self.seq_len..(r + 1) * self.seq_len]
            .iter()
            .filter(|m| **m)
            .count()
    }

    /// Total number of target tokens.
    pub fn num_targets(&self) -> usize {
        self.loss_mask.iter().filter(|m| **m).count()
    }

    /// Target positions: `(row, token index t, full position of the predicting hidden state)`.
    ///
    /// Errors when a target has no position to be predicted from (token 0 without a prompt),
    /// when a prompt index is out of range, or when an id is not in the vocabulary.
    pub fn targets(&self, num_virtual_tokens: usize) -> Result<Vec<(usize, usize, usize)>> {
        let mut out = Vec::new();
        for r in 0..self.rows {
            for t in 0..self.seq_len {
                if self.loss_mask[r * self.seq_len + t] {
                    let full = num_virtual_tokens + t;
                    if full == 0 {
                        return Err(Error::InvalidBatch(format!(
                            "row {r}: token 0 is a target but nothing precedes it"
                        )));
                    }
                    out.push((r, t, full - 1));
                }
            }
        }
        Ok(out)
    }

    /// [`Batch::targets`] for prompts that have no positions of their own (key/value prefixes):
    /// every target must be predicted from a token, so a row whose token 0 is a target errors.
    pub fn token_targets(&self, num_virtual_tokens: usize) -> Result<Vec<(usize, usize, usize)>> {
        let targets = self.targets(num_virtual_tokens)?;
        if let Some((r, _, _)) = targets.iter().find(|(_, _, pos)| *pos < num_virtual_tokens) {
            return Err(Error::InvalidBatch(format!(
                "row {r}: token 0 is a target, but a key/value prefix predicts nothing"
            )));
        }
        Ok(targets)
    }

    /// Checks prompt indices against `num_prompts` and token ids against `vocab_size`.
    pub fn validate(&self, num_prompts: usize, vocab_size: usize) -> Result<()> {
        if let Some((r, p)) = self
            .prompt_index
            .iter()
            .enumerate()
            .find(|(_, p)| **p >= num_prompts)
        {
            return Err(Error::InvalidBatch(format!(
                "row {r} uses prompt {p} but only {num_prompts} prompts were given"
            )));
        }
        crate::backbone::check_token_ids(self.input_ids.iter().copied(), vocab_size)
    }
}

/// Input rows `[prompt][ids]` of several sequences (nothing targeted), right padded, with one
/// prompt slot per distinct prompt (equal values share a slot), and the prompts of those slots in
/// order: what a batched prefill passes to the model.
pub fn input_rows(seqs: &[(&SoftPrompt, &[u32])]) -> Result<(Batch, Vec<SoftPrompt>)> {
    let (distinct, slots) = prompt_slots(seqs.iter().map(|(p, _)| *p));
    let rows: Vec<BatchRow> = seqs
        .iter()
        .zip(slots)
        .map(|((_, ids), slot)| BatchRow {
            ids: ids.to_vec(),
            targets: vec![false; ids.len()],
            prompt: slot,
        })
        .collect();
    let prompts = distinct.into_iter().cloned().collect();
    Ok((Batch::from_rows(&rows, 0)?, prompts))
}

/// One slot per distinct prompt (equal values share a slot), in order of first appearance: the
/// distinct prompts, and the slot of each of `prompts`.
pub fn prompt_slots<'a>(
    prompts: impl IntoIterator<Item = &'a SoftPrompt>,
) -> (Vec<&'a SoftPrompt>, Vec<usize>) {
    let mut distinct: Vec<&SoftPrompt> = Vec::new();
    let slots = prompts
        .into_iter()
        .map(
            |prompt| match distinct.iter().position(|p| p.values() == prompt.values()) {
                Some(s) => s,
                None => {
                    distinct.push(prompt);
                    distinct.len() - 1
                }
            },
        )
        .collect();
    (distinct, slots)
}

/// Where the rows of a forward pass sit in their sequences (the positions RoPE or position
/// embeddings see).
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    /// Every row's first input is at this position.
    From(usize),
    /// Row `r`'s first input is at `starts[r]` (continuous batching: each sequence at its own
    /// length).
    PerRow(&'a [usize]),
}

impl Positions<'_> {
    /// Positions of the rows' `s` inputs, row-major: `s` of them for `From` (shared by every
    /// row), `rows · s` for `PerRow`.
    pub fn ids(&self, s: usize) -> Vec<usize> {
        match self {
            Positions::From(start) => (*start..start + s).collect(),
            Positions::PerRow(starts) => starts.iter().flat_map(|p| *p..p + s).collect(),
        }
    }

    /// One past the last position of any row.
    pub fn end(&self, s: usize) -> usize {
        match self {
            Positions::From(start) => start + s,
            Positions::PerRow(starts) => starts.iter().max().copied().unwrap_or(0) + s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_rows_share_a_slot_per_distinct_prompt() {
        let a = SoftPrompt::new(1, 2, vec![0.5, 1.0]).unwrap();
        let b = SoftPrompt::new(1, 2, vec![0.5, -1.0]).unwrap();
        let a2 = a.clone();
        let (batch, prompts) =
            input_rows(&[(&a, &[3, 4][..]), (&b, &[5][..]), (&a2, &[6, 7, 8][..])]).unwrap();
        assert_eq!(prompts.len(), 2);
        assert_eq!(prompts[0].values(), a.values());
        assert_eq!(prompts[1].values(), b.values());
        assert_eq!(batch.prompt_index(), &[0, 1, 0]);
        assert_eq!(batch.seq_len(), 3);
        assert_eq!(batch.input_ids(), &[3, 4, 0, 5, 0, 0, 6, 7, 8]);
        assert_eq!(
            (0..3).map(|r| batch.row_len(r)).collect::<Vec<_>>(),
            [2, 1, 3]
        );
    }

    #[test]
    fn positions_shared_and_per_row() {
        assert_eq!(Positions::From(3).ids(2), vec![3, 4]);
        assert_eq!(Positions::From(3).end(2), 5);
        let starts = [1, 5, 0];
        assert_eq!(Positions::PerRow(&starts).ids(2), vec![1, 2, 5, 6, 0, 1]);
        assert_eq!(Positions::PerRow(&starts).end(1), 6);
        assert_eq!(Positions::PerRow(&[]).end(2), 2);
    }

    #[test]
    fn pads_right_and_tracks_targets() {
        let rows = vec![
            BatchRow::with_continuation(&[1, 2], &[3], 0),
            BatchRow::with_continuation(&[4], &[5, 6, 7], 1),
        ];
        let b = Batch::from_rows(&rows, 0).unwrap();
        assert_eq!(b.seq_len(), 4);
        assert_eq!(b.input_ids(), &[1, 2, 3, 0, 4, 5, 6, 7]);
        assert_eq!(b.row_len(0), 3);
        assert_eq!(b.num_targets(), 4);
        assert_eq!(
            b.targets(2).unwrap(),
            vec![(0, 2, 3), (1, 1, 2), (1, 2, 3), (1, 3, 4)]
        );
        assert!(b.validate(2, 8).is_ok());
        assert!(b.validate(1, 8).is_err());
        assert!(b.validate(2, 7).is_err());
    }

    #[test]
    fn first_token_target_without_prompt_is_rejected() {
        let b = Batch::from_rows(&[BatchRow::with_continuation(&[], &[3], 0)], 0).unwrap();
        assert!(b.targets(0).is_err());
        assert_eq!(b.targets(1).unwrap(), vec![(0, 0, 0)]);
    }
}
