"""Who owns an output directory: `claim_output_dir` runs before `megarl train` (and the launcher)
writes anything there.

A directory holding a run whose resolved recipe differs from this one (beyond SAME_RUN_KEYS) is
refused, naming the differing keys, unless `trainer.existing_run` says resume (continue it with this
recipe) or overwrite (delete its megarl outputs and start fresh). An identical recipe resumes, as a
Slurm requeue does. A directory with megarl outputs but no resolved recipe is treated the same way.
No torch: the launcher calls it.
"""

from __future__ import annotations

import os
import shutil

import yaml

from megarl.checkpoint.paths import PARTIAL_SUFFIX
from megarl.trainers.runner import CKPT_DIR, HF_EXPORT_DIR, METRICS_FILE, STOP_FILE

RESOLVED = "recipe.resolved.yaml"
PREVIOUS = "recipe.resolved.prev.yaml"   # the recipe a run had before `existing_run: resume` changed it

SAME_RUN_KEYS = (
    "source",                              # the same recipe may live at another path (a copy, a requeue)
    "trainer.resume", "trainer.max_steps_this_run", "trainer.existing_run",  # how this invocation starts/stops
    "trainer.save_freq",                   # how often to checkpoint, not what is trained
    "trainer.micro_batch_per_rank",        # memory knob: gradient accumulation keeps the step the same
    "parallel", "cluster",                 # checkpoints reshard: a run may resume on another layout
    "derived.train_world_size", "derived.dp", "derived.rollout_gpus", "derived.grad_accumulation",
)
"""Resolved-recipe keys (a key or a whole group) that may differ between invocations of one run."""

OWNED = ("recipe.resolved.yaml", PREVIOUS, CKPT_DIR, "critic_checkpoints", METRICS_FILE, "samples.jsonl",
         "tensorboard", "wandb", HF_EXPORT_DIR, "init", "critic_init", "reward_model_init", "critic_init_hf",
         "rm_init_hf", "engine_init", "reference_logps", "rejected_rows.jsonl", STOP_FILE, "launch", "prompts.jsonl",
         "report")
"""What megarl writes in an output directory (each also as `<name>.partial` / `<name>.tmp` while
being written); `existing_run: overwrite` removes these and nothing else."""

SHOWN_KEYS = 5


class OutputDirTaken(Exception):
    """The output directory holds another run and the recipe does not say what to do with it."""


def claim_output_dir(recipe, resolved: dict, write: bool = True) -> str:
    """Check `recipe.trainer.output_dir` against the new resolved recipe `resolved` (plain data) and
    write it there; raises OutputDirTaken before writing anything when the directory holds another
    run. `write=False` (ranks other than 0 of a launched job) only checks. Returns what was done."""
    out = recipe.trainer.output_dir
    diffs = differences(out, resolved)
    mode = recipe.trainer.existing_run
    if diffs and mode == "refuse":
        raise OutputDirTaken(refusal(out, diffs))
    action = "new run" if not os.path.isfile(os.path.join(out, RESOLVED)) else "same run: resuming"
    if diffs and mode == "resume":
        action = f"existing_run=resume: continuing the run there with this recipe (the old one kept as {PREVIOUS})"
        if write and os.path.isfile(os.path.join(out, RESOLVED)):
            os.replace(os.path.join(out, RESOLVED), os.path.join(out, PREVIOUS))
    if diffs and mode == "overwrite":
        action = "existing_run=overwrite: removed the previous run's outputs, starting fresh"
        if write:
            remove_owned(out)
    if write:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, RESOLVED), "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)
    return action


def differences(out: str, resolved: dict) -> list[str]:
    """`key: old -> new` for each key (outside SAME_RUN_KEYS) where the run in `out` differs from
    `resolved`; one line for megarl outputs without a resolved recipe; [] for a free directory."""
    path = os.path.join(out, RESOLVED)
    if not os.path.isfile(path):
        found = owned_outputs(out)
        return [f"megarl outputs without a {RESOLVED}: {', '.join(found)}"] if found else []
    try:
        with open(path) as f:
            old = flatten(yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError) as e:
        return [f"{RESOLVED} cannot be read ({type(e).__name__})"]
    new = flatten(yaml.safe_load(yaml.safe_dump(resolved)))  # the old one's representation (floats, lists)
    keys = [k for k in {**old, **new} if not same_run_key(k) and not added_field(k, old)]
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys if old.get(k) != new.get(k)]


def refusal(out: str, diffs: list[str]) -> str:
    shown = "\n".join(f"  {d}" for d in diffs[:SHOWN_KEYS])
    more = f"\n  ... and {len(diffs) - SHOWN_KEYS} more" if len(diffs) > SHOWN_KEYS else ""
    return (f"trainer.output_dir {out} holds another run:\n{shown}{more}\n"
            "use another trainer.output_dir, or set trainer.existing_run=resume (continue that run with this "
            "recipe) or trainer.existing_run=overwrite (delete its megarl outputs and start fresh)")


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def same_run_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in SAME_RUN_KEYS)


def added_field(key: str, old: dict) -> bool:
    """A key the old recipe lacks although its group is there: a field a newer megarl added (its
    default applies), not a change of the run."""
    group = key.rpartition(".")[0]
    return key not in old and bool(group) and any(k.startswith(group + ".") for k in old)


def owned_outputs(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    names = set(os.listdir(out))
    return [n for base in OWNED for n in (base, base + PARTIAL_SUFFIX, base + ".tmp") if n in names]


def remove_owned(out: str) -> None:
    for name in owned_outputs(out):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
