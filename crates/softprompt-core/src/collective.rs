//! The collective seam of data-parallel training: a few operations over a group of ranks (one
//! per process or thread), each holding the same prompt. Prompt tuning needs little of it — the
//! trainable state is kilobytes — so the trainer only sums gradients and losses
//! ([`Collective::all_reduce_sum`]) and, for gradient-free optimizers, the candidates' losses.
//!
//! - [`SingleProcess`]: a group of one (every operation is the identity).
//! - [`ThreadGroup`]: ranks that are threads of one process, for tests and for a multi-socket
//!   machine; every operation waits at most a timeout for the others, so a rank that fails ends
//!   the others' calls with [`Error::Collective`] instead of a hang.
//!
//! An MPI implementation lives behind the facade's `mpi` feature; all implementations sum in rank
//! order, so every rank holds bit-identical results.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A group of ranks training one prompt together.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` over the ranks, in place on every rank (every rank passes a
    /// buffer of the same length). Summed in rank order: the result is the same bits on every
    /// rank.
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()>;
    /// Replaces `buf` on every rank with `root`'s.
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut []).map(|_| ())
    }
    /// Whether this rank writes the run's files (checkpoints, metrics, the prompt).
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// The `[lo, hi)` share of `n` items (a batch's rows, a step's candidates) that `rank` of
/// `world_size` takes: contiguous, the first `n % world_size` ranks one more.
pub fn shard(n: usize, rank: usize, world_size: usize) -> (usize, usize) {
    let ws = world_size.max(1);
    let (base, extra) = (n / ws, n % ws);
    let lo = rank * base + rank.min(extra);
    (lo, lo + base + usize::from(rank < extra))
}

/// Whether this process was started by a launcher with more than one rank (Open MPI's,
/// MPICH's/PMI's or Slurm's environment says so): a program that cannot join the group must
/// refuse to run rather than train alone N times over.
pub fn launched_with_ranks() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok())
    .filter_map(|v| v.trim().parse::<usize>().ok())
    .any(|n| n > 1)
}

/// This process's rank among the ranks on its node, as the launcher numbers them (Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`, Slurm's `SLURM_LOCALID`, PMIx's
/// `PMIX_LOCAL_RANK`; 0 when none is set): the GPU a rank takes when each node runs one rank
/// per GPU.
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "PMIX_LOCAL_RANK",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok())
    .find_map(|v| v.trim().parse::<usize>().ok())
    .unwrap_or(0)
}

/// A group of one process: every operation is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
}

/// One round of a [`ThreadGroup`] operation: what each rank brought, then the result.
#[derive(Debug, Default)]
struct Round {
    /// Operations completed so far (each rank counts its own calls: the n-th call of every
    /// rank meets in round n).
    generation: u64,
    /// Contributions of this round, by rank.
    parts: Vec<Option<Vec<f64>>>,
    bytes: Vec<Option<Vec<u8>>>,
    /// The result of the last completed round, and how many ranks still have to read it.
    result: Option<(Vec<f64>, Vec<u8>)>,
    unread: usize,
    /// Set when a rank gave up (timed out or dropped): every later call fails.
    broken: Option<String>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    timeout: Duration,
    round: Mutex<Round>,
    changed: Condvar,
}

/// Ranks that are threads of one process (see the module documentation).
#[derive(Debug)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
    /// This rank's calls so far.
    calls: std::sync::atomic::AtomicU64,
}

impl ThreadGroup {
    /// `size` ranks, one to hand to each thread; an operation waits at most `timeout` for the
    /// other ranks.
    pub fn new(size: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            size: size.max(1),
            timeout,
            round: Mutex::new(Round {
                parts: vec![None; size.max(1)],
                bytes: vec![None; size.max(1)],
                ..Round::default()
            }),
            changed: Condvar::new(),
        });
        (0..size.max(1))
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
                calls: std::sync::atomic::AtomicU64::new(0),
            })
            .collect()
    }

    /// Marks the group broken (every pending and later call fails) and returns the error.
    fn break_group(&self, round: &mut Round, why: String) -> Error {
        round.broken.get_or_insert(why.clone());
        self.shared.changed.notify_all();
        Error::Collective(why)
    }

    /// Waits for a change of the round until `deadline`; past it the group is broken.
    fn wait<'a>(
        &'a self,
        guard: std::sync::MutexGuard<'a, Round>,
        deadline: Instant,
    ) -> Result<std::sync::MutexGuard<'a, Round>> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut round = match self.shared.changed.wait_timeout(guard, left) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        };
        if Instant::now() >= deadline {
            let why = format!(
                "rank {} timed out after {:?} waiting for the other ranks",
                self.rank, self.shared.timeout
            );
            return Err(self.break_group(&mut round, why));
        }
        Ok(round)
    }

    /// Contributes `values` and `bytes` to this rank's next round and returns the round's
    /// result: the element-wise sum of the values (in rank order) and `root`'s bytes.
    fn exchange(&self, values: &[f64], bytes: Vec<u8>, root: usize) -> Result<(Vec<f64>, Vec<u8>)> {
        let s = &self.shared;
        let deadline = Instant::now() + s.timeout;
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut round = s.round.lock().unwrap_or_else(|p| p.into_inner());
        // the previous round's result must be read by everyone before this one starts
        loop {
            if let Some(why) = &round.broken {
                return Err(Error::Collective(why.clone()));
            }
            if round.generation == call && round.result.is_none() {
                break;
            }
            round = self.wait(round, deadline)?;
        }
        if round
            .parts
            .iter()
            .flatten()
            .any(|p| p.len() != values.len())
        {
            let why = format!(
                "rank {} brought {} values where another rank brought a different count",
                self.rank,
                values.len()
            );
            return Err(self.break_group(&mut round, why));
        }
        round.parts[self.rank] = Some(values.to_vec());
        round.bytes[self.rank] = Some(bytes);
        if round.parts.iter().all(Option::is_some) {
            // the last to arrive sums in rank order
            let mut sum = vec![0f64; values.len()];
            for part in round.parts.iter_mut() {
                for (a, b) in sum.iter_mut().zip(part.take().unwrap_or_default()) {
                    *a += b;
                }
            }
            let chosen = round
                .bytes
                .get_mut(root)
                .and_then(Option::take)
                .unwrap_or_default();
            round.bytes.iter_mut().for_each(|b| *b = None);
            round.result = Some((sum, chosen));
            round.unread = s.size;
            s.changed.notify_all();
        }
        loop {
            if let Some(why) = &round.broken {
                return Err(Error::Collective(why.clone()));
            }
            if round.generation == call {
                if let Some((sum, bytes)) = &round.result {
                    let out = (sum.clone(), bytes.clone());
                    round.unread -= 1;
                    if round.unread == 0 {
                        round.result = None;
                        round.generation += 1;
                        s.changed.notify_all();
                    }
                    return Ok(out);
                }
            }
            round = self.wait(round, deadline)?;
        }
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        // a rank that leaves while others may still call: they fail at once instead of waiting
        if std::thread::panicking() {
            let mut round = self.shared.round.lock().unwrap_or_else(|p| p.into_inner());
            round
                .broken
                .get_or_insert(format!("rank {} failed", self.rank));
            self.shared.changed.notify_all();
        }
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.size
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        let (sum, _) = self.exchange(buf, Vec::new(), 0)?;
        buf.copy_from_slice(&sum);
        Ok(())
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.shared.size {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} in a group of {}",
                self.shared.size
            )));
        }
        let mine = if self.rank == root {
            std::mem::take(buf)
        } else {
            Vec::new()
        };
        let (_, bytes) = self.exchange(&[], mine, root)?;
        *buf = bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_item_once() {
        for n in 0..12 {
            for ws in 1..5 {
                let mut next = 0;
                for r in 0..ws {
                    let (lo, hi) = shard(n, r, ws);
                    assert_eq!(lo, next);
                    assert!(hi - lo <= n / ws + 1);
                    next = hi;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn thread_ranks_sum_broadcast_and_agree_bit_for_bit() {
        let group = ThreadGroup::new(3, Duration::from_secs(10));
        let results: Vec<(Vec<f64>, Vec<u8>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = group
                .iter()
                .map(|g| {
                    scope.spawn(move || {
                        let mut last = (Vec::new(), Vec::new());
                        // many rounds in a row: no rank may run ahead into the next one
                        for round in 0..50 {
                            let r = g.rank() as f64;
                            let mut buf = vec![0.1 * r + round as f64, 1.0, r * r];
                            g.all_reduce_sum(&mut buf).unwrap();
                            let mut bytes = if g.rank() == 2 {
                                vec![7, round as u8]
                            } else {
                                vec![]
                            };
                            g.broadcast(&mut bytes, 2).unwrap();
                            g.barrier().unwrap();
                            last = (buf, bytes);
                        }
                        last
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (buf, bytes) in &results {
            assert_eq!(buf, &results[0].0, "the same bits on every rank");
            assert_eq!(bytes, &vec![7, 49]);
        }
        assert!((results[0].0[0] - (0.0 + 0.1 + 0.2 + 3.0 * 49.0)).abs() < 1e-12);
        assert_eq!(results[0].0[1], 3.0);
        assert_eq!(results[0].0[2], 5.0);
    }

    #[test]
    fn a_missing_rank_times_out_and_breaks_the_group() {
        let group = ThreadGroup::new(2, Duration::from_millis(200));
        let mut buf = vec![1.0];
        // rank 1 never calls
        let err = group[0].all_reduce_sum(&mut buf).unwrap_err();
        assert!(matches!(err, Error::Collective(_)), "{err}");
        assert!(err.to_string().contains("timed out"), "{err}");
        // and the group stays broken for everyone
        let err = group[1].all_reduce_sum(&mut buf).unwrap_err();
        assert!(matches!(err, Error::Collective(_)), "{err}");
    }

    #[test]
    fn mismatched_lengths_are_refused() {
        let group = ThreadGroup::new(2, Duration::from_secs(5));
        let errs: Vec<Result<()>> = std::thread::scope(|scope| {
            let a = scope.spawn(|| group[0].all_reduce_sum(&mut [1.0, 2.0]));
            let b = scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                group[1].all_reduce_sum(&mut [1.0])
            });
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        assert!(
            errs.iter().all(|e| matches!(e, Err(Error::Collective(_)))),
            "{errs:?}"
        );
    }

    #[test]
    fn single_process_is_the_identity() {
        let mut buf = vec![1.5, -2.0];
        SingleProcess.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, vec![1.5, -2.0]);
        assert!(SingleProcess.is_root());
        assert_eq!(shard(8, 0, 1), (0, 8));
    }
}
