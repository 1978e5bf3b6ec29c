//! Nothing at run time. With the `check` feature (turned on by `softprompt-tch`) the build
//! script of this crate checks that the pinned torch 2.13.0 is reachable and otherwise stops the
//! build with the command that sets it up (`bash tools/setup-python.sh && source
//! tools/libtorch-env.sh`). `torch-sys`'s own message names neither the script nor the version,
//! so this check says what to run instead; cargo does not promise to run it before `torch-sys`'s
//! build script, so with no libtorch at all `torch-sys`'s message may come first.
