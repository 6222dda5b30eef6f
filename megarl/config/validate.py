"""Cross-field rules of a recipe and the derived sizes, computed once at load.

`resolve_recipe` fills stage defaults, the model shape, the parallel world size and `Recipe.derived`,
and returns every rule the recipe breaks (each naming its key). Rules, by group:
- stage <-> groups: ppo needs a reward and a critic (GAE); grpo needs n > 1 and a reward; dpo/kto
  need preference data; groups a stage does not use are refused rather than silently ignored
- preference: label_smoothing only with sigmoid/robust, simpo_gamma only with simpo (unset: the
  loss's default); orpo/simpo run without a reference model;
  reference `auto` resolves to model (or none); no context parallelism for the packed pairs
- not implemented yet, so refused by name rather than ignored or failing mid-run: lora finetuning,
  lora_rank, lora reward models, the remax estimator
- model.tokenizer names an existing directory; KL placed in the reward needs kl.coef > 0
- algorithm: unset clip_ratio_low/high and loss_agg_mode become the policy loss's paper defaults
  (POLICY_LOSS_DEFAULTS); dual_clip only with the ppo loss
- layout: tp·pp·cp·dp = training GPUs; heads and kv heads divisible by tp; layers by pp·vpp;
  experts by ep; sequence parallel for MoE with tp > 1
- batches: prompts per step × n divides into mini-batches, and each mini-batch into micro-batches
  per data-parallel rank
- lengths: max prompt + response <= the model's context
- rollout: engines × engine tp fits the rollout GPUs; engine tp divides the heads
- fp8 only with the Transformer Engine implementation (never on CPU)
- values: every numeric key with an evident range is checked against it (RANGES: counts and sizes
  >= 1, frequencies >= 0 where 0 is off, floats finite, fractions and probabilities in their
  intervals), plus the cross-field ranges (min_lr <= lr, clip ratios per policy loss); expert
  parallelism only on MoE models; trainer.resume names auto, never or an existing checkpoint
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from megarl.config.errors import ConfigIssue
from megarl.config.recipe import (
    POLICY_LOSS_DEFAULTS,
    PREFERENCE_LOSS_OPTIONS,
    PREFERENCE_STAGES,
    RL_STAGES,
    AlgorithmConfig,
    Derived,
    PreferenceConfig,
    Recipe,
    RewardConfig,
)
from megarl.config.shapes import PRESETS, local_hf_config, shape_from_hf_config

DATA_KIND = {"sft": "sft", "rm": "preference", "dpo": "preference", "kto": "kto", "ppo": "prompts",
             "grpo": "prompts"}
REFERENCE_FREE_LOSSES = ("orpo", "simpo")


class _Issues(list):
    def add(self, key: str, message: str) -> None:
        self.append(ConfigIssue(key, message))


def resolve_recipe(r: Recipe) -> list[ConfigIssue]:
    issues = _Issues()
    _stage_groups(r, issues)
    shape = _shape(r, issues)
    _preference(r, issues)
    _reward(r, issues)
    train_gpus, rollout_gpus = _gpus(r, issues)
    _layout(r, shape, train_gpus, issues)
    _rollout(r, shape, rollout_gpus, issues)
    _data(r, shape, issues)
    _algorithm(r, issues)
    _model_impl(r, issues)
    _not_implemented(r, issues)
    _ranges(r, issues)
    if not issues:
        _batches(r, issues)
    if not issues:
        r.derived.train_world_size, r.derived.rollout_gpus = train_gpus, rollout_gpus
    return list(issues)


def _stage_groups(r: Recipe, issues: _Issues) -> None:
    s = r.stage
    if not r.model.path:
        issues.add("model.path", "required: an HF model directory/name or a converted checkpoint")
    if not r.data.train:
        issues.add("data.train", "required: the training dataset (jsonl or parquet)")
    kind = DATA_KIND[s]
    if r.data.kind is None:
        r.data.kind = kind
    elif r.data.kind != kind:
        issues.add("data.kind", f"stage {s} trains on {kind!r} rows, not {r.data.kind!r}"
                   + (" (dpo/kto need a preference dataset)" if s in PREFERENCE_STAGES else ""))
    if s in RL_STAGES:
        if r.rollout is None:
            issues.add("rollout", f"stage {s} generates with a rollout fleet; add a rollout group")
        if r.algorithm is None:
            r.algorithm = AlgorithmConfig(advantage_estimator="gae" if s == "ppo" else "grpo")
        if r.reward is None or not r.reward.has_source:
            issues.add("reward", f"stage {s} needs a reward: functions, reward_model or remote")
        if r.preference is not None:
            issues.add("preference", f"not used by stage {s}; remove it")
        if s == "ppo":
            if r.critic is None:
                issues.add("critic", "stage ppo trains a value model: add critic: {path: ...} "
                                     "(often the actor's path or a reward model)")
            if r.algorithm.advantage_estimator != "gae":
                issues.add("algorithm.advantage_estimator", "ppo learns a critic and uses gae; "
                           "for critic-free estimators use stage grpo")
        else:
            if r.critic is not None:
                issues.add("critic", "stage grpo is critic-free; remove critic (or use stage ppo)")
            if r.algorithm.advantage_estimator == "gae":
                issues.add("algorithm.advantage_estimator", "gae needs a critic: use stage ppo")
            if r.rollout is not None and r.rollout.n == 1:
                issues.add("rollout.n", f"grpo normalises rewards within a group of samples per prompt; "
                           f"needs n > 1, got {r.rollout.n}")
        if r.trainer.prompts_per_step is None:
            issues.add("trainer.prompts_per_step", f"required for stage {s}")
        _rollout_mode(r, issues)
        if r.trainer.samples_per_step is not None:
            issues.add("trainer.samples_per_step", f"stage {s} counts prompts_per_step × rollout.n; "
                       "remove samples_per_step")
    else:
        for group in ("rollout", "algorithm", "critic"):
            if getattr(r, group) is not None:
                issues.add(group, f"not used by stage {s}; remove it")
        if r.reward is not None:
            what = ", ".join(repr(f.name) for f in r.reward.functions)
            issues.add("reward", f"not used by stage {s}: it trains on fixed targets and scores no samples"
                       + (f", so reward functions {what} would never run" if what else "") + "; remove it")
        if s in PREFERENCE_STAGES or s == "rm":
            if r.preference is None:
                r.preference = PreferenceConfig(loss_type="kto" if s == "kto" else "sigmoid")
        elif r.preference is not None:
            issues.add("preference", f"not used by stage {s}; remove it")
        if r.trainer.samples_per_step is None:
            issues.add("trainer.samples_per_step", f"required for stage {s} (sequences per optimizer step"
                       + (", pairs for dpo/rm)" if s in ("dpo", "rm") else ")"))
        if r.trainer.prompts_per_step is not None:
            issues.add("trainer.prompts_per_step", f"only RL stages sample prompts; stage {s} uses samples_per_step")
        if r.trainer.rollout_mode != "sync":
            issues.add("trainer.rollout_mode", f"only RL stages generate rollouts; stage {s} has none to overlap")
        if r.cluster.cpu_pinning:
            issues.add("cluster.cpu_pinning", f"pins the RL driver's Ray workers; stage {s} runs none")
    if r.trainer.steps is None and r.trainer.epochs is None:
        issues.add("trainer.steps", "give trainer.steps or trainer.epochs")
    elif r.trainer.steps is not None and r.trainer.epochs is not None:
        issues.add("trainer.epochs", "give trainer.steps or trainer.epochs, not both")
    resume = r.trainer.resume
    if resume not in ("auto", "never") and not os.path.exists(resume):
        issues.add("trainer.resume", f"no checkpoint at {resume!r} on this machine; expected auto (the newest "
                   "checkpoint in output_dir, if any), never, or the path of an existing checkpoint")
    problem = _unwritable_dir(r.trainer.output_dir)
    if problem:
        issues.add("trainer.output_dir", problem)


def _rollout_mode(r: Recipe, issues) -> None:
    from megarl.config.recipe import TrainerConfig, handoff

    if r.cluster.cpu_pinning and r.cluster.device == "cuda":
        issues.add("cluster.cpu_pinning", "pins the processes of CPU slots; with GPUs each process has its own GPU")
    t = r.trainer
    mode = t.rollout_mode
    if mode != "sync" and handoff(r):
        issues.add("trainer.rollout_mode", f"{mode} generates while the trainers train, but colocated GPUs "
                   "take turns (the engines sleep during training); use cluster.placement.mode: separate, or "
                   "rollout_mode: sync")
    if mode == "async":
        if t.max_staleness < 1:
            issues.add("trainer.max_staleness", f"async needs at least 1 (got {t.max_staleness}); 0 is rollout_mode "
                       "sync")
    else:
        for name in ("max_staleness", "stale_policy"):
            if getattr(t, name) != TrainerConfig.__dataclass_fields__[name].default:
                issues.add(f"trainer.{name}", f"only used by rollout_mode async (this recipe runs {mode}); remove it")


def _unwritable_dir(path: str) -> str | None:
    """Why `path` cannot be (or become) a directory this process writes into; None if it can."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a directory; point output_dir at a directory"
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip("/")) or "."
    if not os.path.isdir(existing):
        return f"{existing} is a file, so {path} cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user, so {path} cannot be " + (
            "written" if existing == path else "created")
    return None


def _shape(r: Recipe, issues: _Issues):
    m = r.model
    if m.shape is not None:
        r.derived.shape_source = "model.shape"
        return m.shape
    if local_hf_config(m.path):
        try:
            arch, shape = shape_from_hf_config(m.path)
        except ValueError as e:
            issues.add("model.path", str(e))
            return None
        m.architecture = m.architecture or arch
        m.shape = shape
        r.derived.shape_source = os.path.join(m.path, "config.json")
        return shape
    if m.shape_preset:
        if m.shape_preset not in PRESETS:
            hint = difflib.get_close_matches(m.shape_preset, list(PRESETS), n=1)
            issues.add("model.shape_preset", f"unknown preset {m.shape_preset!r}; "
                       + (f"did you mean {hint[0]!r}?" if hint else f"known: {', '.join(PRESETS)}"))
            return None
        arch, shape = PRESETS[m.shape_preset]
        m.architecture = m.architecture or arch
        m.shape = shape
        r.derived.shape_source = f"preset {m.shape_preset}"
        return shape
    if m.path:
        issues.add("model.path", f"no config.json at {m.path!r} on this machine; set model.shape_preset "
                   f"(one of {', '.join(PRESETS)}) or model.shape")
    return None


def _preference(r: Recipe, issues: _Issues) -> None:
    p = r.preference
    if p is None:
        return
    if r.stage == "kto" and p.loss_type != "kto":
        issues.add("preference.loss_type", f"stage kto uses loss_type kto, got {p.loss_type!r}")
    if r.stage == "dpo" and p.loss_type == "kto":
        issues.add("preference.loss_type", "loss_type kto needs unpaired data: use stage kto")
    _preference_options(r, issues)
    reference_free = p.loss_type in REFERENCE_FREE_LOSSES
    if reference_free and p.reference in ("model", "precomputed"):
        issues.add("preference.reference", f"{p.loss_type} is reference-free; set reference: none (or auto)")
    if not reference_free and p.reference == "none" and r.stage in PREFERENCE_STAGES:
        issues.add("preference.reference", f"loss_type {p.loss_type} needs a reference model "
                   "(model or precomputed)")
    r.derived.needs_reference = r.stage in PREFERENCE_STAGES and not reference_free
    if p.reference == "auto":  # resolved once here: the trainer reads model | precomputed | none
        p.reference = "model" if r.derived.needs_reference else "none"
    if r.stage == "rm" and p.reference != "none":
        issues.add("preference.reference", "a reward model trains without a reference; remove it")
    if r.stage != "rm" and p.margin:
        issues.add("preference.margin", "the per-pair margin belongs to the reward-model (rm) loss")
    if r.parallel.cp > 1:
        issues.add("parallel.cp", f"stage {r.stage} packs each pair into one row with a block-diagonal mask, "
                   "which context parallelism does not split yet; use cp: 1 (tp/pp/dp/sp all work)")


def _preference_options(r: Recipe, issues: _Issues) -> None:
    """beta / label_smoothing / simpo_gamma: an unset one becomes the loss's default (PREFERENCE_LOSS_OPTIONS);
    one set for a loss that does not use it is refused (label_smoothing 0 is harmless and allowed).
    Afterwards label_smoothing is a number (0 = none); simpo_gamma stays unset unless the loss is simpo."""
    p = r.preference
    loss = "bradley_terry" if r.stage == "rm" else p.loss_type
    used = PREFERENCE_LOSS_OPTIONS.get(loss, {})
    for key in ("beta", "label_smoothing", "simpo_gamma"):
        value = getattr(p, key)
        if key in used:
            setattr(p, key, used[key] if value is None else value)
        elif value is not None and not (key == "label_smoothing" and value == 0):
            what = "stage rm's Bradley-Terry loss" if r.stage == "rm" else f"loss_type {loss!r}"
            takers = ", ".join(n for n, options in PREFERENCE_LOSS_OPTIONS.items() if key in options)
            issues.add(f"preference.{key}", f"{what} does not use {key} (only {takers}); remove it")
    if p.label_smoothing is None:
        p.label_smoothing = 0.0


def _reward(r: Recipe, issues: _Issues) -> None:
    rw: RewardConfig | None = r.reward
    if rw is None:
        return
    if rw.reward_model:
        for cfg_path in (os.path.join(rw.reward_model.path, "config.json"),
                         os.path.join(rw.reward_model.path, "hf", "config.json")):  # HF dir / megatron checkpoint
            if os.path.isfile(cfg_path):
                arch = (json.load(open(cfg_path)).get("architectures") or ["?"])[0]
                if not arch.endswith("ForSequenceClassification"):
                    issues.add("reward.reward_model.path", f"{rw.reward_model.path} is a {arch}, not a reward model "
                               "with a scalar head (*ForSequenceClassification); train one with stage rm")
                break
    names = [f.name for f in rw.functions]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        issues.add("reward.functions", f"reward function {dup!r} is listed twice")
    from megarl.reward.functions import REWARD_FUNCTIONS  # torch-free

    for i, name in enumerate(names):
        if name not in REWARD_FUNCTIONS:
            hint = difflib.get_close_matches(name, REWARD_FUNCTIONS.names(), n=1)
            issues.add(f"reward.functions[{i}].name", f"unknown reward function {name!r}; "
                       + (f"did you mean {hint[0]!r}?" if hint else f"valid: {', '.join(REWARD_FUNCTIONS.names())}"))


def _gpus(r: Recipe, issues: _Issues) -> tuple[int, int]:
    c = r.cluster
    total = c.total_gpus
    if c.nodes < 1 or c.gpus_per_node < 1:  # reported by _ranges; no GPU count to check the layout against
        return 0, 0
    pl = c.placement
    if pl.mode == "colocated":
        if pl.rollout_gpus:
            issues.add("cluster.placement.rollout_gpus", "only used with mode: separate "
                       "(colocated rollout time-shares every GPU)")
        return total, (total if r.stage in RL_STAGES else 0)
    if r.stage in RL_STAGES and pl.rollout_gpus < 1:
        issues.add("cluster.placement.rollout_gpus", "mode separate needs GPUs reserved for rollout")
    train = total - pl.rollout_gpus - pl.reward_model_gpus
    if train < 1:
        issues.add("cluster.placement.rollout_gpus", f"{pl.rollout_gpus} rollout + {pl.reward_model_gpus} "
                   f"reward-model GPUs leave none of the {total} for training")
        return 1, pl.rollout_gpus
    return train, pl.rollout_gpus


def _layout(r: Recipe, shape, train_gpus: int, issues: _Issues) -> None:
    p = r.parallel
    experts = shape.num_experts if shape else None
    # MoE-ness is known once the shape is (model.shape, config.json or the preset); without a shape
    # model.path is already refused above, so there is nothing to check here.
    if shape is not None and not experts:
        dense = f"the model is dense (no num_experts in {r.derived.shape_source})"
        if p.ep > 1:
            issues.add("parallel.ep", f"ep={p.ep} splits the experts of an MoE model over ranks, but {dense}; "
                       "it would do nothing: use ep: 1")
        if p.etp is not None and p.etp != p.tp:
            issues.add("parallel.etp", f"etp={p.etp} shards the experts of an MoE model, but {dense}; remove it")
    layout_issues = p.issues(num_experts=experts)
    issues.extend(layout_issues)
    if layout_issues or train_gpus < 1:
        return
    world_issues = dataclasses.replace(p, world_size=train_gpus).issues(num_experts=experts)
    for i in world_issues:  # name the GPUs in the message: that is what the user can change
        issues.add(i.key, i.message.replace(f"world size {train_gpus}", f"{train_gpus} training GPUs"))
    if world_issues:
        return
    r.parallel = p.resolve(train_gpus, num_experts=experts)
    if shape is None:
        return
    if shape.num_attention_heads % p.tp:
        issues.add("parallel.tp", f"{shape.num_attention_heads} attention heads are not divisible by tp={p.tp}")
    if shape.num_kv_heads % p.tp:
        issues.add("parallel.tp", f"{shape.num_kv_heads} kv heads are not divisible by tp={p.tp}")
    stages = p.pp * (p.vpp or 1)
    if shape.num_layers % stages:
        issues.add("parallel.pp", f"{shape.num_layers} layers are not divisible by pp·vpp = {stages}")
    if r.critic is not None and r.critic.shape is None:
        r.critic.shape = shape


def _rollout(r: Recipe, shape, rollout_gpus: int, issues: _Issues) -> None:
    ro = r.rollout
    if ro is None:
        return
    need = ro.engines * ro.engine_tp
    if ro.engines >= 1 and ro.engine_tp >= 1:  # else reported by _ranges
        if r.cluster.device != "cpu" and r.cluster.total_gpus >= 1 and need > rollout_gpus:
            issues.add("rollout.engines", f"{ro.engines} engines × engine_tp {ro.engine_tp} = {need} GPUs, "
                       f"but the rollout has {rollout_gpus} ({r.cluster.placement.mode} placement)")
        if shape and shape.num_attention_heads % ro.engine_tp:
            issues.add("rollout.engine_tp", f"{shape.num_attention_heads} attention heads are not divisible by "
                       f"engine_tp={ro.engine_tp}")
    if shape and ro.max_prompt_length + ro.max_response_length > shape.max_position_embeddings:
        issues.add("rollout.max_response_length", f"max_prompt_length + max_response_length = "
                   f"{ro.max_prompt_length + ro.max_response_length} exceeds the model context "
                   f"({shape.max_position_embeddings})")
    al = r.algorithm
    if al is not None and al.overlong.mode == "shaping" and not 0 < al.overlong.buffer < ro.max_response_length:
        issues.add("algorithm.overlong.buffer", f"shaping needs 0 < buffer < rollout.max_response_length "
                   f"({ro.max_response_length}), got {al.overlong.buffer}")
    _check_sync_transport(r, issues)
    if ro.quantization == "fp8" and r.cluster.device == "cpu":
        issues.add("rollout.quantization", "FP8 rollout engines need GPUs (vLLM's CPU build has no FP8 linear "
                   "kernels); remove rollout.quantization for a CPU run")
    mt = ro.multi_turn
    if mt is not None:
        if mt.tools and not os.path.isfile(mt.tools):
            issues.add("rollout.multi_turn.tools", f"tool declaration file not found: {mt.tools}")
        budget = ro.max_prompt_length + ro.max_response_length
        if mt.max_total_tokens is None:
            mt.max_total_tokens = budget
        elif shape and mt.max_total_tokens > shape.max_position_embeddings:
            issues.add("rollout.multi_turn.max_total_tokens", f"{mt.max_total_tokens} exceeds the model context "
                       f"({shape.max_position_embeddings})")


def _data(r: Recipe, shape, issues: _Issues) -> None:
    if shape and r.data.max_length and r.data.max_length > shape.max_position_embeddings:
        issues.add("data.max_length",
                   f"{r.data.max_length} exceeds the model context ({shape.max_position_embeddings})")


def _algorithm(r: Recipe, issues: _Issues) -> None:
    a = r.algorithm
    if a is None:
        return
    for key, default in POLICY_LOSS_DEFAULTS[a.policy_loss].items():  # resolved once: workers read values
        if getattr(a, key) is None:
            setattr(a, key, default)
    _clip_ratios(a, issues)
    if a.dual_clip is not None and a.policy_loss != "ppo":
        issues.add("algorithm.dual_clip", f"only the ppo loss has a dual clip; policy_loss {a.policy_loss!r} "
                   "would ignore it")
    if a.kl.controller == "adaptive" and a.kl.target is None:
        issues.add("algorithm.kl.target", "the adaptive KL controller needs a target KL")
    if a.kl.placement == "reward" and a.kl.coef == 0:
        issues.add("algorithm.kl.placement", "placement reward does nothing without a coefficient: with kl.coef 0 "
                   "it subtracts nothing from the reward; set kl.coef > 0 or remove placement")
    r.derived.needs_reference = a.kl.coef > 0
    r.derived.needs_critic = r.stage == "ppo"


def _clip_ratios(a: AlgorithmConfig, issues: _Issues) -> None:
    """The ratio is clipped to [1 - clip_ratio_low, 1 + clip_ratio_high]. ppo/gspo: clip_ratio_low < 1
    (at 1 or more the lower clip is gone) and clip_ratio_high >= clip_ratio_low (clip-higher widens
    the upper side only). cispo clips a stop-gradient weight that is never negative: its paper default
    clip_ratio_low = 1 (lower bound 0) with clip_ratio_high 0.28 is meant, so only 0..1 is asked."""
    lo, hi = a.clip_ratio_low, a.clip_ratio_high
    cispo = a.policy_loss == "cispo"
    lo_ok = 0 <= lo <= 1 if cispo else 0 <= lo < 1
    if not lo_ok:
        issues.add("algorithm.clip_ratio_low", f"expected 0 <= clip_ratio_low {'<=' if cispo else '<'} 1 "
                   f"(the ratio's lower bound is 1 - clip_ratio_low) for policy_loss {a.policy_loss!r}, got {lo!r}")
    if not 0 <= hi < math.inf:
        issues.add("algorithm.clip_ratio_high", f"expected >= 0 and finite, got {hi!r}")
    elif lo_ok and not cispo and hi < lo:
        issues.add("algorithm.clip_ratio_high", f"expected clip_ratio_high >= clip_ratio_low ({lo}), got {hi} "
                   "(clip-higher widens the upper side; set both for a symmetric clip)")


def _model_impl(r: Recipe, issues: _Issues) -> None:
    m = r.model
    if m.fp8:
        if m.transformer_impl == "local":
            issues.add("model.fp8", "FP8 GEMMs are Transformer Engine kernels: set model.transformer_impl "
                       "to transformer_engine (or auto on GPUs)")
        elif r.cluster.device == "cpu":
            issues.add("model.fp8", "FP8 training needs GPUs with Transformer Engine; cluster.device is cpu")
    if m.transformer_impl == "transformer_engine" and r.cluster.device == "cpu":
        issues.add("model.transformer_impl", "Transformer Engine needs CUDA; use local or auto on cpu")
    if m.tokenizer is not None and not os.path.isdir(m.tokenizer):
        issues.add("model.tokenizer", f"no tokenizer directory at {m.tokenizer!r} on this machine "
                   "(remove the key to use the model's own tokenizer)")
    o = r.optim
    if 0 < o.lr < math.inf and 0 <= o.min_lr < math.inf and o.min_lr > o.lr:  # each alone: _ranges
        issues.add("optim.min_lr", f"expected min_lr <= lr ({o.lr}), got {o.min_lr}: the schedule decays "
                   "from lr to min_lr")
    steps = r.trainer.steps
    if isinstance(steps, int) and steps >= 1 and o.warmup_steps >= steps:  # with epochs: checked when built
        issues.add("optim.warmup_steps", f"expected fewer than trainer.steps ({steps}), got {o.warmup_steps}: "
                   "the learning rate would never leave its warmup")


def _not_implemented(r: Recipe, issues: _Issues) -> None:
    """Options the recipe schema accepts but no code runs yet: refused by name, since silently
    training something else (or crashing at step 1) is worse than an error at load."""
    for group, m in (("model", r.model), ("critic", r.critic)):
        if m is None:
            continue
        if m.finetuning == "lora":
            issues.add(f"{group}.finetuning", "lora is not implemented yet; use finetuning: full")
        if m.lora_rank:
            issues.add(f"{group}.lora_rank", f"LoRA is not implemented yet, so lora_rank {m.lora_rank} would "
                       "do nothing; remove it (finetuning: full trains every weight)")
    rm = r.reward.reward_model if r.reward else None
    if rm is not None and rm.type == "lora":
        issues.add("reward.reward_model.type", "lora reward models are not implemented yet; use type: full")
    if r.algorithm is not None and r.algorithm.advantage_estimator == "remax":
        issues.add("algorithm.advantage_estimator", "remax needs a greedy baseline rollout, not implemented yet; "
                   "use grpo, rloo, reinforce_pp or reinforce_pp_baseline")


# ---- value ranges -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Range:
    """What a value must be: `ok(value)`, the words for it and an optional note; the message reads
    "expected <text>[ or null] [(<note>)], got <value>" ("or null" for a key that may be unset)."""

    text: str
    ok: Callable[[Any], bool]
    note: str = ""

    def explain(self, note: str) -> _Range:
        return _Range(self.text, self.ok, note)


AT_LEAST_1 = _Range(">= 1", lambda v: v >= 1)
COUNT = _Range(">= 0", lambda v: v >= 0)
POSITIVE = _Range("> 0 and finite", lambda v: 0 < v < math.inf)
NON_NEGATIVE = _Range(">= 0 and finite", lambda v: 0 <= v < math.inf)
FINITE = _Range("a finite number", lambda v: -math.inf < v < math.inf)
FRACTION = _Range("a fraction in (0, 1]", lambda v: 0 < v <= 1)
UNIT = _Range("in [0, 1]", lambda v: 0 <= v <= 1)
BETA = _Range("in [0, 1)", lambda v: 0 <= v < 1)

_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
          "max_position_embeddings", "num_experts", "moe_topk", "moe_ffn_hidden_size")
# Every numeric key whose range follows from what it means. A path walks the recipe's attributes
# ("[]" goes over a list); an unset group or value (None) is skipped, so each row holds "when set".
# Ranges that depend on another key are written out where that key is checked (the clip ratios per
# policy loss in _clip_ratios, min_lr <= lr in _model_impl, overlong.buffer in _rollout, grpo's
# n > 1 in _stage_groups); the parallel sizes are ParallelConfig.issues'. Seeds take any integer.
RANGES: tuple[tuple[str, _Range], ...] = (
    *((f"{group}.shape.{name}", AT_LEAST_1) for group in ("model", "critic") for name in _SHAPE),
    ("data.max_length", AT_LEAST_1),
    ("rollout.engines", AT_LEAST_1), ("rollout.engine_tp", AT_LEAST_1), ("rollout.n", AT_LEAST_1),
    ("rollout.temperature", POSITIVE.explain("sampled training groups; eval_temperature 0 is greedy")),
    ("rollout.eval_temperature", NON_NEGATIVE.explain("0 = greedy")),
    ("rollout.eval_n", AT_LEAST_1), ("rollout.top_p", FRACTION),
    ("rollout.top_k", _Range(">= -1", lambda v: v >= -1, "-1 or 0 = off")),
    ("rollout.max_prompt_length", AT_LEAST_1), ("rollout.max_response_length", AT_LEAST_1),
    ("rollout.gpu_memory_utilization", FRACTION),
    ("rollout.kv_cache_bytes", AT_LEAST_1.explain("bytes; null: gpu_memory_utilization sizes the cache")),
    ("rollout.engine_cpu_threads", AT_LEAST_1.explain("null: from the placement and the rollout mode")),
    ("rollout.weight_sync.bucket_mb", AT_LEAST_1.explain("MiB")),
    ("rollout.weight_sync.logprob_tolerance", POSITIVE), ("rollout.weight_sync.timeout_s", POSITIVE),
    ("rollout.multi_turn.max_turns", AT_LEAST_1), ("rollout.multi_turn.max_total_tokens", AT_LEAST_1),
    ("rollout.multi_turn.max_tool_output_tokens", AT_LEAST_1),
    ("reward.functions[].weight", FINITE), ("reward.reward_model.weight", FINITE), ("reward.remote.weight", FINITE),
    ("reward.remote.timeout_s", POSITIVE), ("reward.remote.retries", COUNT),
    ("reward.remote.max_concurrency", AT_LEAST_1),
    ("algorithm.dual_clip", _Range("> 1 and finite", lambda v: 1 < v < math.inf, "the dual-clip constant c")),
    ("algorithm.entropy_coef", NON_NEGATIVE), ("algorithm.gamma", UNIT), ("algorithm.lam", UNIT),
    ("algorithm.ppo_epochs", AT_LEAST_1), ("algorithm.value_clip", POSITIVE),
    ("algorithm.dynamic_sampling_max_rounds", COUNT),
    ("algorithm.kl.coef", NON_NEGATIVE), ("algorithm.kl.clamp", POSITIVE), ("algorithm.kl.target", POSITIVE),
    ("algorithm.kl.horizon", AT_LEAST_1.explain("steps")),
    ("algorithm.rollout_correction.threshold", _Range(">= 1 and finite", lambda v: 1 <= v < math.inf,
                                                      "the cap C on the importance ratio")),
    ("algorithm.overlong.buffer", COUNT), ("algorithm.overlong.penalty", NON_NEGATIVE),
    ("preference.beta", POSITIVE), ("preference.label_smoothing", _Range("in [0, 0.5)", lambda v: 0 <= v < 0.5)),
    ("preference.ftx", NON_NEGATIVE), ("preference.simpo_gamma", NON_NEGATIVE),
    ("preference.kto_desirable_weight", NON_NEGATIVE), ("preference.kto_undesirable_weight", NON_NEGATIVE),
    ("optim.lr", POSITIVE), ("optim.min_lr", NON_NEGATIVE), ("optim.critic_lr", POSITIVE),
    ("optim.weight_decay", NON_NEGATIVE), ("optim.adam_beta1", BETA), ("optim.adam_beta2", BETA),
    ("optim.adam_eps", POSITIVE), ("optim.clip_grad", NON_NEGATIVE.explain("0 = off")),
    ("optim.warmup_steps", COUNT),
    ("trainer.steps", AT_LEAST_1), ("trainer.epochs", AT_LEAST_1), ("trainer.prompts_per_step", AT_LEAST_1),
    ("trainer.samples_per_step", AT_LEAST_1), ("trainer.samples_per_minibatch", AT_LEAST_1),
    ("trainer.micro_batch_per_rank", AT_LEAST_1), ("trainer.save_freq", COUNT.explain("0 = no periodic checkpoints")),
    ("trainer.eval_freq", COUNT.explain("0 = no periodic evaluation")), ("trainer.max_steps_this_run", AT_LEAST_1),
    ("logging.samples_every", COUNT.explain("0 = off")),
    ("cluster.nodes", AT_LEAST_1), ("cluster.gpus_per_node", AT_LEAST_1), ("cluster.cpu_threads_per_rank", AT_LEAST_1),
    ("cluster.placement.rollout_gpus", COUNT), ("cluster.placement.reward_model_gpus", COUNT),
)


def _values_at(obj: Any, path: str, key: str = "") -> Iterator[tuple[str, Any, str, Any]]:
    """(dotted key, owning object, field name, value) of every value `path` reaches from `obj`."""
    head, _, rest = path.partition(".")
    name = head.removesuffix("[]")
    value = getattr(obj, name)
    sub = f"{key}.{name}" if key else name
    if not rest:
        yield sub, obj, name, value
    elif head.endswith("[]"):
        for i, item in enumerate(value):
            yield from _values_at(item, rest, f"{sub}[{i}]")
    elif value is not None:
        yield from _values_at(value, rest, sub)


def range_issues(r: Recipe) -> list[ConfigIssue]:
    """The RANGES rules alone, for code that reads a recipe which may have been edited since it was
    loaded (`megarl.config.plan`)."""
    issues = _Issues()
    _ranges(r, issues)
    return list(issues)


def _ranges(r: Recipe, issues: _Issues) -> None:
    shared_shape = r.critic is not None and r.critic.shape is r.model.shape  # the actor's, checked once
    for path, expected in RANGES:
        if shared_shape and path.startswith("critic.shape."):
            continue
        for key, owner, name, value in _values_at(r, path):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is None or (number and expected.ok(value)):
                continue
            nullable = type(None) in typing.get_args(typing.get_type_hints(type(owner))[name])
            derived_shape = key.startswith("model.shape.") and r.derived.shape_source != "model.shape"
            where = f" (read from {r.derived.shape_source})" if derived_shape else ""
            note = f" ({expected.note})" if expected.note else ""
            issues.add(key, f"expected {expected.text}{' or null' if nullable else ''}{note}, got {value!r}{where}")


def _batches(r: Recipe, issues: _Issues) -> None:
    t, d = r.trainer, r.derived
    dp = r.parallel.dp
    per_update_unit = t.micro_batch_per_rank * dp
    if r.stage in RL_STAGES:
        samples = t.prompts_per_step * r.rollout.n
        mini = t.samples_per_minibatch or samples
        if samples % mini:
            issues.add("trainer.samples_per_minibatch", f"prompts_per_step × n = {t.prompts_per_step} × "
                       f"{r.rollout.n} = {samples} samples do not split into mini-batches of {mini}")
            return
    else:
        samples = t.samples_per_step
        mini = samples
        if t.samples_per_minibatch not in (None, samples):
            issues.add("trainer.samples_per_minibatch", f"stage {r.stage} takes one optimizer update per step; "
                       "remove samples_per_minibatch")
            return
    if mini % per_update_unit:
        key = "trainer.samples_per_minibatch" if r.stage in RL_STAGES else "trainer.samples_per_step"
        issues.add(key, f"{mini} samples per update do not split into micro-batches of "
                   f"micro_batch_per_rank {t.micro_batch_per_rank} × dp {dp} = {per_update_unit}")
        return
    d.dp = dp
    d.samples_per_step = samples
    d.samples_per_minibatch = mini
    d.minibatches_per_step = samples // mini
    d.grad_accumulation = mini // per_update_unit


def summary(r: Recipe) -> str:
    """One line describing a resolved recipe."""
    d, p = r.derived, r.parallel
    what = (f"{r.trainer.prompts_per_step} prompts × n={r.rollout.n} = " if r.stage in RL_STAGES else "")
    devices = "CPU ranks" if r.cluster.device == "cpu" else "GPUs"
    rollout = f"; {d.rollout_gpus} rollout" if r.stage in RL_STAGES else ""
    return (f"{r.stage}: {r.model.shape_preset or r.model.path} on {r.cluster.total_gpus} {devices} "
            f"({d.train_world_size} training: {p.describe()}{rollout}); "
            f"step = {what}{d.samples_per_step} samples, {d.minibatches_per_step} update(s) of "
            f"{d.samples_per_minibatch}, grad accumulation {d.grad_accumulation}")


__all__ = ["resolve_recipe", "summary", "Derived"]


def _check_sync_transport(r: Recipe, issues) -> None:
    """An explicit rollout.weight_sync.transport: shared_memory that cannot work is refused with the
    reason. `auto` stays open: it depends on the device the run really gets, so the driver settles
    it (`megarl.sync.choice.resolve_transport`); validation stays torch-free."""
    ws, ro = r.rollout.weight_sync, r.rollout
    reasons = []
    if r.cluster.nodes > 1:
        reasons.append(f"cluster.nodes is {r.cluster.nodes} (engines on other nodes cannot map the trainer's memory)")
    if ro.quantization:
        reasons.append(f"rollout.quantization is {ro.quantization} (FP8 needs each tensor whole on the sender)")
    if ws.transport == "shared_memory" and reasons:
        issues.add("rollout.weight_sync.transport", "shared_memory cannot be used: " + "; ".join(reasons)
                   + ". Use broadcast (or auto)")
