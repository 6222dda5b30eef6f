"""The report's figures: which metrics go on which panel for each stage, drawn with matplotlib.

A figure is a row of panels; a panel plots every metric matching its patterns, for every run (one
run: a colour per metric; several: a colour per run, a line style per metric). Metrics no panel
claims are listed in the page's "other metrics" table (what each `Drawn` plots tells them apart), so
nothing logged is left out.
"""

from __future__ import annotations

import fnmatch
import io
from dataclasses import dataclass, field

from megarl.report.runs import Run

RL = ("grpo", "ppo")
PREFERENCE = ("dpo", "kto", "rm")


@dataclass(frozen=True)
class Panel:
    title: str
    patterns: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    log_y: bool = False

    def keys(self, available: list[str]) -> list[str]:
        """The available metric names this panel plots, in pattern order."""
        out: list[str] = []
        for pattern in self.patterns:
            for k in available:
                if fnmatch.fnmatchcase(k, pattern) and k not in out and not any(
                        fnmatch.fnmatchcase(k, x) for x in self.exclude):
                    out.append(k)
        return out


@dataclass(frozen=True)
class Figure:
    slug: str
    title: str
    panels: tuple[Panel, ...] = ()
    stacked_timing: bool = False      # a stacked area of the step's phases per run, instead of panels


TIMING_PHASES = ("rollout", "rollout_wait", "reward", "old_logprobs", "ref_logprobs", "values", "advantage",
                 "update", "sync")
"""The RL driver's phases (`timing/<phase>_s`), which add up to `timing/step_s`; the rest of the step
shows as "overhead". (engine_generate_s, model_compute_s, update_compute_s measure inside phases.)"""
PHASE_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")   # C7 is grey, like "overhead"

RL_FIGURES = (
    Figure("reward", "Reward", (
        Panel("reward: total and components", ("reward/mean", "reward/*"), exclude=("reward/failed_frac",)),
        Panel("reward functions (raw values)", ("reward_fn/*",)),
        Panel("held-out evaluation", ("eval/mean", "eval/*"), exclude=("eval/seconds", "eval/failed_frac")))),
    Figure("kl", "KL and train/rollout mismatch", (
        Panel("KL", ("kl/*", "actor/kl_ref", "actor/approx_kl")),
        Panel("train vs rollout log-probs", ("mismatch/k3_kl", "mismatch/abs_logp_diff")),
        Panel("tokens over the mismatch threshold", ("mismatch/frac_over_threshold", "mismatch/*")))),
    Figure("policy", "Policy optimisation", (
        Panel("entropy", ("actor/entropy*",)),
        Panel("clip fraction", ("actor/clip_frac", "critic/value_clip_frac")),
        Panel("grad norm", ("actor/grad_norm", "critic/grad_norm"), log_y=True),
        Panel("learning rate", ("actor/lr", "critic/lr")))),
    Figure("advantages", "Advantages and critic", (
        Panel("value loss", ("critic/value_loss",)),
        Panel("values and returns", ("critic/values_mean", "critic/*"),
              exclude=("critic/value_loss", "critic/value_clip_frac", "critic/grad_norm", "critic/lr")),
        Panel("advantages", ("adv/*",)))),
    Figure("responses", "Responses, tools and failures", (
        Panel("response length (tokens)", ("response/length_mean", "response/length_*",
                                           "rollout/response_tokens_mean")),
        Panel("turns and tool calls", ("rollout/turns_mean", "rollout/tool_calls_mean")),
        Panel("failures", ("rollout/truncation_rate", "rollout/tool_error_rate", "reward/failed_frac")),
        Panel("finish reasons (fraction)", ("rollout/finish_*", "rollout/tool_call_parse_rate")))),
    Figure("timing", "Step time by phase", stacked_timing=True),
    Figure("throughput", "Throughput and weight sync", (
        Panel("throughput", ("throughput/*", "rollout/tokens_per_s")),
        Panel("weight sync seconds", ("sync/seconds", "sync/*_s")),
        Panel("weight sync bytes", ("sync/bytes",)))),
    Figure("async", "Off-policy lag (one-step-off / async)", (
        Panel("staleness (weight versions)", ("async/staleness_*",)),
        Panel("buffer", ("async/buffer_*", "async/dropped_groups", "async/filtered_groups")),
        Panel("producer and trainer waits (s)", ("async/trainer_wait_s", "async/producer_idle_s",
                                                 "async/generate_s")))),
)

SFT_FIGURES = (
    Figure("loss", "Supervised fine-tuning", (
        Panel("loss", ("loss", "eval/loss")),
        Panel("grad norm", ("grad_norm",), log_y=True),
        Panel("learning rate", ("lr",)),
        Panel("throughput (trained tokens/s)", ("throughput/trained_tokens_per_s",)))),
)

PREFERENCE_FIGURES = (
    Figure("loss", "Preference training", (
        Panel("loss", ("loss", "eval/loss")),
        Panel("accuracy (chosen scored above rejected)", ("reward/accuracy", "eval/reward/accuracy")),
        Panel("implicit rewards and margin", ("reward/margin", "reward/chosen", "reward/rejected",
                                              "reward/desirable", "reward/undesirable", "eval/reward/*"),
              exclude=("eval/reward/accuracy",)),
        Panel("KL and log-probs", ("kl", "eval/kl", "logp/*", "eval/logp/*")))),
    Figure("optimiser", "Optimiser", (
        Panel("grad norm", ("grad_norm",), log_y=True),
        Panel("learning rate", ("lr",)))),
)


def figures_for(stages: list[str]) -> tuple[Figure, ...]:
    """The figures of every stage among the runs (runs of different stages can be compared)."""
    out: list[Figure] = []
    for group, figs in ((RL, RL_FIGURES), (("sft",), SFT_FIGURES), (PREFERENCE, PREFERENCE_FIGURES)):
        if any(s in group for s in stages):
            out += [f for f in figs if f.slug not in {o.slug for o in out}]
    return tuple(out)


@dataclass
class Drawn:
    figure: Figure
    png: bytes
    metrics: list[str] = field(default_factory=list)   # what it plots


def draw_all(figures: tuple[Figure, ...], runs: list[Run]) -> list[Drawn]:
    import matplotlib

    matplotlib.use("Agg")   # files only: no display on a cluster node
    out = []
    for fig in figures:
        drawn = draw_timing(fig, runs) if fig.stacked_timing else draw_panels(fig, runs)
        if drawn is not None:
            out.append(drawn)
    return out


FIGURE_WIDTH = 14.0   # inches: every figure as wide as the page, whatever its panel count
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def draw_panels(fig: Figure, runs: list[Run]) -> Drawn | None:
    """One row of panels; None when no run logged any of the figure's metrics."""
    panels = []
    used: list[set[str]] = [set() for _ in runs]     # a metric goes on the first panel that claims it
    for p in fig.panels:
        keys = [[k for k in p.keys(r.numeric_keys) if k not in u] for r, u in zip(runs, used)]
        for u, ks in zip(used, keys):
            u.update(ks)
        if any(keys):
            panels.append((p, keys))
    if not panels:
        return None
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    several = len(runs) > 1
    figure, axes = plt.subplots(1, len(panels), figsize=(FIGURE_WIDTH, 3.4 + 0.25 * several * len(runs)),
                                squeeze=False)
    plotted: list[str] = []
    for ax, (panel, keys_per_run) in zip(axes[0], panels):
        keys = list(dict.fromkeys(k for ks in keys_per_run for k in ks))
        for ri, (run, run_keys) in enumerate(zip(runs, keys_per_run)):
            for key in run_keys:
                ki = keys.index(key)
                # one run: a colour per metric; several: a colour per run, a line style per metric
                color = f"C{ri % 10}" if several else f"C{ki % 10}"
                style = LINE_STYLES[ki % len(LINE_STYLES)] if several else "-"
                _plot_series(ax, *run.series(key), color, style, None if several else key)
                plotted.append(key)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.log_y and all(v > 0 for r, ks in zip(runs, keys_per_run) for k in ks for v in r.series(k)[1]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if several:   # the metrics by line style here; the runs by colour below the figure
            styles = [LINE_STYLES[i % len(LINE_STYLES)] for i in range(len(keys))]
            ax.legend([Line2D([], [], color="0.2", linestyle=s) for s in styles], keys, fontsize=7, loc="best")
        else:
            ax.legend(fontsize=7, loc="best")
    if several:
        figure.legend([Line2D([], [], color=f"C{i % 10}", linewidth=2) for i in range(len(runs))],
                      [r.name for r in runs], loc="lower center", ncol=min(4, len(runs)), fontsize=8)
    figure.suptitle(fig.title, fontsize=12)
    return Drawn(fig, _png(figure, bottom=0.07 * ((len(runs) + 3) // 4) if several else None),
                 sorted(set(plotted)))


def _plot_series(ax, steps: list[int], values: list[float], color: str, style: str, label: str | None) -> None:
    """Sparse series (evaluations) as points joined by lines; dense noisy ones raw (faint) plus a
    moving average (about 1/20 of the run), so trends read through step-to-step noise."""
    if len(steps) <= 30:
        ax.plot(steps, values, linestyle=style, color=color, marker="o", markersize=3, label=label)
        return
    window = max(2, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
              for i in range(len(values))]
    ax.plot(steps, values, linestyle=style, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps, smooth, linestyle=style, color=color, linewidth=1.6, label=label and f"{label} (mean of {window})")


def draw_timing(fig: Figure, runs: list[Run]) -> Drawn | None:
    """Per run, the step's phases stacked per step, and the rest of the step as "overhead"."""
    timed = [r for r in runs if r.series("timing/step_s")[0]]
    if not timed:
        return None
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lines = (len(timed) + 2) // 3      # of panels, three runs a line
    figure, axes = plt.subplots(lines, min(len(timed), 3), figsize=(FIGURE_WIDTH, 3.6 * lines), squeeze=False,
                                sharey=True)
    plotted = {"timing/step_s"}
    for ax in axes.flat[len(timed):]:
        ax.set_visible(False)
    for ax, run in zip(axes.flat, timed):
        rows = [row for row in run.metrics if isinstance(row.get("timing/step_s"), (int, float))]
        steps = [row["step"] for row in rows]
        phases = [p for p in TIMING_PHASES if any(f"timing/{p}_s" in row for row in rows)]
        layers = [[float(row.get(f"timing/{p}_s", 0.0)) for row in rows] for p in phases]
        overhead = [max(0.0, row["timing/step_s"] - sum(layer[i] for layer in layers)) for i, row in enumerate(rows)]
        colors = [PHASE_COLORS[TIMING_PHASES.index(p)] for p in phases] + ["0.75"]   # one colour per phase, every run
        ax.stackplot(steps, *layers, overhead, labels=[*phases, "overhead"], colors=colors, alpha=0.85)
        plotted |= {f"timing/{p}_s" for p in phases}
        ax.set_title(run.name if len(timed) > 1 else "seconds per step", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle(fig.title, fontsize=12)
    return Drawn(fig, _png(figure), sorted(plotted))


def _png(figure, bottom: float | None = None) -> bytes:
    """`bottom`: the fraction of the height kept free for a figure legend."""
    import matplotlib.pyplot as plt

    figure.tight_layout(rect=(0, bottom or 0, 1, 1))
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=90)
    plt.close(figure)
    return buf.getvalue()
