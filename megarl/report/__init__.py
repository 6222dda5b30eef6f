"""`megarl report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page (figures embedded, opens from
a file with no network) and a PNG per figure, from what runs wrote (metrics.jsonl, samples.jsonl,
the resolved recipe), while they may still be writing.

The page: a table of the runs, the recipe keys that differ between them, the stage's figures
(figures.py: reward and components, eval, KL and mismatch, policy statistics, responses and tool
failures, a stacked step-time breakdown, throughput and weight sync; SFT and preference curves),
every other logged metric in a table, and a trajectory viewer (trajectories.py) with filters by
run, step, failure kind and reward. Figures are matplotlib, the page a Jinja2 template.
"""

from __future__ import annotations

import base64
import datetime
import os
import time
from dataclasses import dataclass

from megarl.report.figures import draw_all, figures_for
from megarl.report.runs import Run, RunNotFound, load_runs, recipe_differences
from megarl.report.trajectories import FAILURE_KINDS, viewer_entries

__all__ = ["Report", "RunNotFound", "write_report", "default_out_dir"]

INDEX = "index.html"
FIGURE_DIR = "figures"

HEADLINES = {
    "grpo": ("reward/mean", "eval/mean", "eval/task", "actor/entropy_rollout"),
    "ppo": ("reward/mean", "eval/mean", "eval/task", "critic/value_loss"),
    "sft": ("loss", "eval/loss"),
    "dpo": ("loss", "reward/accuracy", "reward/margin"),
    "rm": ("loss", "reward/accuracy", "eval/reward/accuracy"),
    "kto": ("loss", "kl", "reward/desirable", "reward/undesirable"),
}
"""The metrics the runs table shows first → last, by stage."""


@dataclass
class Report:
    index: str                  # the page
    figures: list[str]          # the PNGs
    trajectories: int
    notes: list[str]            # per run: what was missing or left out
    seconds: float


def default_out_dir(run_dirs: list[str]) -> str:
    """One run: RUN_DIR/report; several: report-compare beside the first run."""
    first = os.path.normpath(run_dirs[0])
    if len(run_dirs) == 1:
        return os.path.join(first, "report")
    return os.path.join(os.path.dirname(first), "report-compare")


def write_report(run_dirs: list[str], out_dir: str | None = None) -> Report:
    t0 = time.perf_counter()
    out_dir = out_dir or default_out_dir(run_dirs)
    runs = load_runs(run_dirs)
    figures = figures_for([r.stage for r in runs])
    drawn = draw_all(figures, runs)
    pngs = _write_figures(os.path.join(out_dir, FIGURE_DIR), drawn)
    trajectories = [e for r in runs for e in viewer_entries(r.name, r.samples, r.notes)]
    html = _render_page(runs, drawn, trajectories, {k for d in drawn for k in d.metrics})
    index = os.path.join(out_dir, INDEX)
    _write_atomic(index, html.encode())
    notes = [f"{r.name}: {n}" for r in runs for n in r.notes]
    return Report(index, pngs, len(trajectories), notes, time.perf_counter() - t0)


def _write_figures(directory: str, drawn) -> list[str]:
    """A PNG per figure; those an earlier report wrote for figures this one has not are removed."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"{d.figure.slug}.png") for d in drawn]
    for d, path in zip(drawn, paths):
        _write_atomic(path, d.png)
    for name in os.listdir(directory):
        if name.endswith(".png") and os.path.join(directory, name) not in paths:
            os.remove(os.path.join(directory, name))
    return paths


def _render_page(runs: list[Run], drawn, trajectories: list[dict], plotted: set[str]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    headline_names = [h for h in dict.fromkeys(h for r in runs for h in HEADLINES.get(r.stage, ()))
                      if any(r.series(h)[0] for r in runs)]
    return env.get_template("report.html.j2").render(
        title=", ".join(r.name for r in runs),
        written=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        runs=runs, summaries=[_summary(r, headline_names) for r in runs], headline_names=headline_names,
        differences=recipe_differences(runs),
        figures=[{"slug": d.figure.slug, "title": d.figure.title, "metrics": d.metrics,
                  "data": base64.b64encode(d.png).decode()} for d in drawn],
        other_metrics=_other_metrics(runs, plotted),
        trajectories=trajectories, failure_kinds=FAILURE_KINDS,
        recipes=[(r.name, _yaml(r.recipe)) for r in runs if r.recipe])


def _summary(run: Run, headline_names: list[str]) -> dict:
    steps = [row["step"] for row in run.metrics]
    wall = sum(run.series("timing/step_s")[1]) or sum(run.series("seconds")[1])
    headline = {}
    for key in headline_names:
        _, values = run.series(key)
        if values:
            headline[key] = f"{_num(values[0])} → {_num(values[-1])}"
    return {"name": run.name, "stage": run.stage, "path": run.path, "last_step": max(steps) if steps else "—",
            "wall": _duration(wall) if wall else "—", "headline": headline, "sinks": run.sinks, "notes": run.notes}


def _other_metrics(runs: list[Run], plotted: set[str]) -> list[dict]:
    """Every numeric metric on no figure, per run."""
    rows = []
    for run in runs:
        for key in sorted(set(run.numeric_keys) - plotted):
            _, values = run.series(key)
            if values:
                rows.append({"key": key, "run": run.name, "count": len(values), "first": _num(values[0]),
                             "last": _num(values[-1]), "min": _num(min(values)), "max": _num(max(values))})
    return rows


def _num(x: float) -> str:
    return f"{x:.4g}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _yaml(tree: dict) -> str:
    import yaml

    return yaml.safe_dump(tree, sort_keys=False)


def _write_atomic(path: str, data: bytes) -> None:
    """A reader (a browser refreshing the page) never sees a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
