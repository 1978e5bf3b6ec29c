//! [`Collective`] whose sums run on the GPUs through NCCL (feature `nccl`), for data-parallel
//! training of a model on CUDA devices: one rank per GPU, started by `mpirun` / `srun` as for
//! MPI. MPI bootstraps the group (rank 0 draws NCCL's unique id and broadcasts it) and carries
//! the byte broadcasts and barriers; the per-step all-reduce of the loss and prompt gradient is
//! `ncclAllReduce` on the rank's device.
//!
//! NCCL and the CUDA driver are loaded when the group starts (nothing is linked at build time
//! unless candle's `cuda` feature links them): a build with this feature runs on a machine
//! without GPUs as long as no NCCL group is started there.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use softprompt_core::{Collective, Error, Result};

use crate::MpiCollective;

/// The NCCL communicator and the stream its sums run on.
struct Device {
    comm: Comm,
    stream: Arc<CudaStream>,
    context: Arc<CudaContext>,
}

/// An NCCL group over the ranks of an MPI job (see the module documentation).
pub struct NcclCollective {
    mpi: MpiCollective,
    ordinal: usize,
    device: Mutex<Device>,
}

// `Comm` holds NCCL's communicator pointer. NCCL allows a communicator to be used from any
// thread as long as calls on it do not overlap; every call here holds the `device` mutex and
// binds the CUDA context to the calling thread first.
#[allow(unsafe_code)]
// SAFETY: see above: one call at a time under the mutex, the context bound before each.
unsafe impl Send for NcclCollective {}
#[allow(unsafe_code)]
// SAFETY: see above: shared access reaches NCCL only through the `device` mutex.
unsafe impl Sync for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclCollective(rank {} of {}, cuda:{})",
            self.mpi.rank(),
            self.mpi.world_size(),
            self.ordinal
        )
    }
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Collective(format!("NCCL {what}: {e:?}"))
}

impl NcclCollective {
    /// Starts MPI, then NCCL on CUDA device `ordinal` (by default the rank's local rank on its
    /// node, as `mpirun` / `srun` number them: one rank per GPU).
    pub fn init(ordinal: Option<usize>) -> Result<NcclCollective> {
        Self::over(MpiCollective::init()?, ordinal)
    }

    /// NCCL over an MPI group already started.
    pub fn over(mpi: MpiCollective, ordinal: Option<usize>) -> Result<NcclCollective> {
        let ordinal = ordinal.unwrap_or_else(softprompt_core::collective::local_rank);
        // cudarc panics when the driver library cannot be loaded: an error here, not a crash
        let context = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the CUDA driver could not be loaded".into());
                Error::Collective(format!("NCCL needs a CUDA device (cuda:{ordinal}): {why}"))
            })?
            .map_err(|e| nccl_error(&format!("opening cuda:{ordinal}"), e))?;
        let stream = context.default_stream();
        // rank 0 draws the group's id; the others receive it over MPI
        let mut id = Vec::new();
        if mpi.is_root() {
            let fresh = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
            id = fresh.internal().iter().map(|c| *c as u8).collect();
        }
        mpi.broadcast(&mut id, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id.len() != internal.len() {
            return Err(Error::Collective(format!(
                "NCCL's unique id came as {} bytes, not {}",
                id.len(),
                internal.len()
            )));
        }
        for (slot, b) in internal.iter_mut().zip(&id) {
            *slot = *b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            stream.clone(),
            mpi.rank(),
            mpi.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        Ok(NcclCollective {
            mpi,
            ordinal,
            device: Mutex::new(Device {
                comm,
                stream,
                context,
            }),
        })
    }

    /// The CUDA device this rank's sums run on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Ends every rank of the job (`MPI_Abort`), as [`MpiCollective::abort`].
    pub fn abort(&self, code: i32) -> ! {
        self.mpi.abort(code)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn world_size(&self) -> usize {
        self.mpi.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        // every rank brings the same length (n, n²: sums ws·n and ws·n² only if all equal),
        // checked over MPI so that a mismatch is an error on every rank, not a device overrun
        let n = buf.len() as f64;
        let mut lengths = [n, n * n];
        self.mpi.all_reduce_sum(&mut lengths)?;
        let ws = self.world_size() as f64;
        if lengths != [ws * n, ws * n * n] {
            return Err(Error::Collective(format!(
                "ranks brought buffers of different lengths (this one {n})"
            )));
        }
        let device = self.device.lock().unwrap_or_else(|p| p.into_inner());
        device
            .context
            .bind_to_thread()
            .map_err(|e| nccl_error("binding the context", e))?;
        let mut on_device = device
            .stream
            .clone_htod(&buf[..])
            .map_err(|e| nccl_error("copying to the device", e))?;
        device
            .comm
            .all_reduce_in_place(&mut on_device, &ReduceOp::Sum)
            .map_err(|e| nccl_error("ncclAllReduce", e))?;
        let summed = device
            .stream
            .clone_dtoh(&on_device)
            .map_err(|e| nccl_error("copying from the device", e))?;
        device
            .stream
            .synchronize()
            .map_err(|e| nccl_error("synchronising", e))?;
        buf.copy_from_slice(&summed);
        Ok(())
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.mpi.broadcast(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a CUDA driver the group is refused with an error naming the device
    /// (cudarc's panic is caught); where a GPU is present a group of one process sums as the
    /// identity.
    #[test]
    fn a_group_of_one_needs_a_device_and_sums_as_the_identity() {
        match NcclCollective::init(Some(0)) {
            Err(e) => {
                eprintln!("{e}");
                assert!(e.to_string().contains("cuda:0"), "{e}")
            }
            Ok(g) => {
                assert_eq!((g.rank(), g.world_size(), g.ordinal()), (0, 1, 0));
                let mut v = vec![1.5, -2.0, 3.25];
                g.all_reduce_sum(&mut v).unwrap();
                assert_eq!(v, vec![1.5, -2.0, 3.25]);
            }
        }
    }
}
