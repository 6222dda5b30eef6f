"""One readable loop per stage. `TRAINERS` maps a recipe's `stage` to its entry point
`run(recipe) -> exit code`; a stage appears here only when its loop exists."""

from __future__ import annotations

from collections.abc import Callable

TRAINERS: dict[str, Callable] = {}
