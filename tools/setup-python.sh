#!/usr/bin/env bash
# Creates the project-local Python environment used by the reference oracles (transformers, PEFT,
# torch) and by the libtorch / ONNX Runtime backends. Every version is pinned.
# torch is installed without its CUDA wheels (--no-deps): the oracles run on CPU only.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SOFTPROMPT_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.softprompt-stamp"
want="torch==2.13.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0 numpy==2.4.6 gguf==0.19.0 setuptools==84.2.1 onnxruntime==1.31.1 onnx==1.23.2"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$py" -m venv "$venv"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
"${pip[@]}" --no-deps torch==2.13.0
# torch's own pure-Python dependencies (its CUDA wheels are left out on purpose)
"${pip[@]}" filelock==4.3.1 typing-extensions==4.16.0 sympy==1.14.0 networkx==3.6.1 jinja2==3.1.6 fsspec==2026.9.0 setuptools==84.2.1
"${pip[@]}" transformers==5.24.0 peft==0.21.2 safetensors==0.8.0 numpy==2.4.6 gguf==0.19.0
# ONNX Runtime for the ort backend: only its shared library is used (ORT_DYLIB_PATH, see
# tools/ort-env.sh), so its Python dependencies are left out
"${pip[@]}" --no-deps onnxruntime==1.31.1
# onnx reads the vision backbone's initializers for the ViT oracle (tools/make_vit_fixture.py --real)
"${pip[@]}" --no-deps onnx==1.23.2 protobuf==7.36.2 ml_dtypes==0.7.0
test -f "$venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1"
"$venv/bin/python" -c "import torch, transformers, peft; print('oracle env: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
echo "$want" > "$stamp"
