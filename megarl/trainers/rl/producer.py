"""Fully asynchronous rollouts (`trainer.rollout_mode: async`): a producer thread keeps the engines
generating while the trainer trains, under a staleness bound in weight versions.

    producer  round r: take prompts_per_step prompts ─► agent loop on the engines ─► rewards ─► buffer
    trainer   take prompts_per_step groups from the buffer ─► train ─► weight sync ─► ...

The weight sync (and an evaluation) gets the engines between two engine calls of the producer
(`EngineGate`): the trainer waits at most for the call in flight, and a multi-turn trajectory whose
next turn comes after a sync continues on the new weights — a partial rollout, each token tagged
with the version that sampled it (`Trajectory.token_versions`), so rollout correction (TIS/MIS on
the engine's per-token log-probs) sees exactly which policy sampled each token.

A group trained at weight version V is V − (the oldest version that sampled any of its tokens)
versions stale; `trainer.max_staleness` bounds it (`trainer.stale_policy`):
- wait: a round starts only once the engines hold version ≥ (the latest step that can train it) −
  max_staleness, so no group ever exceeds the bound and none is dropped. Without dynamic sampling
  every step takes one round, round r is trained at step r, and this is AReaL's admission rule
  (round r waits for version r − max_staleness: Fu et al. 2025, "AReaL: A Large-Scale Asynchronous
  Reinforcement Learning System", arXiv:2505.24298); with it a step may take several rounds, and
  the latest step that can train a group follows from the groups queued before it (`_latest_step`).
- drop: the producer runs ahead up to the buffer's capacity; the trainer drops groups over the
  bound (counted in `async/dropped_groups`) and their prompts are generated again, so no prompt is
  lost.
Either way the buffer holds at most (max_staleness + 1) rounds.

DAPO dynamic sampling (`algorithm.dynamic_sampling`): the trainer keeps the groups whose rewards
differ and sets the others aside, taking groups until it has prompts_per_step informative ones or
has looked at (1 + dynamic_sampling_max_rounds) rounds' worth; then set-aside groups fill the batch
(zero advantage), as in a synchronous step, and the rest are reported as filtered (their prompts
were used, in prompts.jsonl's `filtered_rows`).

Checkpoints: `snapshot()` is the finished groups in the buffer (with their versions), the prompts
waiting to be generated again, and the data position from before the round in flight, whose
prompts a resumed run generates again: it neither drops nor repeats a prompt.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from megarl.trainers.rl.step import fill_with_set_aside, oldest_version

FILE = "rollout_buffer.pkl"   # in a checkpoint's driver/ directory
FORMAT = 1


class EngineGate:
    """The producer's engine calls pass the gate one by one; the trainer can close it to have the
    engines to itself (weight sync, evaluation) as soon as the call in flight returns."""

    def __init__(self):
        self._cond = threading.Condition()
        self._calls = 0
        self._closed = False
        self.producer_blocked_s = 0.0

    def enter(self) -> None:
        with self._cond:
            t0 = time.perf_counter()
            while self._closed:
                self._cond.wait()
            self.producer_blocked_s += time.perf_counter() - t0
            self._calls += 1

    def leave(self) -> None:
        with self._cond:
            self._calls -= 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def call(self):
        self.enter()
        try:
            yield
        finally:
            self.leave()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._closed = True
            while self._calls:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


class GatedEngine:
    """The fleet as the producer's agent loop sees it: each engine call (a lock-step batch or a
    per-trajectory turn) passes the gate."""

    def __init__(self, fleet, gate: EngineGate):
        self.fleet, self.gate = fleet, gate

    def generate(self, *args, **kwargs):
        with self.gate.call():
            return self.fleet.generate(*args, **kwargs)

    async def turn(self, *args, **kwargs):
        import asyncio

        await asyncio.to_thread(self.gate.enter)
        try:
            return await self.fleet.turn(*args, **kwargs)
        finally:
            self.gate.leave()


@dataclass
class BufferedGroup:
    group: object        # step.Group
    round: int           # the production round (its sampling seed)
    min_version: int     # the oldest weights that sampled any of its tokens
    seconds: float       # wall time of its round (generation and rewards)
    engine_seconds: float = 0.0   # the busiest engine's time generating its round


@dataclass
class Taken:
    """One step's groups from the buffer (trained in this order) and what dynamic sampling did."""

    groups: list[BufferedGroup]
    filtered: list[BufferedGroup]      # looked at, not informative, not needed to fill the batch
    rounds: int = 0                    # extra rounds' worth looked at (0: the first round sufficed)
    first_round_informative: float = 1.0


class AsyncRollouts:
    def __init__(self, per_round: int, max_staleness: int, policy: str, sampler, rows: Callable[[list[int]], list],
                 produce: Callable[[int, list], list], engine_version: Callable[[], int], next_step: int = 0,
                 dynamic_rounds: int | None = None, engine_clock: Callable[[], float] = lambda: 0.0):
        """`produce(round, prompts)` -> scored groups (runs in the producer thread);
        `rows(indices)` -> prompts; `engine_version()` -> the weights the engines hold; `next_step`
        -> the step the trainer takes groups for next; `dynamic_rounds` -> DAPO dynamic sampling's
        extra rounds (None: off); `engine_clock()` -> the engines' generating seconds so far."""
        self.per_round, self.bound, self.policy = per_round, max_staleness, policy
        self.dynamic_rounds = dynamic_rounds
        self.capacity = (max_staleness + 1) * per_round
        self.next_step = next_step     # the step whose batch the trainer takes next (or is taking)
        self.still_needed = per_round  # groups that step certainly takes before it can end
        self.sampler, self._rows, self._produce, self._engine_version = sampler, rows, produce, engine_version
        self._engine_clock = engine_clock
        self.buffer: deque[BufferedGroup] = deque()
        self.requeue: list = []
        self.rounds = 0
        self.dropped = 0
        self.producer_idle_s = 0.0
        self._inflight: tuple[dict, list] | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ---- producer -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="megarl-rollout-producer", daemon=True)
        self._thread.start()

    def _admitted(self) -> bool:
        if len(self.buffer) + self.per_round > self.capacity:
            return False
        return self.policy == "drop" or self._engine_version() >= self._latest_step() - self.bound

    def _latest_step(self) -> int:
        """The latest step that can train the last group of a round started now: the step being
        taken takes at least the groups it still needs, every later step at least a round's worth
        (more when dynamic sampling sets groups aside, which only makes a group's step earlier)."""
        ahead = len(self.buffer) + self.per_round - 1          # groups queued before the round's last
        if ahead < self.still_needed:
            return self.next_step
        return self.next_step + 1 + (ahead - self.still_needed) // self.per_round

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    t0 = time.perf_counter()
                    while not self._stop and not self._admitted():
                        self._cond.wait()
                    self.producer_idle_s += time.perf_counter() - t0
                    if self._stop:
                        return
                    r, prompts = self.rounds, self._take_prompts()
                t0, engine0 = time.perf_counter(), self._engine_clock()
                groups = self._produce(r, prompts)
                seconds, engine_seconds = time.perf_counter() - t0, self._engine_clock() - engine0
                with self._cond:
                    self.buffer.extend(BufferedGroup(g, r, oldest_version(g.trajectories), seconds, engine_seconds)
                                       for g in groups)
                    self.rounds, self._inflight = r + 1, None
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - raised in the trainer's thread by take()
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _take_prompts(self) -> list:
        """The next round's prompts: those to generate again first, then the data's next rows; the
        position before them is what a checkpoint records while they are in flight."""
        again, self.requeue = self.requeue[:self.per_round], self.requeue[self.per_round:]
        self._inflight = (self.sampler.state_dict(), again)
        return again + self._rows(self.sampler.take(self.per_round - len(again)))

    # ---- trainer --------------------------------------------------------------------------------
    def take(self, trainer_version: int) -> tuple[Taken, dict[str, float]]:
        """prompts_per_step groups no more than max_staleness versions old (waiting for them;
        informative ones first under dynamic sampling) -> (them, async/* metrics)."""
        kept: list[BufferedGroup] = []
        spare: list[BufferedGroup] = []
        looked, first_informative = 0, 0
        limit = self.per_round * (1 + (self.dynamic_rounds or 0))
        with self._cond:
            t0, dropped_before = time.perf_counter(), self.dropped
            self.next_step, self.still_needed = trainer_version, self.per_round
            while len(kept) < self.per_round and looked < limit:
                while not self.buffer and self._error is None:
                    self._cond.wait()
                if self._error is not None:
                    raise self._error
                b = self.buffer.popleft()
                if trainer_version - b.min_version > self.bound:
                    self.dropped += 1
                    self.requeue.append(b.group.prompt)
                    self._cond.notify_all()
                    continue
                informative = self.dynamic_rounds is None or b.group.informative
                if informative and looked < self.per_round:
                    first_informative += 1
                looked += 1
                (kept if informative else spare).append(b)
                # the groups this step still takes for certain: until it has enough or has looked at its limit
                self.still_needed = min(self.per_round - len(kept), limit - looked)
                self._cond.notify_all()
            taken = Taken(*fill_with_set_aside(kept, spare, self.per_round), -(-looked // self.per_round) - 1,
                          first_informative / self.per_round)
            self.next_step, self.still_needed = trainer_version + 1, self.per_round
            self._cond.notify_all()
            metrics = {"async/trainer_wait_s": time.perf_counter() - t0, "async/buffer_groups": float(len(self.buffer)),
                       "async/buffer_fill": len(self.buffer) / self.capacity,
                       "async/dropped_groups": float(self.dropped - dropped_before),
                       "async/filtered_groups": float(len(taken.filtered)),
                       "async/producer_idle_s": self.producer_idle_s}
            self.producer_idle_s = 0.0
        return taken, metrics

    def weights_updated(self) -> None:
        """The engines hold new weights: a round waiting for them may start."""
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    # ---- checkpoints --------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict, bytes]:
        """(the data position to save, the buffer's state): finished groups, prompts to generate
        again, and the position from before the round in flight."""
        with self._cond:
            sampler, again = self._inflight or (self.sampler.state_dict(), [])
            state = {"format": FORMAT, "buffer": list(self.buffer), "requeue": again + self.requeue,
                     "rounds": self.rounds, "dropped": self.dropped}
            return sampler, pickle.dumps(state)

    def load(self, blob: bytes) -> None:
        """Restore `snapshot()`'s buffer (the data position is restored with the driver's state)."""
        state = pickle.loads(blob)
        if state.get("format") != FORMAT:
            raise RuntimeError(f"the checkpoint's rollout buffer has format {state.get('format')}, expected {FORMAT}")
        self.buffer, self.requeue = deque(state["buffer"]), state["requeue"]
        self.rounds, self.dropped = state["rounds"], state["dropped"]
