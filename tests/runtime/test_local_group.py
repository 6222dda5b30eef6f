"""run_local_group: results come back in rank order, failures and hangs are reported, never hung on."""

import os
import time

import pytest

from megarl.runtime.local_group import LocalGroupError, run_local_group


def rank_and_allreduce(scale):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "sum": t.item() * scale, "threads": torch.get_num_threads(),
            "env_rank": os.environ["RANK"]}


def fail_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one is unhappy")
    dist.barrier()  # rank 0 would wait forever: the group must be torn down


def sleep_forever():
    time.sleep(3600)


def test_results_in_rank_order():
    out = run_local_group(rank_and_allreduce, 2, args=(10,), timeout=120)
    assert [o["rank"] for o in out] == [0, 1]
    assert [o["env_rank"] for o in out] == ["0", "1"]
    assert all(o["sum"] == 30.0 for o in out)
    assert all(o["threads"] == max(1, (os.cpu_count() or 1) // 2) for o in out)


def test_thread_count_can_be_set():
    # cluster.cpu_threads_per_rank reaches the SFT/DPO/KTO/RM ranks through this argument
    out = run_local_group(rank_and_allreduce, 2, args=(1,), timeout=120, threads=3)
    assert [o["threads"] for o in out] == [3, 3]


def test_failure_names_the_rank_and_does_not_hang():
    start = time.monotonic()
    with pytest.raises(LocalGroupError, match=r"rank 1:[\s\S]*rank one is unhappy"):
        run_local_group(fail_on_rank_one, 2, timeout=120)
    assert time.monotonic() - start < 60


def test_timeout_kills_the_group():
    with pytest.raises(LocalGroupError, match=r"timed out after 20s; ranks \[0\]"):
        run_local_group(sleep_forever, 1, timeout=20)


def test_local_functions_are_refused():
    def local():
        return 1

    with pytest.raises(ValueError, match="module level"):
        run_local_group(local, 1)


class Counter:
    def __init__(self, start):
        self.value = start

    def add(self, n):
        self.value += n
        return self.value

    def fail(self):
        raise KeyError("no such thing")

    def sleep(self, seconds):
        time.sleep(seconds)


def test_isolated_actor_keeps_state_reports_errors_and_never_hangs():
    from megarl.runtime.local_group import IsolatedActor

    actor = IsolatedActor("tests.runtime.test_local_group:Counter", args=(5,), timeout=60)
    try:
        assert actor.call("add", 2) == 7
        pending = actor.call_async("add", 3)
        with pytest.raises(RuntimeError, match="still pending"):
            actor.call_async("add", 1)
        assert pending.result() == 10
        with pytest.raises(LocalGroupError, match="no such thing"):
            actor.call("fail")
        assert actor.call("add", 0) == 10          # still alive after an error
        with pytest.raises(LocalGroupError, match="no answer within 1s"):
            actor.call("sleep", 30, timeout=1)
        assert not actor._proc.is_alive()          # killed, not left hanging
    finally:
        actor.close()
