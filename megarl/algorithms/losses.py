"""Policy and value losses and their aggregation over tokens.

Inputs are [B, T] token tensors: `logp` (current policy, differentiable), `old_logp` (the policy
that produced the update's data, no grad), `advantages`, and `mask` (1 = a generated token that is
trained on). Each policy loss returns (per-token loss [B, T], metrics dict); `aggregate_loss` turns
per-token losses into the scalar that is optimised. Policy losses take only their own options (an
inapplicable one, e.g. dual_clip for gspo, is a TypeError); their keyword defaults are the papers'
and are mirrored, torch-free, by `megarl.config.recipe.POLICY_LOSS_DEFAULTS`.
"""

from __future__ import annotations

import torch

from megarl.algorithms.masked import masked_mean
from megarl.registry import Registry

LOG_RATIO_CLAMP = 20.0  # exp(±20) stays finite in fp32 and bf16

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
                   norm_length: int | None = None) -> torch.Tensor:
    """Scalar from per-token losses [B, T]:

    - token-mean:               Σ_{i,t} m·L / Σ_{i,t} m            (every token weighs the same; DAPO)
    - seq-mean-token-sum:       (1/B) Σ_i Σ_t m·L
    - seq-mean-token-mean:      (1/B) Σ_i (Σ_t m·L / Σ_t m)          (every sequence weighs the same; GRPO paper)
    - seq-mean-token-sum-norm:  Σ_{i,t} m·L / (B · norm_length)     (Dr. GRPO: a constant length normaliser,
                                                                     norm_length defaults to T)
    Sequences with no unmasked token contribute 0 (never NaN).

    Computed as Σ w·L / Σ m with w = `loss_weights(mask, mode, norm_length)`: one definition of
    every mode, also for losses summed over micro-batches and data-parallel shares.
    """
    m = mask.to(loss.dtype)
    return (loss * loss_weights(m, mode, norm_length or loss.shape[-1])).sum() / m.sum().clamp(min=1.0)


def loss_weights(mask: torch.Tensor, mode: str, norm_length: int) -> torch.Tensor:
    """Per-token weights w [B, T] so that Σ w·L / Σ mask is the `mode` aggregation of
    `aggregate_loss` over these B sequences (one optimizer update's mini-batch). Σ w·L may then be
    summed over any split into micro-batches and data-parallel shares and divided once by the
    mini-batch's token count, which is what megatron's per-token loss mode does."""
    n_tok = mask.sum().clamp(min=1.0)
    n_seq = max(mask.shape[0], 1)
    if mode == "token-mean":
        return mask.clone()
    if mode == "seq-mean-token-mean":
        return mask * n_tok / (n_seq * mask.sum(-1, keepdim=True).clamp(min=1.0))
    if mode == "seq-mean-token-sum":
        return mask * n_tok / n_seq
    if mode == "seq-mean-token-sum-norm":
        return mask * n_tok / (n_seq * norm_length)
    raise KeyError(f"unknown loss aggregation {mode!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")


def _ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio), log_ratio


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None):
    """PPO clipped surrogate (Schulman et al. 2017), with asymmetric clipping (DAPO clip-higher,
    Yu et al. 2025) and dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games"):

        ρ = exp(logp − old_logp)
        L = −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A)
        dual clip, for A < 0:  L = min(L, −c A)      (c > 1 bounds the loss of very large ratios)
    """
    ratio, log_ratio = _ratio(logp, old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    metrics = {"clip_frac": masked_mean((clipped > unclipped).float(), mask).detach()}
    if dual_clip is not None:
        capped = torch.minimum(loss, -advantages * dual_clip)
        loss = torch.where(advantages < 0, capped, loss)
        metrics["dual_clip_frac"] = masked_mean(((advantages < 0) & (loss < torch.maximum(unclipped, clipped)))
                                                .float(), mask).detach()
    metrics["approx_kl"] = masked_mean(-log_ratio, mask).detach()
    return loss, metrics


def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_low: float = 3e-4, clip_high: float = 4e-4):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): a sequence-level ratio

        s_i = exp((1/|y_i|) Σ_t (logp_t − old_logp_t)),
        per token s_{i,t} = sg[s_i] · exp(logp_t − sg[logp_t])       (value s_i, gradient of logp_t)
        L = −min(s A, clip(s, 1 − ε_low, 1 + ε_high) A)

    aggregate with seq-mean-token-mean. Default ε are the paper's (3e-4, 4e-4).
    """
    m = mask.to(logp.dtype)
    log_ratio = (logp - old_logp) * m
    seq_log_ratio = (log_ratio.sum(-1) / m.sum(-1).clamp(min=1.0)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    token_log_ratio = seq_log_ratio.detach().unsqueeze(-1) + logp - logp.detach()
    s = torch.exp(token_log_ratio)
    unclipped = -advantages * s
    clipped = -advantages * s.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    return loss, {"clip_frac": masked_mean((clipped > unclipped).float(), mask).detach(),
                  "approx_kl": masked_mean(-(logp - old_logp), mask).detach()}


def cispo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip_low: float = 1.0, clip_high: float = 0.28):
    """CISPO (MiniMax 2025, "MiniMax-M1"): REINFORCE with a clipped, stop-gradient importance weight,
    so clipped tokens still get gradient:

        L = −sg[clip(ρ, 1 − ε_low, 1 + ε_high)] · A · logp

    The paper bounds the weight from above only: the default ε_low = 1 makes the lower bound 0,
    which a ratio never goes below.
    """
    ratio, log_ratio = _ratio(logp, old_logp)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()
    loss = -weight * advantages * logp
    clipped = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
    return loss, {"clip_frac": masked_mean(clipped.float(), mask).detach(),
                  "approx_kl": masked_mean(-log_ratio, mask).detach()}


POLICY_LOSSES: Registry = Registry("policy loss")
POLICY_LOSSES.register("ppo")(ppo_clip_loss)
POLICY_LOSSES.register("gspo")(gspo_loss)
POLICY_LOSSES.register("cispo")(cispo_loss)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float, mode: str = "token-mean") -> torch.Tensor:
    """−coef · aggregated entropy: adding it to the loss rewards keeping the policy stochastic."""
    return -coef * aggregate_loss(entropy, mask, mode)


def value_loss_per_token(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                         clip: float | None = 0.2):
    """Per-token PPO value loss with value clipping (OpenAI baselines' PPO2):

        V_clip = V_old + clip(V − V_old, −c, c),   L_t = ½ · max((V − R)², (V_clip − R)²)

    Returns (L [B, T], {"value_clip_frac"})."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, {"value_clip_frac": unclipped.new_zeros(())}
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (v_clip - returns) ** 2
    frac = masked_mean((clipped > unclipped).float(), mask).detach()
    return 0.5 * torch.maximum(unclipped, clipped), {"value_clip_frac": frac}


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float | None = 0.2, mode: str = "token-mean"):
    """`value_loss_per_token` aggregated over the mask (`aggregate_loss`)."""
    per_token, metrics = value_loss_per_token(values, old_values, returns, mask, clip)
    return aggregate_loss(per_token, mask, mode), metrics


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Negative log-likelihood of the target tokens, aggregated over the loss mask."""
    return aggregate_loss(-logp, mask, mode)
