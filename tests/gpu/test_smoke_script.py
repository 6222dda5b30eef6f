"""The GPU smoke script on this CPU machine: it prepares its bundle (under 60 MB, nothing that needs
a download on the GPU machine) and its run says "no CUDA" and exits cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "gpu_smoke.py")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[str, dict]:
    bundle = str(tmp_path_factory.mktemp("gpu_smoke") / "bundle")
    done = subprocess.run([sys.executable, SCRIPT, "prepare", bundle], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return bundle, json.loads(done.stdout.strip().splitlines()[-1])


def test_prepare_builds_a_small_bundle_and_a_cpu_run_says_no_cuda(prepared):
    bundle, summary = prepared
    assert summary["megabytes"] < 60 and summary["reference_tokens"] == [2, 24]
    for part in ("pylib/megatron/core/__init__.py", "pylib/einops/__init__.py", "pylib/pytest/__init__.py",
                 "pylib/safetensors/__init__.py", "ckpt", "reference_logits.pt", "tiny_qwen2/config.json"):
        assert os.path.exists(os.path.join(bundle, part)), part
    # only pure Python or abi3 extensions travel: the GPU machine's CPython may differ from this one
    assert not [f for d, _, fs in os.walk(bundle) for f in fs if ".cpython-" in f and f.endswith(".so")]
    dry = subprocess.run([sys.executable, SCRIPT, bundle], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and "no CUDA" in dry.stdout, dry.stdout + dry.stderr
    assert json.loads(dry.stdout.strip().splitlines()[-1]) == {"cuda": False, "ran": False}


def test_the_gpu_checks_pass_on_cpu_in_strict_device_mode(prepared):
    """The smoke checks themselves, run here with the device bound to cpu:0 (strict device mode):
    the code they exercise keeps every tensor where a GPU run needs it, and the checks' own criteria
    hold, so a GPU window is not spent finding a bug in the script."""
    from megarl.runtime.local_group import run_local_group

    bundle, _ = prepared
    strict = {"MEGARL_STRICT_DEVICE": "1"}
    parity = run_local_group("tests.gpu.gpu_checks:converter_parity", 1, args=(bundle,), env=strict, timeout=300)[0]
    assert parity["device"] == "cpu:0" and parity["max_abs_diff"] < 1e-4, parity
    sft = run_local_group("tests.gpu.gpu_checks:sft_steps", 1, args=(bundle,), env=strict, timeout=300)[0]
    assert sft["micro_batch_device"] == "cpu:0" and sft["losses"][-1] < sft["losses"][0], sft
    policy = run_local_group("tests.gpu.gpu_checks:policy_update", 1, args=(bundle,), env=strict, timeout=300)[0]
    assert policy["sums_device"] == "cpu:0" and policy["mean_logp_after"] > policy["mean_logp_before"], policy
    handoff = run_local_group("tests.gpu.gpu_checks:offload_round_trip", 1, args=(bundle,), env=strict, timeout=300)[0]
    assert handoff["bitwise"] and handoff["held_mb"] > 0, handoff
