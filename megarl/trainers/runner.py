"""The stage runner: what sft, preference and rl share around their loops.

    run_stage(recipe, tag, body)   stop signals -> body() -> StageResult -> exit code, HF export
    StagePolicy                    after each step: save? stop? (save_freq, the last step,
                                   max_steps_this_run, a stop signal agreed by every rank)
    resume_checkpoint(recipe)      trainer.resume: auto (newest verified) | never | a path (verified)
    open_metrics(recipe, step)     the recipe's sinks; the curve cut back to the resumed step

A stop signal (SIGTERM/SIGUSR1 to the driver; the launcher forwards Slurm's preemption warning)
drops a file in the output directory, so rank processes and the RL driver see it the same way:
the step in flight finishes, a checkpoint is written, and the process exits with
EXIT_CHECKPOINTED (75, EX_TEMPFAIL) so the launcher requeues the job, which then resumes.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from megarl.checkpoint.manifest import CheckpointCorrupt

EXIT_CHECKPOINTED = 75
"""Exit code of `megarl train` stopped early by SIGUSR1/SIGTERM after writing a checkpoint
(EX_TEMPFAIL: run it again and it resumes). The launcher requeues the Slurm job on it."""
STOP_FILE = "stop_requested"
CKPT_DIR = "checkpoints"   # step_<N> training checkpoints
METRICS_FILE = "metrics.jsonl"
HF_EXPORT_DIR = "hf"


@dataclass
class StageResult:
    """How a stage's loop ended: `finished` (all steps taken), else stopped after checkpointing at
    `step`, because of a signal or because max_steps_this_run was reached."""

    finished: bool
    step: int
    steps: int
    signal: bool = False

    def as_dict(self) -> dict:
        return {"finished": self.finished, "step": self.step, "steps": self.steps, "signal": self.signal}


def run_stage(recipe, tag: str, body: Callable[[], StageResult | None]) -> int:
    """Watch for stop signals, run the stage's loop, and turn its result into an exit code; a
    finished run's newest checkpoint is exported to HF in `<output_dir>/hf`. `body` returns None
    on processes that do not report (ranks other than 0 of a launched job)."""
    os.makedirs(recipe.trainer.output_dir, exist_ok=True)
    check_resume_path(recipe)
    warn_about_emulated_bf16(recipe, tag)
    watch_stop_signals(recipe.trainer.output_dir, tag)
    result = body()
    if result is None:
        return 0
    print(f"[{tag}] {json.dumps(result.as_dict())}", flush=True)
    if result.signal:
        print(f"[{tag}] stopped on a signal at step {result.step} after checkpointing; run again to resume",
              flush=True)
        return EXIT_CHECKPOINTED
    if not result.finished:
        print(f"[{tag}] stopping at step {result.step}; `megarl train` with trainer.resume=auto continues",
              flush=True)
        return 0
    export_final(recipe, tag)
    return 0


def warn_about_emulated_bf16(recipe, tag: str) -> None:
    """bf16 on a CPU without bf16 matrix instructions trains, but slower than fp32: say so once
    (rank 0), with what to set."""
    from megarl.config.recipe import RL_STAGES
    from megarl.runtime.device import bf16_on_cpu_warning, nvidia_gpus_present

    if os.environ.get("RANK", "0") != "0" or recipe.model.dtype != "bf16":
        return
    device = recipe.cluster.device
    if device == "auto":   # RL places its workers on GPUs unless told cpu; other stages compute right here
        device = "cuda" if recipe.stage in RL_STAGES or nvidia_gpus_present() else "cpu"
    message = bf16_on_cpu_warning(recipe.model.dtype, device)
    if message:
        warner(tag)(message)


def export_final(recipe, tag: str) -> str:
    """The newest verified checkpoint converted to an HF directory `<output_dir>/hf`."""
    from megarl.checkpoint.hf import convert_megatron_to_hf
    from megarl.checkpoint.paths import newest_verified
    from megarl.runtime.local_group import run_local_group

    final = newest_verified(os.path.join(recipe.trainer.output_dir, CKPT_DIR), warner(tag))
    if final is None:
        raise CheckpointCorrupt(f"no intact checkpoint in {recipe.trainer.output_dir}/{CKPT_DIR} to export")
    out = os.path.join(recipe.trainer.output_dir, HF_EXPORT_DIR)
    run_local_group(convert_megatron_to_hf, 1, args=(final, out, 1 << 30, recipe.model.tokenizer), timeout=3600)
    print(f"[{tag}] exported {final} to {out}", flush=True)
    return out


def resume_checkpoint(recipe, tag: str = "megarl", companions: tuple[str, ...] = ()) -> str | None:
    """The checkpoint this run starts from: `trainer.resume` auto -> the newest one in
    `<output_dir>/checkpoints` that matches its manifest, together with its step's checkpoint in
    each `companions` directory (a damaged one is named and the one before it used; None on a
    fresh directory), never -> None, else the path given, refused (CheckpointCorrupt) if damaged."""
    from megarl.checkpoint.manifest import usable
    from megarl.checkpoint.paths import newest_verified

    t = recipe.trainer
    if t.resume == "never":
        return None
    if t.resume == "auto":
        return newest_verified(os.path.join(t.output_dir, CKPT_DIR), warner(tag),
                               tuple(os.path.join(t.output_dir, c) for c in companions))
    why = usable(t.resume, warner(tag))
    if why is not None:
        raise refused_resume(t.resume, why)
    return t.resume


def check_resume_path(recipe) -> None:
    """Refuse an explicit `trainer.resume` checkpoint with a missing or truncated file before any
    worker starts (sizes only: cheap; the checksums are checked where it is loaded)."""
    from megarl.checkpoint.manifest import has_manifest, problem

    path = recipe.trainer.resume
    if path not in ("auto", "never") and has_manifest(path) and (why := problem(path, checksums=False)):
        raise refused_resume(path, why)


def refused_resume(path: str, why: str) -> CheckpointCorrupt:
    return CheckpointCorrupt(f"trainer.resume={path}: {why}; point trainer.resume at an intact checkpoint "
                             "(or use auto to take the newest intact one)")


def warner(tag: str) -> Callable[[str], None]:
    return lambda message: print(f"[{tag}] warning: {message}", flush=True)


def checkpoint_path(recipe, step: int, root: str = CKPT_DIR) -> str:
    return os.path.join(recipe.trainer.output_dir, root, f"step_{step:06d}")


@dataclass
class StepDecision:
    save: bool
    stop: bool
    signalled: bool


class StagePolicy:
    """After every step: checkpoint at `save_freq`, at the last step and before stopping; stop on a
    signal or once this invocation took `max_steps_this_run` steps. `agree` turns this process's
    view of the stop file into one every rank shares (a collective on rank processes)."""

    def __init__(self, recipe, steps: int, agree: Callable[[bool], bool] = lambda flag: flag):
        t = recipe.trainer
        self.steps, self.save_freq, self.budget = steps, t.save_freq, t.max_steps_this_run
        self.output_dir, self.agree = t.output_dir, agree
        self.taken = 0

    def after_step(self, step: int) -> StepDecision:
        self.taken += 1
        signalled = self.agree(stop_file_present(self.output_dir))
        stop = signalled or (self.budget is not None and self.taken >= self.budget)
        save = step >= self.steps or stop or bool(self.save_freq and step % self.save_freq == 0)
        return StepDecision(save=save, stop=stop and step < self.steps, signalled=signalled)

    def result(self, step: int, decision: StepDecision | None = None) -> StageResult:
        if decision is not None and decision.stop:
            return StageResult(False, step, self.steps, decision.signalled)
        return StageResult(True, step, self.steps)


def watch_stop_signals(output_dir: str, tag: str) -> None:
    """SIGUSR1/SIGTERM ask for a checkpoint after the current step and a stop: the handler drops
    `<output_dir>/stop_requested`, which the loop (every rank, or the RL driver) looks for."""
    path = os.path.join(output_dir, STOP_FILE)
    if os.path.exists(path):
        os.remove(path)  # left by an earlier stop: this run starts fresh

    def handle(signum, _frame):
        print(f"[{tag}] received signal {signum}: checkpointing after this step, then stopping", flush=True)
        open(path, "w").close()

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handle)


def stop_file_present(output_dir: str) -> bool:
    return os.path.exists(os.path.join(output_dir, STOP_FILE))


def open_metrics(recipe, resumed_step: int):
    """A `MetricsLogger` on the recipe's sinks. A fresh run starts a fresh curve; a resumed one keeps
    the lines up to the step it resumed from and drops any later ones (written after that
    checkpoint by the run that stopped), so every step appears exactly once."""
    from megarl.metrics import MetricsLogger

    t, lg = recipe.trainer, recipe.logging
    truncate_metrics(os.path.join(t.output_dir, METRICS_FILE), resumed_step)
    return MetricsLogger(t.output_dir, lg.sinks, lg.project, lg.run_name, lg.wandb_mode)


def truncate_metrics(path: str, keep_through_step: int) -> None:
    """Drop metric lines of steps after `keep_through_step` (all of them for 0 and a fresh run's
    step-0 eval line too, which the new run writes again); a half-written last line goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if keep_through_step > 0 and row.get("step", 0) <= keep_through_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
