"""RolloutFleet on a local Ray cluster: spreads requests over engines, loads weights into all of
them, and survives an engine dying (restart + reload + retry, reported)."""

import pytest

from megarl.runtime.local_group import run_isolated


@pytest.fixture(scope="module")
def fleet_report(tiny_hf_models):
    return run_isolated("tests.rollout.fleet_checks:fleet_checks", args=(tiny_hf_models["qwen2"],), timeout=600)


def test_fleet_generates_for_every_prompt(fleet_report):
    assert fleet_report["shape"] == [2] * 6 and fleet_report["lengths_ok"]


def test_dead_engine_is_restarted_with_current_weights(fleet_report):
    assert fleet_report["after_kill_shape"] == [1] * 6
    assert fleet_report["after_kill_versions"] == [7]
    assert fleet_report["restarts"] == 1 and fleet_report["events"][0].startswith("restarted after:")
