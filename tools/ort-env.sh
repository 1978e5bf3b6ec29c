# Source this file (`source tools/ort-env.sh`) to run the ONNX Runtime (ort) backend against the
# pinned onnxruntime==1.31.1 wheel in the project's .venv (installed by tools/setup-python.sh).
# `ort` loads the library at run time from ORT_DYLIB_PATH; nothing is linked at build time.
_sp_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_sp_venv="${SOFTPROMPT_VENV:-$_sp_root/.venv}"
_sp_ort="$_sp_venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1"
if [ ! -f "$_sp_ort" ]; then
  echo "ort-env: $_sp_ort is missing; run: bash tools/setup-python.sh" >&2
  return 1 2>/dev/null || exit 1
fi
export ORT_DYLIB_PATH="$_sp_ort"
unset _sp_root _sp_venv _sp_ort
