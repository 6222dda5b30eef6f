"""The async producer (trainers/rl/producer.py) without Ray or engines: a fake `produce` stamps
each group with the engines' current weight version; the test plays the trainer (take, train,
sync = bump the version). Checked: the staleness bound on every batch under both policies, drops
regenerated rather than lost, a checkpoint taken mid-round that neither drops nor repeats a prompt,
and the gate that gives the trainer the engines between two engine calls."""

from __future__ import annotations

import itertools
import threading
import time
from types import SimpleNamespace

import pytest

from megarl.data.sampler import EpochSampler
from megarl.trainers.rl.producer import AsyncRollouts, EngineGate

PER_ROUND = 2


class FakeEngines:
    def __init__(self):
        self.version = 0
        self.block_round: int | None = None     # produce() of this round waits for `release`
        self.release = threading.Event()
        self.in_round = threading.Event()

    def produce(self, round_: int, prompts: list) -> list:
        if round_ == self.block_round:
            self.in_round.set()
            assert self.release.wait(10)
        traj = SimpleNamespace(weight_versions={self.version})
        return [SimpleNamespace(prompt=p, trajectories=[traj, traj]) for p in prompts]


def make(engines: FakeEngines, bound: int, policy: str, sampler=None) -> AsyncRollouts:
    return AsyncRollouts(PER_ROUND, bound, policy, sampler or EpochSampler(1000, seed=0),
                         lambda rows: [SimpleNamespace(row=r) for r in rows], engines.produce, lambda: engines.version)


def wait_until(condition, timeout=10.0):
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, "timed out"
        time.sleep(0.002)


def train(producer: AsyncRollouts, engines: FakeEngines, steps: range, settle,
          looked: list | None = None) -> list[tuple[list[int], list[int]]]:
    """Per step: (rows, version lags) of the batch taken; after each take, `settle()` waits for the
    producer to reach a quiet point, then the weights move to the next version. `looked` gets the
    rows each step looked at (trained or filtered by dynamic sampling) in the order they were sampled."""
    out = []
    for step in steps:
        taken, metrics = producer.take(step)
        out.append(([b.group.prompt.row for b in taken.groups], [step - b.min_version for b in taken.groups]))
        assert metrics["async/filtered_groups"] == len(taken.filtered)
        if looked is not None:
            seen = sorted(taken.groups + taken.filtered, key=lambda b: b.group.order)
            looked.append([b.group.prompt.row for b in seen])
        settle()
        engines.version = step + 1
        producer.weights_updated()
    return out


def test_wait_policy_never_exceeds_the_bound_and_drops_nothing():
    engines = FakeEngines()
    producer = make(engines, bound=2, policy="wait")
    producer.start()
    try:
        batches = train(producer, engines, range(12), lambda: time.sleep(0.01))
    finally:
        producer.stop()
    lags = [lag for _, lags in batches for lag in lags]
    assert max(lags) <= 2 and max(lags) == 2                # it does run ahead, up to the bound
    assert producer.dropped == 0
    rows = [r for batch, _ in batches for r in batch]
    assert rows == EpochSampler(1000, seed=0).take(len(rows))   # data order kept, nothing skipped or repeated


def test_drop_policy_drops_over_the_bound_and_generates_those_prompts_again():
    engines = FakeEngines()
    producer = make(engines, bound=1, policy="drop")
    producer.start()
    full = lambda: wait_until(lambda: len(producer.buffer) == producer.capacity)  # noqa: E731
    try:
        full()
        batches = train(producer, engines, range(10), full)
    finally:
        producer.stop()
    assert all(lag <= 1 for _, lags in batches for lag in lags)
    assert producer.dropped > 0
    trained = [r for batch, _ in batches for r in batch]
    assert len(trained) == len(set(trained)) == 10 * PER_ROUND
    taken = EpochSampler(1000, seed=0).take(producer.sampler.state.position)
    pending = [p.row for p in producer.requeue] + [b.group.prompt.row for b in producer.buffer]
    assert sorted(trained + pending) == sorted(taken)       # every prompt taken is trained or still queued


def test_a_checkpoint_mid_round_resumes_without_dropping_or_repeating_a_prompt():
    def run(stop_after: int | None) -> list[list[int]]:
        engines = FakeEngines()
        producer = make(engines, bound=1, policy="wait")
        if stop_after is not None:
            engines.block_round = stop_after + 1          # in flight when the checkpoint is taken
        producer.start()
        batches = train(producer, engines, range(stop_after if stop_after is not None else 6),
                        lambda: time.sleep(0.01))
        if stop_after is None:
            producer.stop()
            return [rows for rows, _ in batches]
        assert engines.in_round.wait(10)
        sampler_state, blob = producer.snapshot()
        producer.stop()
        engines.release.set()
        # a new process: the data position and the buffer from the checkpoint, the same weights
        restarted = FakeEngines()
        restarted.version = engines.version
        resumed = make(restarted, bound=1, policy="wait",
                       sampler=EpochSampler.from_state(1000, 0, True, sampler_state))
        resumed.load(blob)
        resumed.start()
        try:
            batches += train(resumed, restarted, range(stop_after, 6), lambda: time.sleep(0.01))
        finally:
            resumed.stop()
        return [rows for rows, _ in batches]

    assert run(stop_after=3) == run(stop_after=None)


def test_the_gate_gives_the_trainer_the_engines_between_two_calls():
    gate, order = EngineGate(), []
    in_call, finish_call = threading.Event(), threading.Event()

    def producer_call():
        with gate.call():
            in_call.set()
            assert finish_call.wait(10)
            order.append("call 1 done")
        with gate.call():
            order.append("call 2")

    thread = threading.Thread(target=producer_call)
    thread.start()
    assert in_call.wait(10)

    def trainer():
        with gate.exclusive():
            order.append("sync")

    sync = threading.Thread(target=trainer)
    sync.start()
    time.sleep(0.05)
    assert order == []                                     # the sync waits for the call in flight
    finish_call.set()
    sync.join(10)
    thread.join(10)
    assert order == ["call 1 done", "sync", "call 2"]      # and the next call waits for the sync


def test_a_producer_error_reaches_the_trainer():
    engines = FakeEngines()

    def broken(round_, prompts):
        raise ConnectionError("engine 0 died")

    producer = AsyncRollouts(PER_ROUND, 1, "wait", EpochSampler(10, seed=0),
                             lambda rows: [SimpleNamespace(row=r) for r in rows], broken, lambda: engines.version)
    producer.start()
    with pytest.raises(ConnectionError, match="engine 0 died"):
        producer.take(0)


def test_dynamic_sampling_takes_informative_groups_within_the_bound_and_loses_no_prompt():
    """DAPO in async mode: a step takes groups until it has PER_ROUND informative ones or has looked
    at (1 + dynamic_rounds) rounds' worth. It may need several rounds, so the admission rule must
    let rounds past `step + bound` start (AReaL's `round - bound` rule deadlocks here) while no
    group is trained more than `bound` versions after it was sampled."""
    engines, rounds, sampled = FakeEngines(), 2, itertools.count()
    informative = lambda row: row % 3 == 0  # noqa: E731 - about a third of the groups carry a signal
    plain = engines.produce

    def produce(round_, prompts):
        groups = plain(round_, prompts)
        for g in groups:
            g.informative, g.order = informative(g.prompt.row), next(sampled)
        return groups

    producer = AsyncRollouts(PER_ROUND, 1, "wait", EpochSampler(1000, seed=0),
                             lambda rows: [SimpleNamespace(row=r) for r in rows], produce, lambda: engines.version,
                             dynamic_rounds=rounds)
    producer.start()
    steps, looked = [], []
    settle = lambda: time.sleep(0.01)  # noqa: E731
    worker = threading.Thread(target=lambda: steps.extend(train(producer, engines, range(15), settle, looked)))
    worker.start()
    worker.join(30)
    producer.stop()
    assert not worker.is_alive(), "the trainer waited for a round the admission rule never started"
    assert len(steps) == 15
    for kept, lags in steps:
        assert len(kept) == PER_ROUND and max(lags) <= 1
    # informative groups first; set-aside ones fill the batch only after the step looked at its limit
    for kept, _ in steps:
        assert [informative(r) for r in kept] == sorted((informative(r) for r in kept), reverse=True)
    assert any(not informative(r) for kept, _ in steps for r in kept)
    assert any(len(x) > PER_ROUND for x in looked)
    assert all(len(x) <= PER_ROUND * (1 + rounds) for x in looked)
    # every prompt the data gave was trained or filtered, once, in the data's order
    used = [r for x in looked for r in x]
    assert used == EpochSampler(1000, seed=0).take(len(used))
    assert producer.dropped == 0

