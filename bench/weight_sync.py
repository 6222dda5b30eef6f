"""Benchmark: a full weight sync (megatron TP=2 shards -> one vLLM engine) against
(a) one raw gloo broadcast of a single buffer of the same size between the same two processes
    (the transport limit of the sync group), and
(b) the naive path: gather the full state dict on rank 0, save it as safetensors, have the engine
    reload it from disk,
in the same run, on the same >= 100M-parameter model. Every timing runs until the engine has
finished loading (the engine acknowledges through the rendezvous store). The sync is timed with
both transports (megarl.sync.transport): "shared_memory", what `transport: auto` picks for this
single-node CPU layout, and "broadcast", what engines on other nodes get.

    python bench/weight_sync.py [--hidden 1024] [--layers 8] [--repeats 5] [--bucket-mb 32]

Last stdout line: {"params": N, "ratio_vs_raw_broadcast": R, "speedup_vs_naive": S, "peak_extra_mb": M, ...}
for the auto transport, with R = raw seconds / sync seconds (the same bytes), S = naive seconds /
sync seconds, and M the larger of the sender's and the engine's resident-memory growth during a
sync (shared-memory slots count on both sides). `broadcast_*` fields give the same figures for the
broadcast transport. Also reported: `engine_load_seconds`, vLLM's own in-place load of the same
tensors from memory with nothing else running (a floor every path pays).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

STORE_TIMEOUT = timedelta(seconds=600)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> float:
    """Reset VmHWM to the current RSS (Linux clear_refs 5) and return the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _client_store(port: int):
    from megarl.runtime.rendezvous import Rendezvous

    return Rendezvous("127.0.0.1", port, STORE_TIMEOUT.total_seconds()).connect()


def _raw_group(store, rank: int):
    import torch.distributed as dist

    return dist.ProcessGroupGloo(dist.PrefixStore("bench-raw", store), rank, 2, STORE_TIMEOUT)


class BenchEngine:
    """The engine process: one vLLM engine, acknowledging each phase through the store."""

    def __init__(self, model_dir: str):
        from megarl.rollout.engine import EngineConfig, RolloutEngine

        self.engine = RolloutEngine(EngineConfig(model_dir, max_model_len=256, kv_cache_bytes=32 << 20))

    def run(self, plans: dict, port: int, repeats: int, naive_dir: str) -> dict:
        from megarl.runtime.rendezvous import Rendezvous

        store = _client_store(port)
        raw = _raw_group(store, 1)
        extra, stats = {t: [] for t in plans}, {t: [] for t in plans}
        buf = torch.zeros(next(iter(plans.values())).total_bytes, dtype=torch.uint8)  # the raw path's best case
        for i in range(repeats):  # interleaved, so drifting machine load hits every path alike
            raw.broadcast(buf, 0).wait()
            store.set(f"raw{i}", "1")
            for j, (transport, plan) in enumerate(plans.items()):
                generation = i * len(plans) + j
                self.engine.join_weight_sync(plan, Rendezvous("127.0.0.1", port), 0, generation)
                base = _reset_peak()
                stats[transport].append(self.engine.receive_weights(generation + 1))
                extra[transport].append(_status_mb("VmHWM") - base)
                store.set(f"sync{transport}{i}", "1")
            store.wait([f"naive_ready{i}"])
            self.engine.load_weights_from_path(naive_dir, 100 + i)
            store.set(f"naive{i}", "1")
        del buf
        # the floor any path pays: vLLM's own in-place load of the same tensors from memory, alone
        from safetensors.torch import load_file

        tensors = list(load_file(os.path.join(naive_dir, "model.safetensors")).items())
        load = []
        for i in range(repeats):
            t0 = time.perf_counter()
            self.engine.load_weights(tensors, 200 + i)
            load.append(time.perf_counter() - t0)
        return {"engine_extra_mb": {t: max(v) for t, v in extra.items()}, "receiver_stats": stats,
                "engine_load_seconds": min(load)}


def trainer(ckpt: str, plans: dict, port: int, repeats: int, naive_dir: str) -> dict:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megarl.checkpoint.hf import load_converted
    from megarl.checkpoint.hf_map import hf_tensors
    from megarl.config.parallel import ParallelConfig
    from megarl.runtime.rendezvous import Rendezvous
    from megarl.sync.sender import WeightSender, full_tensor

    torch.set_num_threads(1)
    plan = plans["broadcast"]
    chunks, _, _ = load_converted(ckpt, ParallelConfig(tp=plan.trainer.tp), dtype="fp32")
    rank = dist.get_rank()
    store = _client_store(port) if rank == 0 else None  # the bench process hosts it (bound, then published)
    raw = _raw_group(store, 0) if rank == 0 else None
    out: dict = {"raw": [], "naive": [], **{k: {t: [] for t in plans} for k in ("sync", "extra_mb", "stats")}}
    buf = torch.empty(plan.total_bytes, dtype=torch.uint8).fill_(7) if rank == 0 else None
    gatherer = WeightSender(plan, chunks)   # the naive path uses the same TP gathers
    for i in range(repeats):
        dist.barrier()
        if rank == 0:
            t0 = time.perf_counter()
            raw.broadcast(buf, 0).wait()
            store.wait([f"raw{i}"])
            out["raw"].append(time.perf_counter() - t0)
        for j, (transport, p) in enumerate(plans.items()):
            sender = WeightSender(p, chunks)
            sender.join(Rendezvous("127.0.0.1", port), store=store, generation=i * len(plans) + j)
            dist.barrier()
            base = _reset_peak()
            t0 = time.perf_counter()
            out["stats"][transport].append(sender.send(i * len(plans) + j + 1))
            if rank == 0:
                store.wait([f"sync{transport}{i}"])
            out["sync"][transport].append(time.perf_counter() - t0)
            out["extra_mb"][transport].append(_status_mb("VmHWM") - base)
            if sender.group is not None:
                sender.group.close()
        # naive: every tensor gathered to rank 0 (the same TP gathers the sender does), converted to
        # HF names, saved with safetensors, reloaded by the engine from disk
        dist.barrier()
        t0 = time.perf_counter()
        state = {}
        for s in plan.senders:
            for bucket in plan.buckets_of(s.index):
                for entry in bucket.entries:
                    parts = gatherer._gather(entry, s, root=rank == 0)
                    if rank == 0:
                        full = full_tensor(entry, parts)
                        targets = [t.name for t in entry.hf]
                        state.update((n, t.contiguous()) for n, t in hf_tensors(targets, entry.how, full,
                                                                                plan.qkv_dims))
        if rank == 0:
            shutil.rmtree(naive_dir, ignore_errors=True)
            os.makedirs(naive_dir)
            save_file(state, os.path.join(naive_dir, "model.safetensors"))
            del state
            store.set(f"naive_ready{i}", "1")
            store.wait([f"naive{i}"])
        out["naive"].append(time.perf_counter() - t0)
    dist.barrier()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=32)
    parser.add_argument("--engine-threads", type=int, default=1,
                        help="torch threads of the engine process (the two trainer ranks use one each)")
    args = parser.parse_args()

    from megarl.config.parallel import ParallelConfig
    from megarl.models.hf_config import read_hf_config
    from megarl.models.tiny_hf import make_tiny_model
    from megarl.runtime.local_group import IsolatedActor, run_local_group
    from megarl.sync.plan import EngineLayout, WeightSyncPlan

    work = tempfile.mkdtemp(prefix="megarl-bench-sync-")
    try:
        model = os.path.join(work, "hf")
        info = make_tiny_model(model, arch="qwen2", hidden=args.hidden, layers=args.layers, heads=16, kv_heads=4,
                               ffn=4 * args.hidden)
        ckpt = os.path.join(work, "mcore")
        run_local_group("megarl.checkpoint.hf:convert_hf_to_megatron", 1, args=(model, ckpt), timeout=600)
        cfg = read_hf_config(model)
        plans = {t: WeightSyncPlan.build(ParallelConfig(tp=2).resolve(2), EngineLayout(1), "qwen2", cfg,
                                         bucket_bytes=args.bucket_mb << 20, transport=t)
                 for t in ("shared_memory", "broadcast")}
        plan = plans["broadcast"]
        print(plan.summary(), flush=True)
        engine = IsolatedActor("bench.weight_sync:BenchEngine", args=(model,),
                               env={"OMP_NUM_THREADS": str(args.engine_threads)})
        from megarl.runtime.rendezvous import open_store

        host_store, port = open_store("127.0.0.1", 0, timeout_s=900)  # bound to port 0, then published
        box = {}

        def run_trainer():
            box["trainer"] = run_local_group("bench.weight_sync:trainer", 2,
                                             args=(ckpt, plans, port, args.repeats, os.path.join(work, "naive")),
                                             timeout=900)

        thread = threading.Thread(target=run_trainer)
        thread.start()
        engine_out = engine.call("run", plans, port, args.repeats, os.path.join(work, "naive"), timeout=900)
        thread.join()
        engine.close()
        del host_store  # held until both sides are done with it
        rank0 = box["trainer"][0]
        raw, naive = min(rank0["raw"]), min(rank0["naive"])
        gb = plan.total_bytes / 1e9

        def figures(transport: str) -> dict:
            sync = min(rank0["sync"][transport])
            extra = max(engine_out["engine_extra_mb"][transport],
                        *[max(t["extra_mb"][transport]) for t in box["trainer"]])
            return {"ratio_vs_raw_broadcast": round(raw / sync, 3), "speedup_vs_naive": round(naive / sync, 2),
                    "peak_extra_mb": round(extra, 1), "sync_seconds": round(sync, 3),
                    "sync_gb_per_s": round(gb / sync, 3)}

        auto, bcast = figures("shared_memory"), figures("broadcast")
        result = {
            "params": info["params"], **{k: auto[k] for k in ("ratio_vs_raw_broadcast", "speedup_vs_naive",
                                                              "peak_extra_mb")},
            "transport": "shared_memory", "sync_seconds": auto["sync_seconds"],
            **{f"broadcast_{k}": v for k, v in bcast.items()},
            "bytes": plan.total_bytes, "buckets": len(plan.buckets), "bucket_mb": args.bucket_mb,
            "raw_seconds": round(raw, 3), "naive_seconds": round(naive, 3), "raw_gb_per_s": round(gb / raw, 3),
            "sync_gb_per_s": auto["sync_gb_per_s"],
            "engine_load_seconds": round(engine_out["engine_load_seconds"], 3),
            "engine_threads": args.engine_threads,
        }
        for transport in plans:
            best = min(range(args.repeats), key=lambda i: rank0["sync"][transport][i])
            print(f"{transport} sender:", {k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in rank0["stats"][transport][best].items()})
            print(f"{transport} receiver:",
                  {k: round(v, 3) if isinstance(v, float) else v
                   for k, v in engine_out["receiver_stats"][transport][best].items()})
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
