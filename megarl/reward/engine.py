"""Combine reward functions with recipe weights: scalar = Σ_i w_i · f_i(trajectory), and each
component (task, format, efficiency, safety) is the sum over its functions, all kept for logging.
A function that raises marks that sample's reward as failed, with the error; the trainer leaves
failed samples out of the update and reports them."""

from __future__ import annotations

from dataclasses import dataclass, field

from megarl.config.recipe import RewardConfig
from megarl.reward.functions import REWARD_FUNCTIONS, TrajectoryView


@dataclass
class RewardResult:
    scalar: float
    components: dict[str, float]
    values: dict[str, float] = field(default_factory=dict)
    failed: bool = False
    errors: list[str] = field(default_factory=list)
    failed_in: list[str] = field(default_factory=list)  # "<component>/<function>" of each failure

    def fail(self, where: str, error: str) -> None:
        self.failed, self.scalar = True, 0.0
        self.failed_in.append(where)
        self.errors.append(f"{where.split('/', 1)[1]}: {error}")


class RewardEngine:
    def __init__(self, config: RewardConfig, rm_scorer=None):
        """`rm_scorer(list of token-id sequences) -> list of floats` is the reward-model worker
        (required when the recipe has reward.reward_model)."""
        self.functions = [(f, REWARD_FUNCTIONS.get(f.name)) for f in config.functions]
        self.remote_config = config.remote
        self.remote = None
        if config.remote is not None:
            from megarl.reward.remote import RemoteReward

            self.remote = RemoteReward(config.remote)
        self.rm_config, self.rm_scorer = config.reward_model, rm_scorer
        if config.reward_model is not None and rm_scorer is None:
            raise ValueError("reward.reward_model needs a reward-model worker (rm_scorer); the RL trainer "
                             "starts one from reward.reward_model.path")

    def score(self, view: TrajectoryView, metadata: dict) -> RewardResult:
        result = RewardResult(0.0, {})
        for spec, fn in self.functions:
            try:
                value = float(fn(view, metadata, **spec.args))
            except Exception as e:  # noqa: BLE001 - a broken reward must not kill the run
                result.fail(f"{spec.component}/{spec.name}", f"{type(e).__name__}: {e}")
                continue
            result.values[spec.name] = value
            result.components[spec.component] = result.components.get(spec.component, 0.0) + spec.weight * value
            result.scalar += spec.weight * value
        if result.failed:
            result.scalar = 0.0
        return result

    def score_batch(self, views: list[TrajectoryView], metadata: list[dict],
                    token_ids: list[list[int]] | None = None) -> tuple[list[RewardResult], dict]:
        """Score a batch; `token_ids` (prompt + response of each sample) feed the reward model."""
        results = [self.score(v, m) for v, m in zip(views, metadata)]
        if self.rm_scorer is not None:
            if token_ids is None:
                raise ValueError("the reward model scores token ids: pass token_ids")
            cfg = self.rm_config
            for result, value in zip(results, self.rm_scorer(token_ids)):
                result.values["reward_model"] = value
                result.components[cfg.component] = result.components.get(cfg.component, 0.0) + cfg.weight * value
                if not result.failed:
                    result.scalar += cfg.weight * value
        if self.remote is not None:
            cfg = self.remote_config
            for result, (value, error) in zip(results, self.remote.score(views, metadata)):
                if error is not None:
                    result.fail(f"{cfg.component}/remote", error)
                    continue
                result.values["remote"] = value
                result.components[cfg.component] = result.components.get(cfg.component, 0.0) + cfg.weight * value
                if not result.failed:
                    result.scalar += cfg.weight * value
        return results, reward_summary(results)


FAILED_PREFIX = "reward/failed/"


def failure_counts(metrics: dict) -> str:
    """The console's view of reward failures: "task/numeric_match 3, task/remote 1" ("" if none)."""
    failed = sorted((k[len(FAILED_PREFIX):], int(v)) for k, v in metrics.items() if k.startswith(FAILED_PREFIX))
    return ", ".join(f"{where} {n}" for where, n in failed)


def reward_summary(results: list[RewardResult]) -> dict[str, float]:
    """reward/failed_frac, reward/failed/<component>/<function> (how many samples that function
    failed), and over the samples that scored: reward/mean and reward/<component>."""
    ok = [r for r in results if not r.failed]
    metrics = {"reward/failed_frac": 1.0 - len(ok) / max(len(results), 1)}
    for r in results:
        for where in r.failed_in:
            metrics[f"{FAILED_PREFIX}{where}"] = metrics.get(f"{FAILED_PREFIX}{where}", 0.0) + 1.0
    if ok:
        metrics["reward/mean"] = sum(r.scalar for r in ok) / len(ok)
        for name in {c for r in ok for c in r.components}:
            metrics[f"reward/{name}"] = sum(r.components.get(name, 0.0) for r in ok) / len(ok)
    return metrics
