"""The placement map: which slot (GPU, or CPU share) each rank and engine gets, node-ordered, for
colocated and separate recipes; tensor-parallel groups never span nodes; what does not fit is
refused by the field's name."""

import pytest

from megarl.config.loader import load_recipe
from megarl.launch.placement import PlacementError, Slot, build_placement


def placed(recipe: str, *overrides: str):
    return build_placement(load_recipe(recipe, list(overrides)))


def test_tiny_cpu_recipe_colocates_the_engine_with_actor_rank_0():
    m = placed("configs/tiny/grpo_cpu.yaml")
    assert (m.accelerator, m.mode) == ("cpu", "colocated")
    assert m.roles == {"actor": [Slot(0, 0), Slot(0, 1)]} and m.engines == [[Slot(0, 0)]]
    assert (m.share(Slot(0, 0)), m.share(Slot(0, 1))) == (0.5, 1.0)
    assert m.lines()[1:4] == ["  actor         ranks 0-1 on node 0, dev 0-1", "  engine 0      rank 0 on node 0, dev 0",
                              "  node 0: 0:A+E 1:A"]


def test_cpu_engines_take_their_nodes_cores_only_while_training_waits():
    """Synchronous rollouts: no training rank computes while the engines generate, so a CPU engine
    takes every core of its node (shared among that node's engines); overlapping rollouts, GPUs and
    engine tensor parallelism keep the slot's share (None: Ray's default)."""
    m = placed("configs/tiny/grpo_cpu.yaml")   # 2 slots, engine colocated with actor rank 0
    assert m.engine_cpu_threads(0, alone=True, cores_per_slot=1) == 2
    assert m.engine_cpu_threads(0, alone=True, cores_per_slot=4) == 8
    assert m.engine_cpu_threads(0, alone=False, cores_per_slot=1) is None
    two = placed("configs/tiny/grpo_cpu.yaml", "cluster.gpus_per_node=4", "rollout.engines=2")
    assert [two.engine_cpu_threads(e, alone=True, cores_per_slot=1) for e in (0, 1)] == [2, 2]
    gpu = placed("configs/grpo_70b.yaml")
    assert gpu.engine_cpu_threads(0, alone=True, cores_per_slot=1) is None


def test_separate_pools_on_two_nodes():
    m = placed("configs/ppo_8b.yaml")  # 2 nodes × 8, 4 rollout GPUs: training ranks 0-11
    train = [Slot(n, d) for n in (0, 1) for d in range(8)][:12]
    assert m.roles["actor"] == m.roles["critic"] == m.roles["reference"] == train
    assert m.engines == [[Slot(1, 4), Slot(1, 5)], [Slot(1, 6), Slot(1, 7)]]
    assert m.residents(Slot(1, 4)) == ["rollout"] and m.share(Slot(1, 4)) == 1.0
    assert m.share(Slot(0, 0)) == 0.25  # actor, reference, critic and reward model take turns on it
    assert [m.local_rank("actor", r) for r in (0, 7, 8, 11)] == [0, 7, 0, 3]


def test_colocated_engines_each_inside_one_node():
    m = placed("configs/grpo_70b.yaml")  # 8 × 8, engine_tp 8
    assert all(len({s.node for s in e}) == 1 for e in m.engines) and m.engines[3][0] == Slot(3, 0)
    assert "  actor         ranks 0-63 on nodes 0-7, dev 0-7 each" in m.lines()


def test_tensor_parallel_group_across_nodes_is_refused():
    with pytest.raises(PlacementError, match=r"parallel\.tp: the group on node 0 dev 2 \.\. node 1 dev 0 would span"):
        placed("configs/tiny/grpo_cpu.yaml", "cluster.nodes=2", "cluster.gpus_per_node=3", "parallel.tp=2",
               "trainer.prompts_per_step=6", "trainer.samples_per_minibatch=24")


def test_engine_group_across_nodes_is_refused():
    with pytest.raises(PlacementError, match=r"rollout\.engine_tp: the group on node 0 dev 2 \.\. node 1 dev 0"):
        placed("configs/tiny/grpo_cpu.yaml", "cluster.nodes=2", "cluster.gpus_per_node=3",
               "cluster.placement.mode=separate", "cluster.placement.rollout_gpus=4", "rollout.engines=2",
               "rollout.engine_tp=2")


def test_reward_model_gpus_must_match_the_training_layout():
    with pytest.raises(PlacementError, match="reward_model_gpus: the reward model runs with the training layout"):
        placed("configs/ppo_8b.yaml", "cluster.placement.reward_model_gpus=4", "cluster.placement.rollout_gpus=4")


@pytest.mark.parametrize("mode, overrides", [
    ("colocated", ["cluster.device=cuda", "cluster.gpus_per_node=4", "algorithm.kl.coef=0.01", "rollout.engines=2"]),
    ("separate", ["cluster.device=cuda", "cluster.gpus_per_node=4", "cluster.placement.mode=separate",
                  "cluster.placement.rollout_gpus=2", "algorithm.kl.coef=0.01", "rollout.engines=1",
                  "rollout.engine_tp=2"]),
])
def test_ray_puts_every_worker_where_the_map_says(mode, overrides):
    """With 4 logical GPUs declared, each actor, reference and engine worker gets the GPU of its slot
    (shared by the processes of a colocated slot), its LOCAL_RANK, and rank 0 publishes a store it
    already bound on its node's address. An engine with tensor parallelism (separate) holds no GPU
    itself; its vLLM workers take one bundle each, in the order of its slots."""
    from megarl.runtime.local_group import run_isolated

    out = run_isolated("tests.launch.placement_checks:placement_checks",
                       args=("configs/tiny/grpo_cpu.yaml", overrides, 4), timeout=300)
    m = placed("configs/tiny/grpo_cpu.yaml", *overrides)
    assert out["lines"] == m.lines()
    slot_gpu = out["slot_gpu"]
    assert sorted(slot_gpu.values()) == sorted(set(slot_gpu.values()))  # one GPU per slot
    for role, slots in m.roles.items():
        for rank, (slot, got) in enumerate(zip(slots, out["roles"][role], strict=True)):
            gpu = str(slot_gpu[f"{slot.node}:{slot.device}"])
            assert got["gpu_ids"] == [gpu] and got["visible_devices"] == gpu, (role, rank, got)
            assert got["local_rank"] == rank and got["node_ip"] == out["node_ip"]
    for engine, workers in zip(m.engines, out["engines"], strict=True):
        want = [str(slot_gpu[f"{s.node}:{s.device}"]) for s in engine]
        process, vllm_workers = workers[0], (workers[1:] if len(engine) > 1 else workers)
        assert [w[1] for w in vllm_workers] == [[g] for g in want]
        assert {w[0] for w in workers} == {out["node_ip"]}
        assert len(engine) == 1 or process[1] == []   # the engine process itself holds no GPU
    host, port = out["rendezvous"]
    assert host == out["node_ip"] and port > 0
    if mode == "colocated":
        assert m.share(m.engines[0][0]) == pytest.approx(1 / 3)  # actor + reference + engine on GPU 0
    else:
        assert {s for e in m.engines for s in e}.isdisjoint(m.roles["actor"])


def test_cpu_pinning_puts_each_process_on_its_slots_core():
    """cluster.cpu_pinning on a CPU cluster: the actor rank on slot 0 runs on the first usable core,
    the engine (separate) on slot 1 on the second, and without pinning neither is restricted."""
    import os

    from megarl.runtime.local_group import run_isolated

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable CPUs")
    cores = sorted(os.sched_getaffinity(0))
    layout = ["cluster.device=cpu", "cluster.gpus_per_node=2", "cluster.placement.mode=separate",
              "cluster.placement.rollout_gpus=1"]
    pinned = run_isolated("tests.launch.placement_checks:placement_checks",
                          args=("configs/tiny/grpo_cpu.yaml", [*layout, "cluster.cpu_pinning=true"], 0), timeout=300)
    assert [w["cores"] for w in pinned["roles"]["actor"]] == [[cores[0]]]
    assert pinned["engines"][0][0][2] == [cores[1]]
    free = run_isolated("tests.launch.placement_checks:placement_checks",
                        args=("configs/tiny/grpo_cpu.yaml", layout, 0), timeout=300)
    assert free["roles"]["actor"][0]["cores"] == cores and free["engines"][0][0][2] == cores


def test_validate_refuses_an_unplaceable_recipe_by_name(capsys):
    from megarl.cli import main as cli

    assert cli(["validate", "configs/ppo_8b.yaml", "--set", "cluster.placement.reward_model_gpus=4"]) == 1
    err = capsys.readouterr().err
    assert "cluster.placement.reward_model_gpus: the reward model runs with the training layout" in err


def test_recipe_paths_made_absolute_for_workers_on_other_nodes(tmp_path, monkeypatch):
    """Ray workers on another node run in another working directory: the RL driver hands them
    absolute paths; a model name that is no local path stays as it is."""
    from megarl.config.loader import load_recipe, with_absolute_paths

    r = load_recipe("configs/tiny/grpo_cpu.yaml", ["trainer.resume=runs/x/checkpoints/step_000002",
                                                   "trainer.output_dir=runs/x"], resolve=False)
    r.model.path = "runs/tiny/model_missing"  # not on disk: could be a hub id, left alone
    out = with_absolute_paths(r, base="/shared/proj")
    assert out.trainer.output_dir == "/shared/proj/runs/x" and out.data.train == "/shared/proj/runs/tiny/data/rl.jsonl"
    assert out.trainer.resume == "/shared/proj/runs/x/checkpoints/step_000002"
    assert out.rollout.multi_turn.tools == "/shared/proj/configs/tools/calculator.yaml"
    assert out.model.path == "runs/tiny/model_missing" and r.trainer.output_dir == "runs/x"  # a copy
    (tmp_path / "m").mkdir()
    r.model.path = "m"
    assert with_absolute_paths(r, base=str(tmp_path)).model.path == str(tmp_path / "m")
