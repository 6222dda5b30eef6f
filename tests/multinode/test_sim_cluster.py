"""What crosses nodes, on a simulated 3-node cluster: the nodes really are separate hosts to the
code (own address, hostname, /dev/shm), and the RL run's placement puts every worker on the node,
LOCAL_RANK and GPU its map says, with rank 0's routable address as the rendezvous."""

import json

import pytest

pytestmark = pytest.mark.multinode


def test_nodes_are_separate_hosts(sim):
    assert sim.run(2, ["hostname"]).stdout.strip() == "megarl-sim-n2"
    assert sim.run(3, ["getent", "hosts", "megarl-sim-n3"]).stdout.split()[0] == sim.ip(3)  # not 127.0.0.1
    sim.run(1, ["sh", "-c", "echo x > /dev/shm/megarl-sim-probe"])
    assert sim.run(2, ["test", "-e", "/dev/shm/megarl-sim-probe"], check=False).returncode == 1
    probe = f"import socket; s = socket.socket(); s.settimeout(2); print(s.connect_ex(('{sim.ip(3)}', 9)))"
    assert sim.run(1, [sim.python, "-c", probe]).stdout.strip() == "111"  # reachable: refused, not unreachable


def test_placement_across_three_nodes(sim):
    """Actor + reference over nodes 1-2 (4 logical GPUs each), engines on node 3 (separate)."""
    from megarl.config.loader import load_recipe
    from megarl.launch.placement import build_placement

    overrides = ["cluster.device=cuda", "cluster.nodes=3", "cluster.gpus_per_node=4", "cluster.placement.mode=separate",
                 "cluster.placement.rollout_gpus=4", "rollout.engines=4", "algorithm.kl.coef=0.01"]
    out = json.loads(sim.run(1, [sim.python, "-m", "tests.launch.placement_checks", "configs/tiny/grpo_cpu.yaml",
                                 json.dumps(overrides)], timeout=300).stdout.splitlines()[-1])
    m = build_placement(load_recipe("configs/tiny/grpo_cpu.yaml", overrides))
    assert out["lines"] == m.lines() and out["node_ips"] == [sim.ip(1), sim.ip(2), sim.ip(3)]
    for role in ("actor", "reference"):
        for rank, (slot, got) in enumerate(zip(m.roles[role], out["roles"][role], strict=True)):
            assert got["node_ip"] == sim.ip(slot.node + 1) and got["hostname"] == sim.name(slot.node + 1)
            assert got["local_rank"] == rank % 4 and got["gpu_ids"] == [got["visible_devices"]]
    assert [ip for ip, _ in out["engines"]] == [sim.ip(3)] * 4
    assert sorted(ids[0] for _, ids in out["engines"]) == ["0", "1", "2", "3"]
    host, port = out["rendezvous"]
    assert host == sim.ip(1) and port > 0


@pytest.fixture(scope="module")
def shared_inputs(sim, tiny_hf_models):
    """The tiny model and task data where every node can read them (pytest's tmp_path is under /tmp,
    which is private per node, as on a real cluster)."""
    import random
    import shutil

    from examples.tool_math import rl_row, write

    root = sim.state / "inputs"
    shutil.copytree(tiny_hf_models["qwen2"], root / "model")
    rng = random.Random(0)
    write(str(root / "rl.jsonl"), (rl_row(rng) for _ in range(32)))
    write(str(root / "eval.jsonl"), (rl_row(rng) for _ in range(4)))
    return root


def _grpo(sim, inputs, out, *extra, dry: bool = False):
    """`megarl train` of the tiny GRPO recipe on node 1 over the 3 nodes (`dry`: the argv only)."""
    args = [sim.python, "-m", "megarl.cli", "train", "configs/tiny/grpo_cpu.yaml",
            "--set", f"model.path={inputs / 'model'}", "--set", f"data.train={inputs / 'rl.jsonl'}",
            "--set", f"data.eval={inputs / 'eval.jsonl'}", "--set", f"trainer.output_dir={out}",
            "--set", "cluster.nodes=3", "--set", "cluster.gpus_per_node=2", "--set", "cluster.placement.mode=separate",
            "--set", "cluster.placement.rollout_gpus=2", "--set", "parallel.tp=2", "--set", "parallel.pp=2",
            "--set", "trainer.steps=3", "--set", "trainer.prompts_per_step=4", "--set", "rollout.n=4",
            "--set", "trainer.samples_per_minibatch=16", "--set", "trainer.micro_batch_per_rank=2",
            "--set", "trainer.save_freq=0", "--set", "trainer.eval_freq=0", "--set", "rollout.max_response_length=32",
            "--set", "rollout.weight_sync.verify_logprobs=true", "--set", "rollout.weight_sync.logprob_tolerance=1e-4",
            "--set", "optim.warmup_steps=0", "--set", "algorithm.kl.coef=0.001", "--set", "logging.sinks=[jsonl]",
            *extra]
    return args if dry else sim.run(1, args, timeout=900, check=False)


def test_grpo_across_three_nodes_checkpoints_and_resumes(sim, shared_inputs):
    """The actor split TP=2 inside a node × PP=2 across nodes 1-2, the reference beside it, the engine
    on node 3; every sync crosses nodes (broadcast) and is verified; stop after 2 steps, resume."""
    out = sim.state / "grpo3"
    first = _grpo(sim, shared_inputs, out, "--set", "trainer.resume=never", "--set", "trainer.max_steps_this_run=2")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    text = first.stdout
    assert "[rl] placement:   actor         ranks 0-3 on nodes 0-1, dev 0-1 each" in text
    assert "[rl] placement:   engine 0      rank 0 on node 2, dev 0" in text
    assert f"rendezvous {sim.ip(1)}:" in text and "by broadcast" in text
    second = _grpo(sim, shared_inputs, out, "--set", "trainer.resume=auto")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "resumed from" in second.stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sync/verify_max_diff"] <= 1e-4 for r in rows)
    assert (out / "hf" / "model.safetensors").is_file()


def test_a_lost_node_fails_the_run_in_bounded_time_naming_it(sim, shared_inputs):
    """Every process on node 2 (actor and reference ranks) killed mid-run: the driver stops with an
    error naming the lost ranks and their node within a bounded time, never hangs. Node 2 rejoins
    Ray afterwards."""
    import subprocess
    import time

    out = sim.state / "grpo_loss"
    args = _grpo(sim, shared_inputs, out, "--set", "trainer.steps=50", "--set", "trainer.resume=never", dry=True)
    proc = sim.popen(1, args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (out / "metrics.jsonl").is_file():
            time.sleep(1)
        assert (out / "metrics.jsonl").is_file(), "the run never completed a step"
        t0 = time.monotonic()
        sim.crash(2)
        output, _ = proc.communicate(timeout=300)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        sim.restart_ray_node(2)
    assert proc.returncode != 0 and elapsed < 180, (elapsed, output[-3000:])
    assert "worker(s) lost during" in output and f"on node {sim.ip(2)}" in output, output[-3000:]
