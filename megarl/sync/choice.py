"""Which transport a sync uses (torch-free until the device has to be asked).

`rollout.weight_sync.transport: auto` is a runtime decision: it depends on the device the run
really gets, which only torch can tell when the recipe says `cluster.device: auto`. Validation
refuses an explicit choice that cannot work; the driver settles `auto` here, once.
"""

from __future__ import annotations


def transport_for(cpu: bool, nodes: int, quantization: str | None) -> str:
    """shared_memory on one CPU node without FP8 (every party maps the same /dev/shm slots), else
    broadcast: across nodes, for FP8 (each tensor must be whole on the sender to be quantized),
    and on GPUs, where NCCL is the proven path and the CUDA-IPC slots are opt-in."""
    return "shared_memory" if cpu and nodes == 1 and not quantization else "broadcast"


def resolve_transport(recipe) -> str:
    """The transport this run's sync uses: the recipe's explicit choice, or what `auto` stands for
    on the device `runtime.device` selects."""
    ro = recipe.rollout
    if ro.weight_sync.transport != "auto":
        return ro.weight_sync.transport
    from megarl.runtime.device import select_device

    cpu = not select_device(recipe.cluster.device).is_cuda
    return transport_for(cpu, recipe.cluster.nodes, ro.quantization)
