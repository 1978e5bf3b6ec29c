//! Fails early, with the command to run, when no libtorch 2.13.0 is set up for `tch`.
//! `softprompt-tch` depends on this crate with its `check` feature on. Cargo does not promise
//! to run it before `torch-sys`'s build script (measured: in a clean `cargo build -p
//! softprompt-tch` without libtorch, `torch-sys` fails first), so when libtorch is missing
//! entirely the message may be `torch-sys`'s; when one is found, this checks its version.
//!
//! `torch-sys` (built by `tch`) finds libtorch through `LIBTORCH_USE_PYTORCH=1` and the Python
//! on `PATH`, or through `LIBTORCH`. Without either its own error names neither this project's
//! setup script nor the pinned version, so this check runs first and says exactly what to do.

use std::process::Command;

const WANT: &str = "2.13.0";
const FIX: &str = "set up the pinned libtorch with\n\n    bash tools/setup-python.sh && source tools/libtorch-env.sh\n\nthen build again (the script installs torch==2.13.0 into .venv and exports \
LIBTORCH_USE_PYTORCH=1, VIRTUAL_ENV, PATH and LD_LIBRARY_PATH)";

fn main() {
    if std::env::var_os("CARGO_FEATURE_CHECK").is_none() {
        return; // softprompt-tch is not part of this build
    }
    for var in ["LIBTORCH", "LIBTORCH_USE_PYTORCH", "VIRTUAL_ENV", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("LIBTORCH").is_some() {
        return; // a manual libtorch install: torch-sys checks its version itself
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_none() {
        panic!("softprompt-tch needs libtorch {WANT}, and LIBTORCH_USE_PYTORCH is not set: {FIX}");
    }
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let out = Command::new(python)
        .args(["-c", "import torch; print(torch.__version__.split('+')[0])"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let version = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if version != WANT {
                panic!("softprompt-tch needs libtorch {WANT} but `{python}` has torch {version}: {FIX}");
            }
        }
        Ok(o) => {
            panic!(
            "softprompt-tch needs libtorch {WANT} but `{python}` cannot import torch ({}): {FIX}",
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
        )
        }
        Err(e) => {
            panic!("softprompt-tch needs libtorch {WANT} but `{python}` did not run ({e}): {FIX}")
        }
    }
}
