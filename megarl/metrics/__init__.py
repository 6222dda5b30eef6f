"""Metrics sinks (jsonl always; wandb offline by default; tensorboard), per-step sample traces
for review, a terminal progress bar and a per-phase step timer. Everything a trainer logs goes
through `MetricsLogger`."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager


class MetricsLogger:
    def __init__(self, output_dir: str, sinks: list[str], project: str = "megarl", run_name: str | None = None,
                 wandb_mode: str = "offline", config: dict | None = None, file_name: str = "metrics.jsonl"):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, file_name)
        self.output_dir = output_dir
        self._tb = self._wandb = None
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = os.path.join(output_dir, "tensorboard")
            self._tb = SummaryWriter(self.tb_dir)
        if "wandb" in sinks and wandb_mode != "disabled":
            import wandb

            # offline unless the user logged in and asked for online: nothing leaves the machine by default
            self._wandb = wandb.init(project=project, name=run_name, mode=wandb_mode, dir=output_dir,
                                     config=config or {}, reinit="finish_previous")

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        numeric = {k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


SAMPLES_FILE = "samples.jsonl"


class SampleWriter:
    """Every `every` steps, a few trajectories to samples.jsonl, for review (`megarl report` shows them):
    the text, the response split into trained and masked segments (tool observations are masked),
    each turn and tool call with its result, rewards per component, finish reason and failures."""

    def __init__(self, output_dir: str, every: int, per_step: int = 4):
        self.path = os.path.join(output_dir, SAMPLES_FILE)
        self.every, self.per_step = every, per_step

    def maybe_write(self, step: int, trajectories: list, rewards: list, tokenizer) -> None:
        if self.every <= 0 or step % self.every:
            return
        with open(self.path, "a") as f:
            for t, r in list(zip(trajectories, rewards))[: self.per_step]:
                f.write(json.dumps({
                    "step": step, "prompt": tokenizer.decode(t.prompt_ids),
                    "response": tokenizer.decode(t.response_ids),
                    "segments": trained_segments(t.response_ids, t.loss_mask, tokenizer),
                    "events": t.events, "turns": t.turns, "tool_calls": t.tool_calls, "tool_errors": t.tool_errors,
                    "parse_failures": t.parse_failures, "finish": t.finish, "reward": r.scalar,
                    "components": r.components, "values": r.values, "errors": r.errors}) + "\n")


def trained_segments(ids: list[int], loss_mask: list[int], tokenizer) -> list[dict]:
    """The response as runs of trained (loss mask 1) and masked tokens: [{"text", "trained", "tokens"}]."""
    segments, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or loss_mask[i] != loss_mask[start]:
            segments.append({"text": tokenizer.decode(ids[start:i]), "trained": bool(loss_mask[start]),
                             "tokens": i - start})
            start = i
    return segments


class ProgressBar:
    """One line per step on a terminal (tqdm), silent otherwise."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train"):
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class PhaseTimer:
    """Wall time per named phase of a step: `with timer.phase("update"): ...` adds to
    `timing/update_s` (`<prefix>/update_s`); `seconds` holds every phase timed so far."""

    def __init__(self, prefix: str = "timing"):
        self.seconds: dict[str, float] = {}
        self.prefix = prefix

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"{self.prefix}/{name}_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
