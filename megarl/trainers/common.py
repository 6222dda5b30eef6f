"""Pieces the trainers share besides the stage runner: the starting model as a megatron checkpoint
(converted once), scalar-head starting points (critic, reward model), and the rank-process
stages' model building, checkpointing and resume."""

from __future__ import annotations

import json
import math
import os

from megarl.trainers.runner import StageResult, checkpoint_path, resume_checkpoint, run_stage


class ModelNotFound(FileNotFoundError):
    """A recipe's model path holds neither an HF model nor a megatron checkpoint."""


def looks_like_hub_id(path: str) -> bool:
    """`org/name` with no leading `.`/`/` and no deeper path: what a hub id looks like."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None and not path.startswith(".")


def initial_checkpoint(recipe, tag: str, path: str | None = None) -> str:
    """A megatron checkpoint of the starting model (`path`, default model.path): the path itself,
    or its conversion, made once per content (checkpoint/convert_cache.py) and shared by every run
    that starts from the same model."""
    from megarl.checkpoint.convert_cache import cache_root, converted
    from megarl.checkpoint.hf import MARKER, convert_hf_to_megatron
    from megarl.runtime.local_group import run_local_group

    path = path or recipe.model.path
    if os.path.isfile(os.path.join(path, MARKER)):
        return path
    if not os.path.exists(path) and looks_like_hub_id(path):
        raise ModelNotFound(f"{path!r} (from {recipe.source or 'the recipe'}) is not a directory on this machine; it "
                            "looks like a Hugging Face hub id, and megarl never downloads models (nodes often cannot "
                            f"reach the hub). Download it once where the nodes can read it, e.g. `huggingface-cli "
                            f"download {path} --local-dir /shared/models/{path.split('/')[-1]}`, and set model.path "
                            "(or critic.path / reward.reward_model.path) to that directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFound(f"{path!r} (from {recipe.source or 'the recipe'}) holds neither an HF model "
                            "(config.json + safetensors) nor a megatron checkpoint made by megarl; check model.path "
                            "(or critic.path / reward.reward_model.path), or make one with `megarl make-tiny` / "
                            "`megarl convert`")
    tokenizer = recipe.model.tokenizer

    def convert(out: str) -> None:
        run_local_group(convert_hf_to_megatron, 1, args=(path, out, tokenizer), timeout=3600)

    return converted(cache_root(recipe.trainer.output_dir), [path, tokenizer], convert,
                     lambda line: print(f"[{tag}] {path}: {line}", flush=True))


def has_hf_weights(path: str) -> bool:
    return os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))


def critic_hf_dir(recipe, tag: str) -> str:
    """The critic's starting point: critic.path when it already is an HF *ForTokenClassification
    (num_labels=1) checkpoint, else one built once from the causal LM there (see scalar_head_hf_dir)."""
    return scalar_head_hf_dir(recipe.critic.path or recipe.model.path, recipe.trainer.output_dir, "token", tag,
                              recipe.model.trust_remote_code)


def scalar_head_hf_dir(path: str, output_dir: str, kind: str, tag: str, trust_remote_code: bool = False) -> str:
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
            model = cls.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                        trust_remote_code=trust_remote_code)
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


def run_ranks(recipe, tag: str, train_rank, init: str) -> int:
    """The rank-process stages (sft, dpo, kto, rm) under the stage runner: `train_rank(recipe,
    init) -> StageResult` on every rank (local gloo ranks, or this process when launched by
    torchrun / the Slurm launcher, where rank 0 reports)."""
    def body() -> StageResult | None:
        if os.environ.get("WORLD_SIZE"):  # one rank of a launched job (srun via megarl launch, torchrun)
            from megarl.runtime import cpu_compat

            cpu_compat.install()  # before megatron is imported, as run_local_group does for its ranks
            if recipe.cluster.cpu_threads_per_rank:
                import torch

                torch.set_num_threads(recipe.cluster.cpu_threads_per_rank)
            result = train_rank(recipe, init)
            return result if os.environ.get("RANK", "0") == "0" else None
        from megarl.runtime.device import rank_env, select_device
        from megarl.runtime.local_group import run_local_group

        return run_local_group(train_rank, recipe.derived.train_world_size, args=(recipe, init),
                               timeout=24 * 3600, threads=recipe.cluster.cpu_threads_per_rank,
                               env=rank_env(select_device(recipe.cluster.device)))[0]

    return run_stage(recipe, tag, body)


def build_options(recipe):
    """How this rank builds the model (implementation, recompute, device) from the recipe."""
    from megarl.models.hf_config import BuildOptions
    from megarl.runtime.device import select_device

    return BuildOptions.from_recipe(recipe.model, select_device(recipe.cluster.device))


def build_trainable(recipe, init_ckpt: str):
    """This rank's model chunks loaded from `init_ckpt`, DDP-wrapped, with their optimizer, in
    megatron's per-token loss mode (a loss function returns (Σ loss, count))."""
    from megarl.checkpoint.hf import load_converted
    from megarl.models.optim import optimizer_config
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
    """(step, sampler, checkpoint or None) for a rank-process stage: step 0 and a fresh sampler,
    or the checkpoint `resume_checkpoint` names with its model, optimizer, LR schedule, data
    position and this rank's RNG state."""
    import torch.distributed as dist

    from megarl.checkpoint.dist import load_extra, load_sharded
    from megarl.data.sampler import EpochSampler
    from megarl.runtime.seed import set_rng_state

    d = recipe.data
    resume_from = agreed_resume_checkpoint(recipe, tag)
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


def agreed_resume_checkpoint(recipe, tag: str) -> str | None:
    """Collective: `resume_checkpoint` decided on rank 0 (which alone reads the checkpoints to verify
    them) and shared, so every rank loads the same one, or every rank raises its refusal."""
    import torch.distributed as dist

    from megarl.checkpoint.manifest import CheckpointCorrupt

    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", resume_checkpoint(recipe, tag))]
        except CheckpointCorrupt as e:
            box = [("refused", str(e))]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "refused":
        raise CheckpointCorrupt(value)
    return value


def after_rank_step(recipe, policy, step: int, state, init_ckpt: str, sampler, scheduler) -> StageResult | None:
    """The end of a rank-process step: a checkpoint (model, optimizer, LR schedule, data position,
    RNG) when `policy` says so, and the stage's result when it says stop (None: go on)."""
    decision = policy.after_step(step)
    if decision.save:
        save_stage_checkpoint(state, init_ckpt, checkpoint_path(recipe, step),
                              {"step": step, "sampler": sampler.state_dict(), "scheduler": scheduler.state_dict()})
    return policy.result(step, decision) if decision.stop else None


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank when any rank says so (the stop file, seen by each rank)."""
    import torch
    import torch.distributed as dist

    from megarl.runtime.device import current

    t = torch.tensor([int(flag)], device=current())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
