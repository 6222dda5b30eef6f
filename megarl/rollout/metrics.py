"""Rollout metrics from a batch of trajectories: throughput, tool-call parse rate, completion rate
by number of turns, mean turns, tool error rate, truncation rate, finish reasons."""

from __future__ import annotations

from collections import Counter


def rollout_metrics(trajectories: list, seconds: float | None = None) -> dict[str, float]:
    n = len(trajectories)
    if n == 0:
        return {}
    generated = sum(sum(t.loss_mask) for t in trajectories)
    calls = sum(t.tool_calls for t in trajectories)
    failures = sum(t.parse_failures for t in trajectories)
    finishes = Counter(t.finish for t in trajectories)
    out = {
        "rollout/samples": float(n),
        "rollout/generated_tokens": float(generated),
        "rollout/response_tokens_mean": generated / n,
        "rollout/turns_mean": sum(t.turns for t in trajectories) / n,
        "rollout/tool_calls_mean": calls / n,
        "rollout/tool_call_parse_rate": 1.0 if calls + failures == 0 else calls / (calls + failures),
        "rollout/tool_error_rate": 0.0 if calls == 0 else sum(t.tool_errors for t in trajectories) / calls,
        "rollout/truncation_rate": (finishes["length"] + finishes["max_total_tokens"]) / n,
        "rollout/completion_rate": finishes["answer"] / n,
    }
    for reason, count in finishes.items():
        out[f"rollout/finish_{reason}"] = count / n
    by_turns: dict[int, list] = {}
    for t in trajectories:
        by_turns.setdefault(t.turns, []).append(t.finish == "answer")
    for turns, done in sorted(by_turns.items()):
        out[f"rollout/completion_rate_turns_{turns}"] = sum(done) / len(done)
    if seconds:
        out["rollout/tokens_per_s"] = generated / seconds
        out["rollout/samples_per_s"] = n / seconds
    return out
