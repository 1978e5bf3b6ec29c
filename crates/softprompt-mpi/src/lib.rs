//! [`Collective`] over MPI's world communicator, for `mpirun -np N softprompt train …` (or
//! `srun` under Slurm): needs an MPI library and its headers at build time (Debian:
//! `libopenmpi-dev`, and `libclang-dev` for the bindings).
//!
//! Sums are gathered to rank 0, added there in rank order and broadcast, so every rank holds the
//! same bits (an `MPI_Allreduce` may add in another order per rank). MPI has no timeouts: a rank
//! that fails calls [`MpiCollective::abort`], which ends every rank of the job with its error
//! code instead of leaving them blocked in a collective.
//!
//! With the `nccl` feature, [`NcclCollective`] runs the sums on the GPUs through NCCL (MPI
//! still starts the group).

use std::sync::Mutex;

#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
pub use nccl::NcclCollective;

use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use softprompt_core::{Collective, Error, Result};

/// The world communicator of an MPI job (see the crate documentation).
pub struct MpiCollective {
    rank: usize,
    size: usize,
    /// MPI calls come from the thread that initialised MPI; the lock keeps them one at a time.
    world: Mutex<SimpleCommunicator>,
    /// Finalises MPI when dropped: kept as long as the communicator.
    _universe: Universe,
}

// The communicator handle is a pointer into the MPI library. MPI is initialised with
// MPI_THREAD_SERIALIZED, under which any thread may call MPI as long as calls do not overlap;
// every call here holds the `world` mutex, so moving or sharing the handle between threads keeps
// MPI's rules.
#[allow(unsafe_code)]
// SAFETY: see above: MPI_THREAD_SERIALIZED and every call under the `world` mutex.
unsafe impl Send for MpiCollective {}
#[allow(unsafe_code)]
// SAFETY: see above: shared access reaches MPI only through the `world` mutex.
unsafe impl Sync for MpiCollective {}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiCollective(rank {} of {})", self.rank, self.size)
    }
}

pub use softprompt_core::collective::launched_with_ranks;

impl MpiCollective {
    /// Initialises MPI (once per process).
    pub fn init() -> Result<MpiCollective> {
        // calls may come from any thread, one at a time (the mutex): MPI_THREAD_SERIALIZED
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Collective("MPI was already initialised".into()))?;
        if level < Threading::Serialized {
            return Err(Error::Collective(format!(
                "the MPI library gives thread level {level:?}, softprompt needs Serialized"
            )));
        }
        let world = universe.world();
        Ok(MpiCollective {
            rank: usize::try_from(world.rank()).unwrap_or(0),
            size: usize::try_from(world.size()).unwrap_or(1),
            world: Mutex::new(world),
            _universe: universe,
        })
    }

    /// Ends every rank of the job (`MPI_Abort`) with `code`: what a failing rank does so that
    /// the others are not left waiting in a collective.
    pub fn abort(&self, code: i32) -> ! {
        let world = self.world.lock().unwrap_or_else(|p| p.into_inner());
        world.abort(code)
    }

    fn world(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        let world = self.world();
        // every rank states its length first: a mismatch is an error on every rank, not a
        // buffer overrun
        let mut lengths = vec![0u64; self.size];
        world.all_gather_into(&(buf.len() as u64), &mut lengths[..]);
        if lengths.iter().any(|l| *l != buf.len() as u64) {
            return Err(Error::Collective(format!(
                "ranks brought buffers of lengths {lengths:?}"
            )));
        }
        let root = world.process_at_rank(0);
        if self.rank == 0 {
            let mut all = vec![0f64; buf.len() * self.size];
            root.gather_into_root(&buf[..], &mut all[..]);
            // rank order, the same on every run
            let mut sum = vec![0f64; buf.len()];
            for part in all.chunks(buf.len().max(1)) {
                for (s, v) in sum.iter_mut().zip(part) {
                    *s += v;
                }
            }
            buf.copy_from_slice(&sum);
        } else {
            root.gather_into(&buf[..]);
        }
        root.broadcast_into(buf);
        Ok(())
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.size {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} in a group of {}",
                self.size
            )));
        }
        if self.size == 1 {
            return Ok(());
        }
        let world = self.world();
        let from = world.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        from.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        from.broadcast_into(&mut buf[..]);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world().barrier();
        Ok(())
    }
}
