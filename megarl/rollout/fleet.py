"""`RolloutFleet`: K vLLM engines as Ray actors behind the `RolloutEngine` interface.

Requests are cut into chunks and handed out continuously: each engine gets a new chunk the moment
it returns one, so a slow chunk never idles the other engines (no lock-step). An engine that dies
is restarted, reloaded with the current weights, and its chunk retried; the caller sees it in
`events` and in the returned metrics — never a hang or a silent loss. The per-trajectory agent
loop sends single turns instead (`turn`): each engine actor takes many at once (a threaded actor)
and batches them continuously (`RolloutEngine.generate_turn`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from megarl.rollout.engine import Completion, EngineConfig, SamplingConfig


class EngineActorImpl:
    """Runs inside a Ray worker process: one in-process vLLM engine."""

    def __init__(self, config: EngineConfig):
        from megarl.rollout.engine import RolloutEngine
        from megarl.runtime.device import pin_to_slot

        pin_to_slot()   # before vLLM starts its threads (cluster.cpu_pinning)
        self.engine = RolloutEngine(config)

    def generate(self, prompts, sampling, max_tokens_each=None):
        """(completions, seconds inside the engine)."""
        t0 = time.perf_counter()
        out = self.engine.generate(prompts, sampling, max_tokens_each)
        return out, time.perf_counter() - t0

    def generate_turn(self, prompt, sampling, max_tokens):
        """(one prompt's completions, the engine's seconds stepping turns so far)."""
        out = self.engine.generate_turn(prompt, sampling, max_tokens)
        return out, self.engine.stream_busy_seconds

    def load_weights(self, named_tensors, version: int) -> int:
        self.engine.load_weights(named_tensors, version)
        return version

    def join_weight_sync(self, plan, rendezvous, engine_index: int, generation: int):
        return self.engine.join_weight_sync(plan, rendezvous, engine_index, generation)

    def receive_weights(self, version: int) -> dict:
        return self.engine.receive_weights(version)

    def prompt_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        return [self.engine.prompt_logprobs(s) for s in seqs]

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self, what: tuple[str, ...]) -> None:
        self.engine.wake(what)

    def pid(self) -> int:
        import os

        return os.getpid()

    def threads(self) -> int:
        """The OpenMP threads the engine computes with (its slot's share, or its node's cores)."""
        return self.engine.threads


TURNS_PER_ENGINE = 1024   # concurrent `turn` calls an engine actor takes (vLLM batches them)


class EngineLost(RuntimeError):
    """An engine died while the fleet is part of a weight-sync group: a restarted engine would
    hold stale weights and cannot join the running group, so the step stops here."""


@dataclass
class FleetEvent:
    time: float
    engine: int
    what: str


class RolloutFleet:
    def __init__(self, config: EngineConfig, num_engines: int, cpus_per_engine: float = 1.0,
                 max_restarts: int = 3, chunk_size: int | None = None, chunks_per_engine: int = 2,
                 engine_options: list[dict] | None = None, wait: bool = True):
        """`engine_options[e]`: Ray actor options of engine e (its placement-group bundle and share);
        without them each engine asks for `cpus_per_engine` wherever Ray puts it. `wait=False`
        returns while the engines start (the caller builds other workers meanwhile, then calls
        `wait_ready`)."""
        import ray

        self.config, self.num_engines = config, num_engines
        # Fewer, larger chunks keep vLLM's own batching full; more chunks balance uneven engines.
        self.chunk_size, self.chunks_per_engine, self.max_restarts = chunk_size, chunks_per_engine, max_restarts
        # threaded: the per-trajectory loop has many turns in flight on each engine at once
        self._actor_cls = ray.remote(max_concurrency=TURNS_PER_ENGINE)(EngineActorImpl)
        self._options = engine_options or [{"num_cpus": cpus_per_engine}] * num_engines
        self.actors = [self._new_actor(e) for e in range(num_engines)]
        self._starting = [a.threads.remote() for a in self.actors]
        self.threads: list[int] = []   # each engine's OpenMP threads, once ready
        if wait:
            self.wait_ready()
        self.weight_version = 0
        self._weights_ref = None
        self.restarts = 0
        self.events: list[FleetEvent] = []
        self.in_sync_group = False
        self._batch_seconds = 0.0  # wall time the busiest engine spent on batches (model compute)
        self._turn_seconds = [0.0] * num_engines   # each engine's seconds stepping single turns

    def wait_ready(self) -> None:
        """Return once every engine is up (or raise the error of one that failed to start)."""
        import ray

        if self._starting:
            self.threads = ray.get(self._starting)
            self._starting = []

    @property
    def engine_seconds(self) -> float:
        """Seconds the busiest engine spent generating (batches, plus the busiest engine's turns)."""
        return self._batch_seconds + max(self._turn_seconds, default=0.0)

    def _new_actor(self, index: int):
        return self._actor_cls.options(**self._options[index]).remote(self.config)

    def _restart(self, index: int, reason: str) -> None:
        import ray

        if self.in_sync_group:
            self.events.append(FleetEvent(time.time(), index, f"lost: {reason}"))
            raise EngineLost(f"rollout engine {index} died ({reason}) during a step; a restarted engine would "
                             "sample from stale weights and cannot join the running weight-sync group, so the run "
                             "stops here. Restart it: with trainer.resume=auto it continues from the last "
                             "checkpoint")
        if self.restarts >= self.max_restarts:
            raise RuntimeError(f"rollout engine {index} died ({reason}) and the restart budget "
                               f"({self.max_restarts}) is used up")
        self.restarts += 1
        self.events.append(FleetEvent(time.time(), index, f"restarted after: {reason}"))
        try:
            ray.kill(self.actors[index])
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        actor = self._new_actor(index)  # on the same bundle: the placement map stays true
        if self._weights_ref is not None:
            ray.get(actor.load_weights.remote(self._weights_ref, self.weight_version))
        self.actors[index] = actor

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 max_tokens_each: list[int] | None = None) -> list[list[Completion]]:
        """Same contract as RolloutEngine.generate, spread over the engines."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        size = self.chunk_size or max(1, -(-len(prompts) // (self.num_engines * (
            self.chunks_per_engine if self.num_engines > 1 else 1))))
        limits = max_tokens_each or [sampling.max_tokens] * len(prompts)
        chunks = [(i, (prompts[i:i + size], limits[i:i + size])) for i in range(0, len(prompts), size)]
        todo = list(reversed(chunks))
        results: dict[int, list] = {}
        busy = [0.0] * self.num_engines
        running: dict = {}  # object ref -> (engine index, chunk)

        def submit(index: int) -> None:
            start, chunk = todo.pop()
            chunk_prompts, chunk_limits = chunk
            running[self.actors[index].generate.remote(chunk_prompts, sampling, chunk_limits)] = (index, (start, chunk))

        for index in range(self.num_engines):
            if todo:
                submit(index)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            index, (start, chunk) = running.pop(ref)
            try:
                results[start], seconds = ray.get(ref)
                busy[index] += seconds
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                self._restart(index, type(e).__name__)
                todo.append((start, chunk))  # retried, on this engine or the next free one
            if todo:
                submit(index)
        self._batch_seconds += max(busy)
        return [c for start in sorted(results) for c in results[start]]

    async def turn(self, key: int, prompt: list[int], sampling: SamplingConfig, max_tokens: int) -> list[Completion]:
        """One prompt's completions on engine `key % engines` (a prompt's conversations stay on one
        engine: its prefix cache holds their shared prompt); retried on a restarted engine if that
        one died (outside a weight-sync group, as `generate`)."""
        import asyncio

        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        index = key % self.num_engines
        try:
            out, busy = await self.actors[index].generate_turn.remote(prompt, sampling, max_tokens)
        except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
            await asyncio.to_thread(self._restart, index, type(e).__name__)
            return await self.turn(key, prompt, sampling, max_tokens)
        self._turn_seconds[index] = max(self._turn_seconds[index], busy)
        return out

    def load_weights(self, named_tensors, version: int) -> None:
        """Every engine loads the same HF-named tensors (put in the object store once)."""
        import ray

        self._weights_ref = ray.put(list(named_tensors))
        ray.get([a.load_weights.remote(self._weights_ref, version) for a in self.actors])
        self.weight_version = version

    # ---- weight sync (megarl.sync): the engines are receivers in the trainer's sync group --------
    def join_weight_sync_async(self, plan, rendezvous, generation: int = 0) -> list:
        """Every engine joins the sync group; returns object refs (they resolve once the trainer's
        senders have joined too, so the caller starts the senders before waiting)."""
        self.in_sync_group = True
        return [a.join_weight_sync.remote(plan, rendezvous, i, generation) for i, a in enumerate(self.actors)]

    def receive_weights_async(self, version: int) -> list:
        return [a.receive_weights.remote(version) for a in self.actors]

    def finish_receive(self, refs: list, version: int) -> list[dict]:
        """Wait for every engine's receive; the fleet's version advances only if all succeeded."""
        import ray
        from ray.exceptions import RayActorError

        try:
            stats = ray.get(refs)
        except RayActorError as e:
            raise EngineLost(f"a rollout engine died during the weight sync to version {version}: {e}") from None
        self.weight_version = version
        self._weights_ref = None  # a restarted engine must rejoin the group and be synced again
        return stats

    def prompt_logprobs(self, seqs: list[list[int]]) -> list[list[list[float]]]:
        """Each engine's prompt log-probs of `seqs` (verification after a sync)."""
        import ray

        return ray.get([a.prompt_logprobs.remote(seqs) for a in self.actors])

    def sleep(self) -> None:
        """Every engine gives its GPU memory back (colocated hand-off)."""
        import ray

        ray.get([a.sleep.remote() for a in self.actors])

    def wake(self, what: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        import ray

        ray.get([a.wake.remote(what) for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
