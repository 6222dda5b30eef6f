"""What crosses nodes, on a simulated 3-node cluster: the nodes really are separate hosts to the
code (own address, hostname, /dev/shm), and the RL run's placement puts every worker on the node,
LOCAL_RANK and GPU its map says, with rank 0's routable address as the rendezvous."""

import json

import pytest

from tests.conftest import processes_with

pytestmark = pytest.mark.multinode


def test_nodes_are_separate_hosts(sim):
    assert sim.run(2, ["hostname"]).stdout.strip() == "megarl-sim-n2"
    assert sim.run(3, ["getent", "hosts", "megarl-sim-n3"]).stdout.split()[0] == sim.ip(3)  # not 127.0.0.1
    sim.run(1, ["sh", "-c", "echo x > /dev/shm/megarl-sim-probe"])
    assert sim.run(2, ["test", "-e", "/dev/shm/megarl-sim-probe"], check=False).returncode == 1
    probe = f"import socket; s = socket.socket(); s.settimeout(2); print(s.connect_ex(('{sim.ip(3)}', 9)))"
    assert sim.run(1, [sim.python, "-c", probe]).stdout.strip() == "111"  # reachable: refused, not unreachable


def test_placement_across_three_nodes(sim):
    """Actor + reference over nodes 1-2 (4 logical GPUs each), two engines with engine_tp=2 on node 3
    (separate): each engine's vLLM workers take its two GPUs."""
    from megarl.config.loader import load_recipe
    from megarl.launch.placement import build_placement

    overrides = ["cluster.device=cuda", "cluster.nodes=3", "cluster.gpus_per_node=4", "cluster.placement.mode=separate",
                 "cluster.placement.rollout_gpus=4", "rollout.engines=2", "rollout.engine_tp=2",
                 "algorithm.kl.coef=0.01"]
    printed = sim.run(1, [sim.python, "-m", "tests.launch.placement_checks", "configs/tiny/grpo_cpu.yaml",
                          json.dumps(overrides)], timeout=300).stdout
    out = json.loads(next(line for line in printed.splitlines() if line.startswith("PLACEMENT "))[len("PLACEMENT "):])
    m = build_placement(load_recipe("configs/tiny/grpo_cpu.yaml", overrides))
    assert out["lines"] == m.lines() and out["node_ips"] == [sim.ip(1), sim.ip(2), sim.ip(3)]
    for role in ("actor", "reference"):
        for rank, (slot, got) in enumerate(zip(m.roles[role], out["roles"][role], strict=True)):
            assert got["node_ip"] == sim.ip(slot.node + 1) and got["hostname"] == sim.name(slot.node + 1)
            assert got["local_rank"] == rank % 4 and got["gpu_ids"] == [got["visible_devices"]]
    workers = [w for engine in out["engines"] for w in engine[1:]]   # [0]: the engine process, no GPU
    assert [w[0] for w in workers] == [sim.ip(3)] * 4 and all(engine[0][1] == [] for engine in out["engines"])
    assert sorted(w[1][0] for w in workers) == ["0", "1", "2", "3"]
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
    on node 3 with engine_tp=2 (two vLLM workers, both receivers); every sync crosses nodes
    (broadcast) and is verified; stop after 2 steps, resume."""
    out = sim.state / "grpo3"
    tp2 = ("--set", "rollout.engine_tp=2")
    first = _grpo(sim, shared_inputs, out, *tp2, "--set", "trainer.resume=never",
                  "--set", "trainer.max_steps_this_run=2")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    text = first.stdout
    assert "[rl] placement:   actor         ranks 0-3 on nodes 0-1, dev 0-1 each" in text
    assert "[rl] placement:   engine 0      ranks 0-1 on node 2, dev 0-1" in text
    assert f"rendezvous {sim.ip(1)}:" in text and "to 2 engine worker(s) by broadcast" in text
    second = _grpo(sim, shared_inputs, out, *tp2, "--set", "trainer.resume=auto")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "resumed from" in second.stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sync/verify_max_diff"] <= 1e-4 for r in rows)
    assert (out / "hf" / "model.safetensors").is_file()


def _job(sim, job_id: str) -> dict:
    out = sim.run(1, ["scontrol", "show", "job", "-o", job_id], check=False).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def test_sbatch_on_three_nodes_requeues_on_usr1_and_resumes(sim, shared_inputs):
    """`sbatch --nodes=3 slurm/tiny_cpu.sh` on the simulated Slurm: the launcher brings Ray up on
    all three nodes (srun --overlap), GRPO runs placed across them; USR1 to the batch step ->
    checkpoint -> `scontrol requeue` -> the requeued job resumes and finishes every step once;
    nothing of the job is left running."""
    import time

    out, log = sim.state / "sbatch3", sim.state / "sbatch3.out"
    sets = {"model.path": shared_inputs / "model", "data.train": shared_inputs / "rl.jsonl", "data.eval": "null",
            "trainer.output_dir": out, "cluster.nodes": 3, "cluster.gpus_per_node": 2,
            "cluster.placement.mode": "separate", "cluster.placement.rollout_gpus": 2, "parallel.tp": 2,
            "parallel.pp": 2, "trainer.steps": 30, "trainer.prompts_per_step": 4, "rollout.n": 4,
            "trainer.samples_per_minibatch": 16, "trainer.micro_batch_per_rank": 2, "trainer.save_freq": 0,
            "trainer.eval_freq": 0, "rollout.max_response_length": 32, "optim.warmup_steps": 0,
            "logging.sinks": "[jsonl]"}
    args = " ".join(f"--set {k}={v}" for k, v in sets.items())
    sub = sim.run(1, ["sbatch", "--parsable", "--nodes=3", f"--output={log}", f"--export=ALL,MEGARL_ARGS={args}",
                      "slurm/tiny_cpu.sh"])
    job_id = sub.stdout.strip().split(";")[0]
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline and _job(sim, job_id).get("JobState") in ("PENDING", "RUNNING"), \
            log.read_text()[-3000:] if log.exists() else _job(sim, job_id)
        time.sleep(0.5)
    sim.run(1, ["scancel", "--signal=USR1", "--batch", job_id])  # what --signal=B:USR1@120 does
    while (job := _job(sim, job_id)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text[-4000:]
    assert f"Slurm job {job_id}: 3 node(s)" in text and "checkpointed; requeueing job" in text
    assert "resumed from" in text and "[rl] placement:   actor         ranks 0-3 on nodes 0-1, dev 0-1 each" in text
    assert [json.loads(line)["step"] for line in open(metrics)] == list(range(1, 31))
    assert (out / "hf" / "model.safetensors").is_file()
    assert processes_with(f"megarl_ray_{job_id}") == []  # the job's Ray (temp dir per job) is gone


def _alive_ray_nodes(sim) -> list[str]:
    # The answer is the marked line: a Ray driver's stdout also carries messages the GCS pushes to
    # every driver (e.g. "raylet has lagging heartbeats" while a node is dying), before or after it.
    check = ("import json, ray; ray.init(log_to_driver=False); "
             "print('ALIVE', json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
    out = sim.run(1, [sim.python, "-c", check], timeout=120).stdout
    answer = [line for line in out.splitlines() if line.startswith("ALIVE ")]
    assert len(answer) == 1, out
    return json.loads(answer[0].removeprefix("ALIVE "))


def test_resume_after_losing_a_node_continues_on_the_nodes_that_remain(sim, shared_inputs):
    """A 2-node recipe on the 3-node Ray cluster lands on nodes 1-2 (the driver's node, then by
    address); node 2 (its engine) is killed after a checkpoint; `resume: auto` places the same
    recipe on nodes 1 and 3 and finishes every step once. Node 2 rejoins Ray afterwards."""
    import subprocess
    import time

    out = sim.state / "grpo_spare"
    two_nodes = ["--set", "cluster.nodes=2", "--set", "parallel.pp=1", "--set", "trainer.steps=8",
                 "--set", "trainer.save_freq=2"]
    proc = sim.popen(1, _grpo(sim, shared_inputs, out, *two_nodes, "--set", "trainer.resume=never", dry=True),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (out / "checkpoints" / "step_000002").is_dir():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.5)
        sim.crash(2)
        first, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0 and f"[rl] nodes: 0={sim.ip(1)}, 1={sim.ip(2)}" in first, first[-3000:]
        deadline = time.monotonic() + 120
        while sim.ip(2) in _alive_ray_nodes(sim):  # Ray's own health check marks the node dead
            assert time.monotonic() < deadline, "Ray still shows the crashed node alive"
            time.sleep(2)
        second = _grpo(sim, shared_inputs, out, *two_nodes, "--set", "trainer.resume=auto")
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
        assert f"[rl] nodes: 0={sim.ip(1)}, 1={sim.ip(3)}" in second.stdout and "resumed from" in second.stdout
        steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
        assert steps == list(range(1, 9))  # the steps after the checkpoint ran once (metrics keep each once)
    finally:
        if proc.poll() is None:
            proc.kill()
        sim.restart_ray_node(2)


def _fault_mid_run(sim, inputs, name: str, fault, recover, timeout: float) -> tuple[int, str, float]:
    """Start a 50-step GRPO run over the 3 nodes, apply `fault()` once a step is logged, and return
    (exit code, output, seconds from the fault to the exit); `recover()` runs afterwards, always."""
    import subprocess
    import time

    out = sim.state / name
    args = _grpo(sim, inputs, out, "--set", "trainer.steps=50", "--set", "trainer.resume=never", dry=True)
    proc = sim.popen(1, args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (out / "metrics.jsonl").is_file():
            time.sleep(1)
        assert (out / "metrics.jsonl").is_file(), "the run never completed a step"
        t0 = time.monotonic()
        fault()
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        recover()


def test_a_node_cut_off_fails_the_run_in_bounded_time_naming_it(sim, shared_inputs):
    """Node 2's link goes down mid-run (a partition: its processes live on, nothing arrives, no
    reset): Ray declares the node dead, the driver stops at the first lost rank's error instead of
    waiting for the survivors' collectives to time out, and names the node. Node 2 is then
    reconnected and its processes replaced (its Ray node rejoins)."""
    def recover():
        sim.heal(2)
        sim.crash(2)  # what was cut off (Ray has written it off) goes; a fresh Ray node takes its place
        sim.restart_ray_node(2)

    code, output, elapsed = _fault_mid_run(sim, shared_inputs, "grpo_cut", lambda: sim.cut(2), recover, timeout=400)
    assert code != 0 and elapsed < 240, (elapsed, output[-3000:])
    assert "worker(s) lost during" in output and f"on node {sim.ip(2)}" in output, output[-3000:]


# last: it kills node 2's processes (its Slurm daemons too; Ray is restarted there)
def test_a_lost_node_fails_the_run_in_bounded_time_naming_it(sim, shared_inputs):
    """Every process on node 2 (actor and reference ranks) killed mid-run: the driver stops with an
    error naming the lost ranks and their node within a bounded time, never hangs. Node 2 rejoins
    Ray afterwards."""
    code, output, elapsed = _fault_mid_run(sim, shared_inputs, "grpo_loss", lambda: sim.crash(2),
                                           lambda: sim.restart_ray_node(2), timeout=300)
    assert code != 0 and elapsed < 180, (elapsed, output[-3000:])
    assert "worker(s) lost during" in output and f"on node {sim.ip(2)}" in output, output[-3000:]
