"""Benchmark: synchronous vs one-step-off vs asynchronous RL (`trainer.rollout_mode`), and the
per-trajectory agent loop vs the lock-step one, on this machine.

1. The demo's GRPO (configs/tiny/grpo_cpu.yaml, from the demo's SFT model) in each rollout mode,
   with the training rank and the engine on separate CPU slots pinned to different cores
   (`cluster.cpu_pinning`; placement separate: one actor rank on core 0, the engine on core 1), as
   separate GPU pools would be: the same number of steps and samples each. By default the
   calculator is a remote service answering after `--tool-latency` 4 s (an agentic workload: a
   search API or an execution service, waited on without using the machine; every conversation's
   call in flight at once), so that rollouts are about half of a synchronous step, as generation is
   in RL on GPUs; `--tool-latency 0` is the demo's local calculator, where rollouts are a small part
   of the step. Conversations advance per trajectory (`--loop`). Step time = median
   `timing/step_s` after the first 2 steps; success = held-out task success (eval/task) after the
   last step, on the same held-out prompts.
2. The agent loop alone on a workload whose conversations need 1 to 4 tool turns: a real vLLM
   engine generates every turn (its compute and its lengths), the sandboxed Python tool
   (configs/tools/python.yaml, ~40 ms a call here) runs every call, and the content of each turn
   is scripted (conversation i calls the tool i % 4 times, then answers) so both schedules do the
   same work. Trajectories per second, best of `--repeats`.

    python bench/async_rl.py [--steps 10] [--tool-latency 4] [--eval-prompts 256] [--conversations 64]

Last stdout line: {"sync_step_s": S, "one_step_off_step_s": O, "async_step_s": A,
"async_vs_sync": A/S, "one_step_off_vs_sync": O/S, "success_sync": x, "success_one_step_off": z,
"success_async": y, "samples": N, "agent_loop_speedup": P, "sync_generate_s": G,
"overlap_bound_vs_sync": max(G, S-G)/S, "tool_latency_s": L, "bench_seconds": T, ...}: overlapping
generation with training can at best bring a step down to the longer of the two, so A/S is bounded
below by overlap_bound_vs_sync. Needs the demo's SFT model (runs/tiny/sft/hf); without it the demo's
SFT phase runs first (`examples/demo.py --sft-only`, ~4-7 min, not counted in bench_seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SFT_MODEL = "runs/tiny/sft/hf"
MODES = ("sync", "one_step_off", "async")


class RemoteCalculator:
    """The calculator as a remote service: each call answers after `latency_s` (a network round
    trip and a queue, as a search API or an execution service has), using no CPU meanwhile."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s

    def __call__(self, expression: str) -> str:
        from megarl.rollout.tools.builtin import calculator

        time.sleep(self.latency_s)
        return calculator(expression)


def remote_tools(work: str, latency_s: float) -> str:
    """configs/tools/calculator.yaml with the calculator behind `latency_s` of latency, taking
    every conversation's call at once (an evaluation's too)."""
    import yaml

    with open(os.path.join(ROOT, "configs/tools/calculator.yaml")) as f:
        spec = yaml.safe_load(f)
    spec["tools"][0].update(callable="bench.async_rl:RemoteCalculator", options={"latency_s": latency_s},
                            timeout_s=latency_s + 5, max_concurrency=1024)
    path = os.path.join(work, "remote_tools.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return path


def grpo(work: str, mode: str, args) -> list[dict]:
    out = os.path.join(work, mode)
    sets = ["trainer.resume=never", "trainer.existing_run=overwrite", f"trainer.output_dir={out}",
            f"trainer.steps={args.steps}", f"trainer.eval_freq={args.steps}", "trainer.save_freq=0",
            "optim.warmup_steps=3", f"data.eval={work}/eval.jsonl", "logging.sinks=[jsonl]",
            "cluster.gpus_per_node=2", "cluster.placement.mode=separate", "cluster.placement.rollout_gpus=1",
            "cluster.cpu_pinning=true", "cluster.cpu_threads_per_rank=1", f"trainer.rollout_mode={mode}",
            f"rollout.multi_turn.loop={args.loop}"]
    if args.tool_latency:
        sets.append(f"rollout.multi_turn.tools={remote_tools(work, args.tool_latency)}")
    cmd = [sys.executable, "-m", "megarl.cli", "train", "configs/tiny/grpo_cpu.yaml"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{mode}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"[bench] {mode}: {args.steps} steps in {time.time() - t0:.0f}s", flush=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class ScriptedTurns:
    """A real engine generates each turn; the turn's text is replaced by the workload's script:
    conversation i calls the Python tool `calls[i]` times, then answers."""

    def __init__(self, engine, tokenizer, prompts: list[list[int]], calls: list[int]):
        self.engine, self.tok, self.prompts, self.calls = engine, tokenizer, prompts, calls
        self.end = tokenizer.eos_token_id

    def _script(self, ids: list[int], generated: list) -> list:
        from megarl.rollout.engine import Completion

        i = next(k for k, p in enumerate(self.prompts) if ids[:len(p)] == p)
        done = ids[len(self.prompts[i]):].count(self.end) // 2
        call = {"name": "python", "arguments": {"code": f"print({i} + {done})"}}
        text = (f"<tool_call>\n{json.dumps(call)}\n</tool_call>" if done < self.calls[i] else "The answer is 1.")
        tokens = self.tok(text, add_special_tokens=False)["input_ids"] + [self.end]
        return [Completion(tokens, [0.0] * len(tokens), "stop", c.weight_version) for c in generated]

    def generate(self, prompts, sampling, max_tokens_each=None):
        outs = self.engine.generate(prompts, sampling, max_tokens_each)
        return [self._script(p, o) for p, o in zip(prompts, outs)]

    async def turn(self, key, prompt, sampling, max_tokens):
        return self._script(prompt, await self.engine.turn(key, prompt, sampling, max_tokens))


def agent_loop_rates(model: str, conversations: int, repeats: int) -> dict[str, float]:
    """Trajectories per second of each schedule on the scripted 1-4-turn workload (in this process,
    one engine thread, as an engine actor has)."""
    import torch
    from transformers import AutoTokenizer

    from megarl.data.render import render_prompt
    from megarl.rollout.agent import AgentLoop
    from megarl.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
    from megarl.rollout.tool_spec import load_tool_specs
    from megarl.rollout.tools import ToolExecutor

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model)
    tools = ToolExecutor(load_tool_specs(os.path.join(ROOT, "configs/tools/python.yaml")))
    engine = RolloutEngine(EngineConfig(model, max_model_len=1024, kv_cache_bytes=256 << 20))
    prompts = [render_prompt(tok, [{"role": "user", "content": f"What is {i} plus the number of tool calls so far?"}],
                             tools.schemas()) for i in range(conversations)]
    calls = [i % 4 for i in range(conversations)]     # 1 to 4 turns
    workload = ScriptedTurns(engine, tok, prompts, calls)
    rates: dict[str, list[float]] = {}
    for _ in range(repeats):
        for schedule in ("lock_step", "per_trajectory"):
            loop = AgentLoop(workload, tok, tools, max_turns=4, max_total_tokens=1024, loop=schedule)
            t0 = time.perf_counter()
            groups = loop.run(prompts, SamplingConfig(n=1, max_tokens=48, temperature=1.0, seed=0))
            seconds = time.perf_counter() - t0
            assert [g[0].tool_calls for g in groups] == calls, schedule
            rates.setdefault(schedule, []).append(conversations / seconds)
    return {k: max(v) for k, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--agent-loop-only", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES), help="rollout modes to run (comma-separated)")
    parser.add_argument("--tool-latency", type=float, default=4.0,
                        help="seconds each calculator call waits (a remote tool); 0: the demo's local calculator")
    parser.add_argument("--loop", default="per_trajectory", choices=("lock_step", "per_trajectory"),
                        help="rollout.multi_turn.loop of the GRPO runs")
    args = parser.parse_args()
    os.chdir(ROOT)
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 usable CPUs (the trainer and the engine pinned to different cores)")
    if not os.path.isfile(os.path.join(SFT_MODEL, "config.json")):
        print("[bench] no demo SFT model: running the demo's SFT phase", flush=True)
        subprocess.run([sys.executable, "examples/demo.py", "--sft-only"], check=True)

    out: dict = {}
    t0 = time.time()
    if not args.agent_loop_only:
        work = tempfile.mkdtemp(prefix="megarl-bench-async-")
        with open("runs/tiny/data/rl_eval.jsonl") as f, open(os.path.join(work, "eval.jsonl"), "w") as g:
            g.writelines(line for _, line in zip(range(args.eval_prompts), f))
        for mode in args.modes.split(","):
            rows = [r for r in grpo(work, mode, args) if "timing/step_s" in r]
            final = [r for r in grpo_rows_with_eval(work, mode) if r["step"] == args.steps][0]
            out[f"{mode}_step_s"] = round(statistics.median(r["timing/step_s"] for r in rows[2:]), 3)
            out[f"success_{mode}"] = round(final["eval/task"], 4)
            out[f"{mode}_staleness_max"] = max(r["async/staleness_max"] for r in rows)
            if mode == "sync":   # generation (with its rewards) vs everything else of a step
                gen = statistics.median(r["timing/rollout_s"] + r["timing/reward_s"] for r in rows[2:])
                out["sync_generate_s"] = round(gen, 3)
                # what overlapping the two can give at best: a step as long as the longer of them
                out["overlap_bound_vs_sync"] = round(max(gen, out["sync_step_s"] - gen) / out["sync_step_s"], 3)
        for mode in ("async", "one_step_off"):
            if f"{mode}_step_s" in out and "sync_step_s" in out:
                out[f"{mode}_vs_sync"] = round(out[f"{mode}_step_s"] / out["sync_step_s"], 3)
        out["samples"] = args.steps * 64
        out["tool_latency_s"], out["agent_loop"] = args.tool_latency, args.loop
        out["eval_prompts"] = args.eval_prompts
    rates = agent_loop_rates(SFT_MODEL, args.conversations, args.repeats)
    out["agent_loop_trajectories_per_s"] = {k: round(v, 2) for k, v in rates.items()}
    out["agent_loop_speedup"] = round(rates["per_trajectory"] / rates["lock_step"], 3)
    out["bench_seconds"] = round(time.time() - t0)
    print(json.dumps(out))


def grpo_rows_with_eval(work: str, mode: str) -> list[dict]:
    with open(os.path.join(work, mode, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "eval/task" in r]


if __name__ == "__main__":
    main()
