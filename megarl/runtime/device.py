"""The one place that picks the device and the collective backend, and where tensors live.

GPU machines get `cuda` + NCCL; CPU-only machines (every developer box and CI) get `cpu` + gloo and
run the very same code path. `MEGARL_DEVICE=cpu|cuda|auto` overrides the automatic choice.

A rank binds its device once (`bind_device`, from `init_distributed`); from then on `current()` is
where its model lives, where every micro-batch goes (`to_device`) and where metric reductions run
(the gang's groups are NCCL on GPUs). Whatever leaves the process goes to the host first
(`to_host`) and is loaded with `map_location="cpu"`. On CPU, `runtime/strict_device.py` can make the
device and the host two different places, so the suite catches a tensor left on the wrong one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEVICE_ENV = "MEGARL_DEVICE"
STRICT_DEVICE_ENV = "MEGARL_STRICT_DEVICE"
"""1: on CPU, the device is `cpu:0` and the host plain `cpu`, and mixing them is an error (strict_device.py)."""
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


PIN_ENV = "MEGARL_CPU_SLOT"   # set for a Ray worker whose recipe has cluster.cpu_pinning


def pin_to_slot() -> int | None:
    """Pin this process to the core of its CPU slot (`cluster.cpu_pinning`; the slot index is in
    MEGARL_CPU_SLOT): slot d -> the d-th of the CPUs it may use, modulo their number. Every thread
    it has now is pinned, and threads it starts later inherit the mask. Returns the core, or None
    when this process is not to be pinned."""
    slot = os.environ.get(PIN_ENV)
    if slot is None:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[int(slot) % len(allowed)]
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass
    return core


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


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 flags of hardware bf16 matrix multiplies; without one, torch emulates bf16 on the CPU."""


def cpu_has_bf16_matmul(cpuinfo: str | None = None) -> bool:
    """Does this CPU multiply bf16 matrices in hardware (`cpuinfo`: /proc/cpuinfo's text, injectable)?"""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def bf16_on_cpu_warning(dtype: str, device: str, cpuinfo: str | None = None) -> str | None:
    """What to tell a user who trains in bf16 on a CPU that emulates it (None otherwise)."""
    if dtype != "bf16" or device != "cpu" or cpu_has_bf16_matmul(cpuinfo):
        return None
    return ("model.dtype is bf16 but this CPU has no bf16 matrix instructions (" + "/".join(BF16_CPU_FLAGS) +
            "), so torch emulates them: the tiny GRPO step measured 3.8x slower than in fp32 on such a CPU; "
            "set model.dtype: fp32 here (bf16 pays off on GPUs and CPUs with those instructions)")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def nvidia_gpus_present() -> bool:
    """Does this machine have NVIDIA GPUs, whatever torch thinks (the driver's device files)?"""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/proc/driver/nvidia/gpus/*"))


def select_device(prefer: str | None = None, cuda_available: bool | None = None,
                  gpus_present: bool | None = None) -> DeviceSpec:
    """Choose (device, backend).

    `prefer` is "auto", "cpu" or "cuda" (default: $MEGARL_DEVICE, else "auto"). "auto" on a machine
    with NVIDIA GPUs that torch cannot use (a CPU build of torch, a driver mismatch) is an error,
    not a silent CPU run. `cuda_available` and `gpus_present` are injectable so the selection logic
    is testable on a CPU machine.
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
    if not cuda_available and (nvidia_gpus_present() if gpus_present is None else gpus_present):
        import torch

        raise RuntimeError(
            f"this machine has NVIDIA GPUs but torch {torch.__version__} cannot use them (a CPU build of torch, "
            "e.g. the CPU .venv, or a driver mismatch), so the run would silently train on CPU: install the GPU "
            "stack (requirements/gpu.txt, `make setup-gpu`), or set cluster.device: cpu to run on CPU on purpose")
    return CUDA if cuda_available else CPU


def rank_env(spec: DeviceSpec) -> dict[str, str]:
    """Environment a megatron rank process needs before CUDA starts. CUDA_DEVICE_MAX_CONNECTIONS=1
    keeps one hardware queue, so a TP/SP collective issued before a GEMM is scheduled before it
    (megatron's requirement for overlapping tensor-parallel communication with compute)."""
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if spec.is_cuda else {}


_bound = None  # this process's torch.device once bound


def strict_device_mode() -> bool:
    return os.environ.get(STRICT_DEVICE_ENV) == "1"


def bind_device(spec: DeviceSpec, index: int = 0):
    """Make `spec` (accelerator `index` of those visible) this process's device; returns it.
    In strict mode on CPU the device is `cpu:0`, told apart from the host (`cpu`) by its index."""
    import torch

    global _bound
    if spec.is_cuda:
        torch.cuda.set_device(index)
        _bound = torch.device("cuda", index)
    else:
        _bound = torch.device("cpu", 0) if strict_device_mode() else torch.device("cpu")
    return _bound


def current():
    """This process's device (the host's CPU until `bind_device`)."""
    import torch

    return _bound if _bound is not None else torch.device("cpu")


def to_device(obj):
    """`obj` with every tensor (in nested dicts, lists and tuples) on this process's device."""
    return _map_tensors(obj, lambda t: t.to(current(), non_blocking=True))


def to_host(obj):
    """`obj` with every tensor detached and on the host: what crosses a process boundary."""
    import torch

    return _map_tensors(obj, lambda t: t.detach().to(torch.device("cpu")))


def _map_tensors(obj, fn):
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj
