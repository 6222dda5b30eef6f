"""Small fabricated run directories of every stage, written the way the trainers write them
(metrics.jsonl rows per step with the real metric names, samples.jsonl records as
metrics.SampleWriter writes them, recipe.resolved.yaml)."""

from __future__ import annotations

import json
import math
import os

import yaml

RL_KEYS = ("reward/mean", "reward/task", "reward/format", "reward/failed_frac", "reward_fn/numeric_match",
           "actor/approx_kl", "actor/clip_frac", "actor/entropy_rollout", "actor/grad_norm", "actor/lr",
           "mismatch/k3_kl", "mismatch/abs_logp_diff", "response/length_mean", "rollout/truncation_rate",
           "rollout/tool_error_rate", "rollout/turns_mean", "throughput/samples_per_s", "sync/seconds",
           "sync/bytes", "flops/update", "adv/mean",
           # six metrics on one panel: every line style is drawn
           "rollout/finish_answer", "rollout/finish_length", "rollout/finish_max_turns",
           "rollout/finish_max_total_tokens", "rollout/finish_abort", "rollout/tool_call_parse_rate")
TIMING = {"timing/rollout_s": 1.0, "timing/reward_s": 0.1, "timing/old_logprobs_s": 0.4,
          "timing/advantage_s": 0.01, "timing/update_s": 1.5, "timing/sync_s": 0.2}
PPO_KEYS = ("critic/value_loss", "critic/values_mean", "critic/grad_norm")
SFT_KEYS = ("loss", "grad_norm", "lr")
PAIR_KEYS = ("loss", "reward/accuracy", "reward/chosen", "reward/rejected", "reward/margin", "grad_norm", "lr")
STAGE_KEYS = {"grpo": RL_KEYS, "ppo": RL_KEYS + PPO_KEYS, "sft": SFT_KEYS, "dpo": PAIR_KEYS + ("logp/chosen",),
              "rm": PAIR_KEYS, "kto": ("loss", "kl", "reward/desirable", "reward/undesirable", "grad_norm", "lr")}


def metric_rows(stage: str, steps: int, seed: float = 0.0) -> list[dict]:
    rows = []
    if stage in ("grpo", "ppo"):
        rows.append({"step": 0, "eval/mean": 0.3, "eval/task": 0.2, "eval/seconds": 3.0})
    for step in range(1, steps + 1):
        row = {"step": step}
        for i, key in enumerate(STAGE_KEYS[stage]):
            row[key] = 0.1 + 0.5 * step / steps + 0.05 * math.sin(step * (i + 1) + seed)
        if stage in ("grpo", "ppo"):
            row.update(TIMING)
            row["timing/step_s"] = sum(TIMING.values()) + 0.3
            row["timing/engine_generate_s"] = 0.8
        if stage == "sft":
            row.update({"trained_tokens": 4000.0, "seconds": 0.5})
        if step == steps and stage in ("grpo", "ppo"):
            row.update({"eval/mean": 0.5, "eval/task": 0.4, "eval/seconds": 3.0})
        rows.append(row)
    return rows


def sample_records(steps: list[int]) -> list[dict]:
    """Per step: a solved tool call, a failing tool call, a parse failure and a truncation."""
    out = []
    for step in steps:
        ok_call = {"role": "assistant", "text": "<tool_call>{...}</tool_call>", "calls": [{"name": "calculator"}],
                   "parse_errors": []}
        tool_ok = {"role": "tool", "name": "calculator", "text": "42", "ok": True}
        answer = {"role": "assistant", "text": "The answer is 42.", "calls": [], "parse_errors": []}
        out.append(_record(step, 1.0, "answer", [ok_call, tool_ok, answer]))
        out.append(_record(step, 0.2, "answer", [ok_call, {"role": "tool", "name": "calculator",
                                                           "text": "Error: division by zero", "ok": False}],
                           tool_errors=1))
        out.append(_record(step, 0.0, "answer", [{"role": "assistant", "text": "<tool_call>{bad", "calls": [],
                                                  "parse_errors": ["not JSON"]}], parse_failures=1))
        out.append(_record(step, 0.0, "length", [{"role": "assistant", "text": "The answer is 4 4 4",
                                                  "calls": [], "parse_errors": []}]))
    return out


def _record(step: int, reward: float, finish: str, events: list[dict], tool_errors: int = 0,
            parse_failures: int = 0) -> dict:
    segments = [{"text": "<tool_call>{...}</tool_call>", "trained": True, "tokens": 9},
                {"text": "<tool_response>42</tool_response>", "trained": False, "tokens": 5},
                {"text": "The answer is 42.", "trained": True, "tokens": 6}]
    return {"step": step, "prompt": "<|im_start|>user\n6 * 7 = ?<|im_end|>",
            "response": "".join(s["text"] for s in segments),
            "segments": segments, "events": events, "turns": 2, "tool_calls": 1, "tool_errors": tool_errors,
            "parse_failures": parse_failures, "finish": finish, "reward": reward,
            "components": {"task": reward, "format": 0.2}, "values": {"numeric_match": reward}, "errors": []}


def fabricate_run(out: str, stage: str, steps: int = 40, recipe: dict | None = None, samples_every: int = 10,
                  sinks: tuple[str, ...] = ("tensorboard",), seed: float = 0.0) -> str:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "recipe.resolved.yaml"), "w") as f:
        yaml.safe_dump({"stage": stage, "trainer": {"output_dir": out, "steps": steps, "seed": 0},
                        **(recipe or {})}, f, sort_keys=False)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in metric_rows(stage, steps, seed))
    if stage in ("grpo", "ppo") and samples_every:
        with open(os.path.join(out, "samples.jsonl"), "w") as f:
            records = sample_records(list(range(samples_every, steps + 1, samples_every)))
            f.writelines(json.dumps(r) + "\n" for r in records)
    for sink in sinks:
        os.makedirs(os.path.join(out, sink), exist_ok=True)
    return out
