"""Supervised fine-tuning on chat / tool-calling conversations (loss on assistant tokens only).

Driver (`run`): makes sure a megatron checkpoint of the starting model exists (converting an HF
directory once), then runs `train_rank` on every rank (local gloo ranks on CPU), then exports the
final weights to HF format in `<output_dir>/hf`.

Each step (`train_rank`): the sampler hands out `samples_per_step` rendered conversations; each
data-parallel rank takes its share, cut into micro-batches of `micro_batch_per_rank` sequences padded
to the step's longest; megatron's schedule runs forward/backward with the per-token loss (every
assistant token in the step weighs the same); the optimizer and LR schedule step. Checkpoints
hold model, optimizer, LR schedule, RNG states, data position and step; `resume: auto` picks the
newest complete one.
"""

from __future__ import annotations

import math
import os
import time

from megarl.config.recipe import Recipe
from megarl.trainers.common import initial_checkpoint, run_ranks
from megarl.trainers.runner import StagePolicy, StageResult, open_metrics


def prepare(recipe: Recipe) -> str:
    """The starting megatron checkpoint (an HF model.path is converted once)."""
    os.makedirs(recipe.trainer.output_dir, exist_ok=True)
    return initial_checkpoint(recipe, "sft")


def run(recipe: Recipe) -> int:
    return run_ranks(recipe, "sft", train_rank, prepare(recipe))


def _padded_length(samples: list, multiple: int) -> int:
    """Model input length for these samples (inputs are the sequence minus its last token),
    rounded up to `multiple` (sequence/context parallel splits)."""
    return math.ceil((max(len(s) for s in samples) - 1) / multiple) * multiple


def _microbatches(samples: list, micro: int, pad_id: int, seq: int) -> list[dict]:
    """Micro-batches of `micro` samples, right-padded to model input length `seq`, on the device."""
    import torch

    from megarl.runtime.device import to_device

    out = []
    for i in range(0, len(samples), micro):
        group = samples[i:i + micro]
        ids = torch.full((len(group), seq + 1), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), seq + 1), dtype=torch.float)
        for j, s in enumerate(group):
            ids[j, :len(s)] = torch.tensor(s.input_ids)
            mask[j, :len(s)] = torch.tensor(s.loss_mask, dtype=torch.float)
        out.append(to_device({"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                              "loss_mask": mask[:, 1:].contiguous(),
                              "position_ids": torch.arange(seq).expand(len(group), seq).contiguous(),
                              "attention_mask": None}))
    return out


def train_rank(recipe: Recipe, init_ckpt: str) -> StageResult:
    import torch.distributed as dist

    from megarl.data.sft import SFTDataset
    from megarl.data.tokenizer import load_tokenizer
    from megarl.models.optim import lr_scheduler
    from megarl.runtime.megatron import parallel_state as ps
    from megarl.trainers.common import (
        after_rank_step,
        any_rank,
        build_trainable,
        resume_stage,
        total_steps,
    )

    t = recipe.trainer
    state = build_trainable(recipe, init_ckpt)
    tokenizer = load_tokenizer(recipe.model, os.path.join(init_ckpt, "hf"))
    rank0 = dist.get_rank() == 0
    rejected = (recipe.data.rejected_path or os.path.join(t.output_dir, "rejected_rows.jsonl")) if rank0 else None
    max_length = recipe.data.max_length or recipe.model.shape.max_position_embeddings
    data = SFTDataset(recipe.data.train, tokenizer, max_length, recipe.data.format, recipe.data.on_bad_row, rejected)
    if rejected and data.report.rejected:
        print(f"[sft] {data.report.render()}\n[sft] rejected rows listed in {rejected}", flush=True)
    steps = total_steps(recipe, len(data))
    scheduler = lr_scheduler(state.optimizer, recipe, steps)
    step, sampler, _ = resume_stage(recipe, state, scheduler, len(data), "sft")
    policy = StagePolicy(recipe, steps, agree=any_rank)
    logger = open_metrics(recipe, step) if rank0 else None
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = recipe.derived.samples_per_step // dp
    try:
        while step < steps:
            t0 = time.perf_counter()
            indices = sampler.take(recipe.derived.samples_per_step)
            mine = [data.samples[i] for i in indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]]
            record = _train_on(state, recipe, mine, tokenizer.pad_token_id)
            scheduler.step(increment=1)
            step += 1
            if logger:
                record.update(lr=state.optimizer.param_groups[0]["lr"], seconds=round(time.perf_counter() - t0, 4))
                logger.log(step, record)
                print(f"[sft] step {step}/{steps} loss {record['loss']:.4f} grad_norm {record['grad_norm']:.3f} "
                      f"lr {record['lr']:.2e}", flush=True)
            stopped = after_rank_step(recipe, policy, step, state, init_ckpt, sampler, scheduler)
            if stopped is not None:
                return stopped
    finally:
        if logger:
            logger.close()
    return policy.result(step)


def _train_on(state, recipe: Recipe, mine: list, pad_id: int) -> dict:
    """One optimizer step on this data-parallel rank's samples -> metrics (loss, grad_norm, trained_tokens)."""
    import torch
    import torch.distributed as dist

    from megarl.models.train import train_step
    from megarl.runtime.device import current
    from megarl.runtime.megatron import parallel_state as ps

    p = recipe.parallel
    multiple = p.tp * p.cp * 2 if (p.sp or p.cp > 1) else 1
    # every DP rank must use the same sequence length (pipeline shapes): agree on the max
    seq_t = torch.tensor([_padded_length(mine, multiple)], device=current())
    dist.all_reduce(seq_t, op=dist.ReduceOp.MAX)
    seq = int(seq_t)
    micro = _microbatches(mine, recipe.trainer.micro_batch_per_rank, pad_id, seq)
    metrics = train_step(state, micro, seq)
    tokens = torch.stack([m["loss_mask"].sum() for m in micro]).sum().reshape(1)
    dist.all_reduce(tokens)
    copies = (ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()
              * ps.get_context_parallel_world_size())  # every model-parallel rank counted the same tokens
    return {**metrics, "trained_tokens": int(tokens.item()) // copies}
