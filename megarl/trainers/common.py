"""Pieces every trainer shares: the starting model as a megatron checkpoint (converted once), the
LR schedule, and the HF directory a rollout engine starts from."""

from __future__ import annotations

import json
import os

INIT_DIR = "init"          # the starting model as a megatron checkpoint
CKPT_DIR = "checkpoints"   # step_<N> training checkpoints
METRICS_FILE = "metrics.jsonl"


def initial_checkpoint(recipe, tag: str) -> str:
    """A megatron checkpoint of the starting model: model.path itself, or converted into
    `<output_dir>/init` once (reused while its source is the same path)."""
    from megarl.checkpoint.hf import MARKER, convert_hf_to_megatron
    from megarl.runtime.local_group import run_local_group

    path = recipe.model.path
    if os.path.isfile(os.path.join(path, MARKER)):
        return path
    target = os.path.join(recipe.trainer.output_dir, INIT_DIR)
    marker = os.path.join(target, MARKER)
    if os.path.isfile(marker) and json.load(open(marker)).get("source") == os.path.abspath(path):
        return target
    print(f"[{tag}] converting {path} to a megatron checkpoint in {target}", flush=True)
    run_local_group(convert_hf_to_megatron, 1, args=(path, target), timeout=3600)
    return target


def has_hf_weights(path: str) -> bool:
    return os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))


def lr_scheduler(optimizer, recipe, steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = recipe.optim
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(steps, 1), lr_decay_style=o.lr_scheduler,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(steps, 1), wd_incr_style="constant")
