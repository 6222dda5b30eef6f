"""Benchmark: one GRPO step of the real loop (`megarl train`: Ray, megatron workers, a vLLM engine,
multi-turn tools, weight sync) on the tiny model, with the time per phase and the fraction of the
step spent outside model compute (vLLM generation + megatron forward/backward, each measured inside
its process): agent loop, tools, rewards, batching, Ray transfers, weight sync, metrics.

    python bench/grpo_step.py [--steps 6] [--prompts 8] [--n 4]

Last stdout line: {"step_seconds": T, "step_seconds_vs_before": R, "overhead_fraction": F,
"phases": {...}} (medians over the steps after the first, which pays one-time kernel JIT); R is T
over the same run with `algorithm.old_logprobs: recompute` (the separate old-log-prob pass every
step used to make), measured first in the same invocation.
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


def run_steps(work: str, model: str, args, name: str, *extra: str) -> list[dict]:
    """`megarl train` for args.steps steps -> the metrics of the steps after the first."""
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
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args()
    from examples.tool_math import rl_row, write
    from megarl.models.tiny_hf import make_tiny_model

    work = tempfile.mkdtemp(prefix="megarl-bench-grpo-")
    try:
        model = os.path.join(work, "model")
        make_tiny_model(model, arch="qwen2", logit_scale=4.0)
        rng = random.Random(0)
        write(os.path.join(work, "rl.jsonl"), (rl_row(rng) for _ in range(args.prompts * args.steps)))
        # the same run with the separate old-log-prob pass forced (what every step did before)
        before = run_steps(work, model, args, "before", "--set", "algorithm.old_logprobs=recompute")
        rows = run_steps(work, model, args, "run")
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("timing/")}
        before_s = statistics.median(r["timing/step_s"] for r in before)
        phases = {k.removeprefix("timing/").removesuffix("_s"): round(v, 4) for k, v in med.items()
                  if k not in ("timing/step_s", "timing/overhead_fraction")}
        for k, v in phases.items():
            print(f"{k:>24}: {v:.3f}")
        print(f"{'step, old log-probs recomputed':>24}: {before_s:.3f}")
        print(json.dumps({"step_seconds": round(med["timing/step_s"], 3),
                          "step_seconds_vs_before": round(med["timing/step_s"] / before_s, 3),
                          "overhead_fraction": round(med["timing/overhead_fraction"], 3), "phases": phases,
                          "samples_per_step": args.prompts * args.n, "steps_measured": len(rows)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
