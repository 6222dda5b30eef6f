"""Checkpoint directory conventions (no torch, no megatron: usable by drivers and launchers).

A save is written to `<path>.partial` and renamed when every rank has finished, so a directory
without the suffix is always complete.
"""

from __future__ import annotations

import os

PARTIAL_SUFFIX = ".partial"
EXTRA_DIR = "extra"  # per-rank state: step, data position, RNG, LR schedule


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under `root` (step_<N> directories; unfinished saves ignored)."""
    if not os.path.isdir(root):
        return None
    steps = [d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit()]
    return os.path.join(root, max(steps, key=lambda d: int(d[5:]))) if steps else None
