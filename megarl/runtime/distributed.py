"""torch.distributed + megatron-core parallel state, initialised from a `ParallelConfig`.

Works the same under torchrun, Ray workers (which export RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT)
and `run_local_group`: the device and backend come from `select_device`, the CPU compatibility
layer is installed when there is no CUDA, and every RNG is seeded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megarl.config.parallel import ParallelConfig
from megarl.runtime.device import DEVICE_INDEX_ENV, DeviceSpec, bind_device, select_device, strict_device_mode
from megarl.runtime.megatron import parallel_state as ps
from megarl.runtime.seed import seed_everything


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits: global rank, device, and its coordinates in each parallel group."""

    rank: int
    world_size: int
    local_rank: int
    device: DeviceSpec
    parallel: ParallelConfig
    seed: int
    device_index: int = 0
    """The accelerator this process uses, among those it can see (LOCAL_RANK under torchrun, where
    every process sees the node's GPUs; 0 for a Ray worker that Ray gave one GPU)."""

    @property
    def tp_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        return ps.get_data_parallel_rank()

    @property
    def cp_rank(self) -> int:
        return ps.get_context_parallel_rank()

    @property
    def ep_rank(self) -> int:
        return ps.get_expert_model_parallel_rank()

    @property
    def is_first_stage(self) -> bool:
        return ps.is_pipeline_first_stage()

    @property
    def is_last_stage(self) -> bool:
        return ps.is_pipeline_last_stage()

    @property
    def torch_device(self) -> torch.device:
        from megarl.runtime.device import current

        return current()


def init_distributed(
    parallel: ParallelConfig,
    seed: int = 1234,
    device: DeviceSpec | None = None,
    num_experts: int | None = None,
    timeout_s: float = 600.0,
) -> ParallelContext:
    """Initialise the process group (if needed) and megatron's parallel state; seed every RNG.

    Rank and world come from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) unless the default process group already exists. Re-initialising with another
    layout in the same process (tests, converters) tears down the previous megatron groups first.
    """
    device = device or select_device()
    if not dist.is_initialized():
        dist.init_process_group(backend=device.backend, timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device_index = int(os.environ.get(DEVICE_INDEX_ENV, local_rank))
    bound = bind_device(device, device_index)
    if strict_device_mode() and not device.is_cuda:
        from megarl.runtime.strict_device import enable

        enable(bound)
    parallel = parallel.resolve(world, num_experts=num_experts)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
    )
    seed_everything(seed)
    return ParallelContext(rank, world, local_rank, device, parallel, seed, device_index)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (idempotent)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
