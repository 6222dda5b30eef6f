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


class RewardEngine:
    def __init__(self, config: RewardConfig):
        self.functions = [(f, REWARD_FUNCTIONS.get(f.name)) for f in config.functions]
        if config.reward_model is not None or config.remote is not None:
            raise NotImplementedError("reward_model and remote rewards are not implemented yet; "
                                      "use reward.functions")

    def score(self, view: TrajectoryView, metadata: dict) -> RewardResult:
        result = RewardResult(0.0, {})
        for spec, fn in self.functions:
            try:
                value = float(fn(view, metadata, **spec.args))
            except Exception as e:  # noqa: BLE001 - a broken reward must not kill the run
                result.failed = True
                result.errors.append(f"{spec.name}: {type(e).__name__}: {e}")
                continue
            result.values[spec.name] = value
            result.components[spec.component] = result.components.get(spec.component, 0.0) + spec.weight * value
            result.scalar += spec.weight * value
        if result.failed:
            result.scalar = 0.0
        return result

    def score_batch(self, views: list[TrajectoryView], metadata: list[dict]) -> tuple[list[RewardResult], dict]:
        results = [self.score(v, m) for v, m in zip(views, metadata)]
        ok = [r for r in results if not r.failed]
        metrics = {"reward/failed_frac": 1.0 - len(ok) / max(len(results), 1)}
        if ok:
            metrics["reward/mean"] = sum(r.scalar for r in ok) / len(ok)
            for name in {c for r in ok for c in r.components}:
                metrics[f"reward/{name}"] = sum(r.components.get(name, 0.0) for r in ok) / len(ok)
        return results, metrics
