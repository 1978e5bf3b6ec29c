#!/usr/bin/env bash
# The fault and bad-input suite of docs/reliability.md in one command: killed and concurrent
# writers, mixed files, resumes of another run, slow clients and bounded shutdown, and the
# mutation fuzzers (FUZZ_ITERS mutations per target, default 20000 here; CI runs 1500).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SOFTPROMPT_FUZZ_ITERS="${FUZZ_ITERS:-20000}"
export SOFTPROMPT_FUZZ_SEED="${FUZZ_SEED:-1}"
# the full-disk test mounts a 64 KiB tmpfs in a private mount namespace: required here
export SOFTPROMPT_REQUIRE_FAULTS=1
cargo test -p softprompt-store --test faults --test store
cargo test -p softprompt-serve --features softprompt/serve --test http
cargo test -p softprompt-cli --test cli
cargo test -p softprompt-train
cargo test -p softprompt-tests --test fuzz --test interop
