"""The GPU smoke tests (marker `gpu`): skipped without CUDA; run on a GPU machine by
`python tools/gpu_smoke.py` from the bundle it prepares (env MEGARL_GPU_BUNDLE). Each check runs
on one fresh CUDA rank (NCCL, world size 1)."""

from __future__ import annotations

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def bundle():
    path = os.environ.get("MEGARL_GPU_BUNDLE")
    if not path or not os.path.isfile(os.path.join(path, "bundle.json")):
        pytest.skip("no GPU smoke bundle (python tools/gpu_smoke.py prepare; MEGARL_GPU_BUNDLE)")
    return path


def _on_cuda(fn: str, bundle: str):
    from megarl.runtime.local_group import run_local_group

    return run_local_group(f"tests.gpu.gpu_checks:{fn}", 1, args=(bundle,), timeout=300)[0]


def test_converted_model_matches_transformers_on_cuda(bundle):
    r = _on_cuda("converter_parity", bundle)
    assert r["device"] == "cuda:0" and r["logits_device"] == "cuda:0", r
    assert r["max_abs_diff"] < 1e-4, r


def test_sft_steps_train_on_cuda(bundle):
    r = _on_cuda("sft_steps", bundle)
    assert r["micro_batch_device"] == "cuda:0" and r["grad_buffer_device"] == "cuda:0", r
    assert r["losses"][-1] < r["losses"][0], r


def test_policy_update_and_logprobs_on_cuda(bundle):
    r = _on_cuda("policy_update", bundle)
    assert r["logp_device"] == "cuda:0" and r["sums_device"] == "cuda:0", r
    assert r["grad_norm"] > 0 and r["mean_logp_after"] > r["mean_logp_before"], r


def test_cuda_ipc_slot_round_trip_with_checksum(bundle):
    from tests.gpu.gpu_checks import ipc_round_trip

    r = ipc_round_trip(bundle)   # here: a local-group rank is daemonic and may not start the writer process
    assert r["writer"] == "ok" and r["payload_sum"] == r["expected_sum"], r


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="Transformer Engine not installed")
def test_transformer_engine_fp8_forward(bundle):
    r = _on_cuda("te_fp8_forward", bundle)
    assert r["rel_err"] < 0.1, r


def test_colocated_offload_frees_the_gpu_and_restores_bitwise(bundle):
    r = _on_cuda("offload_round_trip", bundle)
    # the snapshot kept for the comparison stays on the GPU: everything else left it
    assert r["bitwise"] and r["offloaded_mb"] < r["resident_mb"] - r["held_mb"] / 2, r
