# Source this file (`source tools/libtorch-env.sh`) to build and run the libtorch (tch) backend
# against the pinned torch==2.13.0 wheel in the project's .venv (created by tools/setup-python.sh).
# torch-sys finds libtorch through LIBTORCH_USE_PYTORCH=1 and the `python` of the active venv;
# binaries find libtorch*.so at run time through LD_LIBRARY_PATH.
_sp_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_sp_venv="${SOFTPROMPT_VENV:-$_sp_root/.venv}"
if [ ! -x "$_sp_venv/bin/python" ]; then
  echo "libtorch-env: $_sp_venv/bin/python is missing; run: bash tools/setup-python.sh" >&2
  return 1 2>/dev/null || exit 1
fi
export VIRTUAL_ENV="$_sp_venv"
export PATH="$_sp_venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
_sp_torch_lib="$("$_sp_venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$_sp_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _sp_root _sp_venv _sp_torch_lib
