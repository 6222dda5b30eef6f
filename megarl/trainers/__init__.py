"""One readable loop per stage. `TRAINERS` maps a recipe's `stage` to its entry point
`run(recipe) -> exit code`. `RAY_STAGES` run a driver that orchestrates Ray actors; the others
run megatron ranks directly (local gloo ranks, or one process per rank under the launcher), and
`prepare_start` converts their starting model once before the ranks start."""

from __future__ import annotations

from collections.abc import Callable


def _sft(recipe) -> int:
    from megarl.trainers.sft import run

    return run(recipe)


def _rl(recipe) -> int:
    from megarl.trainers.rl import run

    return run(recipe)


def _preference(recipe) -> int:
    from megarl.trainers.preference import run

    return run(recipe)


TRAINERS: dict[str, Callable] = {"sft": _sft, "grpo": _rl, "ppo": _rl, "dpo": _preference, "kto": _preference,
                                 "rm": _preference}


RAY_STAGES = ("grpo", "ppo")


def prepare_start(recipe) -> str:
    """The starting megatron checkpoint of a non-Ray stage, made once (by the launcher, before it
    starts one process per rank, so that the ranks never convert concurrently)."""
    if recipe.stage == "sft":
        from megarl.trainers.sft import prepare
    else:
        from megarl.trainers.preference import prepare
    return prepare(recipe)
