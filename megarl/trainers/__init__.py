"""One readable loop per stage. `TRAINERS` maps a recipe's `stage` to its entry point
`run(recipe) -> exit code`; a stage appears here only when its loop exists."""

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
