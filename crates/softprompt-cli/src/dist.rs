//! Data-parallel runs: under `mpirun -np N` / `srun` (a build with the `mpi` feature) every rank
//! trains its share of each batch and rank 0 alone writes and prints.

use std::sync::Arc;

use anyhow::Result;
use softprompt::Collective;

#[cfg(feature = "mpi")]
static GROUP: std::sync::Mutex<Option<Arc<softprompt_mpi::MpiCollective>>> =
    std::sync::Mutex::new(None);

#[cfg(feature = "mpi")]
fn current() -> Option<Arc<softprompt_mpi::MpiCollective>> {
    GROUP.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The ranks this process trains with: `None` when it runs alone. Started by an MPI launcher
/// with several ranks, a build without the `mpi` feature refuses (it would train alone N times
/// and the ranks would overwrite each other's output).
pub(crate) fn group() -> Result<Option<Arc<dyn Collective>>> {
    if !softprompt::collective::launched_with_ranks() {
        return Ok(None);
    }
    #[cfg(feature = "mpi")]
    {
        let mut slot = GROUP.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let g = softprompt_mpi::MpiCollective::init()?;
            tracing::info!("rank {} of {} (MPI)", g.rank(), g.world_size());
            *slot = Some(Arc::new(g));
        }
        Ok(slot.clone().map(|g| g as Arc<dyn Collective>))
    }
    #[cfg(not(feature = "mpi"))]
    anyhow::bail!(
        "started by an MPI launcher with several ranks, but this softprompt was built without \
         the `mpi` feature (cargo build --release -p softprompt-cli --features mpi)"
    )
}

/// Whether this process writes files and prints reports (rank 0, or running alone).
pub(crate) fn is_root() -> bool {
    #[cfg(feature = "mpi")]
    if let Some(g) = current() {
        return g.is_root();
    }
    true
}

/// Ends every rank of an MPI job after this one failed, so that none is left waiting in a
/// collective (a no-op when running alone).
pub(crate) fn abort_others(code: i32) {
    #[cfg(feature = "mpi")]
    if let Some(g) = current() {
        if g.world_size() > 1 {
            g.abort(code);
        }
    }
    let _ = code;
}

/// Finalises MPI after a successful run (the last handle is dropped here).
pub(crate) fn finish() {
    #[cfg(feature = "mpi")]
    drop(GROUP.lock().unwrap_or_else(|p| p.into_inner()).take());
}
