"""Device/backend choice, torch.distributed + megatron parallel state, seeding, CPU compatibility.

Importing this package is torch-free; the submodules import torch and megatron-core:
- `device.select_device`           - the one place cuda+nccl vs cpu+gloo is decided
- `cpu_compat.install`             - megatron-core CPU compatibility layer (before megatron import)
- `megatron`                       - the one way in to megatron-core: installs the CPU layer, then
                                     re-exports every megatron name megarl uses (never imported here)
- `distributed.init_distributed`   - process group + parallel_state from a ParallelConfig
- `seed`                           - seeding and RNG state capture for checkpoints
- `local_group.run_local_group`    - run a function on N local gloo ranks (tests, tools, benches)
"""

from megarl.runtime.device import DeviceSpec, select_device

__all__ = ["DeviceSpec", "select_device"]
