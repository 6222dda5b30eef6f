"""Rollout/train mismatch correction.

The rollout engine (vLLM, other kernels, maybe FP8) and the trainer (megatron) compute slightly
different log-probs for the same tokens, so rollouts are off-policy for the trainer. With
ρ_t = exp(old_logp_t − rollout_logp_t) (trainer over rollout probability):

- "tis": token-level truncated importance sampling, weight w_t = min(ρ_t, C)
  (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training")
- "sequence_is": one weight per sequence, min(Π_t ρ_t, C)
- "token_mask": drop tokens with ρ_t outside [1/C, C] (IcePop / MIS-style masking)
- "sequence_mask": drop whole sequences whose geometric-mean ratio is outside [1/C, C]
- "none": weights 1

`rollout_correction` returns (weights [B, T], mask [B, T]): the policy loss multiplies per-token
losses by `weights` and aggregates over `mask`. Weights carry no gradient.
"""

from __future__ import annotations

import math

import torch

from megarl.algorithms.kl import kl_k3

CORRECTION_MODES = ("none", "tis", "sequence_is", "token_mask", "sequence_mask")
REWEIGHTING_MODES = ("none", "tis", "sequence_is")
"""The modes that only reweight tokens and never change the mask (so the loss weights of a
mini-batch are known before its forward)."""


def rollout_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, mode: str = "tis",
                       threshold: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    if mode not in CORRECTION_MODES:
        raise KeyError(f"unknown rollout correction {mode!r}; valid: {', '.join(CORRECTION_MODES)}")
    m = mask.to(old_logp.dtype)
    log_ratio = ((old_logp - rollout_logp) * m).detach().clamp(-20.0, 20.0)
    ones = torch.ones_like(old_logp)
    if mode == "none":
        return ones, mask
    if mode == "tis":
        return torch.exp(log_ratio).clamp(max=threshold) * m, mask
    if mode == "sequence_is":
        seq = torch.exp(log_ratio.sum(-1).clamp(max=math.log(threshold)))
        return seq.unsqueeze(-1) * m, mask
    log_c = math.log(threshold)
    if mode == "token_mask":
        keep = (log_ratio.abs() <= log_c).to(mask.dtype)
        return ones, mask * keep
    seq_mean = log_ratio.sum(-1) / m.sum(-1).clamp(min=1.0)
    keep = (seq_mean.abs() <= log_c).to(mask.dtype).unsqueeze(-1)
    return ones, mask * keep


MISMATCH_METRICS = ("mismatch_k3_kl", "mismatch_abs_logp_diff", "mismatch_frac_over_threshold")
MISMATCH_KEYS = {name: f"mismatch/{name.removeprefix('mismatch_')}" for name in MISMATCH_METRICS}
"""Each term's metric name in a run's logs (the driver's and the on-policy update's alike)."""


def mismatch_sums(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                  threshold: float = 2.0) -> torch.Tensor:
    """Σ over the masked tokens of each `MISMATCH_METRICS` term, float64 [3] (divided by Σ mask they
    are `mismatch_metrics`; sums add up exactly across micro-batches and data-parallel ranks)."""
    delta = (old_logp - rollout_logp).detach()
    # kl_k3(logp, ref_logp) estimates KL(π ‖ π_ref) from samples of π: here π is the rollout policy
    k3 = kl_k3(rollout_logp.detach(), old_logp.detach())
    m = mask.to(delta.dtype)
    return torch.stack([(k3 * m).sum(), (delta.abs() * m).sum(),
                        ((delta.abs() > math.log(threshold)).to(delta.dtype) * m).sum()]).to(torch.float64)


def mismatch_metrics(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                     threshold: float = 2.0) -> dict[str, torch.Tensor]:
    """How far the rollout is from the trainer, over the masked tokens:

    - mismatch_k3_kl: KL(π_rollout ‖ π_train) per token, k3 estimate (Schulman 2020, "Approximating
      KL Divergence"): tokens are samples of the rollout policy q, so with r = p/q = π_train/π_rollout
      k3 = (r − 1) − log r, unbiased for KL(q ‖ p) and ≥ 0
    - mismatch_abs_logp_diff: mean |log π_train − log π_rollout|
    - mismatch_frac_over_threshold: fraction of tokens whose ratio leaves [1/C, C]
    """
    sums = mismatch_sums(old_logp, rollout_logp, mask, threshold) / mask.sum().clamp(min=1.0)
    return {name: sums[i].to(old_logp.dtype) for i, name in enumerate(MISMATCH_METRICS)}
