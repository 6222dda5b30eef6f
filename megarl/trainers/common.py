"""Pieces every trainer shares: the starting model as a megatron checkpoint (converted once), the
LR schedule, and the HF directory a rollout engine starts from."""

from __future__ import annotations

import json
import os

INIT_DIR = "init"          # the starting model as a megatron checkpoint
CKPT_DIR = "checkpoints"   # step_<N> training checkpoints
METRICS_FILE = "metrics.jsonl"


def initial_checkpoint(recipe, tag: str, path: str | None = None, name: str = INIT_DIR) -> str:
    """A megatron checkpoint of the starting model (`path`, default model.path): the path itself,
    or converted into `<output_dir>/<name>` once (reused while its source is the same path)."""
    from megarl.checkpoint.hf import MARKER, convert_hf_to_megatron
    from megarl.runtime.local_group import run_local_group

    path = path or recipe.model.path
    if os.path.isfile(os.path.join(path, MARKER)):
        return path
    target = os.path.join(recipe.trainer.output_dir, name)
    marker = os.path.join(target, MARKER)
    if os.path.isfile(marker) and json.load(open(marker)).get("source") == os.path.abspath(path):
        return target
    print(f"[{tag}] converting {path} to a megatron checkpoint in {target}", flush=True)
    run_local_group(convert_hf_to_megatron, 1, args=(path, target), timeout=3600)
    return target


def has_hf_weights(path: str) -> bool:
    return os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))


def lr_scheduler(optimizer, recipe, steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = recipe.optim
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(steps, 1), lr_decay_style=o.lr_scheduler,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(steps, 1), wd_incr_style="constant")


def critic_hf_dir(recipe, tag: str) -> str:
    """An HF *ForTokenClassification (num_labels=1) checkpoint for the critic: critic.path itself
    when it is one, else built once from the causal LM at critic.path (its body, a zero-initialised
    value head, so the first values are 0) in `<output_dir>/critic_init_hf`."""
    import shutil

    from megarl.models.hf_config import read_hf_config

    path = recipe.critic.path or recipe.model.path
    cfg = read_hf_config(path)
    if (cfg.get("architectures") or [""])[0].endswith("ForTokenClassification"):
        return path
    out = os.path.join(recipe.trainer.output_dir, "critic_init_hf")
    stamp = os.path.join(out, "megarl_source.json")
    if os.path.isfile(stamp) and json.load(open(stamp)).get("source") == os.path.abspath(path):
        return out
    import torch
    import transformers

    print(f"[{tag}] building the critic from {path} (value head initialised to zero)", flush=True)
    model = transformers.AutoModelForTokenClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.zero_()
        if model.score.bias is not None:
            model.score.bias.zero_()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if os.path.isfile(os.path.join(path, name)):
            shutil.copy(os.path.join(path, name), os.path.join(out, name))
    with open(stamp, "w") as f:
        json.dump({"source": os.path.abspath(path)}, f)
    return out
