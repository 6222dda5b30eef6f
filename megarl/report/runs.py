"""Reading a run directory for the report, while the run may still be writing it.

What a run leaves (see trainers/run_dir.OWNED): `recipe.resolved.yaml`, `metrics.jsonl` (one JSON
object per log call, with its `step`), `samples.jsonl` (RL trajectories for review), `prompts.jsonl`,
and the optional sinks `tensorboard/` and `wandb/`. Every file may be absent (a run that just
started, a sink the recipe did not ask for) and the last line of a jsonl file may be half written.
Nothing is skipped silently: every line left out, and why, becomes a note the page shows.
No torch: `megarl report` runs anywhere the run directory can be read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property

import yaml

RECIPE_FILE = "recipe.resolved.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"   # metrics.SAMPLES_FILE (the report reads files only: no import of the writers)
SINK_DIRS = ("tensorboard", "wandb")


class RunNotFound(Exception):
    """A path given to the report is not a directory."""


@dataclass
class Run:
    path: str
    name: str
    stage: str
    recipe: dict
    metrics: list[dict]                 # one row per step, steps ascending
    samples: list[dict]
    sinks: list[str]                    # optional sinks present (tensorboard, wandb)
    notes: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) where `key` was logged as a finite number."""
        steps, values = [], []
        for row in self.metrics:
            v = row.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
                steps.append(int(row["step"]))
                values.append(float(v))
        return steps, values

    @cached_property
    def numeric_keys(self) -> list[str]:
        """Every metric logged as a number, in first-logged order (read once: each panel asks)."""
        keys: dict[str, None] = {}
        for row in self.metrics:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys[k] = None
        return list(keys)


def read_jsonl(path: str, notes: list[str]) -> list[dict]:
    """The JSON objects of a jsonl file; a half-written last line (no newline yet: the run is
    writing it) or a line that is not a JSON object is left out and noted."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    rows, lines = [], data.split(b"\n")
    name = os.path.basename(path)
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last_unterminated = number == len(lines)   # split leaves the text after the last newline here
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif last_unterminated:
            notes.append(f"{name}: line {number} is half written (the run is still writing it); left out")
        else:
            notes.append(f"{name}: line {number} is not a JSON object; left out")
    return rows


def merge_steps(rows: list[dict], notes: list[str]) -> list[dict]:
    """One row per step, in step order. A step logged twice (a resumed run redoes the steps after its
    last checkpoint; evaluation may log apart from the step) merges, the later value winning."""
    by_step: dict[int, dict] = {}
    redone: set[int] = set()
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            notes.append(f"{METRICS_FILE}: a row without a numeric step ({sorted(row)[:4]}...); left out")
            continue
        step = int(step)
        seen = by_step.setdefault(step, {"step": step})
        if any(k in seen for k in row if k != "step"):
            redone.add(step)
        seen.update({k: v for k, v in row.items() if k != "step"})
    if redone:
        notes.append(f"{METRICS_FILE}: {len(redone)} step(s) logged more than once (steps {min(redone)}-"
                     f"{max(redone)}: a resumed run redoes the steps after its last checkpoint); "
                     "the later values are shown")
    return [by_step[s] for s in sorted(by_step)]


def guess_stage(metrics: list[dict]) -> str:
    keys = {k for row in metrics for k in row}
    if any(k.startswith("actor/") for k in keys):
        return "ppo" if any(k.startswith("critic/") for k in keys) else "grpo"
    if "reward/desirable" in keys or "reward/undesirable" in keys:
        return "kto"
    if "logp/chosen" in keys:
        return "dpo"
    if "reward/accuracy" in keys:
        return "rm"
    return "sft"


def load_run(path: str, name: str | None = None) -> Run:
    if not os.path.isdir(path):
        raise RunNotFound(f"{path}: not a directory (give the run's trainer.output_dir)")
    notes: list[str] = []
    recipe = {}
    recipe_path = os.path.join(path, RECIPE_FILE)
    if os.path.isfile(recipe_path):
        try:
            with open(recipe_path) as f:
                recipe = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            notes.append(f"{RECIPE_FILE}: not readable YAML ({str(e).splitlines()[0]}); recipe not shown")
    else:
        notes.append(f"no {RECIPE_FILE}: recipe not shown")
    metrics = merge_steps(read_jsonl(os.path.join(path, METRICS_FILE), notes), notes)
    if not os.path.isfile(os.path.join(path, METRICS_FILE)):
        notes.append(f"no {METRICS_FILE} yet: no curves")
    stage = recipe.get("stage") if isinstance(recipe, dict) else None
    if not stage:
        stage = guess_stage(metrics)
        notes.append(f"stage not in a recipe: {stage!r} guessed from the metric names")
    for row in metrics:  # SFT logs tokens and seconds per step: its throughput
        if isinstance(row.get("trained_tokens"), (int, float)) and row.get("seconds"):
            row["throughput/trained_tokens_per_s"] = row["trained_tokens"] / row["seconds"]
    samples = read_jsonl(os.path.join(path, SAMPLES_FILE), notes)
    sinks = [s for s in SINK_DIRS if os.path.isdir(os.path.join(path, s))]
    return Run(path=path, name=name or run_name(path), stage=stage, recipe=recipe if isinstance(recipe, dict) else {},
               metrics=metrics, samples=samples, sinks=sinks, notes=notes)


def run_name(path: str) -> str:
    """The run's directory and its parent (runs/tiny/grpo -> tiny/grpo): short, and distinct for
    the usual layouts."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return "/".join(parts[-2:])


def load_runs(paths: list[str]) -> list[Run]:
    """Runs with distinct names (a suffix where two directories share their last two parts)."""
    runs, names = [], set()
    for path in paths:
        name, k = run_name(path), 2
        while name in names:
            name, k = f"{run_name(path)} ({k})", k + 1
        names.add(name)
        runs.append(load_run(path, name))
    return runs


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_differences(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """[(key, [value in each run])] for the resolved-recipe keys that differ between runs."""
    if len(runs) < 2:
        return []
    flat = [flatten(r.recipe) for r in runs]
    keys = sorted({k for f in flat for k in f} - {"source"})
    missing = object()
    rows = []
    for key in keys:
        values = [f.get(key, missing) for f in flat]
        if any(v != values[0] for v in values[1:]):
            rows.append((key, ["(absent)" if v is missing else v if isinstance(v, str) else json.dumps(v)
                               for v in values]))
    return rows
