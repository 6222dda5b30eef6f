"""Per-token log-probabilities and entropy from vocab-parallel logits, never gathering the vocab.

With tensor parallelism each rank holds logits for V/tp vocabulary entries. Both functions reduce
over the TP group with megatron's conventions (the loss is replicated on every TP rank, so the
backward of each reduction is the identity) and are differentiable.

Temperature is applied exactly as vLLM's `processed_logprobs` mode does: log softmax(logits / T).
"""

from __future__ import annotations

import torch

from megarl.runtime.megatron import parallel_state as ps
from megarl.runtime.megatron import reduce_from_tensor_model_parallel_region, vocab_parallel_cross_entropy


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels) under softmax(logits / T); logits [..., V/tp] (this rank's vocab shard),
    labels [...] global token ids. Returns fp32 [...]."""
    scaled = logits.float() / temperature  # a new tensor: the CE kernel works in place on its input
    return -vocab_parallel_cross_entropy(scaled, labels)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H = log Z - Σ_v p_v x_v with x = logits / T, Z = Σ_v exp(x_v), summed across the TP shards."""
    x = logits.float() / temperature
    m = x.detach().amax(dim=-1, keepdim=True)
    if ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX,
                                     group=ps.get_tensor_model_parallel_group())
    e = torch.exp(x - m)
    z = reduce_from_tensor_model_parallel_region(e.sum(dim=-1))
    p_dot_x = reduce_from_tensor_model_parallel_region((e * x).sum(dim=-1)) / z
    return torch.log(z) + m.squeeze(-1) - p_dot_x
