"""Where the job runs: the node list and resources of a Slurm allocation, or this one machine.

Slurm is detected from `SLURM_JOB_ID`; the node names come from `scontrol show hostnames
$SLURM_JOB_NODELIST` (the compact form `gpu[01-04,07]` is Slurm's to expand), GPUs per node from
`SLURM_GPUS_ON_NODE` (or `SLURM_GPUS_PER_NODE`, or the recipe), CPUs per node from
`SLURM_CPUS_ON_NODE`. Without Slurm the job is local: one node, this host's CPUs and GPUs.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass, field


class LaunchError(RuntimeError):
    """The launcher cannot bring the job up; the message says what it saw and what to do."""


@dataclass
class NodeMap:
    nodes: list[str]
    gpus_per_node: int
    cpus_per_node: int
    job_id: str | None = None
    """Slurm job id (None in local mode)."""
    restart_count: int = 0
    """SLURM_RESTART_COUNT: how often this job was requeued."""
    env: dict = field(default_factory=dict, repr=False)

    @property
    def head(self) -> str:
        return self.nodes[0]

    @property
    def workers(self) -> list[str]:
        return self.nodes[1:]

    @property
    def slurm(self) -> bool:
        return self.job_id is not None

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * len(self.nodes)

    @property
    def total_cpus(self) -> int:
        return self.cpus_per_node * len(self.nodes)

    def describe(self, ray: bool = True) -> str:
        where = f"Slurm job {self.job_id}" + (f" (restart {self.restart_count})" if self.restart_count else "") \
            if self.slurm else "local (no Slurm)"
        lines = [f"{where}: {len(self.nodes)} node(s), {self.gpus_per_node} GPU(s) and {self.cpus_per_node} CPU(s) "
                 f"per node"]
        for i, node in enumerate(self.nodes):
            role = ("ray head + driver" if i == 0 else "ray worker") if ray else ("ranks + driver" if i == 0
                                                                                 else "ranks")
            gpus = ",".join(str(g) for g in range(self.gpus_per_node)) or "-"
            lines.append(f"  {node:<24} {role:<18} GPUs [{gpus}]")
        return "\n".join(lines)


def _first_int(value: str | None) -> int | None:
    """'4', 'a100:4', '4(x2)' -> 4; None when absent."""
    if not value:
        return None
    m = re.search(r"(\d+)(?:\(x\d+\))?$", value.split(",")[0])
    return int(m.group(1)) if m else None


def _local_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return 0
    return len([line for line in out.stdout.splitlines() if line.startswith("GPU ")]) if out.returncode == 0 else 0


def expand_nodelist(nodelist: str) -> list[str]:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError("SLURM_JOB_ID is set but `scontrol` is not on PATH: run inside the Slurm job (or unset "
                          "SLURM_JOB_ID for a local run)") from None
    if out.returncode != 0 or not out.stdout.split():
        raise LaunchError(f"`scontrol show hostnames {nodelist}` failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout.split()


def detect_nodes(env: dict | None = None, gpus_per_node: int | None = None) -> NodeMap:
    """The NodeMap of this job. `gpus_per_node` (the recipe's cluster.gpus_per_node) is used when
    Slurm does not say; in local mode the GPUs this host really has win."""
    env = dict(os.environ if env is None else env)
    job = env.get("SLURM_JOB_ID")
    if job:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError(f"Slurm job {job} has no SLURM_JOB_NODELIST in its environment")
        nodes = expand_nodelist(nodelist)
        expected = _first_int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"))
        if expected is not None and expected != len(nodes):
            raise LaunchError(f"SLURM_JOB_NUM_NODES={expected} but {nodelist} expands to {len(nodes)} nodes")
        gpus = _first_int(env.get("SLURM_GPUS_ON_NODE")) or _first_int(env.get("SLURM_GPUS_PER_NODE"))
        cpus = _first_int(env.get("SLURM_CPUS_ON_NODE")) or os.cpu_count() or 1
        return NodeMap(nodes, gpus if gpus is not None else (gpus_per_node or 0), cpus, job,
                       int(env.get("SLURM_RESTART_COUNT", "0") or 0), env)
    return NodeMap([socket.gethostname()], _local_gpus(), os.cpu_count() or 1, None, 0, env)
