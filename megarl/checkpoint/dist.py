"""Save and load model + optimizer state as a megatron dist checkpoint (torch_dist format).

Checkpoints are layout-free: one saved at TP=2 loads at PP=2 or DP=2 with the optimizer state
resharded (the distributed optimizer's `fully_reshardable` format, as Megatron-LM uses; the
library default raises "ShardedTensor.flattened_range is not supported" in 0.19). A checkpoint is
written to `<path>.partial`, listed in a manifest (sizes and checksums, see manifest.py) and
renamed only after every rank finished, so a crash mid-save never leaves a directory that looks
complete, and damage after the save is found before a resume loads it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import torch
import torch.distributed as dist

from megarl.checkpoint.manifest import write_manifest
from megarl.checkpoint.paths import EXTRA_DIR, PARTIAL_SUFFIX
from megarl.models.train import TrainState, ranks_with_nonfinite
from megarl.runtime.megatron import dist_checkpointing
from megarl.runtime.megatron import parallel_state as ps


def _metadata() -> dict:
    return {
        "distrib_optim_sharding_type": "fully_reshardable",
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
    }


def _unwrap(m):
    return getattr(m, "module", m)  # DDP-wrapped chunk -> the GPTModel


def sharded_state(models: list, optimizer=None, loading: bool = False) -> dict:
    """The sharded state dict of model chunks (+ optimizer); tensor keys are global names."""
    md = _metadata()
    if len(models) == 1:
        model_sd = {"model": _unwrap(models[0]).sharded_state_dict(metadata=md)}
    else:  # virtual pipeline stages: one entry per chunk; tensor keys are global layer names
        model_sd = {f"model{i}": _unwrap(m).sharded_state_dict(metadata=md) for i, m in enumerate(models)}
    out = dict(model_sd)
    if optimizer is not None:
        out["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=md)
    return out


def save_checkpoint(state: TrainState, path: str, with_optimizer: bool = True) -> None:
    """Collective: every rank calls it. Atomic at directory level."""
    save_sharded(state.models, path, state.optimizer if with_optimizer else None)


def load_checkpoint(state: TrainState, path: str, with_optimizer: bool = True) -> None:
    """Collective: load into this rank's layout, resharding model and optimizer state."""
    load_sharded(state.models, path, state.optimizer if with_optimizer else None)


def save_sharded(models: list, path: str, optimizer=None, extra: dict | None = None,
                 finish_rank0: Callable[[str], None] | None = None) -> None:
    """Save model chunks (and optimizer) as a dist checkpoint; collective and atomic.

    `extra` is this rank's own state (step, data position, RNG, scheduler), written to
    `extra/rank<r>.pt`; `finish_rank0(tmp_dir)` adds files before the checkpoint becomes visible.
    """
    bad = ranks_with_nonfinite(p.detach() for m in models for p in m.parameters())
    if bad:  # a poisoned checkpoint would be resumed from and exported: refuse it
        raise FloatingPointError(f"not saving {path}: non-finite weights on {bad} rank(s)")
    tmp = path + PARTIAL_SUFFIX
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(sharded_state(models, optimizer), tmp)
    if extra is not None:
        os.makedirs(os.path.join(tmp, EXTRA_DIR), exist_ok=True)
        torch.save(extra, os.path.join(tmp, EXTRA_DIR, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    if dist.get_rank() == 0 and finish_rank0 is not None:
        finish_rank0(tmp)
    if dist.get_rank() == 0:
        write_manifest(tmp)  # rank 0 reads every rank's files back (shared storage, as loading needs)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


def load_sharded(models: list, path: str, optimizer=None) -> None:
    """Load a dist checkpoint into this rank's model chunks (and optimizer), resharding."""
    if not os.path.isdir(path):
        partial = os.path.isdir(path + PARTIAL_SUFFIX)
        raise FileNotFoundError(f"checkpoint {path!r} does not exist"
                                + (" (only an unfinished save is there)" if partial else ""))
    loaded = dist_checkpointing.load(sharded_state(models, optimizer, loading=True), path)
    if len(models) == 1:
        _unwrap(models[0]).load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(models):
            _unwrap(m).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])


def load_extra(path: str) -> dict | None:
    """This rank's `extra` state from a checkpoint (rank 0's when resuming on more ranks)."""
    mine = os.path.join(path, EXTRA_DIR, f"rank{dist.get_rank()}.pt")
    fallback = os.path.join(path, EXTRA_DIR, "rank0.pt")
    for candidate in (mine, fallback):
        if os.path.isfile(candidate):
            return torch.load(candidate, weights_only=False, map_location="cpu")  # ours: RNG states are tuples
    return None
