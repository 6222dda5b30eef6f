#!/usr/bin/env bash
# Create .venv-gpu with the GPU stack (requirements/gpu.txt) on a machine with NVIDIA GPUs.
# Usage: tools/setup_gpu_env.sh [VENV]      (called by `make setup-gpu`)
# NOT yet run by this project on a GPU machine (CI and the development boxes are CPU-only).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-gpu}
PY=${PYTHON:-python3.11}
if ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  echo "[setup-gpu] no NVIDIA GPU on this machine (/dev/nvidia*); the CPU stack is \`make setup\`" >&2
  exit 1
fi
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip --disable-pip-version-check -q install -r requirements/gpu.txt
"$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation -e .
"$VENV/bin/python" - <<'PY'
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device in the GPU venv"
import megatron.core, ray, transformers, vllm, transformer_engine.pytorch  # noqa: F401
print(f"[setup-gpu] done: torch {torch.__version__}, {torch.cuda.device_count()} GPU(s), "
      f"{torch.cuda.get_device_name(0)}")
PY
