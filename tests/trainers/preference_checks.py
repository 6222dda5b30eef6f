"""Rank functions for the preference-stage tests (run in spawned gloo ranks via run_local_group)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from megarl.config.parallel import ParallelConfig
from megarl.config.recipe import PreferenceConfig


def _recipe(stage: str, loss_type: str, parallel: ParallelConfig, micro: int):
    """`sigmoid_ftx` is the sigmoid loss plus an SFT term (ftx 0.5) on the chosen response."""
    ftx = 0.5 if loss_type.endswith("_ftx") else 0.0
    return SimpleNamespace(stage=stage, parallel=parallel, trainer=SimpleNamespace(micro_batch_per_rank=micro),
                           preference=PreferenceConfig(loss_type=loss_type.removesuffix("_ftx"), beta=0.5,
                                                       reference="none", ftx=ftx))


def pipeline_pair_losses(ckpt: str, parallel: dict, rows_path: str, loss_types: list[str], ref: torch.Tensor,
                         micro: int = 2) -> dict:
    """The dpo (or rm) objective of every pair in `rows_path`, computed the way the trainer does:
    pairs packed into rows, megatron's forward-only schedule at `parallel`, the loss on the last
    stage, metric sums reduced to every rank. `ref` [pairs, 2, 2] are fixed reference (Σ, count)
    values. Returns {loss_type: summarize(...)} (identical on every rank)."""
    from transformers import AutoTokenizer

    from megarl.checkpoint.hf import load_converted
    from megarl.data.preference import PreferenceDataset
    from megarl.models.train import TrainState, run_schedule
    from megarl.trainers.preference import (
        _Batches,
        _forward_step,
        _reduce_sums,
        kto_objective,
        pair_objective,
        summarize,
    )

    layout = ParallelConfig(**parallel)
    chunks, config, _ = load_converted(ckpt, layout)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ckpt, "hf"))
    out = {}
    for loss_type in loss_types:
        stage = "kto" if loss_type == "kto" else ("rm" if loss_type == "bradley_terry" else "dpo")
        data = PreferenceDataset(rows_path, "kto" if stage == "kto" else "preference", tokenizer, 512)
        recipe = _recipe(stage, "sigmoid" if stage == "rm" else loss_type, layout, micro)
        batches = _Batches(recipe, tokenizer.pad_token_id)
        examples = data.examples
        micro_batches, seq, positions = batches.mine(examples, [1.0] * len(examples))
        for k, mb in enumerate(micro_batches):
            mb["ref"] = ref[positions[k * micro:(k + 1) * micro]].float()
        sink: list = []
        objective = kto_objective if stage == "kto" else pair_objective
        from functools import partial

        with torch.no_grad():
            run_schedule(TrainState(chunks, None, config), micro_batches, seq, forward_only=True,
                         forward_step=partial(_forward_step, objective=partial(objective, recipe=recipe), sink=sink))
        from megarl.runtime.megatron import parallel_state as ps

        local = torch.stack(sink).sum(0) if sink else torch.zeros(8, dtype=torch.float64)
        out[loss_type] = summarize(stage, _reduce_sums(local.double(), ps.is_pipeline_last_stage(ignore_virtual=True)))
    return out
