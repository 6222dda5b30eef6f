"""Pieces every trainer shares: the starting model as a megatron checkpoint (converted once), the
LR schedule, and the HF directory a rollout engine starts from."""

from __future__ import annotations

import json
import math
import os

EXIT_CHECKPOINTED = 75
"""Exit code of `megarl train` stopped early by SIGUSR1/SIGTERM after writing a checkpoint
(EX_TEMPFAIL: run it again and it resumes). The launcher requeues the Slurm job on it."""
STOP_FILE = "stop_requested"
INIT_DIR = "init"          # the starting model as a megatron checkpoint
CKPT_DIR = "checkpoints"   # step_<N> training checkpoints
METRICS_FILE = "metrics.jsonl"


class ModelNotFound(FileNotFoundError):
    """A recipe's model path holds neither an HF model nor a megatron checkpoint."""


def initial_checkpoint(recipe, tag: str, path: str | None = None, name: str = INIT_DIR) -> str:
    """A megatron checkpoint of the starting model (`path`, default model.path): the path itself,
    or converted into `<output_dir>/<name>` once (reused while its source is the same path)."""
    from megarl.checkpoint.hf import MARKER, convert_hf_to_megatron
    from megarl.runtime.local_group import run_local_group

    path = path or recipe.model.path
    if os.path.isfile(os.path.join(path, MARKER)):
        return path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFound(f"{path!r} (from {recipe.source or 'the recipe'}) holds neither an HF model "
                            "(config.json + safetensors) nor a megatron checkpoint made by megarl; check model.path "
                            "(or critic.path / reward.reward_model.path), or make one with `megarl make-tiny` / "
                            "`megarl convert`")
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
    """The critic's starting point: critic.path when it already is an HF *ForTokenClassification
    (num_labels=1) checkpoint, else one built once from the causal LM there (see scalar_head_hf_dir)."""
    return scalar_head_hf_dir(recipe.critic.path or recipe.model.path, recipe.trainer.output_dir, "token", tag)


def scalar_head_hf_dir(path: str, output_dir: str, kind: str, tag: str) -> str:
    """An HF checkpoint with a scalar head (num_labels=1) on the body of the causal LM at `path`:
    kind "token" (*ForTokenClassification, the PPO critic; head zero-initialised so the first values
    are 0) or "sequence" (*ForSequenceClassification, a reward model; HF's default small-normal
    head init). `path` itself when it already is one; else built once into
    `<output_dir>/{critic,rm}_init_hf` (reused while its source is the same path)."""
    import shutil

    from megarl.models.hf_config import read_hf_config

    suffix = {"token": "ForTokenClassification", "sequence": "ForSequenceClassification"}[kind]
    cfg = read_hf_config(path)
    if (cfg.get("architectures") or [""])[0].endswith(suffix):
        return path
    out = os.path.join(output_dir, {"token": "critic_init_hf", "sequence": "rm_init_hf"}[kind])
    stamp = os.path.join(out, "megarl_source.json")
    if os.path.isfile(stamp) and json.load(open(stamp)).get("source") == os.path.abspath(path):
        return out
    import torch
    import transformers

    what = "critic (value head initialised to zero)" if kind == "token" else "reward model (fresh scalar head)"
    print(f"[{tag}] building the {what} from {path}", flush=True)
    cls = getattr(transformers, "AutoModelFor" + suffix.removeprefix("For"))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "score.weight newly initialised" notice is expected
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the fresh head is the same on every run
            model = cls.from_pretrained(path, num_labels=1, dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if kind == "token":
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


def run_ranks_and_export(recipe, tag: str, train_rank, init: str) -> int:
    """Run `train_rank(recipe, init) -> {"finished", ...}` on every rank (local gloo ranks, or this
    process when launched by torchrun / the Slurm launcher), then export the final checkpoint to
    HF format in `<output_dir>/hf`."""
    from megarl.checkpoint.hf import convert_megatron_to_hf
    from megarl.checkpoint.paths import latest_checkpoint
    from megarl.runtime.local_group import run_local_group

    watch_stop_signals(recipe.trainer.output_dir, tag)
    if os.environ.get("WORLD_SIZE"):  # we are one rank of a launched job (srun via megarl launch, torchrun)
        from megarl.runtime import cpu_compat

        cpu_compat.install()  # before megatron is imported, as run_local_group does for its ranks
        result = train_rank(recipe, init)
        if os.environ.get("RANK", "0") != "0":
            return 0  # rank 0 reports and exports
    else:
        result = run_local_group(train_rank, recipe.derived.train_world_size, args=(recipe, init),
                                 timeout=24 * 3600)[0]
    print(f"[{tag}] {json.dumps(result)}", flush=True)
    if result.get("signal"):
        print(f"[{tag}] stopped on a signal at step {result['step']} after checkpointing; run again to resume",
              flush=True)
        return EXIT_CHECKPOINTED
    if result["finished"]:
        final = latest_checkpoint(os.path.join(recipe.trainer.output_dir, CKPT_DIR))
        out = os.path.join(recipe.trainer.output_dir, "hf")
        run_local_group(convert_megatron_to_hf, 1, args=(final, out), timeout=3600)
        print(f"[{tag}] exported {final} to {out}", flush=True)
    return 0


def optimizer_config(recipe, lr: float | None = None):
    """megatron OptimizerConfig from the recipe's optim group (Adam; fp32 main params)."""
    import torch
    from megatron.core.optimizer import OptimizerConfig

    o, dtype = recipe.optim, recipe.model.dtype
    lr = o.lr if lr is None else lr
    return OptimizerConfig(optimizer="adam", lr=lr, min_lr=min(o.min_lr, lr), weight_decay=o.weight_decay,
                           adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                           clip_grad=o.clip_grad, bf16=dtype == "bf16", fp16=dtype == "fp16",
                           params_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32))


def build_options(recipe):
    """How this rank builds the model (implementation, recompute, device) from the recipe."""
    from megarl.models.hf_config import BuildOptions
    from megarl.runtime.device import select_device

    return BuildOptions.from_recipe(recipe.model, select_device(recipe.cluster.device))


def build_trainable(recipe, init_ckpt: str):
    """This rank's model chunks loaded from `init_ckpt`, DDP-wrapped, with their optimizer, in
    megatron's per-token loss mode (a loss function returns (Σ loss, count))."""
    from megarl.checkpoint.hf import load_converted
    from megarl.models.train import wrap_for_training

    chunks, config, _ = load_converted(init_ckpt, recipe.parallel, seed=recipe.trainer.seed,
                                       options=build_options(recipe), dtype=recipe.model.dtype)
    config.calculate_per_token_loss = True
    return wrap_for_training(chunks, config, optimizer_config(recipe),
                             distributed_optimizer=recipe.optim.distributed_optimizer)


def save_stage_checkpoint(state, init_ckpt: str, path: str, extra: dict) -> None:
    """Model + optimizer (dist checkpoint) and `extra` plus this rank's RNG state; the starting
    model's HF side files and marker travel along so the checkpoint converts and loads on its own."""
    import shutil

    import torch.distributed as dist

    from megarl.checkpoint.dist import save_sharded
    from megarl.checkpoint.hf import MARKER
    from megarl.runtime.seed import rng_state

    def finish(tmp):
        shutil.copytree(os.path.join(init_ckpt, "hf"), os.path.join(tmp, "hf"), dirs_exist_ok=True)
        shutil.copy(os.path.join(init_ckpt, MARKER), os.path.join(tmp, MARKER))

    save_sharded(state.models, path, state.optimizer, {**extra, "rng": rng_state(), "rank": dist.get_rank()}, finish)


def total_steps(recipe, num_samples: int) -> int:
    t = recipe.trainer
    return t.steps if t.steps is not None else t.epochs * math.ceil(num_samples / recipe.derived.samples_per_step)


def resume_stage(recipe, state, scheduler, num_rows: int, tag: str):
    """(step, sampler) to start from: step 0 and a fresh sampler, or — with trainer.resume auto
    (latest complete checkpoint) or a path — the checkpoint's model, optimizer, LR schedule, data
    position and this rank's RNG state. Returns (step, sampler, checkpoint path or None)."""
    import torch.distributed as dist

    from megarl.checkpoint.dist import load_extra, load_sharded
    from megarl.checkpoint.paths import latest_checkpoint
    from megarl.data.sampler import EpochSampler
    from megarl.runtime.seed import set_rng_state

    t, d = recipe.trainer, recipe.data
    resume_from = {"auto": latest_checkpoint(os.path.join(t.output_dir, CKPT_DIR)), "never": None}.get(t.resume,
                                                                                                     t.resume)
    if not resume_from:
        return 0, EpochSampler(num_rows, d.seed, d.shuffle), None
    load_sharded(state.models, resume_from, state.optimizer)
    extra = load_extra(resume_from)
    scheduler.load_state_dict(extra["scheduler"])
    if extra.get("rank") == dist.get_rank():
        set_rng_state(extra["rng"])
    if dist.get_rank() == 0:
        print(f"[{tag}] resumed from {resume_from} at step {extra['step']}", flush=True)
    return extra["step"], EpochSampler.from_state(num_rows, d.seed, d.shuffle, extra["sampler"]), resume_from


def watch_stop_signals(output_dir: str, tag: str) -> None:
    """SIGUSR1/SIGTERM to the driver (the launcher forwards Slurm's preemption warning) ask the
    ranks to checkpoint after the current step and stop: the handler drops a file the ranks look
    for at every step (`stop_requested`), so no signal has to reach the rank processes."""
    import signal

    path = os.path.join(output_dir, STOP_FILE)
    if os.path.exists(path):
        os.remove(path)  # left by an earlier stop: this run starts fresh

    def handle(signum, _frame):
        print(f"[{tag}] received signal {signum}: checkpointing after this step, then stopping", flush=True)
        open(path, "w").close()

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handle)


def stop_requested(output_dir: str) -> bool:
    """Collective: True on every rank when the driver was asked to stop (see watch_stop_signals)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(os.path.exists(os.path.join(output_dir, STOP_FILE)))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
