//! Data-parallel runs: under `mpirun -np N` / `srun` (a build with the `mpi` feature) every rank
//! trains its share of each batch and rank 0 alone writes and prints. A build with the `nccl`
//! feature sums over NCCL when the model runs on a CUDA device (MPI still starts the group).

use std::sync::Arc;

use anyhow::Result;
use softprompt::Collective;

/// The job's group: MPI's, or NCCL's on the GPUs.
#[cfg(feature = "mpi")]
#[derive(Debug)]
enum Group {
    Mpi(softprompt_mpi::MpiCollective),
    #[cfg(feature = "nccl")]
    Nccl(softprompt_mpi::NcclCollective),
}

#[cfg(feature = "mpi")]
impl Group {
    fn inner(&self) -> &dyn Collective {
        match self {
            Group::Mpi(g) => g,
            #[cfg(feature = "nccl")]
            Group::Nccl(g) => g,
        }
    }
    fn abort(&self, code: i32) -> ! {
        match self {
            Group::Mpi(g) => g.abort(code),
            #[cfg(feature = "nccl")]
            Group::Nccl(g) => g.abort(code),
        }
    }
}

#[cfg(feature = "mpi")]
impl Collective for Group {
    fn rank(&self) -> usize {
        self.inner().rank()
    }
    fn world_size(&self) -> usize {
        self.inner().world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> softprompt::Result<()> {
        self.inner().all_reduce_sum(buf)
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> softprompt::Result<()> {
        self.inner().broadcast(buf, root)
    }
    fn barrier(&self) -> softprompt::Result<()> {
        self.inner().barrier()
    }
}

#[cfg(feature = "mpi")]
static GROUP: std::sync::Mutex<Option<Arc<Group>>> = std::sync::Mutex::new(None);

#[cfg(feature = "mpi")]
fn current() -> Option<Arc<Group>> {
    GROUP.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The device a rank runs on: under a launcher with several ranks, `cuda` (no index) is the
/// rank's local rank on its node (one rank per GPU); anything else is kept.
pub(crate) fn device_for_rank(device: &str) -> String {
    if device == "cuda" && softprompt::collective::launched_with_ranks() {
        format!("cuda:{}", softprompt::collective::local_rank())
    } else {
        device.to_string()
    }
}

/// Joins the job's ranks (before the long model load) for a model on `device`: over NCCL on a
/// CUDA device in a build with the `nccl` feature, else over MPI. `None` when running alone.
pub(crate) fn join(device: &str) -> Result<Option<Arc<dyn Collective>>> {
    #[cfg(feature = "nccl")]
    if softprompt::collective::launched_with_ranks() && device.starts_with("cuda") {
        let mut slot = GROUP.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let ordinal = device
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok());
            let g = softprompt_mpi::NcclCollective::init(ordinal)?;
            tracing::info!(
                "rank {} of {} (NCCL on cuda:{})",
                g.rank(),
                g.world_size(),
                g.ordinal()
            );
            *slot = Some(Arc::new(Group::Nccl(g)));
        }
        return Ok(slot.clone().map(|g| g as Arc<dyn Collective>));
    }
    let _ = device;
    group()
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
            *slot = Some(Arc::new(Group::Mpi(g)));
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
