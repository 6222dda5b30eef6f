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

import json
import math
import os
import time

from megarl.config.recipe import Recipe
from megarl.trainers.common import CKPT_DIR, METRICS_FILE, initial_checkpoint, run_ranks_and_export


def prepare(recipe: Recipe) -> str:
    """The starting megatron checkpoint (an HF model.path is converted once)."""
    os.makedirs(recipe.trainer.output_dir, exist_ok=True)
    return initial_checkpoint(recipe, "sft")


def run(recipe: Recipe) -> int:
    return run_ranks_and_export(recipe, "sft", train_rank, prepare(recipe))


def _padded_length(samples: list, multiple: int) -> int:
    """Model input length for these samples (inputs are the sequence minus its last token),
    rounded up to `multiple` (sequence/context parallel splits)."""
    return math.ceil((max(len(s) for s in samples) - 1) / multiple) * multiple


def _microbatches(samples: list, micro: int, pad_id: int, seq: int) -> list[dict]:
    """Micro-batches of `micro` samples, right-padded to model input length `seq`."""
    import torch

    out = []
    for i in range(0, len(samples), micro):
        group = samples[i:i + micro]
        ids = torch.full((len(group), seq + 1), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), seq + 1), dtype=torch.float)
        for j, s in enumerate(group):
            ids[j, :len(s)] = torch.tensor(s.input_ids)
            mask[j, :len(s)] = torch.tensor(s.loss_mask, dtype=torch.float)
        out.append({"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "loss_mask": mask[:, 1:].contiguous(),
                    "position_ids": torch.arange(seq).expand(len(group), seq).contiguous(), "attention_mask": None})
    return out


def train_rank(recipe: Recipe, init_ckpt: str) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from megarl.data.sft import SFTDataset
    from megarl.models.train import train_step
    from megarl.trainers.common import (
        build_trainable,
        lr_scheduler,
        resume_stage,
        save_stage_checkpoint,
        stop_requested,
        total_steps,
    )

    t = recipe.trainer
    state = build_trainable(recipe, init_ckpt)

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(init_ckpt, "hf"))
    rejected = (recipe.data.rejected_path or os.path.join(t.output_dir, "rejected_rows.jsonl")
                if dist.get_rank() == 0 else None)
    max_length = recipe.data.max_length or recipe.model.shape.max_position_embeddings
    data = SFTDataset(recipe.data.train, tokenizer, max_length, recipe.data.format, recipe.data.on_bad_row, rejected)
    if rejected and data.report.rejected:
        print(f"[sft] {data.report.render()}\n[sft] rejected rows listed in {rejected}", flush=True)
    steps = total_steps(recipe, len(data))
    scheduler = lr_scheduler(state.optimizer, recipe, steps)
    step, sampler, _ = resume_stage(recipe, state, scheduler, len(data), "sft")
    ckpt_root = os.path.join(t.output_dir, CKPT_DIR)

    def save(at_step: int) -> None:
        save_stage_checkpoint(state, init_ckpt, os.path.join(ckpt_root, f"step_{at_step:06d}"),
                              {"step": at_step, "sampler": sampler.state_dict(), "scheduler": scheduler.state_dict()})

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    multiple = recipe.parallel.tp * recipe.parallel.cp * 2 if (recipe.parallel.sp or recipe.parallel.cp > 1) else 1
    per_rank = recipe.derived.samples_per_step // dp
    metrics_path = os.path.join(t.output_dir, METRICS_FILE)
    taken = 0
    while step < steps:
        t0 = time.perf_counter()
        indices = sampler.take(recipe.derived.samples_per_step)
        mine = [data.samples[i] for i in indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]]
        # every DP rank must use the same sequence length (pipeline shapes): agree on the max
        seq_t = torch.tensor([_padded_length(mine, multiple)])
        dist.all_reduce(seq_t, op=dist.ReduceOp.MAX)
        seq = int(seq_t)
        micro = _microbatches(mine, t.micro_batch_per_rank, tokenizer.pad_token_id, seq)
        metrics = train_step(state, micro, seq)
        scheduler.step(increment=1)
        step += 1
        taken += 1
        tokens = torch.tensor([sum(float(m["loss_mask"].sum()) for m in micro)])
        dist.all_reduce(tokens)
        if dist.get_rank() == 0:
            record = {"step": step, **metrics, "lr": state.optimizer.param_groups[0]["lr"],
                      "trained_tokens": int(tokens.item()) // (ps.get_tensor_model_parallel_world_size()
                                                                * ps.get_pipeline_model_parallel_world_size()
                                                                * ps.get_context_parallel_world_size()),
                      "seconds": round(time.perf_counter() - t0, 4)}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[sft] step {step}/{steps} loss {metrics['loss']:.4f} grad_norm {metrics['grad_norm']:.3f} "
                  f"lr {record['lr']:.2e}", flush=True)
        signalled = stop_requested(t.output_dir)
        stop_now = signalled or (t.max_steps_this_run is not None and taken >= t.max_steps_this_run)
        if step == steps or stop_now or (t.save_freq and step % t.save_freq == 0):
            save(step)
        if stop_now and step < steps:
            return {"finished": False, "step": step, "steps": steps, "signal": signalled}
    return {"finished": True, "step": step, "steps": steps}
