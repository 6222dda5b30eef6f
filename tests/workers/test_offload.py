"""Colocated hand-off, trainer side (workers/offload.py): a real megatron DDP model with its
distributed optimizer leaves the device and comes back bitwise, and training after hand-offs is
identical to training without them."""

from __future__ import annotations

import pytest

from megarl.runtime.local_group import run_local_group


@pytest.mark.dist
def test_offload_frees_the_device_and_restores_bitwise(converted):
    args = (converted["qwen2"]["ckpt"], converted["qwen2"]["hf"])
    plain = run_local_group("tests.workers.offload_checks:train_with_handoffs", 2, args=(*args, False), timeout=300)
    handed = run_local_group("tests.workers.offload_checks:train_with_handoffs", 2, args=(*args, True), timeout=300)
    for rank in handed:
        assert rank["freed_param_bytes"] == [0, 0]           # every parameter's storage was released
        assert rank["bitwise"] and rank["moments"] > 0 and rank["offloaded_bytes"] > 0
    assert [r["losses"] for r in handed] == [r["losses"] for r in plain]   # bit-identical training
    assert handed[0]["losses"][-1] < handed[0]["losses"][0]
