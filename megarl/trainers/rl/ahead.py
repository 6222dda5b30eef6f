"""Rollouts generated ahead of the step that trains on them (`trainer.rollout_mode: one_step_off`).

    sync          step k: generate on weights k ─► train ─► sync k+1 ─► ...
    one_step_off  step k: take the rollouts generated during step k-1 (on weights k-1), start
                  generating step k+1's on the engines' weights k ─► train (overlapped) ─► wait for
                  that generation ─► sync k+1 ─► ...

One-step-off-policy RL (Noukhovitch et al. 2024, "Asynchronous RLHF", arXiv:2410.18252; NeMo-RL and
verl ship it): the engines generate while the trainers train, and every sample from step 1 on is
exactly one weight version old. The policy loss keeps PPO's ratio against the current policy and
rollout correction (TIS/MIS on the engine's per-token log-probs, `algorithm.rollout_correction`)
reweights for the version lag. The weight sync waits for the generation in flight, so a rollout
never mixes versions and the engines are idle whenever a sync or an evaluation runs.

`RolloutsAhead` runs the generation (the step's whole `collect_rollouts`: prompts, engines, tools,
rewards, DAPO refills) in one background thread. What it produced and no step has trained on yet
is `ready`; the driver saves it with a checkpoint (`save` / `load`), so a resumed run trains on
exactly those rollouts and neither drops nor repeats a prompt.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

FILE = "rollouts_ahead.pkl"   # in a checkpoint's driver/ directory
FORMAT = 1


@dataclass
class Produced:
    """One step's rollouts and how long they took to make."""

    step: int                  # the step (0-based) that trains on them
    rollouts: object           # step.Rollouts
    seconds: float             # wall time of the generation, rewards included
    engine_seconds: float      # the busiest engine's time generating


class RolloutsAhead:
    def __init__(self, produce: Callable[[int], Produced]):
        """`produce(step)` makes step `step`'s rollouts (it runs in this object's thread)."""
        self._produce = produce
        self._thread: threading.Thread | None = None
        self._result: Produced | BaseException | None = None
        self.ready: Produced | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, step: int) -> None:
        """Begin generating `step`'s rollouts in the background."""
        if self.running or self.ready is not None:
            raise RuntimeError(f"rollouts for step {step} requested while step "
                               f"{(self.ready.step if self.ready else '?')}'s are still in hand")

        def body():
            try:
                self._result = self._produce(step)
            except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread by finish()
                self._result = e

        # A daemon thread: a driver that fails mid-step must still exit while a generation is stuck
        # on engines that are being torn down.
        self._thread = threading.Thread(target=body, name=f"megarl-rollouts-step{step}", daemon=True)
        self._thread.start()

    def finish(self) -> float:
        """Wait for the generation in flight (if any) -> seconds waited. Its error is raised here."""
        if self._thread is None:
            return 0.0
        t0 = time.perf_counter()
        self._thread.join()
        self._thread, result, self._result = None, self._result, None
        if isinstance(result, BaseException):
            raise result
        self.ready = result
        return time.perf_counter() - t0

    def take(self, step: int) -> Produced | None:
        """Step `step`'s rollouts if they were generated ahead (waiting for them), else None."""
        self.finish()
        if self.ready is None:
            return None
        if self.ready.step != step:
            raise RuntimeError(f"the rollouts generated ahead are for step {self.ready.step}, not step {step}")
        out, self.ready = self.ready, None
        return out

    # ---- checkpoints --------------------------------------------------------------------------
    def state(self) -> bytes | None:
        """What a checkpoint keeps: the rollouts generated and not yet trained on (None if none).
        Called between steps, when no generation is in flight."""
        if self.running:
            raise RuntimeError("a checkpoint was asked for while rollouts are being generated")
        return None if self.ready is None else pickle.dumps({"format": FORMAT, "produced": self.ready})

    def load(self, blob: bytes, step: int) -> None:
        """Restore `state()` taken at `step` (the step that trains on it next)."""
        saved = pickle.loads(blob)
        if saved.get("format") != FORMAT or saved["produced"].step != step:
            raise RuntimeError(f"the checkpoint's buffered rollouts (format {saved.get('format')}, step "
                               f"{saved['produced'].step}) do not belong to step {step}")
        self.ready = saved["produced"]
