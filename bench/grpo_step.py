"""Benchmark: one GRPO step of the real loop (`megarl train`: Ray, megatron workers, a vLLM engine,
multi-turn tools, weight sync) on the tiny model, with the time per phase and the fraction of the
step spent outside model compute (vLLM generation + megatron forward/backward, each measured inside
its process): agent loop, tools, rewards, batching, Ray transfers, weight sync, metrics.

    python bench/grpo_step.py [--steps 6] [--prompts 8] [--n 4] [--shape demo|20m]

`--shape 20m`: #22's side-by-side shape (a ~20M-parameter Qwen2, 16 prompts x 8 samples, 64 new
tokens, fp32, one update per rollout, KL off) instead of the demo's model.

Last stdout line: {"step_seconds": T, "step_seconds_vs_before": R, "overhead_fraction": F,
"phases": {...}, "mfu": {phase: fraction}, "padding_fraction": P, "peak_gflops_per_core": {...}}
(medians over the steps after the first, which pays one-time kernel JIT), "startup_seconds": S,
"startup_seconds_converting": C, "startup_phases": {...}; R is T over the same run
with `algorithm.old_logprobs: recompute` (the separate old-log-prob pass every step used to make)
and `rollout.engine_cpu_threads: 1` (the engine on its slot's one thread while the other core
idled), measured first in the same invocation. MFU of a phase = its model FLOPs (`flops/*` metrics: counted
from the architecture and the real token counts, padding excluded; megarl.models.flops) / its
seconds / the fp32 matrix-multiply peak of one core measured here, times the cores the phase runs
on (the training ranks' threads; the engine's OpenMP threads, `startup/engine_threads`). The bf16
peak is measured too, for when the recipe computes in bf16. S: from the start of `megarl train`
to its first step (before any evaluation), in the second run, which finds the model converted by
the first (C: the first, converting it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


SHAPES = {
    "demo": {"model": {}, "prompts": 8, "n": 4, "set": ()},
    # #22's side-by-side shape: ~20M parameters, 16 prompts x 8 samples, 64 new tokens, KL off
    "20m": {"model": dict(hidden=384, layers=9, heads=6, kv_heads=2, ffn=1536), "prompts": 16, "n": 8,
            "set": ("--set", "rollout.max_response_length=64", "--set", "algorithm.kl.coef=0")},
}


def run_steps(work: str, model: str, args, name: str, *extra: str) -> list[dict]:
    """`megarl train` for args.steps steps -> the metrics of every step (the first also holds the
    bring-up's `startup/*` seconds)."""
    out = os.path.join(work, name)
    cmd = [sys.executable, "-m", "megarl.cli", "train", "configs/tiny/grpo_cpu.yaml",
           "--set", f"model.path={model}", "--set", f"data.train={work}/rl.jsonl",
           "--set", f"trainer.output_dir={out}",
           "--set", f"trainer.steps={args.steps}", "--set", f"trainer.prompts_per_step={args.prompts}",
           "--set", f"rollout.n={args.n}", "--set", f"trainer.samples_per_minibatch={args.prompts * args.n}",
           "--set", "trainer.save_freq=0", "--set", "trainer.resume=never", "--set", "logging.sinks=[jsonl]",
           "--set", "trainer.eval_freq=0", "--set", "optim.warmup_steps=0", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stdout[-4000:] + proc.stderr[-4000:])
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def matmul_peak_gflops(dtype: str, size: int = 1024, seconds: float = 1.5) -> float:
    """GFLOP/s of one thread multiplying two size x size matrices of `dtype` (best of a few tries)."""
    import time

    import torch

    torch.set_num_threads(1)
    a, b = (torch.randn(size, size).to(getattr(torch, dtype)) for _ in range(2))
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def phase_mfu(rows: list[dict], peak_per_core: float, cores: dict[str, int]) -> dict[str, float]:
    """Median over steps of flops/<phase> / timing/<phase>_s / (peak × cores of the phase)."""
    out = {}
    for phase, n in cores.items():
        if f"flops/{phase}" in rows[0] and f"timing/{phase}_s" in rows[0]:
            out[phase] = round(statistics.median(r[f"flops/{phase}"] / r[f"timing/{phase}_s"] for r in rows)
                               / (peak_per_core * 1e9 * n), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=None, help="default: the shape's (demo 8, 20m 16)")
    parser.add_argument("--n", type=int, default=None, help="default: the shape's (demo 4, 20m 8)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo",
                        help="demo: the demo's model; 20m: a 20M-parameter Qwen2 shape with #22's batch "
                             "(16 prompts x 8 samples, 64 new tokens)")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    args.prompts = args.prompts or shape["prompts"]
    args.n = args.n or shape["n"]
    from examples.tool_math import rl_row, write
    from megarl.runtime.device import usable_cpus

    peak = {dtype: round(matmul_peak_gflops(dtype), 1) for dtype in ("float32", "bfloat16")}
    print(f"matmul peak of one core: {peak} GFLOP/s", flush=True)
    from megarl.models.tiny_hf import make_tiny_model

    work = tempfile.mkdtemp(prefix="megarl-bench-grpo-")
    try:
        model = os.path.join(work, "model")
        made = make_tiny_model(model, arch="qwen2", logit_scale=4.0, **shape["model"])
        print(f"model: {args.shape}, {made['params'] / 1e6:.1f}M parameters; {args.prompts} prompts x {args.n}",
              flush=True)
        rng = random.Random(0)
        write(os.path.join(work, "rl.jsonl"), (rl_row(rng) for _ in range(args.prompts * args.steps)))
        # the same run as before #22's items 1-2: the separate old-log-prob pass forced and the engine
        # on its slot's one thread (its start converts the model; the second run finds the conversion)
        before_all = run_steps(work, model, args, "before", *shape["set"], "--set", "algorithm.old_logprobs=recompute",
                               "--set", "rollout.engine_cpu_threads=1")
        rows_all = run_steps(work, model, args, "run", *shape["set"])
        before, rows = before_all[1:], rows_all[1:]
        startup = {k.removeprefix("startup/").removesuffix("_s"): round(v, 2) for k, v in rows_all[0].items()
                   if k.startswith("startup/") and k.endswith("_s")}
        print(f"{'startup (converted before)':>24}: {startup}")
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("timing/")}
        before_s = statistics.median(r["timing/step_s"] for r in before)
        phases = {k.removeprefix("timing/").removesuffix("_s"): round(v, 4) for k, v in med.items()
                  if k not in ("timing/step_s", "timing/overhead_fraction")}
        for k, v in phases.items():
            print(f"{k:>24}: {v:.3f}")
        print(f"{'step, old log-probs recomputed':>24}: {before_s:.3f}")
        world = 2  # configs/tiny: 2 ranks of usable_cpus() // 2 threads each (megarl.trainers.rl.driver)
        cores = {"update": min(usable_cpus(), world * max(1, usable_cpus() // world)),
                 "rollout": int(rows_all[0]["startup/engine_threads"])}   # the engine's OpenMP threads
        cores["old_logprobs"] = cores["ref_logprobs"] = cores["update"]
        mfu = {**phase_mfu(before, peak["float32"], cores), **phase_mfu(rows, peak["float32"], cores)}
        padding = statistics.median(r["batch/padding_fraction"] for r in rows)
        print(f"{'mfu (fp32 peak)':>24}: {mfu}; padding {padding:.3f}")
        print(json.dumps({"shape": args.shape, "step_seconds": round(med["timing/step_s"], 3),
                          "step_seconds_vs_before": round(med["timing/step_s"] / before_s, 3),
                          "overhead_fraction": round(med["timing/overhead_fraction"], 3), "phases": phases,
                          "samples_per_step": args.prompts * args.n, "steps_measured": len(rows),
                          "mfu": mfu, "padding_fraction": round(padding, 3), "peak_gflops_per_core": peak,
                          "startup_seconds": startup["total"],
                          "startup_seconds_converting": round(before_all[0]["startup/total_s"], 2),
                          "startup_phases": startup}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
