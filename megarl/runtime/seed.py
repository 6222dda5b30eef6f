"""Seeding and RNG state capture for every generator a training step touches.

Python, NumPy, torch (CPU and, on GPUs, CUDA) and megatron-core's tensor-parallel RNG tracker
(which gives TP ranks different dropout streams and expert ranks their own). Checkpoints store
`rng_state()` and resume with `set_rng_state()` so a resumed run draws the same numbers.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from megarl.runtime.megatron import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
from megarl.runtime.megatron import parallel_state as ps

# Megatron-LM offsets the seed per pipeline stage so stages do not share dropout masks.
PIPELINE_SEED_STRIDE = 100


def seed_everything(seed: int) -> int:
    """Seed all generators; with megatron model parallelism initialised, also its RNG tracker.

    Returns the per-rank seed actually used (seed + 100·pp_rank).
    """
    rank_seed = seed
    if ps.model_parallel_is_initialized():
        rank_seed += PIPELINE_SEED_STRIDE * ps.get_pipeline_model_parallel_rank()
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    if ps.model_parallel_is_initialized():
        model_parallel_cuda_manual_seed(rank_seed)
    return rank_seed


def rng_state() -> dict:
    """Every generator's state, picklable, for checkpoints."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
