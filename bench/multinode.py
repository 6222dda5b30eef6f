"""Benchmark: what crossing nodes costs, on a simulated 3-node cluster (tools/simcluster.py: network
namespaces on this machine, each node its own address, hostname, /dev/shm and /tmp; Ray across
them; root needed). Every process below runs inside a node; the layout is the one the multinode
tests use: the actor TP=2 within a node × PP=2 across nodes 1-2, one engine on node 3 (`separate`).

- cross_node_sync_vs_raw: GRPO on a ~120M-parameter model in that layout; every step ends with a
  full weight sync (checksummed buckets, broadcast from the sender of each pipeline stage to the
  engine on node 3). R = (bytes / sync seconds) / (bytes / seconds of one raw gloo broadcast of a
  buffer of the same size from node 1 to node 3), medians, measured in the same run.
- step_seconds_3node / step_seconds_1node: the tiny GRPO recipe in that layout across the three
  nodes, and the same recipe with every slot on node 1 (where the sync uses shared memory), median
  step time over the steps after the first.

    python bench/multinode.py [--hidden 1024] [--layers 8] [--steps 5] [--bucket-mb 64]

Last stdout line: {"nodes": 3, "cross_node_sync_vs_raw": R, "step_seconds_3node": T3,
"step_seconds_1node": T1, ...} (also the sync and raw seconds, the bytes and the step ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

LAYOUT_3NODE = ["cluster.nodes=3", "cluster.gpus_per_node=2", "cluster.placement.rollout_gpus=2"]
LAYOUT_1NODE = ["cluster.nodes=1", "cluster.gpus_per_node=6", "cluster.placement.rollout_gpus=2"]


def grpo(sim, inputs, model: str, out: str, layout: list[str], steps: int, *extra: str) -> list[dict]:
    """`megarl train` of the tiny GRPO recipe from node 1 -> the metrics of every step."""
    sets = [f"model.path={model}", f"data.train={inputs}/rl.jsonl", f"trainer.output_dir={out}",
            *layout, "cluster.placement.mode=separate", "parallel.tp=2", "parallel.pp=2",
            f"trainer.steps={steps}", "trainer.save_freq=0", "trainer.eval_freq=0", "trainer.resume=never",
            "optim.warmup_steps=0", "logging.sinks=[jsonl]", "data.eval=null", *extra]
    argv = [sim.python, "-m", "megarl.cli", "train", "configs/tiny/grpo_cpu.yaml"]
    for s in sets:
        argv += ["--set", s]
    done = sim.run(1, argv, timeout=1200, check=False, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{out}: exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def raw_broadcast(sim, nbytes: int, repeats: int) -> float:
    """Median seconds of a gloo broadcast of `nbytes` from node 1 to node 3 (two processes, one
    per node; the store is hosted on node 1, its port published in the shared state dir)."""
    path = str(sim.state / "bench_raw_rendezvous.json")
    if os.path.exists(path):
        os.remove(path)
    args = [str(nbytes), str(repeats), path, sim.ip(1)]
    host = sim.popen(1, [sim.python, os.path.abspath(__file__), "--raw-rank", "0", *args], cwd=ROOT,
                     stdout=subprocess.PIPE, text=True)
    peer = sim.run(3, [sim.python, os.path.abspath(__file__), "--raw-rank", "1", *args], timeout=600, cwd=ROOT)
    out, _ = host.communicate(timeout=600)
    if host.returncode:
        sys.exit(f"raw broadcast host failed: {out}\n{peer.stdout}")
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def raw_rank(rank: int, nbytes: int, repeats: int, path: str, host_ip: str) -> None:
    """One end of the raw broadcast (run inside a node)."""
    import torch
    import torch.distributed as dist

    from megarl.runtime.rendezvous import Rendezvous, open_store, publish_address, wait_for_address

    torch.set_num_threads(1)
    if rank == 0:
        store, port = open_store(host_ip, 0, 300)
        publish_address(path, host_ip, port)
    else:
        host, port = wait_for_address(path, 300, "the raw broadcast's store")
        store = Rendezvous(host, port, 300).connect()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.broadcast(buf, src=0)
        dist.barrier()  # the receiver has it all
        times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    print(json.dumps({"seconds": statistics.median(times)}), flush=True)


def median_after_first(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--raw-rank", type=int)
    args, rest = parser.parse_known_args()
    if args.raw_rank is not None:
        return raw_rank(args.raw_rank, int(rest[0]), int(rest[1]), rest[2], rest[3])
    if os.geteuid() != 0:
        sys.exit("bench/multinode.py needs root (the simulated cluster uses network namespaces)")

    from simcluster import SimCluster

    from examples.tool_math import rl_row, write
    from megarl.models.tiny_hf import make_tiny_model

    sim = SimCluster(nodes=3, ray=True, cpus=6)
    sim.down()  # one left by a killed earlier run
    t0 = time.monotonic()
    sim.up()
    print(f"simulated cluster up in {time.monotonic() - t0:.0f} s", flush=True)
    try:
        work = sim.state / "bench"
        work.mkdir()
        write(str(work / "rl.jsonl"), (rl_row(random.Random(0)) for _ in range(64)))
        make_tiny_model(str(work / "tiny"), arch="qwen2", logit_scale=4.0)
        info = make_tiny_model(str(work / "big"), arch="qwen2", hidden=args.hidden, layers=args.layers, heads=16,
                               kv_heads=4, ffn=4 * args.hidden, tokenizer_dir=str(work / "tiny"))
        small = ["trainer.prompts_per_step=4", "rollout.n=4", "trainer.samples_per_minibatch=16",
                 "trainer.micro_batch_per_rank=2", "rollout.max_response_length=32"]
        three = grpo(sim, work, str(work / "tiny"), str(work / "run3"), LAYOUT_3NODE, args.steps, *small)
        one = grpo(sim, work, str(work / "tiny"), str(work / "run1"), LAYOUT_1NODE, args.steps, *small)
        big = grpo(sim, work, str(work / "big"), str(work / "sync3"), LAYOUT_3NODE, 3, "trainer.prompts_per_step=2",
                   "rollout.n=2", "trainer.samples_per_minibatch=4", "trainer.micro_batch_per_rank=1",
                   "rollout.max_response_length=16", f"rollout.weight_sync.bucket_mb={args.bucket_mb}")
        nbytes = int(big[0]["sync/bytes"])
        sync_s = statistics.median(r["sync/seconds"] for r in big)
        raw_s = raw_broadcast(sim, nbytes, repeats=5)
    finally:
        sim.down()
    t3, t1 = median_after_first(three, "timing/step_s"), median_after_first(one, "timing/step_s")
    parts = {k.removeprefix("sync/").removesuffix("_s"): round(statistics.median(r[k] for r in big), 4)
             for k in big[0] if k.startswith(("sync/sender_", "sync/engine_"))}
    print(f"sync across nodes: {nbytes / 2**20:.0f} MiB in {sync_s:.3f} s; raw gloo broadcast {raw_s:.3f} s")
    for k, v in parts.items():
        print(f"{k:>24}: {v:.3f} s")
    print(f"step: {t3:.3f} s on 3 nodes, {t1:.3f} s on 1 node")
    print(json.dumps({"nodes": 3, "cross_node_sync_vs_raw": round(raw_s / sync_s, 3),
                      "step_seconds_3node": round(t3, 3), "step_seconds_1node": round(t1, 3),
                      "step_3node_vs_1node": round(t3 / t1, 3), "sync_seconds": round(sync_s, 4),
                      "raw_broadcast_seconds": round(raw_s, 4), "sync_bytes": nbytes, "params": info["params"],
                      "steps_measured": len(three) - 1, "sync_parts_seconds": parts}))


if __name__ == "__main__":
    main()
