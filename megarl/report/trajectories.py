"""samples.jsonl records -> the trajectory viewer's entries, each with its failure kinds.

A record (metrics.SampleWriter) holds the prompt, the response split into trained and masked
segments, the turns (assistant text with its parsed calls and parse errors; tool results with ok),
rewards per component and the finish reason. Records written before segments and failure counts
existed still show: the whole response as one segment of unknown training status.
"""

from __future__ import annotations

MAX_SHOWN = 2000
"""Trajectories embedded per report (the newest); the page says when more were left out."""

FAILURE_KINDS = {
    "tool_error": "a tool call failed",
    "parse_failure": "a tool call could not be parsed",
    "truncation": "cut at the token budget",
    "max_turns": "ran out of turns",
    "reward_error": "a reward function failed",
}
TRUNCATING_FINISHES = ("length", "max_total_tokens")


def failure_kinds(record: dict) -> list[str]:
    events = record.get("events") or []
    kinds = []
    if record.get("tool_errors") or any(e.get("role") == "tool" and e.get("ok") is False for e in events):
        kinds.append("tool_error")
    if record.get("parse_failures") or any(e.get("parse_errors") for e in events):
        kinds.append("parse_failure")
    if record.get("finish") in TRUNCATING_FINISHES:
        kinds.append("truncation")
    if record.get("finish") == "max_turns":
        kinds.append("max_turns")
    if record.get("errors"):
        kinds.append("reward_error")
    return kinds


def viewer_entries(run_name: str, records: list[dict], notes: list[str]) -> list[dict]:
    """The viewer's entries for one run (the newest MAX_SHOWN; the rest noted)."""
    if len(records) > MAX_SHOWN:
        notes.append(f"samples.jsonl: {len(records)} trajectories; the viewer shows the newest {MAX_SHOWN}")
        records = records[-MAX_SHOWN:]
    out = []
    for i, r in enumerate(records):
        segments = r.get("segments")
        if not isinstance(segments, list):
            segments = [{"text": str(r.get("response", "")), "trained": None}]
        reward = r.get("reward")
        out.append({
            "id": f"{run_name}#{i}", "run": run_name, "step": r.get("step"),
            "reward": reward if isinstance(reward, (int, float)) else None,
            "components": r.get("components") or {}, "values": r.get("values") or {},
            "finish": r.get("finish") or "", "failures": failure_kinds(r), "errors": r.get("errors") or [],
            "prompt": str(r.get("prompt", "")), "segments": segments, "events": r.get("events") or [],
            "turns": r.get("turns"), "tool_calls": r.get("tool_calls"),
        })
    return out
