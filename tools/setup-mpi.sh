#!/usr/bin/env bash
# Open MPI and the headers the `mpi` crate's bindings need (Debian: openmpi-bin, libopenmpi-dev,
# libclang-dev), for the workspace's softprompt-mpi crate and `mpirun` tests. A no-op once present.
set -euo pipefail
if command -v mpirun >/dev/null && command -v mpicc >/dev/null && ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
  exit 0
fi
echo "== installing Open MPI and libclang (apt-get: openmpi-bin libopenmpi-dev libclang-dev)" >&2
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
$sudo apt-get update -q >&2
$sudo apt-get install -y -q openmpi-bin libopenmpi-dev libclang-dev >&2
