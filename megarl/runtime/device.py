"""The one place that picks the device and the collective backend.

GPU machines get `cuda` + NCCL; CPU-only machines (every developer box and CI) get `cpu` + gloo and
run the very same code path. `MEGARL_DEVICE=cpu|cuda|auto` overrides the automatic choice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEVICE_ENV = "MEGARL_DEVICE"
DEVICE_INDEX_ENV = "MEGARL_DEVICE_INDEX"
"""Set by a launcher that knows which visible accelerator a process should use; else LOCAL_RANK."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a Slurm cpuset or `taskset`), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_rank(world_size: int, requested: int | None = None) -> int:
    """torch threads of each of `world_size` training ranks on this machine: `requested`
    (cluster.cpu_threads_per_rank) when set, else the usable CPUs shared out, at least one."""
    return requested or max(1, usable_cpus() // world_size)


@dataclass(frozen=True)
class DeviceSpec:
    device_type: str
    """"cuda" or "cpu"."""
    backend: str
    """torch.distributed backend: "nccl" with cuda, "gloo" with cpu."""

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def torch_device(self, local_rank: int = 0):
        import torch

        return torch.device("cuda", local_rank) if self.is_cuda else torch.device("cpu")


CPU = DeviceSpec("cpu", "gloo")
CUDA = DeviceSpec("cuda", "nccl")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def select_device(prefer: str | None = None, cuda_available: bool | None = None) -> DeviceSpec:
    """Choose (device, backend).

    `prefer` is "auto", "cpu" or "cuda" (default: $MEGARL_DEVICE, else "auto"). `cuda_available`
    is injectable so the selection logic is testable on a CPU machine.
    """
    prefer = (prefer or os.environ.get(DEVICE_ENV) or "auto").lower()
    if prefer not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}/device must be one of auto, cpu, cuda; got {prefer!r}")
    if prefer == "cpu":
        return CPU
    if cuda_available is None:
        cuda_available = _cuda_available()
    if prefer == "cuda" and not cuda_available:
        raise RuntimeError(
            "device 'cuda' was requested but torch sees no CUDA device "
            f"(torch CPU build or no GPU); set {DEVICE_ENV}=cpu or device: auto to run on CPU with gloo"
        )
    return CUDA if cuda_available else CPU
