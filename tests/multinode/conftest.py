"""One simulated 3-node cluster (tools/simcluster.py) with Ray (4 logical GPUs per node) and Slurm, shared
by the multinode tests and torn down (and checked clean) after them, failed or not."""

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the simulated cluster needs root (network namespaces)"
    if not (shutil.which("nsenter") and shutil.which("ip")):
        return "nsenter and ip (util-linux, iproute2) are needed"
    return None


@pytest.fixture(scope="session")
def sim():
    from simcluster import SimCluster

    why = _unavailable()
    if why:
        pytest.skip(why)
    cluster = SimCluster(nodes=3, ray=True, gpus=4, slurm=True)
    cluster.down()  # a cluster left by a killed earlier session
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()  # raises if anything of it is left on the machine
