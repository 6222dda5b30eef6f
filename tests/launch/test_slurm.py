"""`sbatch slurm/tiny_cpu.sh` on a real single-node Slurm cluster (Debian's slurmctld/slurmd/munge,
brought up by tools/slurm_local.sh inside the test run, torn down after it).

- the job brings Ray up through `srun --overlap`, runs the tiny GRPO recipe, writes its metrics
  and exports, and nothing it started is left running
- preemption: USR1 to the batch step mid-run -> the driver checkpoints -> `scontrol requeue` ->
  the requeued job resumes and finishes with exactly the weights and metrics of the
  uninterrupted run
- a non-Ray stage (SFT) runs one process per training rank under `srun` (torch.distributed
  rendezvous on the head), after the launcher converted the start checkpoint once

Skipped with the reason where Slurm cannot run (not root, no package access); CI runs as root.
"""

import json
import os
import random
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slurm
STEPS = 8


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm_state")
    up = subprocess.run(["bash", "tools/slurm_local.sh", "up", str(state)], cwd=ROOT, capture_output=True, text=True,
                        timeout=900)
    if up.returncode == 3:
        pytest.skip(f"no local Slurm cluster here: {up.stderr.strip()}")
    assert up.returncode == 0, up.stdout + up.stderr
    env = {**os.environ, "SLURM_CONF": str(state / "etc" / "slurm.conf")}
    yield env
    subprocess.run(["bash", "tools/slurm_local.sh", "down", str(state)], cwd=ROOT, env=env, timeout=120)


@pytest.fixture(scope="module")
def job_args(tmp_path_factory, tiny_hf_models):
    from examples.tool_math import rl_row, write

    root = tmp_path_factory.mktemp("slurm_jobs")
    rng = random.Random(0)
    write(str(root / "rl.jsonl"), (rl_row(rng) for _ in range(64)))

    def args(out) -> str:
        sets = {"model.path": tiny_hf_models["qwen2"], "data.train": root / "rl.jsonl", "data.eval": "null",
                "trainer.output_dir": out, "trainer.steps": STEPS, "trainer.prompts_per_step": 4, "rollout.n": 4,
                "trainer.samples_per_minibatch": 8, "trainer.micro_batch_per_rank": 2, "trainer.eval_freq": 0,
                "trainer.save_freq": 0, "rollout.max_response_length": 48, "logging.sinks": "[jsonl]",
                "optim.warmup_steps": 0}
        return " ".join(f"--set {k}={v}" for k, v in sets.items())

    return root, args


def _sbatch(slurm, out_file, megarl_args, wait: bool):
    cmd = ["sbatch", "--parsable", f"--output={out_file}", f"--export=ALL,MEGARL_ARGS={megarl_args}"]
    cmd += ["--wait"] if wait else []
    return subprocess.run([*cmd, "slurm/tiny_cpu.sh"], cwd=ROOT, env=slurm, capture_output=True, text=True,
                          timeout=1200)


def _job(slurm, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=slurm, capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def _leftovers(job_id: str) -> list[str]:
    """Processes still carrying this job's Ray temp dir (head, raylet, gcs, workers, actors)."""
    tag, found = f"megarl_ray_{job_id}", []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if tag in cmdline or (f"/{job_id}/" in cmdline and "ray" in cmdline):
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def _deterministic(metrics: dict) -> dict:
    """A step's metrics without wall-clock figures (timings, rates, overhead shares) and the bring-up's
    (startup/*: logged with the first step each process runs, so a requeued job logs them again)."""
    return {k: v for k, v in metrics.items() if not (k.startswith(("timing/", "throughput/", "startup/"))
                                                     or k.endswith(("_s", "seconds")) or "overhead" in k)}


def _steps(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def straight(slurm, job_args):
    root, args = job_args
    out = _sbatch(slurm, root / "straight.out", args(root / "straight"), wait=True)
    log = (root / "straight.out").read_text() if (root / "straight.out").exists() else ""
    assert out.returncode == 0, out.stderr + log[-4000:]
    return out.stdout.strip().split(";")[0], root / "straight", log


def test_sbatch_tiny_cpu_runs_grpo_under_ray_in_slurm_and_cleans_up(slurm, straight):
    job_id, run_dir, log = straight
    assert _job(slurm, job_id)["JobState"] == "COMPLETED"
    assert f"Slurm job {job_id}: 1 node(s)" in log and "srun --overlap --nodes=1 --ntasks=1" in log
    assert "[launch] ray up at" in log and "[launch] ray stopped" in log
    assert [m["step"] for m in _steps(run_dir)] == list(range(1, STEPS + 1))
    assert os.path.isfile(run_dir / "hf" / "model.safetensors")
    assert os.path.isfile(run_dir / "launch" / job_id / "ray_head_" f"{_job(slurm, job_id)['NodeList']}.log")
    assert _leftovers(job_id) == []


def test_usr1_checkpoints_requeues_and_the_requeued_job_finishes_like_an_uninterrupted_one(slurm, job_args,
                                                                                         straight):
    root, args = job_args
    run_dir = root / "preempted"
    out = _sbatch(slurm, root / "preempted.out", args(run_dir), wait=False)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline and _job(slurm, job_id).get("JobState") in ("PENDING", "RUNNING"), \
            (root / "preempted.out").read_text()[-3000:]
        time.sleep(0.2)
    # what `#SBATCH --signal=B:USR1@120` does shortly before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm, check=True)
    # (tools/slurm_local.sh shortens the credential lifetime that holds a requeued job: 10 s, not 120)
    while (job := _job(slurm, job_id)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    log = (root / "preempted.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log[-4000:]
    assert "checkpointed; requeueing job" in log and "resumed from" in log
    got, want = _steps(run_dir), _steps(straight[1])
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        assert _deterministic(a) == _deterministic(b), (a["step"], a, b)
    w_got, w_want = load_file(run_dir / "hf" / "model.safetensors"), load_file(straight[1] / "hf" / "model.safetensors")
    assert all(torch.equal(w_got[k], w_want[k]) for k in w_want)
    assert _leftovers(job_id) == []


def test_sbatch_runs_sft_as_one_srun_task_per_rank(slurm, job_args, converted):
    from examples.tool_math import sft_row, write

    root, _ = job_args
    write(str(root / "sft.jsonl"), (sft_row(random.Random(0)) for _ in range(32)))
    sets = {"model.path": converted["qwen2"]["hf"], "data.train": root / "sft.jsonl",
            "trainer.output_dir": root / "sft", "trainer.steps": 3, "trainer.samples_per_step": 8,
            "trainer.micro_batch_per_rank": 2, "trainer.save_freq": 0}
    out = subprocess.run(["sbatch", "--parsable", "--wait", f"--output={root / 'sft.out'}",
                          "--export=ALL,RECIPE=configs/tiny/sft_cpu.yaml,MEGARL_ARGS="
                          + " ".join(f"--set {k}={v}" for k, v in sets.items()), "slurm/tiny_cpu.sh"],
                         cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=900)
    log = (root / "sft.out").read_text()
    assert out.returncode == 0, out.stderr + log[-4000:]
    assert "no Ray" in log and "srun --overlap --nodes=1 --ntasks-per-node=2 --cpus-per-task=1" in log
    assert "megarl.launch.rank configs/tiny/sft_cpu.yaml" in log
    assert [json.loads(line)["step"] for line in open(root / "sft" / "metrics.jsonl")] == [1, 2, 3]
    assert os.path.isfile(root / "sft" / "hf" / "model.safetensors")
