"""Sample selection and length shaping from DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale"). Pure functions of tensors.
"""

from __future__ import annotations

import torch

from megarl.algorithms.masked import group_mean_std


def informative_groups(scores: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dynamic sampling: a bool per sample, True when its group's rewards are not all equal.
    A group with zero reward variance gives every member a zero group-relative advantage, so it
    costs compute and adds no gradient; DAPO drops such groups and samples more prompts."""
    _, std, _ = group_mean_std(scores, group_ids)
    return std > eps


def overlong_penalty(response_lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0
                     ) -> torch.Tensor:
    """Soft overlong punishment (DAPO eq. 13), added to the reward:

        0                                   if L <= L_max − L_cache
        ((L_max − L_cache) − L) / L_cache   if L_max − L_cache < L <= L_max      (linear ramp to −1)
        −1                                  if L > L_max
    scaled by `penalty`."""
    lengths = response_lengths.float()
    start = max_length - buffer
    ramp = (start - lengths) / max(buffer, 1)
    out = torch.where(lengths <= start, torch.zeros_like(lengths), ramp.clamp(min=-1.0))
    return out * penalty
