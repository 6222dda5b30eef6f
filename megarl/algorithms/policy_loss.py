"""The RL policy objective of one micro-batch, as a pure function of tensors, and the one
definition of how a step's batch is cut into optimizer mini-batches.

Per token t of a generated response (mask m_t = 1), with ρ_t = π_θ(y_t) / π_old(y_t):

    ℓ_t = c_t · L^pg_t(ρ_t, A_t)  +  β · KL_t  −  α · H_t

- L^pg: the policy loss chosen by name from `POLICY_LOSSES` — "ppo" (clipped surrogate, Schulman
  et al. 2017, with DAPO clip-higher, Yu et al. 2025, and dual clip, Ye et al. 2020), "gspo"
  (Zheng et al. 2025) or "cispo" (MiniMax 2025);
- c_t: the rollout-correction weight (`correction.rollout_correction`: truncated importance
  sampling, Yao et al. 2025; 1 when absent);
- KL_t = `token_kl`(π_θ, π_ref) with the k1/k2/k3 estimators (Schulman 2020); in the loss, as in
  GRPO (Shao et al. 2024, "DeepSeekMath"), only when the KL placement is the loss and β > 0 (the
  other placement puts it in the reward, see `kl.kl_penalized_rewards`);
- H_t: the policy's entropy at the rollout temperature, an entropy bonus (Williams & Peng 1991;
  Mnih et al. 2016) when α > 0.

The optimised scalar of a mini-batch is J = Σ_t w_t ℓ_t / Σ_t m_t with per-token weights
w = `losses.loss_weights(mask, mode, norm_length)`, which make J exactly the chosen aggregation
(token-mean: DAPO; seq-mean-token-mean: GRPO; seq-mean-token-sum-norm: Dr. GRPO, Liu et al. 2025)
however the mini-batch is split: each micro-batch returns its Σ w·ℓ and Σ m, and megatron's
per-token loss mode divides the gradients once by the token count of all micro-batches on all
data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megarl.algorithms.correction import MISMATCH_METRICS, mismatch_sums, rollout_correction
from megarl.algorithms.kl import token_kl
from megarl.algorithms.losses import POLICY_LOSSES, loss_weights

METRIC_SUMS = ("pg_loss", "tokens", "clip_frac", "approx_kl", "kl_ref", "entropy")
"""Order of the metric sums `policy_loss` returns (each a Σ over masked tokens; "tokens" is Σ m, so
sum/tokens is the token mean; entropy is 0 unless the bonus is on)."""


ON_POLICY_SUMS = (*MISMATCH_METRICS, "entropy_rollout")
"""Order of the extra metric sums `on_policy_inputs` returns (Σ over masked tokens)."""


@dataclass(frozen=True)
class PolicyLossConfig:
    """The algorithm settings the policy objective reads (recipe.algorithm, by name)."""

    loss: str = "ppo"                 # a POLICY_LOSSES name
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None    # ppo only; None = off
    kl_estimator: str = "k3"
    kl_clamp: float | None = 10.0
    kl_in_loss: bool = False          # KL placement "loss" (else it is in the reward, or off)
    entropy_coef: float = 0.0
    correction: str = "tis"           # rollout_correction mode, applied in the update when on-policy
    correction_threshold: float = 2.0

    @classmethod
    def from_algorithm(cls, a) -> PolicyLossConfig:
        """From a recipe's `algorithm` group (read by attribute name)."""
        return cls(loss=a.policy_loss, clip_low=a.clip_ratio_low, clip_high=a.clip_ratio_high, dual_clip=a.dual_clip,
                   kl_estimator=a.kl.estimator, kl_clamp=a.kl.clamp, kl_in_loss=a.kl.placement == "loss",
                   entropy_coef=a.entropy_coef, correction=a.rollout_correction.mode,
                   correction_threshold=a.rollout_correction.threshold)


def _policy_loss_kwargs(cfg: PolicyLossConfig) -> dict:
    """The options the chosen loss takes: every loss takes the clip range; dual_clip only when set
    (only ppo accepts it; recipe validation keeps it unset for the others)."""
    return {"clip_low": cfg.clip_low, "clip_high": cfg.clip_high,
            **({"dual_clip": cfg.dual_clip} if cfg.dual_clip is not None else {})}


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                loss_weight: torch.Tensor, cfg: PolicyLossConfig, *, is_weight: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro-batch's (Σ_t w_t ℓ_t, Σ_t m_t, metric sums [len(METRIC_SUMS)] float64); see the
    module docstring for ℓ. Tensors are [B, T]: `logp` differentiable, `loss_weight` = w from
    `loss_weights`, `is_weight` = c, `entropy` = H (required when cfg.entropy_coef > 0; it is
    differentiable there). KL to `ref_logp` is reported whenever given, optimised only when
    cfg.kl_in_loss and kl_coef > 0."""
    per_token, m = POLICY_LOSSES.get(cfg.loss)(logp, old_logp, advantages, mask, **_policy_loss_kwargs(cfg))
    if is_weight is not None:
        per_token = per_token * is_weight
    total = per_token
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = token_kl(logp, ref_logp, cfg.kl_estimator, cfg.kl_clamp)
        if kl_coef > 0 and cfg.kl_in_loss:
            total = total + kl_coef * kl
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("the entropy bonus is on (entropy_coef > 0) but no entropy was given")
        total = total - cfg.entropy_coef * entropy
    loss_sum = (total * loss_weight).sum()
    count = mask.sum()
    # float64 on the inputs' device, without a host round trip per number (a GPU sync each)
    n = count.detach().double()
    zero = torch.zeros((), dtype=torch.float64, device=logp.device)
    ent_sum = (entropy.detach() * mask).sum().double() if cfg.entropy_coef > 0 else zero
    sums = torch.stack([(per_token.detach() * mask).sum().double(), n, _as64(m["clip_frac"], zero) * n,
                        _as64(m.get("approx_kl", 0.0), zero) * n, (kl.detach() * mask).sum().double(), ent_sum])
    return loss_sum, count, sums


def _as64(value, like: torch.Tensor) -> torch.Tensor:
    """A loss metric (tensor or number) as a float64 scalar on `like`'s device."""
    if isinstance(value, torch.Tensor):
        return value.detach().double().reshape(())
    return like + float(value)


def on_policy_inputs(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, entropy: torch.Tensor,
                     cfg: PolicyLossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The old log-probs of an exactly on-policy update (one mini-batch, one epoch): the policy
    being updated is the one that scored the batch, so π_old = sg(π_θ) from the update's own
    forward, ρ = 1 by construction and ∇ρ = ∇log π_θ, which is what a separate old-log-prob pass
    would give at the cost of one more forward.

    Returns (old_logp, rollout-correction weight c against the engine's `rollout_logp`, metric sums
    [len(ON_POLICY_SUMS)] float64: the mismatch sums and Σ entropy, `entropy` being the policy's
    token entropy). Only for corrections that reweight (`REWEIGHTING_MODES`): a masking one would
    change the mini-batch's loss weights after they were fixed."""
    old_logp = logp.detach()
    is_weight, _ = rollout_correction(old_logp, rollout_logp, mask, cfg.correction, cfg.correction_threshold)
    sums = torch.cat([mismatch_sums(old_logp, rollout_logp, mask, cfg.correction_threshold),
                      (entropy.detach() * mask).sum().to(torch.float64).reshape(1)])
    return old_logp, is_weight, sums


def minibatch_slices(n_samples: int, minibatches: int) -> list[slice]:
    """The rows of each optimizer mini-batch of a step's `n_samples` (already shuffled) samples:
    `minibatches` equal consecutive slices. The driver's per-mini-batch loss weights and the
    workers' update loops both cut the batch here."""
    if minibatches < 1 or n_samples % minibatches:
        raise ValueError(f"{n_samples} samples do not split into {minibatches} equal mini-batches")
    per = n_samples // minibatches
    return [slice(i * per, (i + 1) * per) for i in range(minibatches)]


def minibatch_loss_weights(mask: torch.Tensor, minibatches: int, mode: str, norm_length: int) -> torch.Tensor:
    """`loss_weights` of each mini-batch of `minibatch_slices`, as one [B, T] tensor."""
    return torch.cat([loss_weights(mask[s], mode, norm_length) for s in minibatch_slices(mask.shape[0], minibatches)])
