"""The phases of one RL step as functions of plain inputs, so each is testable without Ray, vLLM or
megatron (tests pass a fake `generate` and a fake `score`):

    collect_rollouts   prompts -> groups of trajectories with rewards (DAPO refill, overlong shaping)
    build_batch        kept groups -> `TrajectoryBatch` (failed rewards and filtered samples masked out)
    reference_kl       old vs reference log-probs -> KL metrics
    compute_advantages scores / token rewards / values -> advantages, returns, rollout correction,
                       per-token loss weights of each mini-batch
    update_inputs      what the actor's `update` receives
    step_metrics       the step's metrics in one dict

The driver (`driver.py`) calls them in this order and owns everything stateful.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megarl.config.recipe import Recipe


@dataclass
class Group:
    """One prompt's samples with their rewards."""

    prompt: object                  # a PromptRow (prompt_ids, metadata)
    trajectories: list
    results: list                   # RewardResult per trajectory
    scores: torch.Tensor            # [n] scalar reward (+ overlong shaping)
    informative: bool               # rewards not all equal (DAPO dynamic sampling keeps these)


@dataclass
class Rollouts:
    """The groups a step trains on, in order, and how they were collected."""

    groups: list[Group]
    rounds: int = 0
    first_round_informative: float = 1.0
    reward_seconds: float = 0.0
    filtered: list[Group] = field(default_factory=list)   # sampled, left out by dynamic sampling

    @property
    def trajectories(self) -> list:
        return [x for g in self.groups for x in g.trajectories]

    @property
    def group_ids(self) -> list[int]:
        return [i for i, g in enumerate(self.groups) for _ in g.trajectories]

    @property
    def results(self) -> list:
        return [r for g in self.groups for r in g.results]

    @property
    def scores(self) -> torch.Tensor:
        return torch.cat([g.scores for g in self.groups])


EVAL_SEED_OFFSET = 10_000


def sampling_for(recipe: Recipe, step: int, round_: int = 0):
    """The step's sampling settings; the seed differs per step and per refill round (the engine
    derives each request's seed from it and the prompt)."""
    from megarl.rollout.engine import SamplingConfig

    ro = recipe.rollout
    return SamplingConfig(n=ro.n, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                          max_tokens=ro.max_response_length, seed=recipe.trainer.seed + 1000 * round_ + step)


def eval_sampling(recipe: Recipe, step: int):
    """`rollout.eval_n` answers per held-out prompt at `rollout.eval_temperature` (0 = greedy)."""
    from megarl.rollout.engine import SamplingConfig

    ro = recipe.rollout
    temperature = ro.temperature if ro.eval_temperature is None else ro.eval_temperature
    return SamplingConfig(n=ro.eval_n, temperature=temperature, top_p=ro.top_p, top_k=ro.top_k,
                          max_tokens=ro.max_response_length, seed=recipe.trainer.seed + EVAL_SEED_OFFSET + step)


def collect_rollouts(recipe: Recipe, step: int, take: Callable[[int], list], generate: Callable,
                     score: Callable) -> Rollouts:
    """`prompts_per_step` groups of `rollout.n` samples. With DAPO dynamic sampling, groups whose
    rewards are all equal (no learning signal) are set aside and up to
    `dynamic_sampling_max_rounds` extra rounds sample fresh prompts to replace them; if still
    short, set-aside groups fill the batch (zero advantage) so its size stays fixed.

    take(k) -> k prompt rows; generate(prompt_ids, sampling) -> groups of trajectories;
    score(trajectories, metadata) -> one RewardResult per trajectory."""
    a, want = recipe.algorithm, recipe.trainer.prompts_per_step
    kept: list[Group] = []
    spare: list[Group] = []
    out = Rollouts([])
    candidates = take(want)
    while True:
        groups = generate([p.prompt_ids for p in candidates], sampling_for(recipe, step, out.rounds))
        t0 = time.perf_counter()
        scored = score_groups(recipe, candidates, groups, score)
        out.reward_seconds += time.perf_counter() - t0
        if out.rounds == 0:
            out.first_round_informative = sum(g.informative for g in scored) / max(len(scored), 1)
        for g in scored:
            (kept if g.informative or not a.dynamic_sampling else spare).append(g)
        short = want - len(kept)
        if short <= 0 or out.rounds >= a.dynamic_sampling_max_rounds:
            break
        out.rounds += 1
        candidates = take(short)
    out.groups, out.filtered = fill_with_set_aside(kept, spare, want)
    return out


def fill_with_set_aside(kept: list, spare: list, want: int) -> tuple[list, list]:
    """DAPO's batch: the informative groups, then set-aside (uninformative) ones up to `want` so
    the batch size stays fixed -> (the batch, the set-aside groups left out)."""
    fill = max(0, want - len(kept))
    return kept + spare[:fill], spare[fill:]


def oldest_version(trajectories: list) -> int:
    """The oldest weight version that sampled any token of these trajectories (a group's staleness
    is measured from it)."""
    return min(min(x.weight_versions) for x in trajectories)


def score_groups(recipe: Recipe, prompts: list, groups: list[list], score: Callable) -> list[Group]:
    """Rewards of every sample (one batched call), DAPO's overlong shaping, and which groups carry
    a learning signal."""
    from megarl.algorithms.filtering import informative_groups, overlong_penalty

    ro, ov = recipe.rollout, recipe.algorithm.overlong
    flat = [x for g in groups for x in g]
    gids = [i for i, g in enumerate(groups) for _ in g]
    results = score(flat, [prompts[i].metadata for i in gids])
    check_finite_rewards(results, [prompts[i].row for i in gids])
    scores = torch.tensor([r.scalar for r in results], dtype=torch.float32)
    if ov.mode == "shaping":
        lengths = torch.tensor([len(x.response_ids) for x in flat])
        scores = scores + overlong_penalty(lengths, ro.max_response_length, ov.buffer, ov.penalty)
    informative = informative_groups(scores, torch.tensor(gids))
    out = []
    for i, (prompt, trajs) in enumerate(zip(prompts, groups)):
        rows = [j for j, gid in enumerate(gids) if gid == i]
        out.append(Group(prompt, trajs, [results[j] for j in rows], scores[rows], bool(informative[rows[0]])))
    return out


def check_finite_rewards(results: list, rows: list[int], shown: int = 5) -> None:
    """Stop the step, before any update, when a sample's reward is NaN or infinite: naming the data
    row, the sample and each non-finite reward function. (A reward function that raises marks its
    sample failed instead; a NaN it returns would otherwise train every weight into NaN.)"""
    bad = []
    for j, (r, row) in enumerate(zip(results, rows)):
        named = {k: v for k, v in r.values.items() if not math.isfinite(v)}
        if not r.failed and (named or not math.isfinite(r.scalar)):
            bad.append(f"data row {row} sample {j}: " + (", ".join(f"{k}={v}" for k, v in named.items())
                                                          or f"total reward {r.scalar}"))
    if bad:
        more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
        raise FloatingPointError(f"non-finite reward in {len(bad)} of {len(results)} samples, the step is stopped "
                                 f"before any update: {'; '.join(bad[:shown])}{more}. Fix the reward function "
                                 "(or make it raise: a failed reward leaves its sample out of the update)")


def check_finite(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    """Stop the step when `values` (e.g. advantages) are NaN or infinite on a trained token, naming
    the samples."""
    bad = (~torch.isfinite(values) & (mask > 0)).any(-1).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(f"non-finite {name} in {len(bad)} sample(s) of the batch (rows {bad[:10]}), the "
                                 "step is stopped before any update")


def sequence_multiple(recipe: Recipe) -> int:
    """Model inputs are padded to a multiple of this (sequence- and context-parallel splits)."""
    p = recipe.parallel
    return p.tp * p.cp * 2 if (p.sp or p.cp > 1) else 1


def build_batch(recipe: Recipe, rollouts: Rollouts, pad_id: int):
    """(TrajectoryBatch, reward metrics). Samples whose reward failed are left out of the update
    (and reported); with DAPO overlong filtering, truncated samples are too (they teach nothing
    about the answer)."""
    from megarl.reward.engine import reward_summary
    from megarl.rollout.batch import TrajectoryBatch

    a = recipe.algorithm
    trajs, results = rollouts.trajectories, rollouts.results
    batch = TrajectoryBatch.from_trajectories(trajs, rollouts.group_ids, pad_id, sequence_multiple(recipe))
    batch.scores = rollouts.scores
    batch.reward_failed = [r.failed for r in results]
    batch.mask[torch.tensor(batch.reward_failed, dtype=torch.bool)] = 0.0
    metrics = reward_summary(results)
    if a.dynamic_sampling:
        metrics["dynamic_sampling/rounds"] = float(rollouts.rounds)
        metrics["dynamic_sampling/informative_frac_first_round"] = rollouts.first_round_informative
    if a.overlong.mode == "filter":
        truncated = torch.tensor([x.finish in ("length", "max_total_tokens") for x in trajs])
        batch.mask[truncated] = 0.0
        metrics["overlong/filtered_frac"] = float(truncated.float().mean())
    return batch, metrics


def reference_kl(recipe: Recipe, batch, kl_coef: float) -> dict[str, float]:
    """Mean per-token KL of the sampling policy to the reference (the adaptive controller's input)."""
    from megarl.algorithms.kl import token_kl
    from megarl.algorithms.masked import masked_mean

    k = recipe.algorithm.kl
    kl = token_kl(batch.old_logp, batch.ref_logp, k.estimator, k.clamp)
    return {"kl/ref_mean": float(masked_mean(kl, batch.mask)), "kl/coef": kl_coef}


def old_logprobs_in_update(recipe: Recipe) -> bool:
    """Whether the update's own forward provides the old log-probs (`algorithm.old_logprobs: auto`
    and the update exactly on-policy), so no separate pass runs before it."""
    from megarl.algorithms.correction import REWEIGHTING_MODES

    a = recipe.algorithm
    kl_in_reward = a.kl.placement == "reward" and a.kl.coef > 0  # needs old log-probs before the advantages
    return (a.old_logprobs == "auto" and a.ppo_epochs == 1 and recipe.derived.minibatches_per_step == 1
            and a.rollout_correction.mode in REWEIGHTING_MODES and not kl_in_reward)


@dataclass
class UpdatePlan:
    """What the policy update needs beyond the batch: rollout-correction weights and mask, and the
    per-token loss weights that make each mini-batch's aggregation exact."""

    is_weight: torch.Tensor | None   # None: the update computes it (old log-probs from its own forward)
    train_mask: torch.Tensor
    loss_weight: torch.Tensor
    metrics: dict = field(default_factory=dict)


def compute_advantages(recipe: Recipe, batch, kl_coef: float) -> UpdatePlan:
    """Fills batch.advantages / batch.returns with the recipe's estimator (KL in the reward when
    `kl.placement: reward`; PPO's GAE advantages whitened over the batch), then the rollout
    correction against the engine's log-probs and the loss weights of every mini-batch."""
    from megarl.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, estimator_kwargs
    from megarl.algorithms.correction import MISMATCH_KEYS, mismatch_metrics, rollout_correction
    from megarl.algorithms.masked import masked_whiten
    from megarl.algorithms.policy_loss import minibatch_loss_weights

    a = recipe.algorithm
    inputs = AdvantageInputs(batch.mask, scores=batch.scores, group_ids=batch.group_ids,
                             token_rewards=_kl_token_rewards(recipe, batch, kl_coef), values=batch.values)
    kwargs = estimator_kwargs(a.advantage_estimator, gamma=a.gamma, lam=a.lam, norm_adv_by_std=a.norm_adv_by_std)
    batch.advantages, batch.returns = ADVANTAGE_ESTIMATORS.get(a.advantage_estimator)(inputs, **kwargs)
    if a.advantage_estimator == "gae":  # PPO: whiten GAE advantages over the batch's trained tokens
        batch.advantages = masked_whiten(batch.advantages, batch.mask) * batch.mask
    check_finite("advantages", batch.advantages, batch.mask)
    rc, metrics = a.rollout_correction, {}
    if batch.old_logp is None:  # the update's own forward gives them; it applies the correction too
        is_weight, train_mask = None, batch.mask
    else:
        is_weight, train_mask = rollout_correction(batch.old_logp, batch.rollout_logp, batch.mask, rc.mode,
                                                   rc.threshold)
        mismatch = mismatch_metrics(batch.old_logp, batch.rollout_logp, batch.mask, rc.threshold)
        metrics = {MISMATCH_KEYS[k]: float(v) for k, v in mismatch.items()}
    weights = minibatch_loss_weights(train_mask, recipe.derived.minibatches_per_step, a.loss_agg_mode,
                                     recipe.rollout.max_response_length)
    return UpdatePlan(is_weight, train_mask, weights, metrics)


def _kl_token_rewards(recipe: Recipe, batch, kl_coef: float) -> torch.Tensor | None:
    """r_t = score·[t = last] − β·KL_t when the KL penalty sits in the reward, else None."""
    from megarl.algorithms.advantages import scores_to_token_rewards
    from megarl.algorithms.kl import kl_penalized_rewards, token_kl

    k = recipe.algorithm.kl
    if batch.ref_logp is None or k.placement != "reward":
        return None
    kl = token_kl(batch.old_logp, batch.ref_logp, k.estimator, k.clamp)
    return kl_penalized_rewards(scores_to_token_rewards(batch.scores, batch.mask), kl, kl_coef, batch.mask)


def update_inputs(batch, plan: UpdatePlan) -> dict[str, torch.Tensor]:
    """The actor's `update` batch: with old log-probs and correction weights, or (when the update
    computes them) the engine's log-probs instead."""
    out = {"tokens": batch.tokens, "mask": plan.train_mask, "advantages": batch.advantages,
           "loss_weight": plan.loss_weight}
    if batch.old_logp is None:
        out["rollout_logp"] = batch.rollout_logp
    else:
        out.update(old_logp=batch.old_logp, is_weight=plan.is_weight)
    if batch.ref_logp is not None:
        out["ref_logp"] = batch.ref_logp
    return out


def critic_inputs(batch) -> dict[str, torch.Tensor]:
    return {"tokens": batch.tokens, "mask": batch.mask, "values": batch.values, "returns": batch.returns}


def step_metrics(batch, rollouts: Rollouts, timings: dict[str, float], entropy: torch.Tensor | None,
                 *parts: dict, generate_seconds: float | None = None) -> dict[str, float]:
    """Every metric of a step: the phases' own (`parts`), timings, throughput, advantages,
    response lengths, the rollout's entropy, and each reward function's mean. Generation
    throughput uses `generate_seconds` (rollouts generated ahead) or the rollout phase's time."""
    from megarl.algorithms.masked import masked_mean
    from megarl.rollout.metrics import rollout_metrics

    step_s = timings["timing/step_s"]
    seconds = timings["timing/rollout_s"] if generate_seconds is None else generate_seconds
    m: dict[str, float] = {**rollout_metrics(rollouts.trajectories, seconds)}
    for part in parts:
        m.update(part)
    m.update(timings)
    m.update({"throughput/trained_tokens_per_s": float(batch.mask.sum()) / step_s,
              "throughput/samples_per_s": batch.size / step_s,
              "adv/mean": float(masked_mean(batch.advantages, batch.mask)),
              "adv/abs_mean": float(masked_mean(batch.advantages.abs(), batch.mask)),
              "response/length_mean": sum(batch.response_lengths) / batch.size,
              "response/length_max": float(max(batch.response_lengths)),
              "weight_version/min": float(min(batch.weight_versions))})
    if entropy is not None:
        m["actor/entropy_rollout"] = float(masked_mean(entropy, batch.mask))
    results = rollouts.results
    for name, value in ((n, v) for r in results for n, v in r.values.items()):
        m[f"reward_fn/{name}"] = m.get(f"reward_fn/{name}", 0.0) + value / len(results)
    return m


def staleness_metrics(batch, trajectories: list, trainer_version: int, generate_seconds: float,
                      ahead: bool) -> dict[str, float]:
    """How old the trained samples are: version lag = the weights being updated (`trainer_version`)
    minus the oldest weights that sampled a token of the sample (min / mean / max over the batch),
    the generated tokens by lag, and whether and for how long generation overlapped training."""
    lags = [trainer_version - v for v in batch.weight_versions]
    out = {"async/staleness_min": float(min(lags)), "async/staleness_mean": sum(lags) / len(lags),
           "async/staleness_max": float(max(lags)), "async/generated_ahead": float(ahead),
           "async/generate_s": generate_seconds}
    for lag, t in zip(lags, trajectories):
        key = f"async/tokens_lag_{lag}"
        out[key] = out.get(key, 0.0) + float(sum(t.loss_mask))
    return out


def flops_metrics(hf_cfg: dict, batch, ppo_epochs: int, passes: tuple[str, ...]) -> dict[str, float]:
    """Model FLOPs of the step's phases from the real token counts (`megarl.models.flops`), and the
    batch's padding: `flops/update` (forward + backward per epoch), `flops/<pass>` for each
    forward-only pass that ran (old_logprobs, ref_logprobs, values), `flops/rollout` (generation
    with each group's prompt computed once)."""
    from megarl.models.flops import forward_flops, generation_flops

    lengths = [p + r for p, r in zip(batch.prompt_lengths, batch.response_lengths)]
    forward = forward_flops(hf_cfg, lengths)
    out = {"flops/update": 3 * forward * ppo_epochs,
           "flops/rollout": generation_flops(hf_cfg, batch.prompt_lengths, lengths, batch.group_ids.tolist()),
           "batch/tokens": float(sum(lengths)), "batch/padded_tokens": float(batch.tokens.numel())}
    out["batch/padding_fraction"] = 1.0 - out["batch/tokens"] / out["batch/padded_tokens"]
    for name in passes:
        out[f"flops/{name}"] = forward
    return out
