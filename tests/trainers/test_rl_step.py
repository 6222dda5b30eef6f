"""The RL driver's phases (`megarl.trainers.rl.step`) without Ray, vLLM or megatron: a fake
`generate` returns scripted trajectories, a fake `score` rewards them by a rule, and each phase's
output is checked against what it must be."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from megarl.config.loader import load_recipe
from megarl.reward.engine import RewardResult
from megarl.rollout.agent import Trajectory
from megarl.trainers.rl import step as phases

GRPO = {
    "stage": "grpo",
    "model": {"path": "nowhere/llama", "shape_preset": "llama3-8b"},
    "parallel": {"tp": 1},
    "data": {"train": "train.jsonl"},
    "rollout": {"engines": 1, "n": 2, "max_prompt_length": 8, "max_response_length": 4},
    "reward": {"functions": [{"name": "numeric_match"}]},
    "trainer": {"steps": 2, "prompts_per_step": 2, "micro_batch_per_rank": 1},
    "cluster": {"nodes": 1, "gpus_per_node": 1},
}


def recipe(tmp_path, **algorithm):
    data = {**GRPO, "algorithm": algorithm} if algorithm else GRPO
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(str(path), env={})


class Prompts:
    """Prompt rows 0, 1, 2, ...; `reward_of[i]` is the reward every sample of prompt i gets unless
    the sample's first response token says otherwise."""

    def __init__(self):
        self.next = 0
        self.taken: list[int] = []

    def take(self, k: int) -> list:
        rows = [SimpleNamespace(row=i + 1, prompt_ids=[1, 100 + i], metadata={"id": i})
                for i in range(self.next, self.next + k)]
        self.next += k
        self.taken += [r.metadata["id"] for r in rows]
        return rows


def fake_generate(calls: list):
    """Sample j of a prompt answers token 10 + j; the second token is EOS-like 2."""
    def generate(prompt_ids, sampling):
        calls.append(sampling)
        return [[Trajectory(list(p), [10 + j, 2], [1, 1], [-0.5, -0.25], finish="answer", weight_versions={0})
                 for j in range(sampling.n)] for p in prompt_ids]
    return generate


def score_by(rule):
    def score(trajectories, metadata):
        out = []
        for t, meta in zip(trajectories, metadata):
            value = rule(meta["id"], t.response_ids[0] - 10)
            out.append(RewardResult(value, {"task": value}, {"numeric_match": value}, failed=value is None)
                       if value is not None else RewardResult(0.0, {}, failed=True, errors=["boom"]))
        return out
    return score


def test_collect_keeps_every_group_without_dynamic_sampling_and_seeds_per_step(tmp_path):
    r = recipe(tmp_path)
    prompts, calls = Prompts(), []
    out = phases.collect_rollouts(r, 3, prompts.take, fake_generate(calls), score_by(lambda i, j: 1.0))
    assert [g.prompt.metadata["id"] for g in out.groups] == [0, 1] and out.rounds == 0
    assert out.group_ids == [0, 0, 1, 1] and out.scores.tolist() == [1.0] * 4
    assert calls[0].seed == r.trainer.seed + 3 and calls[0].n == 2
    assert out.first_round_informative == 0.0    # all rewards equal: no signal, but kept


def test_dynamic_sampling_refills_uninformative_groups_with_fresh_prompts(tmp_path):
    r = recipe(tmp_path, dynamic_sampling=True, dynamic_sampling_max_rounds=2)
    prompts, calls = Prompts(), []
    # even prompts: samples disagree (signal); odd prompts: all equal (no signal)
    out = phases.collect_rollouts(r, 0, prompts.take, fake_generate(calls),
                                  score_by(lambda i, j: float(j) if i % 2 == 0 else 1.0))
    assert [g.prompt.metadata["id"] for g in out.groups] == [0, 2]
    assert out.rounds == 1 and prompts.taken == [0, 1, 2]
    assert [g.prompt.metadata["id"] for g in out.filtered] == [1]   # used, left out (prompts.jsonl's filtered_rows)
    assert calls[1].seed == calls[0].seed + 1000      # a refill round samples with another seed
    assert out.first_round_informative == 0.5


def test_dynamic_sampling_pads_with_uninformative_groups_when_rounds_run_out(tmp_path):
    r = recipe(tmp_path, dynamic_sampling=True, dynamic_sampling_max_rounds=1)
    prompts = Prompts()
    out = phases.collect_rollouts(r, 0, prompts.take, fake_generate([]), score_by(lambda i, j: 1.0))
    assert len(out.groups) == 2 and out.rounds == 1 and prompts.taken == [0, 1, 2, 3]
    assert not any(g.informative for g in out.groups)
    assert [g.prompt.metadata["id"] for g in out.groups + out.filtered] == [0, 1, 2, 3]


def test_overlong_shaping_penalises_long_responses(tmp_path):
    r = recipe(tmp_path, overlong={"mode": "shaping", "buffer": 2, "penalty": 1.0})
    out = phases.collect_rollouts(r, 0, Prompts().take, fake_generate([]), score_by(lambda i, j: 1.0))
    # 2 tokens of a 4-token limit with a 2-token buffer: exactly at the buffer's start, no penalty
    assert out.scores.tolist() == [1.0] * 4
    long = [[Trajectory([1], [5, 5, 5, 5], [1] * 4, [0.0] * 4, finish="length")]]
    groups = phases.score_groups(r, [SimpleNamespace(row=1, metadata={"id": 0})], long, score_by(lambda i, j: 1.0))
    assert groups[0].scores.item() == pytest.approx(0.0)   # the last buffer token: full penalty


def test_build_batch_masks_failed_rewards_and_filtered_truncations(tmp_path):
    r = recipe(tmp_path, overlong={"mode": "filter"})
    out = phases.collect_rollouts(r, 0, Prompts().take, fake_generate([]),
                                  score_by(lambda i, j: None if (i, j) == (1, 0) else 1.0))
    out.groups[0].trajectories[1].finish = "length"
    batch, metrics = phases.build_batch(r, out, pad_id=0)
    assert batch.mask.sum(-1).tolist() == [2.0, 0.0, 0.0, 2.0]     # truncated, failed
    assert batch.reward_failed == [False, False, True, False]
    assert metrics["overlong/filtered_frac"] == 0.25 and metrics["reward/failed_frac"] == 0.25
    # the rollout log-probs sit on the label positions of the mask
    assert batch.rollout_logp[0].tolist() == [0.0, -0.5, -0.25]


def _batch_with_logps(r, rule):
    out = phases.collect_rollouts(r, 0, Prompts().take, fake_generate([]), score_by(rule))
    batch, _ = phases.build_batch(r, out, pad_id=0)
    batch.old_logp = batch.rollout_logp.clone()
    return batch


def test_grpo_advantages_and_exact_on_policy_correction(tmp_path):
    r = recipe(tmp_path)
    batch = _batch_with_logps(r, lambda i, j: float(j))
    plan = phases.compute_advantages(r, batch, kl_coef=0.0)
    # group (0, 1): z-scores -1/√2·√2 = ∓0.7071 (unbiased std), on every trained token
    per_sample = (batch.advantages * batch.mask).sum(-1) / batch.mask.sum(-1)
    assert per_sample.tolist() == pytest.approx([-0.7071, 0.7071, -0.7071, 0.7071], abs=1e-4)
    assert torch.equal(plan.is_weight, batch.mask) and torch.equal(plan.train_mask, batch.mask)
    assert plan.metrics["mismatch/abs_logp_diff"] == 0.0
    inputs = phases.update_inputs(batch, plan)
    assert set(inputs) == {"tokens", "mask", "old_logp", "advantages", "is_weight", "loss_weight"}


def test_kl_in_reward_reaches_the_grpo_advantages(tmp_path):
    r = recipe(tmp_path, kl={"coef": 0.5, "placement": "reward", "estimator": "k1"})
    batch = _batch_with_logps(r, lambda i, j: 1.0)   # equal scores: only the KL penalty differs
    batch.ref_logp = batch.old_logp.clone()
    batch.ref_logp[0] -= 1.0 * batch.mask[0]          # sample 0 drifted from the reference by 1 nat/token
    phases.compute_advantages(r, batch, kl_coef=0.5)
    assert (batch.advantages[0] * batch.mask[0]).sum() < 0 < (batch.advantages[1] * batch.mask[1]).sum()
    assert phases.reference_kl(r, batch, 0.5)["kl/ref_mean"] == pytest.approx(2 / 8)


def test_loss_weights_follow_the_minibatch_boundaries(tmp_path):
    r = recipe(tmp_path, loss_agg_mode="seq-mean-token-sum")
    r.derived.minibatches_per_step = 2
    batch = _batch_with_logps(r, lambda i, j: float(j))
    batch.mask[0, 1] = 0.0
    plan = phases.compute_advantages(r, batch, kl_coef=0.0)
    # each mini-batch of 2 samples: w = mask · (tokens in the mini-batch) / 2
    assert plan.loss_weight[:2].sum(-1).tolist() == pytest.approx([1 * 3 / 2, 2 * 3 / 2])
    assert plan.loss_weight[2:].sum(-1).tolist() == pytest.approx([2 * 4 / 2, 2 * 4 / 2])


def test_step_metrics_collects_every_family(tmp_path):
    r = recipe(tmp_path)
    out = phases.collect_rollouts(r, 0, Prompts().take, fake_generate([]), score_by(lambda i, j: float(j)))
    batch, reward_m = phases.build_batch(r, out, pad_id=0)
    batch.old_logp = batch.rollout_logp.clone()
    plan = phases.compute_advantages(r, batch, 0.0)
    timings = {"timing/step_s": 2.0, "timing/rollout_s": 1.0}
    m = phases.step_metrics(batch, out, timings, torch.ones_like(batch.mask), reward_m, plan.metrics)
    assert m["throughput/samples_per_s"] == 2.0 and m["reward_fn/numeric_match"] == 0.5
    assert m["actor/entropy_rollout"] == 1.0 and m["response/length_mean"] == 2.0
    assert m["reward/mean"] == 0.5 and "rollout/turns_mean" in m and "mismatch/abs_logp_diff" in m


def test_flops_metrics_count_real_tokens_and_the_passes_that_ran(tmp_path):
    from megarl.models.flops import forward_flops, generation_flops

    r = recipe(tmp_path)
    out = phases.collect_rollouts(r, 0, Prompts().take, fake_generate([]), score_by(lambda i, j: float(j)))
    batch, _ = phases.build_batch(r, out, pad_id=0)
    batch.tokens = torch.cat([batch.tokens, torch.zeros(batch.size, 3, dtype=batch.tokens.dtype)], 1)  # more padding
    cfg = {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16,
           "num_hidden_layers": 2, "vocab_size": 32}
    lengths = [p + q for p, q in zip(batch.prompt_lengths, batch.response_lengths)]
    m = phases.flops_metrics(cfg, batch, 2, ("old_logprobs",))
    assert m["batch/tokens"] == sum(lengths) and m["batch/padded_tokens"] == batch.tokens.numel()
    assert 0 < m["batch/padding_fraction"] == 1 - sum(lengths) / batch.tokens.numel()
    forward = forward_flops(cfg, lengths)
    assert m["flops/update"] == 3 * 2 * forward and m["flops/old_logprobs"] == forward
    assert "flops/ref_logprobs" not in m and "flops/values" not in m
    assert m["flops/rollout"] == generation_flops(cfg, batch.prompt_lengths, lengths, batch.group_ids.tolist())


def test_eval_samples_one_answer_per_prompt_at_the_eval_temperature(tmp_path):
    r = recipe(tmp_path)
    s = phases.eval_sampling(r, 20)
    assert (s.n, s.temperature, s.seed) == (1, r.rollout.temperature, r.trainer.seed + phases.EVAL_SEED_OFFSET + 20)
    r.rollout.eval_n = 4
    assert phases.eval_sampling(r, 20).n == 4
    r.rollout.eval_temperature = 0.0
    assert phases.eval_sampling(r, 20).temperature == 0.0     # greedy
    assert phases.sampling_for(r, 20).temperature == r.rollout.temperature


def test_old_logprobs_come_from_the_update_only_when_it_is_exactly_on_policy(tmp_path):
    assert phases.old_logprobs_in_update(recipe(tmp_path))            # one mini-batch, one epoch, TIS
    for algorithm in ({"ppo_epochs": 2}, {"old_logprobs": "recompute"},
                      {"rollout_correction": {"mode": "token_mask"}},   # would change the mask after the weights
                      {"kl": {"coef": 0.1, "placement": "reward"}}):    # the advantages need them first
        assert not phases.old_logprobs_in_update(recipe(tmp_path, **algorithm)), algorithm
    assert phases.old_logprobs_in_update(recipe(tmp_path, kl={"coef": 0.1, "placement": "loss"}))
    two = recipe(tmp_path)
    two.derived.minibatches_per_step = 2
    assert not phases.old_logprobs_in_update(two)


def test_without_old_logprobs_the_update_gets_the_engine_logprobs(tmp_path):
    r = recipe(tmp_path)
    out = phases.collect_rollouts(r, 0, Prompts().take, fake_generate([]), score_by(lambda i, j: float(j)))
    batch, _ = phases.build_batch(r, out, pad_id=0)
    plan = phases.compute_advantages(r, batch, kl_coef=0.0)
    assert plan.is_weight is None and torch.equal(plan.train_mask, batch.mask) and plan.metrics == {}
    inputs = phases.update_inputs(batch, plan)
    assert set(inputs) == {"tokens", "mask", "rollout_logp", "advantages", "loss_weight"}
    assert torch.equal(inputs["rollout_logp"], batch.rollout_logp)


def test_a_nonfinite_reward_stops_the_step_naming_row_sample_and_function(tmp_path):
    r = recipe(tmp_path)
    rows = Prompts()
    with pytest.raises(FloatingPointError) as e:   # prompt 1, sample 0 -> flat sample 2
        phases.collect_rollouts(r, 0, rows.take, fake_generate([]),
                                score_by(lambda i, j: float("nan") if (i, j) == (1, 0) else 1.0))
    msg = str(e.value)
    assert "non-finite reward in 1 of 4 samples" in msg and "before any update" in msg
    assert "data row 2 sample 2: numeric_match=nan" in msg
    # a failed (raising) reward is not non-finite: it is masked out of the update instead
    out = phases.collect_rollouts(r, 0, Prompts().take, fake_generate([]),
                                  score_by(lambda i, j: None if (i, j) == (1, 0) else 1.0))
    assert [x.failed for x in out.results] == [False, False, True, False]


def test_nonfinite_advantages_stop_the_step(tmp_path):
    r = recipe(tmp_path)
    batch = _batch_with_logps(r, lambda i, j: float(j))
    batch.scores[1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite advantages in 2 sample\(s\) .*rows \[0, 1\]"):
        phases.compute_advantages(r, batch, kl_coef=0.0)


def test_console_line_names_reward_failures_per_component_and_function(capsys):
    from megarl.trainers.rl.driver import RLDriver

    driver = SimpleNamespace(step_count=3, recipe=SimpleNamespace(trainer=SimpleNamespace(steps=10)))
    m = {"reward/mean": 0.5, "reward/task": 0.5, "rollout/turns_mean": 2.0, "actor/pg_loss": 0.1,
         "timing/step_s": 1.0}
    RLDriver._print(driver, m)
    assert "reward failures" not in capsys.readouterr().out
    RLDriver._print(driver, {**m, "reward/failed/task/remote": 2.0, "reward/failed/task/numeric_match": 1.0})
    assert capsys.readouterr().out.rstrip().endswith("| reward failures: task/numeric_match 1, task/remote 2")
