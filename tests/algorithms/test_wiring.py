"""How the algorithm functions are wired to the recipe and to each other (issue 17, item 6): which
KL the mismatch metric measures, paper defaults per loss, refused inapplicable arguments, the KL
penalty reaching the outcome estimators, float64 precision, and ORPO's log-odds near 0."""

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from megarl.algorithms import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, PREFERENCE_LOSSES
from megarl.algorithms.advantages import (
    AdvantageInputs,
    compute_gae,
    discounted_returns,
    estimator_kwargs,
    grpo_advantage,
    reinforce_pp_baseline_advantage,
    remax_advantage,
    rloo_advantage,
    scores_to_token_rewards,
)
from megarl.algorithms.correction import mismatch_metrics
from megarl.algorithms.kl import kl_k3, kl_penalized_rewards
from megarl.algorithms.losses import gspo_loss
from megarl.algorithms.masked import group_mean_std
from megarl.algorithms.preference import _log_odds
from megarl.config.recipe import POLICY_LOSS_DEFAULTS, PREFERENCE_LOSS_OPTIONS, PreferenceConfig

T = torch.tensor
close = pytest.approx


# ---- mismatch KL: KL(rollout ‖ train) from rollout samples ------------------------------------------
def test_mismatch_kl_estimates_kl_from_rollout_to_trainer():
    q = T([0.7, 0.2, 0.1], dtype=torch.float64)          # rollout policy: the tokens are its samples
    p = T([0.1, 0.3, 0.6], dtype=torch.float64)          # trainer policy
    n = 400_000
    x = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(0))
    old, rollout, mask = p.log()[x][None], q.log()[x][None], torch.ones(1, n, dtype=torch.float64)
    k3 = kl_k3(rollout, old)[0]
    stderr = float(k3.std()) / math.sqrt(n)
    exact = float((q * (q / p).log()).sum())             # KL(q ‖ p)
    estimate = mismatch_metrics(old, rollout, mask)["mismatch_k3_kl"].item()
    assert abs(estimate - exact) < 4 * stderr
    previous = kl_k3(old, rollout).mean().item()         # the old argument order: r = q/p under q,
    assert abs(previous - exact) > 1.0                   # E = Σ q²/p − 1 − KL(q ‖ p) ≈ 2.95, not 1.10


# ---- paper defaults: the config's torch-free table equals the functions' signatures -------------------
def test_policy_loss_defaults_table_matches_the_loss_signatures():
    assert set(POLICY_LOSS_DEFAULTS) == set(POLICY_LOSSES.names())
    for name, defaults in POLICY_LOSS_DEFAULTS.items():
        params = inspect.signature(POLICY_LOSSES.get(name)).parameters
        assert params["clip_low"].default == defaults["clip_ratio_low"], name
        assert params["clip_high"].default == defaults["clip_ratio_high"], name
        assert defaults["loss_agg_mode"] in LOSS_AGGREGATIONS, name
    assert POLICY_LOSS_DEFAULTS["gspo"]["loss_agg_mode"] in gspo_loss.__doc__


def test_preference_options_table_matches_the_loss_signatures():
    assert set(PREFERENCE_LOSS_OPTIONS) == set(PREFERENCE_LOSSES.names())
    argument = {"beta": "beta", "label_smoothing": "label_smoothing", "simpo_gamma": "gamma"}
    for name, options in PREFERENCE_LOSS_OPTIONS.items():
        params = inspect.signature(PREFERENCE_LOSSES.get(name)).parameters
        for key, arg in argument.items():
            if key in options:
                assert params[arg].default == options[key], (name, key)
            else:
                assert arg not in params, (name, key)


# ---- inapplicable arguments are errors, and the callers pass only applicable ones ----------------------
def test_losses_and_estimators_refuse_arguments_they_do_not_use():
    one = T([-1.0])
    for name in ("hinge", "ipo"):
        with pytest.raises(TypeError, match="label_smoothing"):
            PREFERENCE_LOSSES.get(name)(one, one, one, one, beta=0.1, label_smoothing=0.1)
    with pytest.raises(TypeError, match="label_smoothing"):
        PREFERENCE_LOSSES.get("simpo")(one, one, beta=2.0, label_smoothing=0.1)
    with pytest.raises(TypeError, match="gamma"):
        PREFERENCE_LOSSES.get("orpo")(one, one, one, beta=0.1, gamma=0.5)
    logp, mask = torch.zeros(1, 2), torch.ones(1, 2)
    for name in ("gspo", "cispo"):
        with pytest.raises(TypeError, match="dual_clip"):
            POLICY_LOSSES.get(name)(logp, logp, logp, mask, dual_clip=3.0)
    x = AdvantageInputs(mask=mask, scores=T([1.0]), group_ids=T([0]))
    with pytest.raises(TypeError, match="gamma"):
        ADVANTAGE_ESTIMATORS.get("rloo")(x, gamma=1.0)


def test_estimator_kwargs_selects_the_settings_each_estimator_takes():
    settings = {"gamma": 0.9, "lam": 0.8, "norm_adv_by_std": False}
    want = {"gae": {"gamma": 0.9, "lam": 0.8}, "grpo": {"norm_adv_by_std": False}, "rloo": {},
            "reinforce_pp": {"gamma": 0.9}, "reinforce_pp_baseline": {}, "remax": {}}
    assert set(want) == set(ADVANTAGE_ESTIMATORS.names())
    mask = torch.ones(4, 3)
    x = AdvantageInputs(mask=mask, scores=T([1.0, 0.0, 2.0, 1.0]), group_ids=T([0, 0, 1, 1]),
                        values=torch.zeros(4, 3), baseline_scores=torch.zeros(4))
    for name, expected in want.items():
        assert estimator_kwargs(name, **settings) == expected, name
        adv, _ = ADVANTAGE_ESTIMATORS.get(name)(x, **estimator_kwargs(name, **settings))
        assert torch.isfinite(adv).all(), name
    with pytest.raises(KeyError, match="unknown advantage estimator"):
        estimator_kwargs("ppo", **settings)


def _pair_batch():
    """A packed micro-batch of 2 pairs (4 segments of 2 tokens) and megatron's per-token NLL."""
    nll = T([[0.5, 0.7, 1.5, 1.1, 0.2, 0.4, 2.0, 0.9]])
    mb = {"num_segments": 4, "seg_ids": T([0, 0, 1, 1, 2, 2, 3, 3]), "mask": torch.ones(1, 8),
          "weight": torch.ones(2), "ref": T([[[-1.0, 2.0], [-3.0, 2.0]], [[-0.8, 2.0], [-2.0, 2.0]]])}
    return nll, mb


@pytest.mark.parametrize("loss_type, options", [("sigmoid", {"label_smoothing": 0.2}), ("hinge", {}),
                                                ("ipo", {}), ("robust", {"label_smoothing": 0.2}), ("orpo", {}),
                                                ("simpo", {"simpo_gamma": 0.3})])
def test_pair_objective_passes_each_loss_only_its_options(loss_type, options):
    from megarl.trainers.preference import pair_objective

    nll, mb = _pair_batch()
    recipe = SimpleNamespace(stage="dpo", preference=PreferenceConfig(loss_type=loss_type, beta=0.5, **options))
    loss_sum, _ = pair_objective(nll, mb, recipe)
    sums = -nll[0].reshape(4, 2).sum(-1)
    pc, pr, avg_c, avg_r = sums[0::2], sums[1::2], sums[0::2] / 2, sums[1::2] / 2
    ref = mb["ref"]
    fn = PREFERENCE_LOSSES.get(loss_type)
    if loss_type == "orpo":
        want, _ = fn(avg_c, avg_r, -avg_c, beta=0.5)
    elif loss_type == "simpo":
        want, _ = fn(avg_c, avg_r, beta=0.5, gamma=0.3)
    elif loss_type == "ipo":
        want, _ = fn(avg_c, avg_r, ref[:, 0, 0] / 2, ref[:, 1, 0] / 2, beta=0.5)
    else:
        smoothing = {"label_smoothing": 0.2} if options else {}
        want, _ = fn(pc, pr, ref[:, 0, 0], ref[:, 1, 0], beta=0.5, **smoothing)
    assert loss_sum.item() == close(want.sum().item(), rel=1e-6)


# ---- KL in the reward reaches the outcome estimators ---------------------------------------------------
def test_kl_penalty_in_the_reward_reaches_the_outcome_estimators():
    scores, groups = T([1.0, 0.0, 1.0, 0.5, 0.0, 1.0]), T([0, 0, 0, 1, 1, 1])  # groups of 3: std-normalised
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    kl = T([[0.3, 0.1, 0.2], [0.05, 0.0, 9.0], [0.4, 9.0, 0.4], [0.0, 0.2, 0.1], [0.3, 9.0, 9.0], [0.1, 0.1, 9.0]])
    coef = 0.5  # the 9.0 are masked out
    token_rewards = kl_penalized_rewards(scores_to_token_rewards(scores, mask), kl, coef, mask)
    penalised = scores - coef * (kl * mask).sum(-1)
    plain = AdvantageInputs(mask=mask, scores=scores, group_ids=groups, baseline_scores=torch.zeros(6))
    with_kl = AdvantageInputs(mask=mask, scores=scores, group_ids=groups, token_rewards=token_rewards,
                              baseline_scores=torch.zeros(6))
    grpo = ADVANTAGE_ESTIMATORS.get("grpo")
    assert not torch.allclose(grpo(with_kl)[0], grpo(plain)[0])
    expected = {"grpo": grpo_advantage(penalised, groups, mask), "rloo": rloo_advantage(penalised, groups, mask),
                "reinforce_pp_baseline": reinforce_pp_baseline_advantage(penalised, groups, mask),
                "remax": remax_advantage(penalised, torch.zeros(6), mask)}
    for name, (adv, _) in expected.items():
        got, _ = ADVANTAGE_ESTIMATORS.get(name)(with_kl)
        torch.testing.assert_close(got, adv, msg=name)


# ---- float64 stays float64 ------------------------------------------------------------------------------
def test_group_statistics_and_returns_keep_float64_precision():
    big = 1e8  # float32 spacing at 1e8 is 8: every +1 below would vanish
    scores = T([big, big + 1, big + 2, big + 5], dtype=torch.float64)
    mean, std, count = group_mean_std(scores, T([0, 0, 0, 0]))
    offsets = [0.0, 1.0, 2.0, 5.0]
    exact_mean = 2.0
    exact_std = math.sqrt(sum((o - exact_mean) ** 2 for o in offsets) / 3)
    assert mean.dtype == torch.float64 and (mean - big).tolist() == [exact_mean] * 4
    assert std.tolist() == close([exact_std] * 4, rel=1e-12)
    rewards = T([[big, 1.0, 2.0]], dtype=torch.float64)
    m = torch.ones(1, 3, dtype=torch.float64)
    adv, ret = compute_gae(rewards, torch.zeros_like(rewards), m)
    assert (adv[0] - big).tolist() == [3.0, 3.0 - big, 2.0 - big] and torch.equal(adv, ret)
    assert (discounted_returns(rewards, m)[0, 0] - big).item() == 3.0


# ---- ORPO log-odds near p = 1 ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_orpo_log_odds_is_accurate_near_zero(dtype, rel):
    for x in (-1e-6, -3e-6, -1e-5, -1e-3, -0.5, -20.0):
        exact = x - math.log(-math.expm1(x))  # log(p / (1 − p)) with p = e^x, in float64
        assert _log_odds(T([x], dtype=dtype)).item() == close(exact, rel=rel), x
