"""KL between the policy and a reference, per token, as a loss term or a reward penalty.

Estimators of KL(π ‖ π_ref) from samples of π (Schulman 2020, "Approximating KL Divergence"),
with x = log π_ref(y) − log π(y):

    k1 = −x                    unbiased, high variance, can be negative
    k2 = ½ x²                  biased, low variance
    k3 = exp(x) − x − 1        unbiased, low variance, always ≥ 0  (GRPO's choice)

All are 0 where the two log-probs are equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megarl.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    x = (ref_logp - logp).clamp(-20.0, 20.0)  # keep exp finite
    # expm1 avoids the cancellation of exp(x) - 1 for small x; the clamp removes rounding below 0
    return (torch.expm1(x) - x).clamp(min=0.0)


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3",
             clamp: float | None = 10.0) -> torch.Tensor:
    """Per-token KL estimate, clamped to [−clamp, clamp] (large single-token values are noise)."""
    kl = KL_ESTIMATORS.get(estimator)(logp, ref_logp)
    return kl.clamp(-clamp, clamp) if clamp is not None else kl


def kl_penalized_rewards(token_rewards: torch.Tensor, kl: torch.Tensor, coef: float,
                         mask: torch.Tensor) -> torch.Tensor:
    """KL in the reward (Ziegler et al. 2019; InstructGPT): r_t ← r_t − β · KL_t on response tokens."""
    return (token_rewards - coef * kl.detach()) * mask


@dataclass
class FixedKLController:
    """β stays as configured."""

    coef: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]


@dataclass
class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"):

        e = clip(KL / target − 1, −0.2, 0.2),   β ← β · (1 + e · n_steps / horizon)
    """

    coef: float
    target: float
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> float:
        error = max(min(current_kl / self.target - 1.0, 0.2), -0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]


def make_kl_controller(controller: str, coef: float, target: float | None = None, horizon: int = 10000):
    if controller == "fixed":
        return FixedKLController(coef)
    if controller == "adaptive":
        if target is None:
            raise ValueError("the adaptive KL controller needs a target KL")
        return AdaptiveKLController(coef, target, horizon)
    raise KeyError(f"unknown KL controller {controller!r}; valid: adaptive, fixed")
