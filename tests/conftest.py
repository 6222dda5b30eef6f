"""Shared test configuration. Heavy resources (megatron process groups, engines, Ray) are created
per test session and shared; every distributed test runs real gloo ranks via run_local_group."""

import os

# Deterministic, quiet, offline defaults for every test process (spawned ranks inherit them).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Single-rank run of the tiny dense and MoE GPTs (tests/dist/scenarios.py): the initial weights
    as dist checkpoints in a work dir, first-step loss and full gradients, loss trajectory."""
    from megarl.runtime.local_group import run_local_group

    workdir = str(tmp_path_factory.mktemp("parallel_ref"))
    [ref] = run_local_group("tests.dist.scenarios:reference_run", 1, args=(workdir,), timeout=300)
    return workdir, ref
