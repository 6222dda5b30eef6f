"""Masked reductions shared by the algorithm functions (mask: 1 = counts, 0 = ignored)."""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over unmasked entries; 0 (not NaN) where nothing is unmasked."""
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over unmasked entries (biased variance); masked entries -> 0."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index 0..G-1 of each sample, and G (group ids need not be contiguous)."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype to accumulate in: the widest input dtype, at least float32 (bf16/fp16 sums drift,
    and float64 inputs must not be rounded to float32)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def group_mean_std(scores: torch.Tensor, group_ids: torch.Tensor, unbiased: bool = True):
    """Per-sample mean, std and size of its group, computed in `compute_dtype(scores)`. Std is 0
    for groups of one."""
    idx, groups = group_index(group_ids)
    work = scores.to(compute_dtype(scores))
    zeros = work.new_zeros(groups)
    count = zeros.index_add(0, idx, torch.ones_like(work))
    mean = zeros.index_add(0, idx, work) / count
    sq = zeros.index_add(0, idx, (work - mean[idx]) ** 2)
    denom = (count - 1).clamp(min=1.0) if unbiased else count
    std = torch.where(count > 1, (sq / denom).sqrt(), torch.zeros_like(sq))
    return mean[idx].to(scores.dtype), std[idx].to(scores.dtype), count[idx]
