"""Checkpoint directory conventions (no torch, no megatron: usable by drivers and launchers).

A save is written to `<path>.partial`, gets a manifest (see manifest.py) and is renamed when every
rank has finished, so a directory without the suffix is complete when written; the manifest tells
whether it is still intact.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from megarl.checkpoint.manifest import usable

PARTIAL_SUFFIX = ".partial"
EXTRA_DIR = "extra"  # per-rank state: step, data position, RNG, LR schedule


def checkpoints(root: str) -> list[str]:
    """The complete step_<N> checkpoints under `root`, newest first (unfinished saves ignored)."""
    if not os.path.isdir(root):
        return []
    steps = [d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit()]
    return [os.path.join(root, d) for d in sorted(steps, key=lambda d: int(d[5:]), reverse=True)]


def newest_verified(root: str, warn: Callable[[str], None], companions: tuple[str, ...] = ()) -> str | None:
    """The newest checkpoint under `root` that matches its manifest, together with the checkpoint of
    the same step under each of `companions` (the RL critic's); each one skipped is named in a
    warning with the reason, so a damaged newest save falls back to the one before it."""
    for path in checkpoints(root):
        parts = [path, *(os.path.join(c, os.path.basename(path)) for c in companions)]
        why = next(((p, w) for p in parts if (w := usable(p, warn)) is not None), None)
        if why is None:
            return path
        warn(f"skipping checkpoint {why[0]}: {why[1]}; trying the one before it")
    return None
