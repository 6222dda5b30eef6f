"""Save and load model + optimizer state as a megatron dist checkpoint (torch_dist format).

Checkpoints are layout-free: one saved at TP=2 loads at PP=2 or DP=2 with the optimizer state
resharded (the distributed optimizer's `fully_reshardable` format, as Megatron-LM uses; the
library default raises "ShardedTensor.flattened_range is not supported" in 0.19). A checkpoint is
written to `<path>.partial` and renamed only after every rank finished, so a crash mid-save never
leaves a directory that looks complete.
"""

from __future__ import annotations

import os
import shutil

import torch.distributed as dist

from megarl.runtime import cpu_compat

cpu_compat.install()

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from megarl.models.train import TrainState  # noqa: E402

PARTIAL_SUFFIX = ".partial"


def _metadata() -> dict:
    return {
        "distrib_optim_sharding_type": "fully_reshardable",
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
    }


def sharded_state(state: TrainState, loading: bool, with_optimizer: bool = True) -> dict:
    md = _metadata()
    if len(state.models) == 1:
        model_sd = {"model": state.models[0].module.sharded_state_dict(metadata=md)}
    else:  # virtual pipeline stages: one entry per chunk; tensor keys are global layer names
        model_sd = {f"model{i}": m.module.sharded_state_dict(metadata=md) for i, m in enumerate(state.models)}
    out = dict(model_sd)
    if with_optimizer:
        out["optimizer"] = state.optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=md)
    return out


def save_checkpoint(state: TrainState, path: str, with_optimizer: bool = True) -> None:
    """Collective: every rank calls it. Atomic at directory level."""
    tmp = path + PARTIAL_SUFFIX
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(sharded_state(state, loading=False, with_optimizer=with_optimizer), tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


def load_checkpoint(state: TrainState, path: str, with_optimizer: bool = True) -> None:
    """Collective: load into this rank's layout, resharding model and optimizer state."""
    if not os.path.isdir(path):
        partial = os.path.isdir(path + PARTIAL_SUFFIX)
        raise FileNotFoundError(f"checkpoint {path!r} does not exist"
                                + (" (only an unfinished save is there)" if partial else ""))
    loaded = dist_checkpointing.load(sharded_state(state, loading=True, with_optimizer=with_optimizer), path)
    if len(state.models) == 1:
        state.models[0].module.load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(state.models):
            m.module.load_state_dict(loaded[f"model{i}"])
    if with_optimizer:
        state.optimizer.load_state_dict(loaded["optimizer"])
