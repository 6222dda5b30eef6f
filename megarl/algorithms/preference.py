"""Preference and reward-model losses. Inputs are per-sequence [B] tensors: summed response
log-probs under the policy (`policy_chosen`, `policy_rejected`) and the reference
(`ref_chosen`, `ref_rejected`); length-normalised variants take average log-probs. Each loss
returns (per-pair loss [B], metrics) — average it over the batch. Losses take only their own
options (label_smoothing on hinge/IPO, say, is a TypeError rather than silently ignored).

With h = (π_c − ref_c) − (π_r − ref_r) (the implicit reward margin):
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megarl.registry import Registry

PREFERENCE_LOSSES: Registry = Registry("preference loss")


def _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return chosen, rejected, {"reward_chosen": chosen.detach(), "reward_rejected": rejected.detach(),
                              "reward_margin": (chosen - rejected).detach(),
                              "reward_accuracy": (chosen > rejected).float().detach()}


@PREFERENCE_LOSSES.register("sigmoid")
def dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
                     label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023) with conservative label smoothing ε (Mitchell 2023, cDPO):
    L = −(1 − ε) log σ(β h) − ε log σ(−β h)."""
    chosen, rejected, metrics = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    logits = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, metrics


@PREFERENCE_LOSSES.register("hinge")
def dpo_hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """SLiC-style hinge (Zhao et al. 2023): L = max(0, 1 − β h)."""
    chosen, rejected, metrics = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return torch.relu(1.0 - (chosen - rejected)), metrics


@PREFERENCE_LOSSES.register("ipo")
def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm..."): L = (h − 1/(2β))²; pass average
    per-token log-probs as in the paper's implementation."""
    _, _, metrics = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2, metrics


@PREFERENCE_LOSSES.register("robust")
def robust_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
                    label_smoothing: float = 0.1):
    """Robust DPO (Chowdhury et al. 2024) for labels flipped with probability ε:
    L = ((1 − ε)(−log σ(β h)) − ε(−log σ(−β h))) / (1 − 2ε)   (unbiased under label noise)."""
    chosen, rejected, metrics = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    logits = chosen - rejected
    eps = label_smoothing
    loss = ((1 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1 - 2 * eps)
    return loss, metrics


def _log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) of the length-normalised sequence probability p = exp(avg_logp), with
    log(1 − e^x) = log(−expm1(x)): log1p(−exp(x)) loses all but a few digits for x near 0, where
    exp(x) rounds to 1 (Mächler 2012, "Accurately Computing log(1 − exp(−|a|))")."""
    return avg_logp - torch.log(-torch.expm1(avg_logp.clamp(max=-1e-6)))


@PREFERENCE_LOSSES.register("orpo")
def orpo_loss(policy_chosen_avg, policy_rejected_avg, chosen_nll, beta: float = 0.1):
    """ORPO (Hong et al. 2024), reference-free: L = NLL(chosen) − β log σ(log odds_c − log odds_r),
    odds from the average per-token log-probs; `chosen_nll` is the chosen response's token-mean NLL."""
    ratio = _log_odds(policy_chosen_avg) - _log_odds(policy_rejected_avg)
    odds_loss = -F.logsigmoid(ratio)
    return chosen_nll + beta * odds_loss, {"log_odds_ratio": ratio.detach(),
                                            "reward_accuracy": (ratio > 0).float().detach()}


@PREFERENCE_LOSSES.register("simpo")
def simpo_loss(policy_chosen_avg, policy_rejected_avg, beta: float = 2.0, gamma: float = 0.5):
    """SimPO (Meng et al. 2024), reference-free: L = −log σ(β·avg_logp_c − β·avg_logp_r − γ)."""
    chosen, rejected = beta * policy_chosen_avg, beta * policy_rejected_avg
    return -F.logsigmoid(chosen - rejected - gamma), {
        "reward_chosen": chosen.detach(), "reward_rejected": rejected.detach(),
        "reward_accuracy": (chosen > rejected).float().detach()}


@PREFERENCE_LOSSES.register("kto")
def kto_loss(policy_logp, ref_logp, desirable, kl_baseline, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024) on unpaired feedback. With r = log π(y|x) − log π_ref(y|x) and
    z0 = max(0, KL estimate) (no gradient):
        desirable:    L = λ_D (1 − σ(β (r − z0)))
        undesirable:  L = λ_U (1 − σ(β (z0 − r)))
    `desirable` is a bool [B]; `kl_baseline` a scalar (mean log-ratio on mismatched pairs)."""
    r = policy_logp - ref_logp
    z0 = kl_baseline.detach().clamp(min=0.0)
    desirable = desirable.bool()
    value = torch.where(desirable, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r)))
    weight = torch.where(desirable, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    return weight * (1.0 - value), {"reward": (beta * r).detach(), "kl_baseline": z0}


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                       margin: torch.Tensor | None = None):
    """Reward-model loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022), with the optional
    per-pair margin of Llama 2 (Touvron et al. 2023): L = −log σ(r_c − r_r − m)."""
    diff = reward_chosen - reward_rejected - (margin if margin is not None else 0.0)
    return -F.logsigmoid(diff), {"reward_accuracy": (reward_chosen > reward_rejected).float().detach(),
                                 "reward_margin": (reward_chosen - reward_rejected).detach()}
