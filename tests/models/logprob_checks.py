"""Rank function: vocab-parallel log-probs/entropy (and their gradients) vs the full-vocab formula."""

import torch

from megarl.config.parallel import ParallelConfig
from megarl.models.logprobs import token_entropy, token_logprobs
from megarl.runtime.distributed import init_distributed
from megarl.runtime.megatron import parallel_state as ps


def check(temperature: float) -> dict:
    init_distributed(ParallelConfig(tp=torch.distributed.get_world_size()))
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(3, 5, 64, generator=g) * 4).requires_grad_(True)
    labels = torch.randint(0, 64, (3, 5), generator=g)
    ref_lp = torch.log_softmax(full / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    logp = torch.log_softmax(full / temperature, dim=-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    (ref_lp.sum() + 0.5 * ref_ent.sum()).backward()
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    shard = full.detach().chunk(tp, dim=-1)[r].clone().requires_grad_(True)
    lp, ent = token_logprobs(shard, labels, temperature), token_entropy(shard, temperature)
    (lp.sum() + 0.5 * ent.sum()).backward()
    return {"lp": (lp - ref_lp).abs().max().item(), "ent": (ent - ref_ent).abs().max().item(),
            "grad": (shard.grad - full.grad.chunk(tp, dim=-1)[r]).abs().max().item(),
            "input_untouched": torch.equal(shard.detach(), full.detach().chunk(tp, dim=-1)[r])}
