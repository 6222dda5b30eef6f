"""Algorithm library: hand-computed values, invariants (hypothesis), fp32/bf16, no NaN."""

import math
import typing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megarl.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, PREFERENCE_LOSSES
from megarl.algorithms.advantages import (
    AdvantageInputs,
    compute_gae,
    discounted_returns,
    grpo_advantage,
    reinforce_pp_advantage,
    reinforce_pp_baseline_advantage,
    remax_advantage,
    rloo_advantage,
    scores_to_token_rewards,
)
from megarl.algorithms.correction import CORRECTION_MODES, mismatch_metrics, rollout_correction
from megarl.algorithms.kl import AdaptiveKLController, kl_penalized_rewards, make_kl_controller, token_kl
from megarl.algorithms.losses import (
    aggregate_loss,
    cispo_loss,
    clipped_value_loss,
    entropy_bonus,
    gspo_loss,
    ppo_clip_loss,
    sft_loss,
)
from megarl.algorithms.preference import (
    bradley_terry_loss,
    dpo_hinge_loss,
    dpo_sigmoid_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from megarl.config.recipe import AlgorithmConfig, KLConfig, PreferenceConfig, RolloutCorrectionConfig

T = torch.tensor
close = pytest.approx


def literal_values(cls, field):
    """The names a Literal (or Literal | None: unset = a default filled in at load) field allows."""
    hint = typing.get_type_hints(cls)[field]
    if typing.get_origin(hint) is not typing.Literal:
        hint = next(a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal)
    return set(typing.get_args(hint))


# ---- registries match the recipe's names ------------------------------------------------------
def test_registries_cover_exactly_the_recipe_names():
    assert set(ADVANTAGE_ESTIMATORS.names()) == literal_values(AlgorithmConfig, "advantage_estimator")
    assert set(POLICY_LOSSES.names()) == literal_values(AlgorithmConfig, "policy_loss")
    assert set(LOSS_AGGREGATIONS) == literal_values(AlgorithmConfig, "loss_agg_mode")
    assert set(KL_ESTIMATORS.names()) == literal_values(KLConfig, "estimator")
    assert set(CORRECTION_MODES) == literal_values(RolloutCorrectionConfig, "mode")
    assert set(PREFERENCE_LOSSES.names()) == literal_values(PreferenceConfig, "loss_type")


def test_wrong_name_lists_valid_ones():
    with pytest.raises(KeyError, match="unknown policy loss 'ppo2'; valid: cispo, gspo, ppo"):
        POLICY_LOSSES.get("ppo2")
    with pytest.raises(KeyError, match="unknown loss aggregation .mean.; valid: token-mean"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "mean")
    with pytest.raises(ValueError, match="'gae' needs values"):
        ADVANTAGE_ESTIMATORS.get("gae")(AdvantageInputs(mask=torch.ones(1, 2), scores=T([1.0])))


# ---- advantages: hand-computed -------------------------------------------------------------------
def test_gae_hand_computed():
    r, v, m = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), torch.ones(1, 3)
    adv, ret = compute_gae(r, v, m, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == close([0.5, 0.4, 0.3])
    assert ret[0].tolist() == close([1.0, 1.0, 1.0])
    adv, _ = compute_gae(r, v, m, gamma=0.9, lam=0.5)
    assert adv[0].tolist() == close([0.11425, 0.165, 0.3])


def test_gae_skips_masked_tool_tokens_and_bootstraps():
    r, v = T([[0.0, 5.0, 1.0]]), T([[0.5, 9.0, 0.7]])
    adv, _ = compute_gae(r, v, T([[1.0, 0.0, 1.0]]))
    assert adv[0].tolist() == close([0.5, 0.0, 0.3])  # δ0 = 0 + V2 − V0 = 0.2; A0 = 0.2 + 0.3
    adv, _ = compute_gae(T([[0.0]]), T([[0.5]]), T([[1.0]]), bootstrap_values=T([2.0]))
    assert adv[0].tolist() == close([1.5])


def test_grpo_and_dr_grpo_hand_computed():
    scores, groups, m = T([1.0, 0.0, 0.0, 1.0, 3.0, 3.0]), T([7, 7, 7, 7, 2, 2]), torch.ones(6, 2)
    adv, _ = grpo_advantage(scores, groups, m)
    s = 0.5 / math.sqrt(1 / 3)
    assert adv[:, 0].tolist() == close([s, -s, -s, s, 0.0, 0.0], rel=1e-5)
    adv, _ = grpo_advantage(scores, groups, m, norm_by_std=False)
    assert adv[:, 1].tolist() == close([0.5, -0.5, -0.5, 0.5, 0.0, 0.0])


def test_rloo_hand_computed_and_singletons():
    adv, _ = rloo_advantage(T([1.0, 0.0, 0.0, 4.0]), T([0, 0, 0, 1]), torch.ones(4, 1))
    assert adv[:, 0].tolist() == close([1.0, -0.5, -0.5, 0.0])


def test_reinforce_pp_family_and_remax():
    m = torch.ones(2, 2)
    rewards = scores_to_token_rewards(T([1.0, 0.0]), m)
    assert rewards.tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert discounted_returns(rewards, m, gamma=0.5).tolist() == [[0.5, 1.0], [0.0, 0.0]]
    adv, _ = reinforce_pp_advantage(rewards, m, gamma=0.5)
    assert adv.mean().item() == close(0.0, abs=1e-6) and adv.std(unbiased=False).item() == close(1.0, rel=1e-4)
    adv, _ = reinforce_pp_baseline_advantage(T([1.0, 0.0, 5.0, 5.0]), T([0, 0, 1, 1]), torch.ones(4, 1))
    assert adv[:, 0].tolist() == close([math.sqrt(2), -math.sqrt(2), 0.0, 0.0], rel=1e-4)
    adv, _ = remax_advantage(T([1.0, 0.5]), T([0.25, 0.5]), torch.ones(2, 3))
    assert adv.tolist() == [[0.75] * 3, [0.0] * 3]


def test_registry_dispatch_passes_recipe_options():
    x = AdvantageInputs(mask=torch.ones(4, 2), scores=T([1.0, 0.0, 0.0, 1.0]), group_ids=T([0, 0, 0, 0]))
    adv, _ = ADVANTAGE_ESTIMATORS.get("grpo")(x, norm_adv_by_std=False)
    assert adv[:, 0].tolist() == close([0.5, -0.5, -0.5, 0.5])


# ---- policy and value losses -------------------------------------------------------------------
def test_ppo_clip_hand_computed():
    logp = torch.log(T([[1.5, 0.5, 5.0]]))
    adv = T([[1.0, -1.0, -1.0]])
    loss, metrics = ppo_clip_loss(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), 0.2, 0.2)
    assert loss[0].tolist() == close([-1.2, 0.8, 5.0])
    assert metrics["clip_frac"].item() == close(2 / 3)
    loss, _ = ppo_clip_loss(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), 0.2, 0.2, dual_clip=3.0)
    assert loss[0].tolist() == close([-1.2, 0.8, 3.0])
    loss, _ = ppo_clip_loss(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), 0.2, 0.28)  # clip-higher
    assert loss[0, 0].item() == close(-1.28)


def test_cispo_and_gspo():
    logp = torch.log(T([[0.6]])).requires_grad_()
    old = torch.log(T([[0.4]]))  # ratio 1.5 -> weight 1.28
    loss, _ = cispo_loss(logp, old, T([[1.0]]), torch.ones(1, 1), clip_low=1.0, clip_high=0.28)
    assert loss.item() == close(-1.28 * math.log(0.6))
    loss.sum().backward()
    assert logp.grad.item() == close(-1.28)  # clipped tokens keep their gradient
    logp = T([[-1.0, -2.0, 0.0]]).requires_grad_()
    old = T([[-1.5, -1.5, 0.0]])
    mask = T([[1.0, 1.0, 0.0]])
    loss, _ = gspo_loss(logp, old, T([[1.0, 1.0, 1.0]]), mask, clip_low=0.5, clip_high=0.5)
    assert loss[0, 0].item() == close(-1.0)  # s = exp((0.5 - 0.5) / 2) = 1 for every token
    (loss * mask).sum().backward()
    assert logp.grad[0].tolist() == close([-1.0, -1.0, 0.0])


def test_aggregation_modes_hand_computed():
    loss, mask = T([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]), T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == close(2.5)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == close(5.0)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == close(3.0)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == close(10 / 6)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_length=10).item() == close(0.5)


def test_value_entropy_and_sft_losses():
    v, old, ret, m = T([[1.0, 0.0]]), T([[0.0, 0.0]]), T([[0.0, 1.0]]), torch.ones(1, 2)
    loss, metrics = clipped_value_loss(v, old, ret, m, clip=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped (0.2-0)^2 = 0.04 -> 1; token 1: both 1 -> mean 0.5*(1+1)/2
    assert loss.item() == close(0.5) and metrics["value_clip_frac"].item() == 0.0
    assert entropy_bonus(T([[2.0, 4.0]]), m, coef=0.01).item() == close(-0.03)
    assert sft_loss(torch.log(T([[0.5, 0.25]])), T([[1.0, 0.0]])).item() == close(math.log(2))


# ---- KL -------------------------------------------------------------------------------------------
def test_kl_estimators_hand_computed():
    logp, ref = torch.log(T([0.5])), torch.log(T([0.25]))
    x = math.log(0.5)
    assert token_kl(logp, ref, "k1").item() == close(-x)
    assert token_kl(logp, ref, "k2").item() == close(0.5 * x * x)
    assert token_kl(logp, ref, "k3").item() == close(math.exp(x) - x - 1)
    assert token_kl(T([0.0]), T([-50.0]), "k1", clamp=10.0).item() == 10.0


def test_kl_reward_penalty_and_controllers():
    out = kl_penalized_rewards(T([[0.0, 1.0]]), T([[0.5, 0.5]]), 0.1, T([[1.0, 1.0]]))
    assert out.tolist() == [close([-0.05, 0.95])]
    ctl = AdaptiveKLController(coef=0.1, target=1.0, horizon=100)
    assert ctl.update(current_kl=2.0, n_steps=10) == close(0.102)
    assert ctl.update(current_kl=0.0, n_steps=10) == close(0.102 * 0.98)
    assert make_kl_controller("fixed", 0.3).update(5.0, 10) == 0.3
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", 0.1)


# ---- rollout correction ------------------------------------------------------------------------------
def test_rollout_correction_modes():
    old = torch.log(T([[0.3, 0.5, 0.2]]))
    rollout = torch.log(T([[0.1, 0.5, 0.3]]))  # ratios 3, 1, 2/3
    m = torch.ones(1, 3)
    w, mask = rollout_correction(old, rollout, m, "tis", threshold=2.0)
    assert w[0].tolist() == close([2.0, 1.0, 2 / 3]) and torch.equal(mask, m)
    w, _ = rollout_correction(old, rollout, m, "sequence_is", threshold=10.0)
    assert w[0].tolist() == close([2.0] * 3)
    _, mask = rollout_correction(old, rollout, m, "token_mask", threshold=2.0)
    assert mask[0].tolist() == [0.0, 1.0, 1.0]
    _, mask = rollout_correction(old, rollout, m, "sequence_mask", threshold=1.2)
    assert mask[0].tolist() == [0.0, 0.0, 0.0]
    metrics = mismatch_metrics(old, rollout, m, threshold=2.0)
    assert metrics["mismatch_frac_over_threshold"].item() == close(1 / 3)
    assert metrics["mismatch_k3_kl"].item() > 0
    same = mismatch_metrics(old, old, m)
    assert all(v.item() == 0.0 for v in same.values())


# ---- preference -------------------------------------------------------------------------------------
def test_preference_losses_hand_computed():
    pc, pr, rc, rr = T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0])  # h = 2
    loss, metrics = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == close(-math.log(1 / (1 + math.exp(-1))))
    assert metrics["reward_accuracy"].item() == 1.0 and metrics["reward_margin"].item() == close(1.0)
    loss, _ = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert loss.item() == close(0.9 * 0.3132617 + 0.1 * 1.3132617, rel=1e-5)
    assert dpo_hinge_loss(pc, pr, rc, rr, beta=0.5)[0].item() == 0.0
    assert ipo_loss(pc, pr, rc, rr, beta=0.5)[0].item() == close(1.0)
    loss, _ = robust_dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert loss.item() == close((0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8, rel=1e-5)
    assert simpo_loss(T([-0.5]), T([-1.0]), beta=2.0, gamma=0.5)[0].item() == close(0.474077, rel=1e-5)
    loss, _ = orpo_loss(torch.log(T([0.5])), torch.log(T([0.25])), T([1.0]), beta=0.1)
    assert loss.item() == close(1.0 + 0.1 * -math.log(1 / (1 + math.exp(-math.log(3)))), rel=1e-5)
    loss, _ = kto_loss(T([1.0, 1.0]), T([0.0, 0.0]), T([True, False]), T(0.5), beta=1.0, undesirable_weight=2.0)
    assert loss.tolist() == close([1 - 1 / (1 + math.exp(-0.5)), 2 * (1 - 1 / (1 + math.exp(0.5)))])
    assert bradley_terry_loss(T([2.0]), T([1.0]))[0].item() == close(0.3132617, rel=1e-5)
    assert bradley_terry_loss(T([2.0]), T([1.0]), margin=T([1.0]))[0].item() == close(math.log(2))


# ---- invariants (hypothesis) ------------------------------------------------------------------------------
scores_and_groups = st.integers(1, 6).flatmap(lambda g: st.tuples(
    st.lists(st.floats(-5, 5, width=32), min_size=g * 2, max_size=g * 2),
    st.just([i // 2 for i in range(g * 2)])))


@settings(max_examples=50, deadline=None)
@given(scores_and_groups, st.booleans())
def test_group_advantages_sum_to_zero_per_group(data, norm):
    scores, groups = T(data[0]), T(data[1])
    for adv in (grpo_advantage(scores, groups, torch.ones(len(scores), 1), norm_by_std=norm)[0][:, 0],
                rloo_advantage(scores, groups, torch.ones(len(scores), 1))[0][:, 0]):
        assert torch.isfinite(adv).all()
        for g in groups.unique():
            assert adv[groups == g].sum().item() == close(0.0, abs=1e-3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=8),
       st.lists(st.floats(-5, 5, width=32), min_size=8, max_size=8), st.sampled_from(["ppo", "gspo", "cispo"]))
def test_ratio_one_means_plain_policy_gradient(logps, advs, name):
    """When the policy equals the one that sampled (ρ = 1) clipping does nothing: d loss/d logp = −A."""
    n = len(logps)
    logp = T([logps]).requires_grad_()
    adv = T([advs[:n]])
    loss, _ = POLICY_LOSSES.get(name)(logp, logp.detach(), adv, torch.ones(1, n), clip_low=0.2, clip_high=0.2)
    loss.sum().backward()
    if name != "gspo":  # gspo's per-token gradient is the same; its value is −A·s with s = 1
        assert logp.grad[0].tolist() == close((-adv[0]).tolist(), abs=1e-5)
    else:
        assert logp.grad[0].tolist() == close((-adv[0]).tolist(), abs=1e-5)
        assert loss[0].tolist() == close((-adv[0]).tolist(), abs=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 0, width=32), min_size=1, max_size=8), st.lists(st.floats(-10, 0, width=32),
                                                                                   min_size=8, max_size=8))
def test_kl_estimators_zero_when_equal_and_k3_nonnegative(a, b):
    x, y = T(a), T(b[:len(a)])
    for name in KL_ESTIMATORS.names():
        assert token_kl(x, x, name).abs().max().item() == 0.0
    assert (token_kl(x, y, "k3") >= 0).all() and (token_kl(x, y, "k2") >= 0).all()


@settings(max_examples=50, deadline=None)
@given(st.floats(-5, 5, width=32), st.floats(-5, 5, width=32), st.floats(0.01, 1.0))
def test_dpo_symmetries(h1, h2, beta):
    """Swapping chosen and rejected negates the logits; a pair with equal margins costs log 2."""
    zero = T([0.0])
    loss, _ = dpo_sigmoid_loss(T([h1]), T([h2]), zero, zero, beta=beta)
    swapped, _ = dpo_sigmoid_loss(T([h2]), T([h1]), zero, zero, beta=beta)
    assert (swapped - loss).item() == close(beta * (h1 - h2), abs=1e-4)
    same, _ = dpo_sigmoid_loss(T([h1]), T([h1]), zero, zero, beta=beta)
    assert same.item() == close(math.log(2), abs=1e-6)
    half, _ = dpo_sigmoid_loss(T([h1]), T([h2]), zero, zero, beta=beta, label_smoothing=0.5)
    half_swapped, _ = dpo_sigmoid_loss(T([h2]), T([h1]), zero, zero, beta=beta, label_smoothing=0.5)
    assert half.item() == close(half_swapped.item(), abs=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-2, 2, width=32), min_size=1, max_size=6))
def test_gae_with_unit_gamma_lambda_and_zero_values_is_reward_to_go(rewards):
    r = T([rewards])
    adv, ret = compute_gae(r, torch.zeros_like(r), torch.ones_like(r))
    expected = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1])
    assert adv.tolist() == [close(expected[0].tolist(), abs=1e-4)] and ret.tolist() == adv.tolist()


# ---- dtypes and degenerate batches ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_for_masked_or_all_equal_groups(dtype):
    mask = T([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=dtype)
    scores, groups = T([1.0, 1.0, 1.0, 1.0], dtype=dtype), T([0, 0, 1, 2])
    x = AdvantageInputs(mask=mask, scores=scores, group_ids=groups, values=torch.zeros(4, 2, dtype=dtype),
                        baseline_scores=scores)
    for name in ADVANTAGE_ESTIMATORS.names():
        adv, ret = ADVANTAGE_ESTIMATORS.get(name)(x)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all(), name
        assert (adv[mask == 0] == 0).all(), name
    logp = torch.full((4, 2), -1.0, dtype=dtype, requires_grad=True)
    for name in POLICY_LOSSES.names():
        loss, metrics = POLICY_LOSSES.get(name)(logp, logp.detach() - 0.1, torch.zeros(4, 2, dtype=dtype), mask)
        for mode in LOSS_AGGREGATIONS:
            value = aggregate_loss(loss, mask, mode)
            assert torch.isfinite(value), (name, mode)
        assert all(torch.isfinite(v).all() for v in metrics.values())
    empty = torch.zeros(2, 3, dtype=dtype)
    for mode in LOSS_AGGREGATIONS:
        assert aggregate_loss(torch.ones(2, 3, dtype=dtype), empty, mode).item() == 0.0
    for mode in CORRECTION_MODES:
        w, m = rollout_correction(logp.detach(), logp.detach() - 30.0, mask, mode)
        assert torch.isfinite(w).all() and torch.isfinite(m).all(), mode
    for name in KL_ESTIMATORS.names():
        assert torch.isfinite(token_kl(logp, logp - 100.0, name)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_matches_fp32(dtype):
    g = torch.Generator().manual_seed(0)
    logp, old = -torch.rand(3, 5, generator=g), -torch.rand(3, 5, generator=g)
    adv, mask = torch.randn(3, 5, generator=g), (torch.rand(3, 5, generator=g) > 0.3).float()
    ref, _ = ppo_clip_loss(logp, old, adv, mask)
    got, _ = ppo_clip_loss(logp.to(dtype), old.to(dtype), adv.to(dtype), mask.to(dtype))
    assert (got.float() - ref).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 1e-6)
    s = torch.randn(6, generator=g)
    ref_adv, _ = grpo_advantage(s, T([0, 0, 0, 1, 1, 1]), torch.ones(6, 2))
    got_adv, _ = grpo_advantage(s.to(dtype), T([0, 0, 0, 1, 1, 1]), torch.ones(6, 2, dtype=dtype))
    assert (got_adv.float() - ref_adv).abs().max().item() < (5e-2 if dtype == torch.bfloat16 else 1e-6)


def test_dapo_informative_groups_and_overlong_penalty():
    from megarl.algorithms.filtering import informative_groups, overlong_penalty

    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert informative_groups(scores, groups).tolist() == [False, False, True, True, False, False]
    # L_max 100, cache 20: no penalty up to 80, linear to -1 at 100, -1 beyond
    pen = overlong_penalty(torch.tensor([50, 80, 90, 100, 130]), 100, 20, penalty=1.0)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
