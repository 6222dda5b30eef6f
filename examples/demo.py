"""`make demo`: the main job that exists today, end to end on CPU.

1. make the tiny model (random init, locally trained tokenizer with a tool-calling chat template)
2. generate the synthetic calculator tool-calling task (examples/tool_math.py)
3. SFT it with megatron on 2 gloo ranks (configs/tiny/sft_cpu.yaml), exporting HF weights
4. GRPO it (configs/tiny/grpo_cpu.yaml): multi-turn calculator calls on a vLLM engine, rewards
   from the answer and the tool-call format, weight sync after every step, Ray orchestrating;
   the task success rate on held-out prompts is measured before the first and after the last step
5. write runs/demo/summary.json (success_before, success_after, grpo_seconds, the curve, paths)
6. write the GRPO run's report (`megarl report runs/tiny/grpo`: curves, step time, trajectories)

    python examples/demo.py [--seed N] [--threads N]

--seed sets the GRPO phase's trainer.seed (sampling and initialisation streams); --threads sets
cluster.cpu_threads_per_rank of both phases (another floating-point reduction order, as on another
machine): the demo's learning must not hang on either.

The SFT demonstrations are a mix: about half call the calculator, the rest answer from mental
arithmetic, which the tiny model cannot imitate (examples/tool_math.py: mixed_sft_rows). After
SFT the model skips the tool about half the time and then mostly guesses wrong; GRPO learns from
the task reward alone that calling the tool pays.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

SFT_TOOL_SHARE = 0.5  # share of SFT demonstrations that call the calculator
EVAL_PROMPTS = 512    # held-out prompts (x rollout.eval_n samples each, configs/tiny/grpo_cpu.yaml)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train(what: str, recipe: str, *overrides: str) -> int:
    """`megarl train <recipe>` from scratch, as a user would run it."""
    # the demo always starts over: a previous demo's outputs there (another seed, say) are replaced
    sets = [x for o in ("trainer.resume=never", "trainer.existing_run=overwrite", *overrides) for x in ("--set", o)]
    print(f"[demo] {what}: megarl train {recipe} {' '.join(sets[2:])}".rstrip(), flush=True)
    return subprocess.call([sys.executable, "-m", "megarl.cli", "train", recipe, *sets])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="trainer.seed of the GRPO phase")
    parser.add_argument("--threads", type=int, default=None, help="cluster.cpu_threads_per_rank of both phases")
    parser.add_argument("--sft-only", action="store_true", help="stop after the SFT phase (benchmarks start from it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="a recipe override for the GRPO phase, e.g. --set trainer.rollout_mode=async")
    args = parser.parse_args()
    thread_sets = [f"cluster.cpu_threads_per_rank={args.threads}"] if args.threads else []
    grpo_sets = ([f"trainer.seed={args.seed}"] if args.seed is not None else []) + thread_sets + args.sets
    os.chdir(ROOT)
    from examples.tool_math import mixed_sft_rows, rl_row, write
    from megarl.cli import main as megarl

    summary = {}
    if not os.path.isfile("runs/tiny/model/config.json"):
        print("[demo] making the tiny model", flush=True)
        megarl(["make-tiny", "runs/tiny/model", "--arch", "qwen2"])
    os.makedirs("runs/tiny/data", exist_ok=True)
    rng = random.Random(0)
    write("runs/tiny/data/sft.jsonl", mixed_sft_rows(rng, 2000, SFT_TOOL_SHARE))
    write("runs/tiny/data/rl.jsonl", (rl_row(rng) for _ in range(2000)))
    eval_rng = random.Random(1)  # held out: another stream than the training prompts
    write("runs/tiny/data/rl_eval.jsonl", (rl_row(eval_rng) for _ in range(EVAL_PROMPTS)))
    metrics = "runs/tiny/sft/metrics.jsonl"
    if os.path.exists(metrics):
        os.remove(metrics)
    t0 = time.time()
    code = train("SFT", "configs/tiny/sft_cpu.yaml", *thread_sets)
    if code:
        return code
    curve = [json.loads(line) for line in open(metrics)]
    summary["sft_seconds"] = round(time.time() - t0, 1)
    summary["sft_loss_first"] = curve[0]["loss"]
    summary["sft_loss_last"] = curve[-1]["loss"]
    summary["sft_export"] = "runs/tiny/sft/hf"
    print(f"[demo] SFT loss {summary['sft_loss_first']:.3f} -> {summary['sft_loss_last']:.3f} in "
          f"{summary['sft_seconds']}s", flush=True)
    if args.sft_only:
        return 0

    grpo_metrics = "runs/tiny/grpo/metrics.jsonl"
    t0 = time.time()
    code = train("GRPO", "configs/tiny/grpo_cpu.yaml", *grpo_sets)
    if code:
        return code
    summary["grpo_seconds"] = round(time.time() - t0, 1)
    summary["grpo_overrides"] = grpo_sets
    rows = [json.loads(line) for line in open(grpo_metrics)]
    curve = [(r["step"], r["eval/task"]) for r in rows if "eval/task" in r]
    summary["success_before"] = curve[0][1]
    summary["success_after"] = curve[-1][1]
    summary["success_best"] = max(v for _, v in curve)
    summary["success_curve"] = curve
    summary["reward_curve"] = [(r["step"], round(r["reward/mean"], 4)) for r in rows if "reward/mean" in r]
    # calculator calls per training sample: about half before GRPO (the SFT mix), then what GRPO learned
    summary["tool_calls_curve"] = [(r["step"], round(r["rollout/tool_calls_mean"], 3)) for r in rows
                                   if "rollout/tool_calls_mean" in r]
    summary["grpo_metrics"] = grpo_metrics
    summary["tensorboard"] = "runs/tiny/grpo/tensorboard"
    summary["samples"] = "runs/tiny/grpo/samples.jsonl"
    summary["grpo_export"] = "runs/tiny/grpo/hf"
    os.makedirs("runs/demo", exist_ok=True)
    with open("runs/demo/summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    import yaml

    with open("runs/tiny/grpo/recipe.resolved.yaml") as f:   # what the run used, not a copy of it here
        eval_n = yaml.safe_load(f)["rollout"]["eval_n"]
    summary["eval_samples_per_prompt"] = eval_n
    print(f"[demo] task success on {EVAL_PROMPTS} held-out prompts x {eval_n} samples: {summary['success_before']:.1%} "
          f"after SFT -> "
          f"{summary['success_after']:.1%} after {len(summary['reward_curve'])} GRPO steps "
          f"({summary['grpo_seconds']}s)\n[demo] curve {curve}\n[demo] calculator calls per sample "
          f"{summary['tool_calls_curve'][0][1]} -> {summary['tool_calls_curve'][-1][1]}\n"
          f"[demo] metrics {grpo_metrics}, tensorboard "
          f"--logdir {summary['tensorboard']}, trajectories {summary['samples']}, summary runs/demo/summary.json",
          flush=True)
    report = subprocess.run([sys.executable, "-m", "megarl.cli", "report", "runs/tiny/grpo"], capture_output=True,
                            text=True)
    if report.returncode:
        print(f"[demo] the report failed:\n{report.stdout}{report.stderr}", flush=True)
        return report.returncode
    for line in report.stdout.strip().splitlines():   # its notes, then the page's path
        print(f"[demo] {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
