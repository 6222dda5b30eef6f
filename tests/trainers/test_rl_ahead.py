"""`RolloutsAhead` (trainers/rl/ahead.py) without Ray or engines: the generation runs in the
background, its error reaches the driver's thread, and what a checkpoint keeps comes back only for
the step it belongs to."""

import threading
import time

import pytest

from megarl.trainers.rl.ahead import Produced, RolloutsAhead


def test_generates_in_the_background_and_hands_over_for_its_step():
    started, release = threading.Event(), threading.Event()

    def produce(step):
        started.set()
        release.wait(5)
        return Produced(step, f"rollouts {step}", 0.1, 0.05)

    ahead = RolloutsAhead(produce)
    assert ahead.take(0) is None                         # nothing generated ahead: the step generates itself
    ahead.start(1)
    assert started.wait(5) and ahead.running             # the driver's thread is free meanwhile
    release.set()
    got = ahead.take(1)
    assert got.rollouts == "rollouts 1" and not ahead.running and ahead.ready is None
    ahead.start(2)
    ahead.finish()
    with pytest.raises(RuntimeError, match="are for step 2, not step 3"):
        ahead.take(3)


def test_a_failed_generation_raises_in_the_drivers_thread():
    def produce(step):
        time.sleep(0.05)
        raise ValueError(f"engine gone at step {step}")

    ahead = RolloutsAhead(produce)
    ahead.start(4)
    with pytest.raises(ValueError, match="engine gone at step 4"):
        ahead.finish()
    assert not ahead.running and ahead.ready is None


def test_checkpoint_state_round_trips_only_for_its_step():
    ahead = RolloutsAhead(lambda step: Produced(step, {"groups": [step]}, 1.0, 0.5))
    assert ahead.state() is None
    ahead.start(3)
    ahead.finish()
    blob = ahead.state()
    restored = RolloutsAhead(lambda step: None)
    restored.load(blob, 3)
    assert restored.take(3).rollouts == {"groups": [3]}
    with pytest.raises(RuntimeError, match="do not belong to step 4"):
        RolloutsAhead(lambda step: None).load(blob, 4)
    ahead.take(3)
    ahead.start(5)
    with pytest.raises(RuntimeError, match="while rollouts are being generated"):
        ahead.state()
    ahead.finish()
