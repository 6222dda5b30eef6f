"""Advantage estimators. Token tensors are [B, T] over response positions with `mask` = 1 on tokens
the policy generated (tool outputs, prompt and padding are 0); scalar scores are [B]; `group_ids`
[B] says which samples answer the same prompt (n samples per prompt).

Every estimator returns (advantages [B, T], returns [B, T]), zero where mask is 0, and never NaN
(groups of one sample or with identical rewards get advantage 0).

KL in the reward (`kl.placement: reward`) arrives as `token_rewards`; the outcome estimators then
score each sequence by its summed token rewards (`outcome_scores`), so the penalty is not lost.
Estimators take only their own settings (`estimator_kwargs` selects them from the recipe's).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from megarl.algorithms.masked import compute_dtype, group_mean_std, masked_whiten
from megarl.registry import Registry


def compute_gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 1.0, bootstrap_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation"):

        δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = Σ_l (γλ)^l δ_{t+l},   R_t = A_t + V(s_t)

    over the unmasked tokens of each sequence in order; masked tokens (tool outputs in a multi-turn
    trajectory) are transparent: the recursion skips them. `bootstrap_values` [B] is V of the state
    after the last token for truncated sequences (0 for finished ones, the default). Computed in
    `compute_dtype(token_rewards, values)` (float64 stays float64).
    """
    b, t = token_rewards.shape
    dtype = compute_dtype(token_rewards, values)
    r, v, m = token_rewards.to(dtype), values.to(dtype), mask.to(dtype)
    next_value = r.new_zeros(b) if bootstrap_values is None else bootstrap_values.to(dtype)
    last_gae = r.new_zeros(b)
    adv = r.new_zeros(b, t)
    for i in reversed(range(t)):
        on = m[:, i]
        delta = r[:, i] + gamma * next_value - v[:, i]
        gae = delta + gamma * lam * last_gae
        adv[:, i] = gae * on
        last_gae = torch.where(on > 0, gae, last_gae)
        next_value = torch.where(on > 0, v[:, i], next_value)
    returns = (adv + v) * m
    return adv.to(token_rewards.dtype), returns.to(token_rewards.dtype)


def grpo_advantage(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, norm_by_std: bool = True,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative outcome advantage (Shao et al. 2024, "DeepSeekMath", GRPO):

        A_i = (r_i − mean_g r) / (std_g r + ε)      broadcast to every response token of sample i

    With `norm_by_std=False` it is Dr. GRPO's unbiased A_i = r_i − mean_g r (Liu et al. 2025,
    "Understanding R1-Zero-Like Training"). Std is the unbiased group std.
    """
    mean, std, _ = group_mean_std(scores, group_ids)
    adv = scores - mean
    if norm_by_std:
        adv = adv / (std + eps)
    token_adv = adv.unsqueeze(-1) * mask
    return token_adv, token_adv


def rloo_advantage(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019):

        A_i = r_i − (1/(n−1)) Σ_{j≠i} r_j = n/(n−1) · (r_i − mean_g r)      (0 for groups of one)
    """
    mean, _, count = group_mean_std(scores, group_ids)
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1.0), torch.zeros_like(count))
    adv = (scores - mean) * scale.to(scores.dtype)
    token_adv = adv.unsqueeze(-1) * mask
    return token_adv, token_adv


def scores_to_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's scalar reward on its last response token."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).amax(dim=1)
    out = scores.new_zeros(mask.shape)
    has = last >= 0
    out[has, last[has]] = scores[has]
    return out


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{s≥t} γ^{s−t} r_s over unmasked tokens (masked tokens are skipped), computed in
    `compute_dtype(token_rewards)`."""
    b, t = token_rewards.shape
    dtype = compute_dtype(token_rewards)
    ret = token_rewards.new_zeros(b, t, dtype=dtype)
    running = token_rewards.new_zeros(b, dtype=dtype)
    m = mask.to(dtype)
    r = token_rewards.to(dtype)
    for i in reversed(range(t)):
        updated = r[:, i] + gamma * running
        running = torch.where(m[:, i] > 0, updated, running)
        ret[:, i] = running * m[:, i]
    return ret.to(token_rewards.dtype)


def reinforce_pp_advantage(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs"):
    per-token rewards (outcome score on the last token minus any per-token KL penalty), discounted
    returns G_t, and the advantage G_t whitened over every response token of the batch."""
    returns = discounted_returns(token_rewards, mask, gamma)
    dtype = compute_dtype(returns)
    return masked_whiten(returns.to(dtype), mask.to(dtype)).to(token_rewards.dtype), returns


def reinforce_pp_baseline_advantage(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ with baseline: subtract the group mean score (as GRPO, without std), broadcast to
    tokens, then whiten over every response token of the batch."""
    mean, _, _ = group_mean_std(scores, group_ids)
    token = (scores - mean).unsqueeze(-1) * mask
    dtype = compute_dtype(token)
    return masked_whiten(token.to(dtype), mask.to(dtype)).to(scores.dtype), token


def remax_advantage(scores: torch.Tensor, baseline_scores: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient RL Method for LLMs"):
    A_i = r_i − r(greedy response to the same prompt), broadcast to the response tokens."""
    token = (scores - baseline_scores).unsqueeze(-1) * mask
    return token, token


@dataclass
class AdvantageInputs:
    """Everything an estimator may need; each uses its own subset."""

    mask: torch.Tensor
    scores: torch.Tensor | None = None            # [B] outcome rewards
    group_ids: torch.Tensor | None = None         # [B]
    token_rewards: torch.Tensor | None = None     # [B, T] (scores on the last token, KL penalties)
    values: torch.Tensor | None = None            # [B, T] critic values (gae)
    baseline_scores: torch.Tensor | None = None   # [B] greedy-baseline rewards (remax)


ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")


def _need(inputs: AdvantageInputs, name: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(inputs, f) is None]
    if missing:
        raise ValueError(f"advantage estimator {name!r} needs {', '.join(missing)}")


def outcome_scores(x: AdvantageInputs, name: str) -> torch.Tensor:
    """The [B] score an outcome estimator (grpo, rloo, reinforce_pp_baseline, remax) normalises.

    With `token_rewards` (KL in the reward: r_t = score·[t = last] − β·KL_t, Ziegler et al. 2019)
    it is their masked per-sequence sum, score_i − β Σ_t KL_{i,t}, as verl does: reading the raw
    scalar score would silently drop the KL penalty. Without them it is `scores`."""
    if x.token_rewards is not None:
        return (x.token_rewards * x.mask.to(x.token_rewards.dtype)).sum(-1)
    _need(x, name, "scores")
    return x.scores


@ADVANTAGE_ESTIMATORS.register("gae")
def _gae(x: AdvantageInputs, gamma: float = 1.0, lam: float = 1.0):
    _need(x, "gae", "values")
    rewards = x.token_rewards if x.token_rewards is not None else scores_to_token_rewards(x.scores, x.mask)
    return compute_gae(rewards, x.values, x.mask, gamma, lam)


@ADVANTAGE_ESTIMATORS.register("grpo")
def _grpo(x: AdvantageInputs, norm_adv_by_std: bool = True):
    _need(x, "grpo", "group_ids")
    return grpo_advantage(outcome_scores(x, "grpo"), x.group_ids, x.mask, norm_by_std=norm_adv_by_std)


@ADVANTAGE_ESTIMATORS.register("rloo")
def _rloo(x: AdvantageInputs):
    _need(x, "rloo", "group_ids")
    return rloo_advantage(outcome_scores(x, "rloo"), x.group_ids, x.mask)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def _rpp(x: AdvantageInputs, gamma: float = 1.0):
    rewards = x.token_rewards if x.token_rewards is not None else scores_to_token_rewards(x.scores, x.mask)
    return reinforce_pp_advantage(rewards, x.mask, gamma)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")
def _rpp_baseline(x: AdvantageInputs):
    _need(x, "reinforce_pp_baseline", "group_ids")
    return reinforce_pp_baseline_advantage(outcome_scores(x, "reinforce_pp_baseline"), x.group_ids, x.mask)


@ADVANTAGE_ESTIMATORS.register("remax")
def _remax(x: AdvantageInputs):
    _need(x, "remax", "baseline_scores")
    return remax_advantage(outcome_scores(x, "remax"), x.baseline_scores, x.mask)


def estimator_kwargs(name: str, *, gamma: float, lam: float, norm_adv_by_std: bool) -> dict:
    """The subset of the recipe's estimator settings that estimator `name` takes (gae: gamma, lam;
    reinforce_pp: gamma; grpo: norm_adv_by_std; the others none), since the estimators refuse
    arguments they do not use. Unknown names raise the registry's KeyError."""
    accepted = inspect.signature(ADVANTAGE_ESTIMATORS.get(name)).parameters
    settings = {"gamma": gamma, "lam": lam, "norm_adv_by_std": norm_adv_by_std}
    return {k: v for k, v in settings.items() if k in accepted}
