//! Nothing at run time. With the `check` feature (turned on by `softprompt-tch`) the build
//! script of this crate checks that the pinned torch 2.13.0 is reachable and otherwise stops the
//! build with the command that sets it up (`bash tools/setup-python.sh && source
//! tools/libtorch-env.sh`). `torch-sys`'s own message names neither the script nor the version,
//! so this check must run first: `softprompt-core` depends on this crate, which puts it ahead of
//! `torch-sys` in cargo's scheduling (cargo builds first what most crates wait for).
