//! Nothing at run time. The build script of this crate checks, before `torch-sys` looks for
//! libtorch, that the pinned torch 2.13.0 is reachable, and otherwise stops the build with the
//! command that sets it up (`bash tools/setup-python.sh && source tools/libtorch-env.sh`).
//! It is a crate of its own, without dependencies, so that its check runs (and fails) before
//! `torch-sys`'s build script, whose own message names neither the script nor the version.
