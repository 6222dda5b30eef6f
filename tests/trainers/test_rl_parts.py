"""Pure parts of the RL loop: the trajectory batch puts each generated token's mask and rollout
log-prob on its label position, and request seeds. (Loss weights: tests/algorithms/test_policy_loss.py.)"""

import torch

from megarl.rollout.agent import Trajectory
from megarl.rollout.batch import TrajectoryBatch


def test_batch_aligns_masks_and_logprobs_with_labels():
    a = Trajectory([1, 2, 3], [10, 11, 12, 13], [1, 1, 0, 1], [-0.1, -0.2, 0.0, -0.4])
    b = Trajectory([1, 2], [20], [1], [-0.5])
    batch = TrajectoryBatch.from_trajectories([a, b], [0, 0], pad_id=0, multiple=4)
    assert batch.tokens.shape == (2, 9) and batch.mask.shape == (2, 8)   # S-1 = 8, a multiple of 4
    assert batch.tokens[0, :7].tolist() == [1, 2, 3, 10, 11, 12, 13]
    # label position t predicts token t+1: response token j of a is at p + j, label position p + j - 1
    assert batch.mask[0].tolist() == [0, 0, 1, 1, 0, 1, 0, 0]
    assert torch.allclose(batch.rollout_logp[0, 2:6], torch.tensor([-0.1, -0.2, 0.0, -0.4]))
    assert batch.mask[1].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert batch.response_lengths == [4, 1] and batch.prompt_lengths == [3, 2]


def test_request_seeds_differ_per_prompt_and_are_reproducible():
    from megarl.rollout.engine import request_seed

    a, b = request_seed(7, [1, 2, 3]), request_seed(7, [1, 2, 4])
    assert a != b and a == request_seed(7, [1, 2, 3]) and request_seed(8, [1, 2, 3]) != a
    assert request_seed(None, [1, 2, 3]) is None and 0 <= a < 2**31 - 1


def test_colocated_gpu_handoff_takes_turns_in_order():
    """Colocated on GPUs the gangs and the engines take turns on the devices (MemoryHandOff): the
    idle gangs offload before the engines wake to generate, and reload only after they sleep, even
    when the rollout fails; separate placements and CPU runs hand nothing over."""
    import pytest

    from megarl.config.loader import load_recipe
    from megarl.trainers.rl.gangs import MemoryHandOff, handoff_enabled

    events: list = []

    class Gang:
        def __init__(self, name):
            self.name = name

        def call(self, method):
            events.append((self.name, method))

    class Fleet:
        def wake(self, what=("weights", "kv_cache")):
            events.append(("engines", "wake") if len(what) == 2 else ("engines", "wake", *what))

        def sleep(self):
            events.append(("engines", "sleep"))

    handoff = MemoryHandOff(True, [Gang("actor"), None, Gang("critic")])
    handoff.start_engines(lambda: events.append("engines start") or Fleet())
    assert events == [("actor", "offload"), ("critic", "offload"), "engines start", ("engines", "sleep"),
                      ("actor", "reload"), ("critic", "reload")]
    events.clear()
    with handoff.rollout_window():
        events.append("generate")
    assert events == [("actor", "offload"), ("critic", "offload"), ("engines", "wake"), "generate",
                      ("engines", "sleep"), ("actor", "reload"), ("critic", "reload")]
    events.clear()
    with pytest.raises(RuntimeError), handoff.rollout_window():
        raise RuntimeError("an engine died")
    assert events[-3:] == [("engines", "sleep"), ("actor", "reload"), ("critic", "reload")]
    events.clear()
    with handoff.sync_window():   # weights only: no verification pass needs the KV cache
        events.append("sync")
    assert events == [("engines", "wake", "weights"), "sync", ("engines", "sleep")]
    events.clear()
    with MemoryHandOff(False, [Gang("actor")], Fleet()).rollout_window():
        events.append("generate")
    assert events == ["generate"]
    # a GPU placement comes from cluster.device other than cpu (launch/placement.py)
    colocated = load_recipe("configs/tiny/grpo_cpu.yaml", ["cluster.placement.mode=colocated", "cluster.device=auto"])
    separate = load_recipe("configs/tiny/grpo_cpu.yaml", ["cluster.placement.mode=separate", "cluster.gpus_per_node=3",
                                                           "cluster.placement.rollout_gpus=1", "cluster.device=auto"])
    assert handoff_enabled(colocated, gpu=True) and not handoff_enabled(colocated, gpu=False)
    assert not handoff_enabled(separate, gpu=True)
