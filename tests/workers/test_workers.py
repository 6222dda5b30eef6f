"""The megatron worker classes without megatron: role -> class, plain errors on every public
method of every subclass, the driver <-> worker wire format, and the import direction."""

import subprocess
import sys

import pytest
import torch

from megarl.workers import ACTOR, CRITIC, REFERENCE, REWARD_MODEL, ROLES, worker_class
from megarl.workers.base import MegatronRank, TrainableRank, WorkerError
from megarl.workers.wire import encode_share, gather_shares


def test_worker_class_per_role():
    from megarl.workers.actor import ActorWorker
    from megarl.workers.critic import CriticWorker
    from megarl.workers.scorer import ReferenceWorker, RewardModelWorker

    assert {r: worker_class(r) for r in ROLES} == {ACTOR: ActorWorker, REFERENCE: ReferenceWorker,
                                                    CRITIC: CriticWorker, REWARD_MODEL: RewardModelWorker}
    assert issubclass(ActorWorker, TrainableRank) and issubclass(CriticWorker, TrainableRank)
    assert not issubclass(ReferenceWorker, TrainableRank) and not issubclass(RewardModelWorker, TrainableRank)
    with pytest.raises(KeyError, match="policy"):
        worker_class("policy")


def _public(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}


def test_each_role_keeps_the_methods_the_driver_calls():
    common = {"coords", "save", "load", "pid", "rendezvous", "build", "placement", "offload", "reload"}
    assert _public(worker_class(ACTOR)) == common | {"compute_logprobs", "update", "sync_open_store", "sync_join",
                                                     "sync_send"}
    assert _public(worker_class(CRITIC)) == common | {"compute_values", "update_critic"}
    assert _public(worker_class(REFERENCE)) == common | {"compute_logprobs"}
    assert _public(worker_class(REWARD_MODEL)) == common | {"score"}
    for role in ROLES:  # inherited and own public methods all convert errors
        cls = worker_class(role)
        assert all(getattr(getattr(cls, n), "__plain_errors__", False) for n in _public(cls)), role


class _Failing(MegatronRank):
    def fail(self, x):
        raise ZeroDivisionError(f"bad {x}")

    def ok(self, x):
        return x + 1

    def _private(self):
        raise ZeroDivisionError("kept")


class _Deeper(_Failing):
    def fail(self, x):
        return super().fail(x * 2)

    @torch.no_grad()
    def decorated(self):
        raise KeyError("inside no_grad")


def test_worker_error_wraps_subclass_methods(monkeypatch):
    w = object.__new__(_Failing)  # no model is built
    assert w.ok(1) == 2
    with pytest.raises(WorkerError) as e:
        w.fail(3)
    assert "ZeroDivisionError: bad 3" in str(e.value) and e.value.__cause__ is None
    with pytest.raises(ZeroDivisionError):
        w._private()  # private helpers are not wrapped
    d = object.__new__(_Deeper)
    with pytest.raises(WorkerError) as e:
        d.fail(3)
    assert "bad 6" in str(e.value) and "WorkerError" not in str(e.value)  # converted once, not nested
    with pytest.raises(WorkerError, match="inside no_grad"):
        d.decorated()
    assert MegatronRank.pid.__plain_errors__ and _Deeper.ok is _Failing.ok  # base methods wrapped once
    # megatron stays out of the pytest process: importing it through the gateway fails here
    monkeypatch.setitem(sys.modules, "megarl.runtime.megatron", None)
    with pytest.raises(WorkerError, match="megarl.runtime.megatron"):
        d.coords()  # an inherited base method: no model, no parallel state here


def test_wire_round_trip_orders_by_dp_rank():
    shares = [None, encode_share(1, {"logp": torch.tensor([[3.0], [4.0]]), "seconds": 2.0}), None,
              encode_share(2, {"logp": torch.tensor([[5.0]]), "seconds": 0.5}),
              encode_share(0, {"logp": torch.tensor([[1.0], [2.0]]), "seconds": 1.0})]
    assert all(isinstance(s, bytes) for s in shares if s is not None)
    out = gather_shares(shares)
    assert out["logp"].flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert out["seconds"] == 2.0 and set(out) == {"logp", "seconds"}
    with pytest.raises(ValueError):
        gather_shares([None, None])


def test_workers_import_neither_trainers_nor_megatron():
    code = ("import sys; import megarl.workers.actor, megarl.workers.critic, megarl.workers.scorer, "
            "megarl.workers.wire; from megarl.workers import worker_class; [worker_class(r) for r in "
            "('actor', 'critic', 'reference', 'reward_model')]; "
            "print(sorted(m for m in sys.modules if m.startswith(('megarl.trainers', 'megatron'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_each_replica_gets_its_part_of_every_minibatch_and_nothing_else():
    from megarl.workers.wire import replica_rows, replica_share

    # 16 samples, 2 mini-batches of 8, 4 replicas: replica 1 gets rows 2-3 of each mini-batch
    assert replica_rows(16, 1, 4, minibatches=2) == [2, 3, 10, 11]
    every = sorted(r for d in range(4) for r in replica_rows(16, d, 4, minibatches=2))
    assert every == list(range(16))                      # each row to exactly one replica
    assert replica_rows(6, 2, 3) == [4, 5]               # forward-only: consecutive blocks in dp order
    batch = {"tokens": torch.arange(16).view(8, 2), "mask": torch.ones(8, 1), "note": "kept"}
    share = replica_share(batch, 1, 2, minibatches=2)
    assert share["tokens"][:, 0].tolist() == [4, 6, 12, 14] and share["mask"].shape == (4, 1)
    assert share["note"] == "kept" and replica_share(list("abcdef"), 0, 3) == ["a", "b"]
    with pytest.raises(ValueError, match="mini-batches of 6 samples do not split over 4"):
        replica_rows(12, 0, 4, minibatches=2)
