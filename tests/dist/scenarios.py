"""Functions that run inside `run_local_group` ranks for the parallel-equivalence tests.

The single-rank reference (`reference_run`, world size 1) builds a tiny Llama-shaped GPT (RMSNorm,
SwiGLU, GQA, RoPE; optionally MoE), saves its initial weights as a dist checkpoint, and records the
first step's loss and full gradients and the losses of a few Adam steps. A parallel run
(`layout_run`) loads those weights at its own layout, takes the same steps on the same global batch,
and writes its first-step gradients as a dist checkpoint; reloading that checkpoint at TP=PP=1
gives full, unsharded gradients to compare name by name with the reference.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megarl.checkpoint.dist import load_checkpoint, save_checkpoint
from megarl.config.parallel import ParallelConfig
from megarl.models.tiny import build_tiny_train_state
from megarl.models.train import TrainState, run_schedule, train_step
from megarl.runtime.megatron import parallel_state as ps
from megarl.runtime.megatron import shard_buffer

VOCAB, SEQ, MICRO_BS, GLOBAL_BS, STEPS = 128, 32, 2, 8, 3


def build(parallel: ParallelConfig, moe: bool, seed: int = 1234) -> TrainState:
    return build_tiny_train_state(parallel, moe, seed=seed, vocab_size=VOCAB, seq_length=SEQ)


def global_batch(step: int) -> list[dict]:
    """The step's global batch as micro-batches (identical on every rank, split by DP later)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BS, SEQ + 1), generator=g)
    loss_mask = (torch.rand(GLOBAL_BS, SEQ, generator=g) > 0.2).float()  # uneven token counts
    mbs = []
    for i in range(0, GLOBAL_BS, MICRO_BS):
        t = tokens[i:i + MICRO_BS]
        mbs.append(dict(tokens=t[:, :-1].contiguous(), labels=t[:, 1:].contiguous(),
                        loss_mask=loss_mask[i:i + MICRO_BS].contiguous(),
                        position_ids=torch.arange(SEQ).expand(MICRO_BS, SEQ).contiguous(),
                        attention_mask=None))
    return mbs


def my_microbatches(step: int) -> list[dict]:
    mbs = global_batch(step)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = len(mbs) // dp
    return mbs[r * per:(r + 1) * per]


def _full_named_params(state: TrainState) -> dict[str, torch.Tensor]:
    assert len(state.models) == 1
    return {n: p.detach().clone() for n, p in state.models[0].module.named_parameters()}


def _all_gather_reduced_grads(state: TrainState) -> None:
    """Under the distributed optimizer each DP rank holds the reduced gradient of its buffer shard
    only (a reduce-scatter); all-gather the shards so every `main_grad` is complete."""
    for m in state.models:
        for group in m.bucket_groups + m.expert_parallel_bucket_groups:
            size = group.intra_distributed_optimizer_instance_size
            if size == 1:
                continue
            rank = group.intra_distributed_optimizer_instance_rank
            for bucket in group.buckets:
                mine = shard_buffer(bucket.grad_data, size)[rank].clone()
                dist.all_gather_into_tensor(bucket.grad_data, mine,
                                            group=group.intra_distributed_optimizer_instance_group)


def _grads_into_params(state: TrainState) -> list[torch.Tensor]:
    """Swap each param's data for its reduced gradient (returns the saved values)."""
    _all_gather_reduced_grads(state)
    saved = []
    for m in state.models:
        for p in m.module.parameters():
            saved.append(p.data.clone())
            p.data.copy_(p.main_grad)
    return saved


def _restore_params(state: TrainState, saved: list[torch.Tensor]) -> None:
    it = iter(saved)
    for m in state.models:
        for p in m.module.parameters():
            p.data.copy_(next(it))


def reference_run(workdir: str) -> dict:
    """World size 1: weights checkpoint, first-step loss and grads, loss trajectory; dense + MoE."""
    out = {}
    for moe in (False, True):
        name = "moe" if moe else "dense"
        state = build(ParallelConfig(), moe)
        save_checkpoint(state, os.path.join(workdir, f"init_{name}"), with_optimizer=False)
        loss0 = run_schedule(state, my_microbatches(0), SEQ)
        grads = {n: p.main_grad.detach().clone() for n, p in state.models[0].module.named_parameters()}
        state.optimizer.step()
        losses = [loss0] + [train_step(state, my_microbatches(s), SEQ)["loss"] for s in range(1, STEPS)]
        out[name] = {"loss0": loss0, "grads": grads, "losses": losses}
    return out


def layout_run(workdir: str, parallel: dict, moe: bool, tag: str) -> dict:
    """Parallel run: load the reference weights, same steps; return losses and full grads."""
    name = "moe" if moe else "dense"
    state = build(ParallelConfig(**parallel), moe)
    load_checkpoint(state, os.path.join(workdir, f"init_{name}"), with_optimizer=False)
    loss0 = run_schedule(state, my_microbatches(0), SEQ)
    saved = _grads_into_params(state)
    grads_dir = os.path.join(workdir, f"grads_{tag}")
    save_checkpoint(state, grads_dir, with_optimizer=False)
    _restore_params(state, saved)
    state.optimizer.step()
    losses = [loss0] + [train_step(state, my_microbatches(s), SEQ)["loss"] for s in range(1, STEPS)]
    cfg = state.models[0].module.config
    layout = dict(tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size,
                  vpp=len(state.models), cp=cfg.context_parallel_size,
                  ep=cfg.expert_model_parallel_size, sp=cfg.sequence_parallel,
                  dp=ps.get_data_parallel_world_size())
    # Read the gradients back unsharded: TP=PP=1 (every rank holds the full model).
    full = build(ParallelConfig(), moe)
    load_checkpoint(full, grads_dir, with_optimizer=False)
    return {"loss0": loss0, "losses": losses, "grads": _full_named_params(full),
            "layout": layout}


def checkpoint_reshard_run(workdir: str, save_layout: dict, load_layouts: list[dict]) -> dict:
    """Train 2 steps at `save_layout`, save model+optimizer, take step 3 (the reference); then for
    each load layout: load, check eval loss, take step 3, compare."""
    ckpt = os.path.join(workdir, "resume")
    state = build(ParallelConfig(**save_layout), moe=False)
    for s in range(2):
        train_step(state, my_microbatches(s), SEQ)
    save_checkpoint(state, ckpt)
    ref_eval = run_schedule(state, my_microbatches(99), SEQ, forward_only=True)
    ref_step3 = train_step(state, my_microbatches(2), SEQ)["loss"]
    ref_after = run_schedule(state, my_microbatches(99), SEQ, forward_only=True)
    results = {"reference": (ref_eval, ref_step3, ref_after), "loaded": []}
    for layout in load_layouts:
        state = build(ParallelConfig(**layout), moe=False, seed=999)  # different random init
        fresh_eval = run_schedule(state, my_microbatches(99), SEQ, forward_only=True)
        load_checkpoint(state, ckpt)
        ev = run_schedule(state, my_microbatches(99), SEQ, forward_only=True)
        step3 = train_step(state, my_microbatches(2), SEQ)["loss"]
        after = run_schedule(state, my_microbatches(99), SEQ, forward_only=True)
        results["loaded"].append({"layout": layout, "fresh_eval": fresh_eval,
                                  "values": (ev, step3, after)})
    return results


def nonfinite_guard_run(workdir: str) -> dict:
    """A NaN gradient on rank 1 only: both ranks refuse the update (no weight changes anywhere);
    a NaN weight on rank 1 only: both refuse to save (no checkpoint, not even a partial one)."""
    state = build(ParallelConfig(tp=2), moe=False)
    before = [p.detach().clone() for p in state.models[0].parameters()]
    out = {"rank": dist.get_rank()}
    run_schedule(state, my_microbatches(0), SEQ)
    if dist.get_rank() == 1:
        next(p for p in state.models[0].parameters() if p.main_grad.numel() > 1).main_grad[0] = float("nan")
    try:
        from megarl.models.train import optimizer_update

        optimizer_update(state, "test")
        out["update"] = "applied"
    except FloatingPointError as e:
        out["update"] = str(e)
    out["weights_unchanged"] = all(torch.equal(a, p) for a, p in zip(before, state.models[0].parameters()))
    out["finite_step"] = train_step(state, my_microbatches(1), SEQ)["grad_norm"]  # a finite step still goes
    if dist.get_rank() == 1:
        with torch.no_grad():
            next(iter(state.models[0].parameters())).view(-1)[0] = float("inf")
    ckpt = os.path.join(workdir, "poisoned")
    try:
        save_checkpoint(state, ckpt)
        out["save"] = "written"
    except FloatingPointError as e:
        out["save"] = str(e)
    out["on_disk"] = sorted(os.listdir(workdir))
    return out
