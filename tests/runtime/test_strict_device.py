"""Strict device mode (runtime/strict_device.py): on CPU the device (cpu:0) and the host are two
places, and what a GPU would refuse is refused here too — checked on its own rules, and on a real
megatron SFT step with and without a micro-batch planted on the host."""

from __future__ import annotations

import pytest

from megarl.runtime.local_group import run_local_group

STRICT = {"MEGARL_STRICT_DEVICE": "1"}


def test_device_and_host_are_told_apart():
    r = run_local_group("tests.runtime.strict_checks:placement_rules", 1, env=STRICT, timeout=120)[0]
    assert r["device"] == "cpu:0"
    assert not r["host"] and r["to_device"] and r["factory"] and r["view"] and r["grad"]
    assert r["beside"] == ("cpu:0", True)     # device=t.device places a tensor beside t
    assert r["cpu_copy"] == (False, False) and r["to_host"] is False   # host copies are other tensors
    assert "mixes tensors on the device" in r["mix"] and "strict_checks.py" in r["mix"]
    assert r["scalar_mix"] == "" and r["index_with_host"] == ""          # as CUDA allows
    assert "all_reduce on a host tensor" in r["reduce_host"]
    assert r["reduce_device"] == "" and r["reduce_host_group"] == ""
    assert "returns a device tensor" in r["return_device"] and r["return_host"] == ""


@pytest.mark.parametrize("planted", [False, True])
def test_sft_step_refuses_a_micro_batch_left_on_the_host(planted, tiny_hf_models):
    error = run_local_group("tests.runtime.strict_checks:sft_step_with", 1, args=(planted, tiny_hf_models["qwen2"]),
                            env=STRICT, timeout=300)[0]
    if planted:
        assert "input argument 0 (2, 16) is on the host" in error, error
    else:
        assert error == ""
