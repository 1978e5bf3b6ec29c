//! The engine: one thread that owns the backbone's compute and packs work from many requests,
//! for many prompts, into shared forward passes.
//!
//! Classification jobs are gathered up to `max_batch_rows` rows per round; generation runs as
//! continuous batching: sequences join the decoder between steps (after their own prefill) and
//! leave when they finish or their client goes away, and each step advances every live
//! sequence in one pass. In [`Batching::PerPrompt`] mode (the baseline) a forward pass only
//! ever holds rows of one prompt.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use softprompt_core::generate::sample;
use softprompt_core::{
    batch_decoder, Backbone, Batch, BatchDecoder, BatchRow, GenerationParams, Rng, SeqId,
    SoftPrompt, StopReason,
};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::metrics::Metrics;
use crate::registry::Entry;

/// How the engine groups rows of different prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Batching {
    /// Rows of any prompts share a forward pass (per-row prompt input).
    #[default]
    Mixed,
    /// A forward pass holds rows of one prompt only (the baseline: one prompt per batch).
    PerPrompt,
}

/// One text to classify under one prompt.
#[derive(Debug)]
pub struct ClassifyRow {
    /// The prompt version (its labels give the candidates).
    pub entry: Arc<Entry>,
    /// Context ids (template applied).
    pub ids: Vec<u32>,
}

/// Rows of one request; the reply has one log-probability per label for each row.
#[derive(Debug)]
pub struct ClassifyJob {
    /// Rows.
    pub rows: Vec<ClassifyRow>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<Vec<Vec<f64>>, String>>,
    /// When the request was admitted.
    pub admitted: Instant,
}

/// What a generation job reports.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The next token.
    Token(u32),
    /// Generation ended.
    Done(StopReason),
    /// Generation failed.
    Failed(String),
}

/// One sequence to generate.
#[derive(Debug)]
pub struct GenerateJob {
    /// The prompt version.
    pub entry: Arc<Entry>,
    /// Input ids.
    pub ids: Vec<u32>,
    /// Sampling settings, `max_new_tokens` and stop tokens.
    pub params: GenerationParams,
    /// Token stream; dropping its receiver cancels the sequence.
    pub events: tmpsc::UnboundedSender<GenEvent>,
    /// When the request was admitted.
    pub admitted: Instant,
}

/// Work for the engine.
#[derive(Debug)]
pub enum Job {
    /// Rank classification.
    Classify(ClassifyJob),
    /// Generation.
    Generate(GenerateJob),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most classification rows in one forward pass.
    pub max_batch_rows: usize,
    /// Most sequences decoded together.
    pub max_active: usize,
    /// Mixed or per-prompt batches.
    pub batching: Batching,
}

struct Active {
    id: SeqId,
    job: GenerateJob,
    rng: Rng,
    produced: usize,
    last: u32,
}

/// Runs until every sender of `jobs` is gone and all work is done.
pub fn run(
    backbone: Arc<dyn Backbone>,
    jobs: mpsc::Receiver<Job>,
    config: EngineConfig,
    metrics: Metrics,
) {
    let mut decoder = batch_decoder(backbone.as_ref());
    let mut classify: VecDeque<ClassifyJob> = VecDeque::new();
    let mut waiting: VecDeque<GenerateJob> = VecDeque::new();
    let mut active: Vec<Active> = Vec::new();
    let mut open = true;
    let push = |job: Job, c: &mut VecDeque<ClassifyJob>, w: &mut VecDeque<GenerateJob>| match job {
        Job::Classify(j) => c.push_back(j),
        Job::Generate(j) => w.push_back(j),
    };
    loop {
        if classify.is_empty() && waiting.is_empty() && active.is_empty() {
            if !open {
                break;
            }
            match jobs.recv() {
                Ok(job) => push(job, &mut classify, &mut waiting),
                Err(_) => break,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => push(job, &mut classify, &mut waiting),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !classify.is_empty() {
            classify_round(backbone.as_ref(), &mut classify, &config, &metrics);
        }
        admit(
            decoder.as_mut(),
            &mut waiting,
            &mut active,
            &config,
            &metrics,
        );
        if !active.is_empty() {
            step(decoder.as_mut(), &mut active, &metrics);
        }
        metrics.active.store(active.len(), Ordering::Relaxed);
    }
}

/// Takes classification jobs up to `max_batch_rows` rows and answers them, one forward pass per
/// group of compatible rows (mixed: same prompt length and label kind; per-prompt: same prompt).
fn classify_round(
    backbone: &dyn Backbone,
    queue: &mut VecDeque<ClassifyJob>,
    config: &EngineConfig,
    metrics: &Metrics,
) {
    let mut jobs = Vec::new();
    let mut rows = 0;
    while let Some(job) = queue.front() {
        if !jobs.is_empty() && rows + job.rows.len() > config.max_batch_rows {
            break;
        }
        rows += job.rows.len();
        let job = queue.pop_front().expect("front exists");
        metrics.queued.fetch_sub(1, Ordering::Relaxed);
        metrics.queue_wait(job.admitted.elapsed().as_secs_f64());
        jobs.push(job);
    }
    // every row of the round: (job, row)
    let all: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..job.rows.len()).map(move |r| (j, r)))
        .collect();
    // one scoring call per prompt length and placement (a backbone call takes one of each)
    type Key = (usize, &'static str, bool, u64);
    let mut groups: BTreeMap<Key, Vec<(usize, usize)>> = BTreeMap::new();
    for (j, r) in all {
        let e = &jobs[j].rows[r].entry;
        let single = e.label_ids.iter().all(|ids| ids.len() == 1);
        let (n, at) = (e.prompt.num_virtual_tokens(), e.prompt.placement().as_str());
        let key = match config.batching {
            Batching::Mixed => (n, at, single, 0),
            Batching::PerPrompt => (n, at, single, e.key),
        };
        groups.entry(key).or_default().push((j, r));
    }
    let mut answers: Vec<Vec<Option<Vec<f64>>>> =
        jobs.iter().map(|j| vec![None; j.rows.len()]).collect();
    let mut failures: Vec<Option<String>> = vec![None; jobs.len()];
    for ((_, _, single, _), members) in groups {
        let rows: Vec<&ClassifyRow> = members.iter().map(|(j, r)| &jobs[*j].rows[*r]).collect();
        match classify_group(backbone, &rows, single, metrics) {
            Ok(scores) => {
                for ((j, r), s) in members.iter().zip(scores) {
                    answers[*j][*r] = Some(s);
                }
            }
            Err(e) => {
                for (j, _) in &members {
                    failures[*j] = Some(e.clone());
                }
            }
        }
    }
    for ((job, answer), failure) in jobs.into_iter().zip(answers).zip(failures) {
        let result = match failure {
            Some(e) => Err(e),
            None => Ok(answer.into_iter().map(|a| a.unwrap_or_default()).collect()),
        };
        let _ = job.reply.send(result);
    }
}

/// Scores every label of every row in one forward pass; `out[row][label]`.
fn classify_group(
    backbone: &dyn Backbone,
    rows: &[&ClassifyRow],
    single_token_labels: bool,
    metrics: &Metrics,
) -> Result<Vec<Vec<f64>>, String> {
    // one prompt slot per distinct prompt version
    let mut slots: Vec<&Arc<Entry>> = Vec::new();
    let mut slot_of = Vec::with_capacity(rows.len());
    for row in rows {
        let s = match slots.iter().position(|e| e.key == row.entry.key) {
            Some(s) => s,
            None => {
                slots.push(&row.entry);
                slots.len() - 1
            }
        };
        slot_of.push(s);
    }
    let prompts: Vec<SoftPrompt> = slots.iter().map(|e| e.prompt.clone()).collect();
    let mut per_prompt: BTreeMap<&str, usize> = BTreeMap::new();
    for row in rows {
        *per_prompt.entry(row.entry.name.as_str()).or_default() += 1;
    }
    let per_prompt: Vec<(String, usize)> = per_prompt
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    metrics.classify_batch(rows.len(), slots.len(), &per_prompt);
    if single_token_labels {
        let mut candidates: Vec<u32> = rows
            .iter()
            .flat_map(|r| r.entry.label_ids.iter().map(|ids| ids[0]))
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        let batch_rows: Vec<BatchRow> = rows
            .iter()
            .zip(&slot_of)
            .map(|(r, s)| BatchRow {
                ids: r.ids.clone(),
                targets: vec![false; r.ids.len()],
                prompt: *s,
            })
            .collect();
        let batch = Batch::from_rows(&batch_rows, 0).map_err(|e| e.to_string())?;
        let lp = backbone
            .next_token_logprobs(&prompts, &batch, &candidates)
            .map_err(|e| e.to_string())?;
        Ok(rows
            .iter()
            .zip(lp)
            .map(|(r, lp)| {
                r.entry
                    .label_ids
                    .iter()
                    .map(|ids| lp[candidates.binary_search(&ids[0]).expect("in the union")])
                    .collect()
            })
            .collect())
    } else {
        let mut batch_rows = Vec::new();
        for (r, s) in rows.iter().zip(&slot_of) {
            for ids in &r.entry.label_ids {
                batch_rows.push(BatchRow::with_continuation(&r.ids, ids, *s));
            }
        }
        let batch = Batch::from_rows(&batch_rows, 0).map_err(|e| e.to_string())?;
        let scores = backbone
            .score(&prompts, &batch)
            .map_err(|e| e.to_string())?;
        let mut k = 0;
        Ok(rows
            .iter()
            .map(|r| {
                let n = r.entry.label_ids.len();
                k += n;
                scores.logprob_sum[k - n..k].to_vec()
            })
            .collect())
    }
}

/// Lets waiting sequences join the decoder (mixed: any prompt; per-prompt: only the prompt
/// already being decoded, or any when none is), prefilled together in one batched call.
fn admit(
    decoder: &mut dyn BatchDecoder,
    waiting: &mut VecDeque<GenerateJob>,
    active: &mut Vec<Active>,
    config: &EngineConfig,
    metrics: &Metrics,
) {
    let mut joining: Vec<GenerateJob> = Vec::new();
    while active.len() + joining.len() < config.max_active {
        let key = active
            .first()
            .map(|a| a.job.entry.key)
            .or_else(|| joining.first().map(|j| j.entry.key));
        let pick = match (config.batching, key) {
            (Batching::PerPrompt, Some(key)) => waiting.iter().position(|j| j.entry.key == key),
            _ => (!waiting.is_empty()).then_some(0),
        };
        let Some(i) = pick else { break };
        let job = waiting.remove(i).expect("picked from the queue");
        metrics.queued.fetch_sub(1, Ordering::Relaxed);
        metrics.queue_wait(job.admitted.elapsed().as_secs_f64());
        if !job.events.is_closed() {
            joining.push(job); // else the client left while queued
        }
    }
    if joining.is_empty() {
        return;
    }
    let seqs: Vec<(&SoftPrompt, &[u32])> = joining
        .iter()
        .map(|j| (&j.entry.prompt, j.ids.as_slice()))
        .collect();
    let added: Vec<Result<(SeqId, Vec<f32>), String>> = match decoder.add_many(&seqs) {
        Ok(all) => all.into_iter().map(Ok).collect(),
        // find the culprit: one at a time
        Err(_) => seqs
            .iter()
            .map(|(p, ids)| decoder.add(p, ids).map_err(|e| e.to_string()))
            .collect(),
    };
    for (job, result) in joining.into_iter().zip(added) {
        let (id, logits) = match result {
            Ok(x) => x,
            Err(e) => {
                let _ = job.events.send(GenEvent::Failed(e));
                continue;
            }
        };
        let mut a = Active {
            id,
            rng: Rng::seed_from_u64(job.params.seed),
            job,
            produced: 0,
            last: 0,
        };
        if emit(&mut a, &logits, metrics) {
            decoder.remove(id);
        } else {
            active.push(a);
        }
    }
}

/// Samples and sends the next token; true when the sequence is finished.
fn emit(a: &mut Active, logits: &[f32], metrics: &Metrics) -> bool {
    let next = sample(logits, &a.job.params, &mut a.rng);
    a.produced += 1;
    a.last = next;
    metrics.generated(&a.job.entry.name, 1);
    if a.job.events.send(GenEvent::Token(next)).is_err() {
        return true; // the client left
    }
    let stop = if a.job.params.stop_tokens.contains(&next) {
        Some(StopReason::StopToken(next))
    } else if a.produced >= a.job.params.max_new_tokens {
        Some(StopReason::MaxTokens)
    } else {
        None
    };
    match stop {
        Some(s) => {
            let _ = a.job.events.send(GenEvent::Done(s));
            true
        }
        None => false,
    }
}

/// One decode step for every live sequence.
fn step(decoder: &mut dyn BatchDecoder, active: &mut Vec<Active>, metrics: &Metrics) {
    // drop sequences whose client left before paying for their step
    active.retain(|a| {
        let keep = !a.job.events.is_closed();
        if !keep {
            decoder.remove(a.id);
        }
        keep
    });
    if active.is_empty() {
        return;
    }
    let tokens: Vec<(SeqId, u32)> = active.iter().map(|a| (a.id, a.last)).collect();
    let mut prompts: Vec<u64> = active.iter().map(|a| a.job.entry.key).collect();
    prompts.sort_unstable();
    prompts.dedup();
    metrics.decode_step(tokens.len(), prompts.len());
    match decoder.step(&tokens) {
        Ok(all) => {
            let mut finished = vec![false; active.len()];
            for ((a, logits), done) in active.iter_mut().zip(all).zip(finished.iter_mut()) {
                *done = emit(a, &logits, metrics);
            }
            let mut i = 0;
            active.retain(|a| {
                let keep = !finished[i];
                i += 1;
                if !keep {
                    decoder.remove(a.id);
                }
                keep
            });
        }
        Err(e) => {
            for a in active.drain(..) {
                decoder.remove(a.id);
                let _ = a.job.events.send(GenEvent::Failed(e.to_string()));
            }
        }
    }
}
