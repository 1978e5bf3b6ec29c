//! Communication cost of one data-parallel step: the trainer's all-reduce of a prompt gradient
//! (2 + N × d values: loss, target count, gradient) between the ranks of an MPI job.
//!
//! ```text
//! mpirun -np 2 target/release/examples/allreduce [N] [d] [repeats]   # default 20 576 2000
//! ```

use softprompt_core::Collective;
use softprompt_mpi::MpiCollective;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let (n, d, repeats) = (
        args.first().copied().unwrap_or(20),
        args.get(1).copied().unwrap_or(576),
        args.get(2).copied().unwrap_or(2000),
    );
    let group = MpiCollective::init()?;
    let mut buf = vec![group.rank() as f64 + 0.5; 2 + n * d];
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        group.barrier()?;
        let t0 = std::time::Instant::now();
        group.all_reduce_sum(&mut buf)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    if group.is_root() {
        println!(
            "{{\"ranks\": {}, \"values\": {}, \"bytes\": {}, \"median_us\": {:.1}, \"p90_us\": {:.1}}}",
            group.world_size(),
            buf.len(),
            8 * buf.len(),
            1e6 * times[times.len() / 2],
            1e6 * times[times.len() * 9 / 10]
        );
    }
    Ok(())
}
