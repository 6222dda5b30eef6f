"""The GPU smoke run: megarl's GPU path on one CUDA GPU whose Python has only torch (CUDA), numpy and
the usual scientific stack, with nothing downloadable — one prepared command, under 8 minutes.

    python tools/gpu_smoke.py prepare [BUNDLE]   # here (CPU, the project's .venv): build the bundle
    python tools/gpu_smoke.py [run] [BUNDLE]      # on the GPU machine (or here: a dry run)

BUNDLE (default runs/gpu_smoke, ~10 MB) holds what the GPU machine lacks: `pylib/` (megatron-core,
einops, safetensors, pytest and its few deps, copied from this .venv: pure Python or abi3 only),
a tiny Qwen2 model converted to a megatron checkpoint, and its logits under transformers (fp32, CPU)
as the parity reference, so transformers itself need not travel. `run` puts `pylib` on the path and
runs `tests/gpu` (marker `gpu`): SFT and policy updates on CUDA with NCCL at world size 1, the
converted model's logits vs transformers', policy log-probs, a CUDA-IPC slot round trip between
two processes with the checksum, and a Transformer Engine FP8 forward when TE imports. Without CUDA
it says "no CUDA" and exits 0. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUNDLE = os.path.join(ROOT, "runs", "gpu_smoke")
BUNDLE_ENV = "MEGARL_GPU_BUNDLE"
# importable names copied into pylib/ (pure Python, or abi3 extension modules: any CPython >= 3.8)
PYLIB = ("megatron", "einops", "safetensors", "pytest", "_pytest", "pluggy", "iniconfig", "py.py", "yaml", "_yaml",
         "packaging", "setuptools", "_distutils_hack", "pkg_resources", "pygments")
# and their distribution metadata (megarl checks the megatron-core version; pytest finds its plugins)
DIST_INFO = ("megatron_core-*", "einops-*", "safetensors-*", "pytest-*", "pluggy-*", "iniconfig-*", "PyYAML-*",
             "packaging-*", "setuptools-*", "pygments-*")
BUNDLE_LIMIT_MB = 60
SMOKE_TIMEOUT_S = 480


def prepare(bundle: str) -> dict:
    """Build the bundle on this (CPU) machine."""
    import site

    sys.path.insert(0, ROOT)
    from megarl.checkpoint.hf import convert_hf_to_megatron
    from megarl.models.tiny_hf import make_tiny_model
    from megarl.runtime.local_group import run_local_group

    shutil.rmtree(bundle, ignore_errors=True)
    pylib = os.path.join(bundle, "pylib")
    os.makedirs(pylib)
    packages = site.getsitepackages()[0]
    for name in PYLIB:
        src = os.path.join(packages, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(pylib, name), ignore=shutil.ignore_patterns(
                "__pycache__", "*.cpython-*.so", "tests"))   # CPython-version-specific parts stay here
        elif os.path.isfile(src):
            shutil.copy(src, pylib)
    for pattern in DIST_INFO:
        for src in glob.glob(os.path.join(packages, pattern + ".dist-info")):
            shutil.copytree(src, os.path.join(pylib, os.path.basename(src)))
    model = os.path.join(bundle, "tiny_qwen2")
    make_tiny_model(model, arch="qwen2", seed=0)
    run_local_group(convert_hf_to_megatron, 1, args=(model, os.path.join(bundle, "ckpt")), timeout=600)
    tokens = _reference_logits(model, os.path.join(bundle, "reference_logits.pt"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(bundle) for f in fs) / 2**20
    if size > BUNDLE_LIMIT_MB:
        raise SystemExit(f"the bundle is {size:.0f} MB, over the {BUNDLE_LIMIT_MB} MB limit")
    summary = {"bundle": bundle, "megabytes": round(size, 1), "reference_tokens": tokens}
    with open(os.path.join(bundle, "bundle.json"), "w") as f:
        json.dump(summary, f)
    return summary


def _reference_logits(model_dir: str, out: str) -> list[int]:
    """transformers' fp32 logits of a fixed token batch, the parity reference on the GPU."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = torch.arange(3, 3 + 2 * 24).reshape(2, 24) % hf.config.vocab_size
    with torch.no_grad():
        logits = hf(tokens).logits
    torch.save({"tokens": tokens, "logits": logits}, out)
    return list(tokens.shape)


def run(bundle: str) -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA: the GPU smoke run needs a CUDA GPU; nothing was run")
        print(json.dumps({"cuda": False, "ran": False}))
        return 0
    if not os.path.isfile(os.path.join(bundle, "bundle.json")):
        print(f"no bundle at {bundle}: run `python tools/gpu_smoke.py prepare` on the CPU machine first")
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(bundle, "pylib"), ROOT]),
               **{BUNDLE_ENV: os.path.abspath(bundle)}, PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=",
           "-o", "timeout=0", "-rA", os.path.join(ROOT, "tests", "gpu")]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, timeout=SMOKE_TIMEOUT_S)
        code = done.returncode
    except subprocess.TimeoutExpired:
        print(f"the GPU smoke run passed its {SMOKE_TIMEOUT_S} s budget")
        code = 124
    print(json.dumps({"cuda": True, "ran": True, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                      "exit_code": code, "seconds": round(time.monotonic() - t0, 1)}))
    return code


def main(argv: list[str]) -> int:
    if argv and argv[0] == "prepare":
        print(json.dumps(prepare(argv[1] if len(argv) > 1 else DEFAULT_BUNDLE)))
        return 0
    if argv and argv[0] == "run":
        argv = argv[1:]
    return run(argv[0] if argv else DEFAULT_BUNDLE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
