"""The policy objective as a pure tensor function, checked by hand, and the one definition of the
loss aggregation modes (`loss_weights`) and of the mini-batch boundaries."""

import math

import pytest
import torch

from megarl.algorithms.losses import LOSS_AGGREGATIONS, aggregate_loss, loss_weights
from megarl.algorithms.policy_loss import (
    METRIC_SUMS,
    PolicyLossConfig,
    minibatch_loss_weights,
    minibatch_slices,
    policy_loss,
)

T = torch.tensor
close = pytest.approx

# ratios ρ, advantages, mask: ppo with ε = 0.2 clips (0,1) and (0,2); (1,2) is masked out
RATIO = T([[1.0, 1.5, 0.5], [1.1, 1.0, 2.0]])
OLD = T([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
ADV = T([[1.0, 1.0, -1.0], [2.0, -1.0, 1.0]])
MASK = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
TIS = T([[1.0, 0.5, 2.0], [1.0, 1.0, 3.0]])
KL = T([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])          # logp − ref_logp (k1)
ENTROPY = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
CFG = PolicyLossConfig(loss="ppo", clip_low=0.2, clip_high=0.2, kl_estimator="k1", kl_clamp=None, kl_in_loss=True,
                       entropy_coef=0.01)
# ℓ = c·L_ppo + 0.5·KL − 0.01·H, by hand:
#   L_ppo = max(−Aρ, −A·clip(ρ, 0.8, 1.2)) = [[-1, -1.2, 0.8], [-2.2, 1, -1.2]]
#   c·L   = [[-1, -0.6, 1.6], [-2.2, 1, -3.6]]
ELL = T([[-0.96, -0.52, 1.72], [-2.04, 1.2, -3.36]])
# the aggregations of ℓ over the mask (norm_length 4): token-mean −0.6/5; seq-mean-token-mean
# (0.24/3 − 0.84/2)/2; seq-mean-token-sum (0.24 − 0.84)/2; seq-mean-token-sum-norm −0.6/(2·4)
WANT = {"token-mean": -0.12, "seq-mean-token-mean": -0.17, "seq-mean-token-sum": -0.3,
        "seq-mean-token-sum-norm": -0.075}


def _objective(mode, cfg=CFG, kl_coef=0.5, entropy=ENTROPY, **kw):
    logp = (OLD + RATIO.log()).requires_grad_()
    w = loss_weights(MASK, mode, norm_length=4)
    out = policy_loss(logp, OLD, ADV, MASK, w, cfg, is_weight=TIS, ref_logp=logp.detach() - KL, kl_coef=kl_coef,
                      entropy=entropy, **kw)
    return logp, w, out


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_ppo_with_tis_kl_in_loss_and_entropy_bonus_by_hand(mode):
    _, _, (loss_sum, count, sums) = _objective(mode)
    assert count.item() == 5.0
    assert (loss_sum / count).item() == close(WANT[mode], abs=1e-6)
    assert (loss_sum / count).item() == close(aggregate_loss(ELL, MASK, mode, norm_length=4).item(), abs=1e-6)
    got = dict(zip(METRIC_SUMS, sums.tolist()))
    assert sums.dtype == torch.float64
    assert got == close({"pg_loss": -1.2, "tokens": 5.0, "clip_frac": 2.0, "approx_kl": -math.log(1.5 * 0.5 * 1.1),
                         "kl_ref": 1.5, "entropy": 15.0}, abs=1e-5)


def test_gradients_flow_through_entropy_and_kl():
    ent = ENTROPY.clone().requires_grad_()
    logp, w, (loss_sum, _, _) = _objective("token-mean", entropy=ent)
    loss_sum.backward()
    assert torch.allclose(ent.grad, -0.01 * w)
    # k1 KL adds β·w to ∂/∂logp; masked tokens get no gradient at all
    assert logp.grad[1, 2].item() == 0.0 and logp.grad[0, 0].item() == close(-1.0 + 0.5, abs=1e-6)


def test_kl_is_reported_but_only_optimised_in_the_loss_placement_with_a_positive_coef():
    no_bonus = PolicyLossConfig(clip_low=0.2, clip_high=0.2, kl_estimator="k1", kl_clamp=None, kl_in_loss=True)
    pg_only = (ELL - 0.5 * KL + 0.01 * ENTROPY) * MASK
    for cfg, coef in ((no_bonus, 0.0), (PolicyLossConfig(**{**no_bonus.__dict__, "kl_in_loss": False}), 0.5)):
        _, _, (loss_sum, _, sums) = _objective("token-mean", cfg=cfg, kl_coef=coef, entropy=None)
        assert loss_sum.item() == close(pg_only.sum().item(), abs=1e-6)
        assert sums[METRIC_SUMS.index("kl_ref")].item() == close(1.5) and sums[METRIC_SUMS.index("entropy")] == 0.0
    _, _, (loss_sum, _, sums) = _objective("token-mean", cfg=no_bonus, kl_coef=0.5, entropy=None)
    assert loss_sum.item() == close((pg_only + 0.5 * KL * MASK).sum().item(), abs=1e-6)
    logp = OLD + RATIO.log()
    _, _, sums = policy_loss(logp, OLD, ADV, MASK, MASK, no_bonus)  # no reference, no correction
    assert sums[METRIC_SUMS.index("kl_ref")] == 0.0 and sums[0].item() == close(-1.0 - 1.2 + 0.8 - 2.2 + 1.0, abs=1e-6)


def test_entropy_bonus_needs_the_entropy():
    with pytest.raises(ValueError, match="entropy"):
        _objective("token-mean", entropy=None)


def test_config_from_the_recipe_algorithm_group():
    from megarl.config.loader import load_recipe

    r = load_recipe("configs/tiny/ppo_cpu.yaml")
    cfg = PolicyLossConfig.from_algorithm(r.algorithm)
    a = r.algorithm
    assert (cfg.loss, cfg.clip_low, cfg.clip_high, cfg.dual_clip) == (a.policy_loss, a.clip_ratio_low,
                                                                      a.clip_ratio_high, a.dual_clip)
    assert cfg.kl_in_loss == (a.kl.placement == "loss") and cfg.entropy_coef == a.entropy_coef


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_loss_weights_reproduce_aggregate_loss_over_any_micro_batch_split(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(8, 12, generator=g)
    mask = (torch.rand(8, 12, generator=g) > 0.3).float()
    mask[3] = 0.0  # a sample with nothing to train on contributes nothing
    w = loss_weights(mask, mode, norm_length=12)
    want = aggregate_loss(loss, mask, mode, norm_length=12)
    assert torch.allclose((w * loss).sum() / mask.sum(), want, atol=1e-6)
    # megatron sums Σ w·ℓ over micro-batches / DP ranks and divides by the total token count once
    for cuts in ([4], [1, 2, 5], [3, 6, 7], list(range(1, 8))):
        bounds = [0, *cuts, 8]
        parts = sum((w[a:b] * loss[a:b]).sum() for a, b in zip(bounds, bounds[1:]))
        assert torch.allclose(parts / mask.sum(), want, atol=1e-6), cuts


def test_minibatch_slices_and_weights():
    assert minibatch_slices(8, 2) == [slice(0, 4), slice(4, 8)]
    assert minibatch_slices(6, 1) == [slice(0, 6)]
    for bad in ((7, 2), (4, 0)):
        with pytest.raises(ValueError):
            minibatch_slices(*bad)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(8, 5, generator=g) > 0.4).float()
    w = minibatch_loss_weights(mask, 2, "seq-mean-token-mean", 5)
    assert torch.equal(w, torch.cat([loss_weights(mask[:4], "seq-mean-token-mean", 5),
                                     loss_weights(mask[4:], "seq-mean-token-mean", 5)]))


@pytest.mark.parametrize("correction", ["tis", "sequence_is", "none"])
@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_on_policy_old_logprobs_give_the_separate_pass_loss_and_gradients(correction, mode):
    """Exactly on-policy, π_old from the update's own forward (`on_policy_inputs`) == a separate
    no-grad forward first: same loss, same gradients, same correction and mismatch metrics."""
    from megarl.algorithms.correction import mismatch_metrics, rollout_correction
    from megarl.algorithms.policy_loss import ON_POLICY_SUMS, on_policy_inputs

    torch.manual_seed(0)
    weight = torch.randn(8, 16, dtype=torch.float64)
    hidden = torch.randn(3, 5, 8, dtype=torch.float64)
    labels = torch.randint(0, 16, (3, 5))
    mask = (torch.rand(3, 5) > 0.2).to(torch.float64)
    adv = torch.randn(3, 5, dtype=torch.float64)
    cfg = PolicyLossConfig(loss="ppo", clip_low=0.2, clip_high=0.28, correction=correction, correction_threshold=1.5)
    w = loss_weights(mask, mode, norm_length=5)

    def forward(wt):
        logits = hidden @ wt
        logp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        probs = torch.softmax(logits, -1)
        return logp, -(probs * torch.log_softmax(logits, -1)).sum(-1)

    with torch.no_grad():
        old, entropy = forward(weight)
    rollout = old + 0.3 * torch.randn_like(old)            # the engine's slightly different log-probs
    separate = weight.clone().requires_grad_()
    logp, _ = forward(separate)
    is_weight, _ = rollout_correction(old, rollout, mask, correction, 1.5)
    loss_a, _, sums_a = policy_loss(logp, old, adv, mask, w, cfg, is_weight=is_weight)
    loss_a.backward()

    fused = weight.clone().requires_grad_()
    logp, ent = forward(fused)
    old_b, is_weight_b, extra = on_policy_inputs(logp, rollout, mask, ent, cfg)
    loss_b, _, sums_b = policy_loss(logp, old_b, adv, mask, w, cfg, is_weight=is_weight_b)
    loss_b.backward()

    assert torch.equal(old_b, old) and torch.equal(is_weight_b, is_weight) and not old_b.requires_grad
    assert loss_b.item() == close(loss_a.item(), rel=1e-12)
    assert torch.allclose(fused.grad, separate.grad, rtol=1e-12, atol=1e-15) and fused.grad.abs().sum() > 0
    assert torch.allclose(sums_b, sums_a, rtol=1e-12)
    named = dict(zip(ON_POLICY_SUMS, (extra / mask.sum()).tolist()))
    for k, v in mismatch_metrics(old, rollout, mask, 1.5).items():
        assert named[k] == close(float(v), rel=1e-12) and (k != "mismatch_abs_logp_diff" or named[k] > 0)
    assert named["entropy_rollout"] == close(float((entropy * mask).sum() / mask.sum()), rel=1e-12)
