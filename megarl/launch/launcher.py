"""`megarl launch RECIPE`: bring Ray up on the job's nodes, run the driver, tear Ray down, and on
preemption checkpoint and requeue.

    detect nodes (Slurm or local) -> start Ray (head + workers, by PID) -> wait for every node's
    CPUs/GPUs -> `megarl train RECIPE` as a child with RAY_ADDRESS set -> stop Ray -> exit code

Preemption: sbatch scripts ask for `#SBATCH --signal=B:USR1@<seconds>` and `exec` this launcher,
so the batch step's USR1 reaches it. It forwards the signal to the driver, which checkpoints after
the current step and exits with EXIT_CHECKPOINTED; the launcher then stops Ray and runs
`scontrol requeue $SLURM_JOB_ID`. The requeued job runs the same script; `trainer.resume: auto`
(the default) picks the checkpoint up. SIGTERM (scancel, time limit) is forwarded the same way but
never requeues.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from megarl.launch.nodes import LaunchError, NodeMap, detect_nodes
from megarl.launch.ray_cluster import RayCluster, extra_srun_args
from megarl.runtime.rendezvous import RENDEZVOUS_FILE_ENV
from megarl.trainers.runner import EXIT_CHECKPOINTED


def driver_plan(recipe, recipe_path: str, overrides: list[str], nodes: NodeMap, cluster: RayCluster | None,
                log_dir: str):
    """(argv, extra env) of the driver. Ray stages: `megarl train` on the head with RAY_ADDRESS
    (the head's published address and the token variables join at start).
    Other stages: `megarl train` itself (local gloo ranks) locally; under Slurm one process per
    training rank across the nodes (`srun` + megarl.launch.rank): rank 0 hosts the
    torch.distributed store on the head and publishes its port in a file of this launch's own
    (in the log directory, which every node sees)."""
    sets = [a for o in overrides for a in ("--set", o)]
    if cluster is not None:
        return [sys.executable, "-m", "megarl.cli", "train", recipe_path, *sets], {"RAY_ADDRESS": cluster.address}
    if not nodes.slurm:
        return [sys.executable, "-m", "megarl.cli", "train", recipe_path, *sets], {}
    world = recipe.derived.train_world_size
    if world % len(nodes.nodes):
        raise LaunchError(f"{world} training ranks do not split over the job's {len(nodes.nodes)} nodes")
    per_node = world // len(nodes.nodes)
    srun = ["srun", "--overlap", f"--nodes={len(nodes.nodes)}", f"--ntasks-per-node={per_node}",
            f"--cpus-per-task={max(1, nodes.cpus_per_node // per_node)}", "--kill-on-bad-exit=1", *extra_srun_args()]
    rendezvous = os.path.join(os.path.abspath(log_dir), f"rendezvous_{os.getpid()}_{time.time_ns()}.json")
    from megarl.runtime.device import CUDA, rank_env

    env = {"MASTER_ADDR": nodes.head, RENDEZVOUS_FILE_ENV: rendezvous, **(rank_env(CUDA) if nodes.total_gpus else {})}
    return [*srun, sys.executable, "-m", "megarl.launch.rank", recipe_path, *sets], env


def plan_text(nodes: NodeMap, cluster: RayCluster | None, driver: list[str], env: dict, log_dir: str) -> str:
    import shlex

    lines = [nodes.describe(ray=cluster is not None)]
    if cluster is not None:
        lines += [f"ray (address {cluster.address}, logs in {log_dir}):", cluster.render()]
    else:
        lines += ["no Ray: this stage runs megatron ranks directly"]
    lines += [f"driver on {nodes.head}: {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(driver)}".replace(
        ":  ", ": ")]
    if cluster is not None:
        lines.append("teardown: SIGTERM to the processes above (workers, then head); never `ray stop`")
    lines.append("on USR1: driver checkpoints" + (" -> ray stopped" if cluster else "")
                 + " -> `scontrol requeue` (Slurm only)")
    return "\n".join(lines)


def launch(recipe_path: str, overrides: list[str], dry_run: bool = False, start_timeout: float = 300.0,
           port: int = 0) -> int:
    from megarl.config import ConfigError
    from megarl.config.loader import load_recipe, recipe_to_dict
    from megarl.launch.placement import build_placement
    from megarl.trainers import RAY_STAGES, prepare_start
    from megarl.trainers.run_dir import OutputDirTaken, claim_output_dir

    try:
        recipe = load_recipe(recipe_path, overrides=overrides)
    except ConfigError as e:
        print(f"{recipe_path}: {e}", file=sys.stderr)
        return 1
    cpu_only = recipe.cluster.device == "cpu"  # cluster.gpus_per_node then counts CPU ranks, not GPUs
    nodes = detect_nodes(gpus_per_node=0 if cpu_only else recipe.cluster.gpus_per_node)
    if cpu_only:
        nodes.gpus_per_node = 0
    problems = []
    if nodes.slurm and len(nodes.nodes) != recipe.cluster.nodes:
        problems.append(f"the recipe's cluster.nodes is {recipe.cluster.nodes} but the job has {len(nodes.nodes)} "
                        "node(s); make the sbatch --nodes and the recipe agree")
    if not cpu_only and nodes.total_gpus < recipe.cluster.total_gpus:
        problems.append(f"the recipe wants {recipe.cluster.total_gpus} GPUs (cluster.nodes × gpus_per_node) but "
                        f"the job has {nodes.total_gpus}; fix the sbatch header or the recipe's cluster group")
    if not problems or dry_run:  # the output directory is claimed (recipe written) before anything goes there
        try:
            claim_output_dir(recipe, recipe_to_dict(recipe), write=not dry_run)
        except OutputDirTaken as e:
            problems.append(str(e))
    if problems and not dry_run:
        raise LaunchError("; ".join(problems))
    log_dir = os.path.join(recipe.trainer.output_dir, "launch", nodes.job_id or "local")
    cluster = RayCluster(nodes, log_dir, port=port) if recipe.stage in RAY_STAGES else None
    driver, driver_env = driver_plan(recipe, recipe_path, overrides, nodes, cluster, log_dir)
    print(plan_text(nodes, cluster, driver, driver_env, log_dir), flush=True)
    if recipe.rollout is not None:  # the same map `megarl plan` prints and the RL driver places by
        print("\n".join(["placement:"] + ["  " + line for line in build_placement(recipe).lines()]), flush=True)
    if dry_run:
        for p in problems:
            print(f"would fail: {p}", flush=True)
        return 1 if problems else 0

    received: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum, _frame):
        received.append(signum)
        print(f"[launch] received signal {signum}: asking the driver to checkpoint and stop", flush=True)
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    t0 = time.monotonic()
    try:
        if cluster is not None:
            cluster.start(timeout=start_timeout)
            print(f"[launch] ray up at {cluster.address} in {time.monotonic() - t0:.1f}s (pids {cluster.pids()})",
                  flush=True)
        elif nodes.slurm:
            prepare_start(recipe)  # convert once, before the ranks start
            os.makedirs(os.path.dirname(driver_env[RENDEZVOUS_FILE_ENV]), exist_ok=True)
        if received:  # a signal while starting: nothing ran, nothing to save
            return 128 + received[0]
        if cluster is not None:
            driver_env = {**driver_env, **cluster.client_env()}
        child.append(subprocess.Popen(driver, env={**os.environ, **driver_env}))
        code = child[0].wait()
    finally:
        if cluster is not None:
            killed = cluster.stop()
            print(f"[launch] ray stopped{' (SIGKILL: ' + ', '.join(killed) + ')' if killed else ''}", flush=True)
        if RENDEZVOUS_FILE_ENV in driver_env and os.path.exists(driver_env[RENDEZVOUS_FILE_ENV]):
            os.remove(driver_env[RENDEZVOUS_FILE_ENV])
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code == EXIT_CHECKPOINTED and signal.SIGUSR1 in received and nodes.slurm:
        # said before: a successful requeue ends this batch script at once, often before a line after it
        print(f"[launch] checkpointed; requeueing job {nodes.job_id} (it resumes from the checkpoint)", flush=True)
        out = subprocess.run(["scontrol", "requeue", nodes.job_id], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"[launch] checkpointed, but `scontrol requeue {nodes.job_id}` failed: {out.stderr.strip()}; "
                  "resubmit the script to continue (it resumes from the checkpoint)", file=sys.stderr, flush=True)
            return EXIT_CHECKPOINTED
        return 0
    return code
