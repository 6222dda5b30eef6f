"""`megarl launch` without Slurm: the node/GPU map and commands of --dry-run (a multi-node job seen
through a stand-in `scontrol`, since this machine's Slurm has one node), and a local run whose
SIGUSR1 makes the ranks checkpoint and stop (exit 75) before a second launch finishes the run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "megarl.cli", "launch", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=kw.pop("timeout", 120), **kw)


@pytest.fixture
def eight_node_job(tmp_path):
    """Slurm's environment for an 8-node job; `scontrol show hostnames` answered by a stand-in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[01-08]" ] || exit 1\n'
                                      'for i in 01 02 03 04 05 06 07 08; do echo gpu$i; done\n')
    (bin_dir / "scontrol").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-08]",
            "SLURM_JOB_NUM_NODES": "8", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96"}


def test_dry_run_shows_the_ray_map_of_a_multi_node_grpo_job(eight_node_job):
    out = _launch(["configs/grpo_70b.yaml", "--dry-run"], env=eight_node_job)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Slurm job 4242: 8 node(s), 8 GPU(s) and 96 CPU(s) per node" in text
    # the placement map the run uses, as `megarl plan` prints it
    assert ("placement:\n  8 node(s) × 8 GPU(s), colocated:\n"
            "    actor         ranks 0-63 on nodes 0-7, dev 0-7 each") in text
    head = [line for line in text.splitlines() if line.strip().startswith("head gpu01:")]
    workers = [line for line in text.splitlines() if line.strip().startswith("worker gpu")]
    assert len(head) == 1 and "srun --overlap --nodes=1 --ntasks=1 -w gpu01" in head[0] and "--head" in head[0]
    assert "--num-gpus=8" in head[0] and "--num-cpus=96" in head[0]
    # the head binds a port of the kernel's choice and publishes it; the workers join at what it published
    assert "--port=0" in head[0] and "megarl.launch.ray_node --publish" in head[0]
    assert head[0].split("--publish ")[1].split()[0].endswith("/launch/4242/ray_head_address.json")
    assert [w.split(":")[0].split()[-1] for w in workers] == [f"gpu0{i}" for i in range(2, 9)]
    assert all("'--address=<the address the head publishes>'" in w and "-w gpu0" in w for w in workers)
    assert "megarl.cli train configs/grpo_70b.yaml" in text


def test_dry_run_runs_preference_ranks_under_srun_and_refuses_a_node_mismatch(eight_node_job):
    out = _launch(["configs/dpo_70b.yaml", "--dry-run"], env={**eight_node_job, "SLURM_JOB_NODELIST": "gpu[01-04]",
                                                               "SLURM_JOB_NUM_NODES": "4"})
    # the stand-in only knows gpu[01-08]: a 4-node list fails to expand, and says so
    assert out.returncode == 1 and "scontrol show hostnames gpu[01-04]" in out.stderr
    out = _launch(["configs/dpo_70b.yaml", "--dry-run"], env=eight_node_job)
    assert out.returncode == 1, out.stdout
    assert "no Ray" in out.stdout and "srun --overlap --nodes=8 --ntasks-per-node=4" in out.stdout
    assert "megarl.launch.rank configs/dpo_70b.yaml" in out.stdout and "MASTER_ADDR=gpu01" in out.stdout
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in out.stdout   # GPU ranks keep one CUDA queue (TP overlap)
    # rank 0 binds the store's port and publishes it in a file of this launch: no port is picked here
    assert "MASTER_PORT" not in out.stdout and "MEGARL_RENDEZVOUS_FILE=" in out.stdout
    assert "would fail: the recipe's cluster.nodes is 4 but the job has 8 node(s)" in out.stdout


def test_local_launch_stops_on_usr1_with_a_checkpoint_and_resumes(tmp_path, converted):
    from examples.tool_math import sft_row, write

    data = tmp_path / "sft.jsonl"
    write(str(data), (sft_row(random.Random(0)) for _ in range(64)))
    sets = ["--set", f"model.path={converted['qwen2']['ckpt']}", "--set", f"data.train={data}",
            "--set", f"trainer.output_dir={tmp_path / 'run'}", "--set", "trainer.steps=40",
            "--set", "trainer.samples_per_step=8", "--set", "trainer.micro_batch_per_rank=2",
            "--set", "trainer.save_freq=0"]
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "megarl.cli", "launch", "configs/tiny/sft_cpu.yaml", *sets],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no step logged"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, output[-3000:]      # checkpointed on request: run again to resume
    assert "no Ray: this stage runs megatron ranks directly" in output
    stopped = [json.loads(line)["step"] for line in open(metrics)]
    assert stopped[-1] < 40 and os.path.isdir(tmp_path / "run" / "checkpoints" / f"step_{stopped[-1]:06d}")
    out = _launch(["configs/tiny/sft_cpu.yaml", *sets], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout and [json.loads(line)["step"] for line in open(metrics)] == list(range(1, 41))


def _processes_with(tag: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if tag in cmdline:
            found.append(f"{pid}: {cmdline[:160]}")
    return found


def test_local_ray_cluster_starts_waits_and_stops_by_pid(tmp_path):
    from megarl.launch.nodes import LaunchError, NodeMap
    from megarl.launch.ray_cluster import RayCluster

    cluster = RayCluster(NodeMap(["localhost"], gpus_per_node=0, cpus_per_node=2), str(tmp_path / "logs"))
    try:
        cluster.start(timeout=120)
        assert [p.poll() for _, p, _ in cluster.procs] == [None]
        assert _processes_with(cluster.temp_dir), "the head's processes carry its temp dir"
        assert oct(os.stat(cluster.auth_env()["RAY_AUTH_TOKEN_PATH"]).st_mode & 0o777) == "0o600"
        # a node that never brings what the job needs: a clear error naming what Ray shows
        host, port = cluster.address.rsplit(":", 1)
        assert port != "0" and json.load(open(cluster.address_file)) == {"host": host, "port": int(port)}
        logs = os.listdir(os.path.join(cluster.temp_dir, "session_latest", "logs"))
        assert "raylet.out" in logs and not [f for f in logs if f.startswith("ray_client_server")]  # never started
        greedy = RayCluster(NodeMap(["localhost"], gpus_per_node=4, cpus_per_node=2), str(tmp_path / "logs"))
        greedy.address = cluster.address  # join the running cluster (its token is in the same log dir)
        with pytest.raises(LaunchError, match=r"shows .*'GPU': 0.0.*want .*'GPU': 4"):
            greedy.wait_for_resources(time.monotonic() + 15)
    finally:
        assert cluster.stop(grace=30) == []          # SIGTERM was enough
    deadline = time.monotonic() + 30
    while _processes_with(cluster.temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_with(cluster.temp_dir) == []
    assert os.path.isfile(tmp_path / "logs" / "ray_head_localhost.log")
