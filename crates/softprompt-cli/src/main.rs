//! `softprompt`: prompt tuning of frozen language models from the command line.

mod args;
mod bench;
mod commands;
mod dist;
mod task;
mod vision;

use anyhow::Result;
use clap::Parser;

use crate::args::{Cli, Command};

/// candle allocates a fresh buffer for every tensor op; glibc's malloc hands big buffers back to
/// the kernel and page-faults them in again on the next op (a fifth of a candle train step's CPU
/// time went to the kernel). mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every command's progress lines and warnings on stderr through one `tracing` subscriber, at
/// `info` (RUST_LOG overrides: `RUST_LOG=warn` keeps warnings only): the server's request log
/// and prompt events with timestamps (JSON lines with `serve --log-format json`), the other
/// commands' lines without (a person reads them as they come).
fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let (serve, json) = match &cli.command {
        Command::Serve(a) => (true, a.log_format == args::LogFormat::Json),
        _ => (false, false),
    };
    // the runtimes' own info logs (ONNX Runtime's session set-up) stay out of a command's lines
    let default = if serve {
        "info"
    } else {
        "warn,softprompt=info,softprompt_train=info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // colours only for a person at a terminal, never in a file or a pipe
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else if serve {
        builder.try_init()
    } else {
        builder.without_time().with_target(false).try_init()
    };
}

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`'s `mi_option_e` of the pinned
/// libmimalloc-sys 0.1.49, mimalloc v3; the crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
// the option after it is one the crate names
const _: () = assert!(MI_OPTION_PURGE_DELAY + 1 == libmimalloc_sys::mi_option_use_numa_nodes);

/// Keeps the memory of freed buffers instead of handing it back to the kernel after a delay:
/// a training step frees its activations at its end and asks for as much again at the start of
/// the next, and the pages handed back had to be faulted in and zeroed again (a sixth of a ViT
/// training step went to the kernel's `clear_page`; the step ran 1.2× faster without it). The
/// process's peak memory is unchanged: freed memory is reused, not added to. Not for `serve`:
/// a long-lived server's bursts would hold their peak for the process's life, so it keeps
/// mimalloc's default (freed memory handed back after a short delay).
fn keep_freed_memory() {
    #[allow(unsafe_code)]
    // SAFETY: `mi_option_set` takes an option index and a value and has no other
    // precondition; an index it does not know is ignored
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1)
    };
}

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        keep_freed_memory();
    }
    if let Some(threads) = cli.threads() {
        // candle sizes its thread pool from this variable at its first operation; set it
        // before any thread starts (libtorch's count is set when the backbone loads)
        std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
    }
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => {
            dist::finish();
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            // under mpirun: end the other ranks too, never leave them in a collective
            dist::abort_others(1);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one subcommand.
async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => commands::train(*a).await,
        Command::Eval(a) => commands::evaluate(a).await,
        Command::Generate(a) => commands::generate_text(a).await,
        Command::Inspect(a) => commands::inspect(a).await,
        Command::Bench(a) => bench::bench(a).await,
        Command::Serve(a) => commands::serve(a).await,
        Command::Export(a) => commands::export(a),
    }
}
