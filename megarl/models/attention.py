"""Context-parallel core attention in pure torch, for the local (non-TE) layer spec.

megatron-core implements context parallelism only in TEDotProductAttention
(transformer/dot_product_attention.py:57 asserts otherwise), so CP on CPU needs this module.

Megatron shards a sequence into 2·cp chunks in zig-zag order: CP rank r holds chunks r and
2·cp-1-r (`get_batch_on_this_cp_rank`, and RoPE's `get_pos_emb_on_this_cp_rank`). Each rank
all-gathers K and V over the CP group (autograd-aware: the backward reduce-scatters their grads),
restores global chunk order, and lets its local queries attend causally by global position:

    softmax(q_i · k_j / sqrt(d) + (-inf if pos(j) > pos(i))) · v_j

Memory is O(s_local · s) per rank: a correctness implementation for CPU and tests, not a fast one
(on GPUs the TE spec's ring attention is used).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from megarl.runtime.megatron import DotProductAttention
from megarl.runtime.megatron import parallel_state as ps


def zigzag_positions(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions of the tokens CP rank `cp_rank` holds (chunks r and 2·cp-1-r)."""
    c = local_len // 2
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


class AllGatherContextParallelAttention(DotProductAttention):
    """Causal self-attention whose K/V are all-gathered across the context-parallel group."""

    def __init__(self, config, *args, **kwargs):
        local_cfg = copy.copy(config)
        local_cfg.context_parallel_size = 1  # the parent refuses CP; this class implements it
        super().__init__(local_cfg, *args, **kwargs)
        self.cp_size = config.context_parallel_size

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("AllGatherContextParallelAttention supports neither packed "
                                      "sequences nor attention bias")
        s_local = query.shape[0]  # [s, b, heads, head_dim]
        if self.cp_size > 1:
            group = ps.get_context_parallel_group()
            rank = ps.get_context_parallel_rank()
            key, value = (self._gather_global(t, group) for t in (key, value))
            q_pos = zigzag_positions(s_local, self.cp_size, rank, device=query.device)
        else:
            q_pos = torch.arange(s_local, device=query.device)
        k_pos = torch.arange(key.shape[0], device=query.device)
        allowed = k_pos[None, :] <= q_pos[:, None]  # [s_local, s]
        groups = query.shape[2] // key.shape[2]  # GQA: share each kv head across its query heads
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dropout = self.config.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                             scale=self.softmax_scale)
        b, heads, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    def _gather_global(self, t: torch.Tensor, group) -> torch.Tensor:
        c = t.shape[0] // 2
        parts = dist_fn.all_gather(t.contiguous(), group=group)
        chunks: list[torch.Tensor] = [None] * (2 * self.cp_size)  # type: ignore[list-item]
        for r, part in enumerate(parts):
            chunks[r], chunks[2 * self.cp_size - 1 - r] = part[:c], part[c:]
        return torch.cat(chunks, dim=0)
