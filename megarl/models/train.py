"""Training plumbing shared by every megatron stage: DDP + (distributed) optimizer, one step
through megatron's pipeline schedule, and the masked token-mean loss under context parallelism.

Flow of one `train_step`: micro-batches -> get_forward_backward_func (1F1B / interleaved) ->
finalize_model_grads (DP all-reduce, SP norm grads over TP, tied embeddings across PP) ->
optimizer.step (clip, Adam on fp32 main params, param all-gather under the distributed optimizer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megarl.runtime.device import current
from megarl.runtime.megatron import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    OptimizerConfig,
    TransformerConfig,
    finalize_model_grads,
    get_batch_on_this_cp_rank,
    get_forward_backward_func,
    get_megatron_optimizer,
)
from megarl.runtime.megatron import parallel_state as ps


@dataclass
class TrainState:
    """A rank's model chunks (DDP-wrapped) and their optimizer."""

    models: list[DistributedDataParallel]
    optimizer: object
    config: TransformerConfig


def wrap_for_training(chunks: list[torch.nn.Module], config: TransformerConfig,
                      optim: OptimizerConfig, distributed_optimizer: bool = True,
                      overlap: bool = False) -> TrainState:
    """Wrap chunks in megatron DDP and build the optimizer (torch AdamW without TE/Apex)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap, overlap_param_gather=overlap,
        use_distributed_optimizer=distributed_optimizer, bucket_size=None)
    models = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                      disable_bucketing=(i > 0))
              for i, chunk in enumerate(chunks)]
    optim.use_distributed_optimizer = distributed_optimizer
    optimizer = get_megatron_optimizer(optim, models)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in models] if len(models) > 1 else models[0].no_sync
    config.grad_scale_func = optimizer.scale_loss
    return TrainState(models, optimizer, config)


def masked_token_mean_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """Mean over unmasked tokens of one micro-batch, correct under context parallelism.

    With CP each rank holds a slice of every sequence, so the local loss sum is divided by the
    micro-batch's *global* token count. (The schedule then multiplies by cp, since DDP averages
    gradients over the dp×cp group, and divides by the number of micro-batches.)
    Returns (loss for backward, {"loss": detached global token-mean}).
    """
    mask = loss_mask.float()
    local_sum = (per_token_loss.float() * mask).sum()
    counts = torch.stack([local_sum.detach(), mask.sum()])
    if ps.get_context_parallel_world_size() > 1:
        dist.all_reduce(counts, group=ps.get_context_parallel_group())
    n_tokens = counts[1].clamp(min=1.0)
    return local_sum / n_tokens, {"loss": counts[0] / n_tokens}


def masked_token_sum_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """Sum over unmasked tokens and their count, for `calculate_per_token_loss` configs: megatron
    then divides the gradients by the token count of the whole step (all micro-batches, all DP
    ranks), so every token weighs the same however the batch was cut. Context parallel ranks add
    their partial sums. Returns (sum, count, {"loss_sum_count": [sum, count]})."""
    mask = loss_mask.float()
    local_sum = (per_token_loss.float() * mask).sum()
    count = mask.sum()
    report = torch.stack([local_sum.detach(), count])
    if ps.get_context_parallel_world_size() > 1:
        dist.all_reduce(report, group=ps.get_context_parallel_group())
    return local_sum, count.to(torch.int), {"loss_sum_count": report}


def gpt_forward_step(data_iterator, model):
    """forward_step_func for megatron's schedule: a GPT batch dict -> per-token CE + loss func
    (token sum for `calculate_per_token_loss` models, micro-batch token mean otherwise)."""
    batch = next(data_iterator)
    if ps.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(dict(batch, cu_seqlens=None), is_hybrid_cp=False,
                                          cp_group=ps.get_context_parallel_group())
    per_token = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                      labels=batch["labels"])
    per_token_loss_mode = getattr(model, "config", None) is not None and model.config.calculate_per_token_loss
    loss_fn = masked_token_sum_loss if per_token_loss_mode else masked_token_mean_loss
    return per_token, partial(loss_fn, loss_mask=batch["loss_mask"])


def run_schedule(state: TrainState, microbatches: list[dict], seq_length: int,
                 forward_only: bool = False,
                 forward_step: Callable = gpt_forward_step) -> float:
    """Forward (and backward) over this rank's micro-batches; returns the step's mean loss,
    averaged over data-parallel ranks and identical on every rank."""
    if not forward_only:
        for m in state.models:
            m.zero_grad_buffer()
        state.optimizer.zero_grad()
    n = len(state.models)
    iterators = [iter(microbatches) for _ in range(n)] if n > 1 else iter(microbatches)
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators,
        model=state.models if n > 1 else state.models[0], num_microbatches=len(microbatches),
        seq_length=seq_length, micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only)
    return _mean_loss_everywhere(outputs)


def train_step(state: TrainState, microbatches: list[dict], seq_length: int,
               forward_step: Callable = gpt_forward_step) -> dict[str, float]:
    loss = run_schedule(state, microbatches, seq_length, forward_step=forward_step)
    return {"loss": loss, "grad_norm": optimizer_update(state, "training")}


def ranks_with_nonfinite(tensors: Iterable[torch.Tensor]) -> int:
    """How many ranks of the gang hold a NaN or infinite value in their `tensors` (collective: one
    all-reduce over the default group, so every rank gets the same answer and can stop together)."""
    bad = torch.zeros(1, device=current())
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            bad += 1
            break
    dist.all_reduce(bad)
    return int(bad.item())


def _grads(models: list) -> Iterable[torch.Tensor]:
    for m in models:
        for p in m.parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is not None:
                yield g


def optimizer_update(state: TrainState, what: str) -> float:
    """One optimizer update -> its grad norm, applied only when every gradient on every rank is
    finite. Megatron looks for inf/NaN only under a loss scaler (fp16/bf16): in fp32 a non-finite
    gradient would be applied silently and poison every weight, so the ranks check first."""
    bad = ranks_with_nonfinite(_grads(state.models))
    if bad:
        raise FloatingPointError(f"non-finite gradients in the {what} update on {bad} rank(s); no update was "
                                 "applied (check the loss inputs: rewards, advantages, log-probs)")
    ok, grad_norm, _ = state.optimizer.step()
    if not ok:
        raise FloatingPointError(f"optimizer step skipped: non-finite gradients in the {what} update")
    return float(grad_norm)


def _mean_loss_everywhere(outputs: Iterable[dict]) -> float:
    """The step's loss on every rank: the mean of micro-batch means (token-mean mode) or the global
    token mean (per-token mode), over all DP ranks. Every last-stage rank of every TP/CP replica
    contributes equally, so the replicas' identical values average to themselves."""
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    t = torch.zeros(2, dtype=torch.float64, device=current())
    for o in outputs if last else []:
        if "loss_sum_count" in o:
            t += o["loss_sum_count"].double()
        else:
            t += torch.tensor([float(o["loss"]), 1.0], dtype=torch.float64, device=current())
    dist.all_reduce(t)
    return (t[0] / t[1].clamp(min=1.0)).item()


def sums_from_reporter(sums: torch.Tensor) -> torch.Tensor:
    """Metric sums of the reporting rank (last pipeline stage, tp 0, cp 0, dp 0; already reduced
    over DP there), on every rank: the other ranks contribute zeros to one world all-reduce."""
    reporter = (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_context_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0)
    shared = sums.clone() if reporter else torch.zeros_like(sums)
    dist.all_reduce(shared)
    return shared
