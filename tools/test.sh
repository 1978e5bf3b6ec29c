#!/usr/bin/env bash
# The project's tests: the Rust workspace, the custom-backend example, and the PEFT interop check
# (a prompt saved by softprompt loads in Hugging Face PEFT and gives the same loss).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup-python.sh
cargo test --workspace
# built by `cargo test` with the workspace's features; `cargo run -p` would resolve them anew and rebuild
target/debug/examples/custom_backend
.venv/bin/python tools/peft_interop.py target/debug/softprompt
