"""`megarl plan`: what a resolved recipe means on the cluster: the GPU map, the batch accounting,
and an estimate of memory per GPU for each role, with the formula behind every number.

Memory model (bytes per GPU; P = parameters held by the GPU):
- params: P × 2 (bf16/fp16) or 4 (fp32). P = dense params / (tp·pp) + expert params / (ep·etp·pp).
- grads: P × 4 (megatron DDP keeps fp32 gradient buffers, grad_reduce_in_fp32).
- optimizer: P × 12 (fp32 main params + Adam m + v) / dp with the distributed optimizer
  (experts: / expert-dp), P × 12 without it.
- activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", per layer, per micro-batch, TP with SP and CP): s·b·h·34/(tp·cp) with flash/selective
  recompute, plus 5·a·s²·b/(tp·cp) without it; full recompute keeps 2·s·b·h/(tp·cp) per layer plus
  one layer's working set. 1F1B keeps up to pp micro-batches in flight on the first stage, i.e. the
  activations of all L layers; logits add s·b·V/tp × 4 (fp32 for the loss) on the last stage.
- rollout engine: weights / engine_tp; the KV cache gets kv_cache_bytes when set, else
  gpu_memory_utilization × GPU − weights; one token of KV is 2 · L · kv_heads · head_dim · 2 bytes
  / engine_tp. The reward model is a forward-only scalar-head model (its config.json's shape when
  local, else the actor's).
- separate: every role holds its memory for the whole run; the training roles on the training GPUs,
  the engines on the rollout GPUs (the reward model on its own GPUs when reward_model_gpus > 0).
- colocated RL on GPUs: the trainers and the engines take turns (trainers/rl/gangs.MemoryHandOff),
  so each GPU's peak is the largest of three phases: training (actor, reference, critic and reward
  model resident; the engine asleep, its process only), weight sync (the same plus the engine's
  weights, and its KV cache when rollout.weight_sync.verify_logprobs), rollout (the engine and the
  reward model; actor, reference and critic offloaded to host memory, their processes only).
  Colocated on CPU nothing is handed over and the roles add up. RL roles are separate processes,
  each with its own runtime overhead; sft/rm/dpo/kto keep the reference in the actor's process.
"""

from __future__ import annotations

from dataclasses import dataclass

from megarl.config.errors import ConfigError, ConfigIssue
from megarl.config.recipe import RL_STAGES, ModelShape, Recipe, handoff
from megarl.config.shapes import local_hf_config, shape_from_hf_config

GiB = 1024**3
GPU_TYPES = {"h100-80gb": 80, "h200-141gb": 141, "a100-80gb": 80, "a100-40gb": 40, "b200-192gb": 192,
             "l40s-48gb": 48}
OVERHEAD_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def param_counts(s: ModelShape, value_head: bool = False) -> tuple[int, int]:
    """(dense params, expert params) of a Llama/Qwen-style decoder."""
    head_dim = s.hidden_size // s.num_attention_heads
    attn = s.hidden_size * (s.num_attention_heads + 2 * s.num_kv_heads) * head_dim \
        + s.num_attention_heads * head_dim * s.hidden_size
    norms = 2 * s.hidden_size
    if s.num_experts:
        ffn = s.moe_ffn_hidden_size or s.ffn_hidden_size
        expert = s.num_layers * s.num_experts * 3 * s.hidden_size * ffn
        dense_mlp = s.hidden_size * s.num_experts  # router
    else:
        expert = 0
        dense_mlp = 3 * s.hidden_size * s.ffn_hidden_size
    embed = s.vocab_size * s.hidden_size
    head = s.hidden_size if value_head else (0 if s.tie_embeddings else embed)
    dense = s.num_layers * (attn + norms + dense_mlp) + embed + head + s.hidden_size
    return dense, expert


@dataclass
class RoleMemory:
    role: str
    params: float
    grads: float
    optimizer: float
    activations: float
    kv_cache: float
    note: str

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.kv_cache + OVERHEAD_GIB


def _training_role(r: Recipe, role: str, trainable: bool, value_head: bool = False,
                   shape: ModelShape | None = None) -> RoleMemory:
    s, p = shape or r.model.shape, r.parallel
    dense, expert = param_counts(s, value_head)
    local = dense / (p.tp * p.pp) + expert / (p.ep * p.expert_tp * p.pp)
    pbytes = DTYPE_BYTES[r.model.dtype]
    params = local * pbytes / GiB
    grads = optimizer = activations = 0.0
    if trainable:
        grads = local * 4 / GiB
        if r.optim.distributed_optimizer:
            optimizer = (dense / (p.tp * p.pp) / p.dp + expert / (p.ep * p.expert_tp * p.pp) / p.expert_dp) * 12 / GiB
        else:
            optimizer = local * 12 / GiB
    seq = (r.rollout.max_prompt_length + r.rollout.max_response_length) if r.stage in RL_STAGES \
        else (r.data.max_length or s.max_position_embeddings)
    b, h, a, L = r.trainer.micro_batch_per_rank, s.hidden_size, s.num_attention_heads, s.num_layers
    shard = p.tp * p.cp
    per_layer_sel = seq * b * h * 34 / shard
    if r.model.recompute == "full":
        per_layer, flight_layers = 2 * seq * b * h / shard, L
        working = per_layer_sel + 5 * a * seq * seq * b / shard
        act = per_layer * flight_layers + working
    else:
        per_layer = per_layer_sel + (0 if r.model.recompute == "selective" else 5 * a * seq * seq * b / shard)
        act = per_layer * L  # pp stages × L/pp layers in flight on the first stage (1F1B)
    logits = seq * b * s.vocab_size / p.tp * 4 / p.cp
    if not trainable:  # forward only: one layer's working set plus the logits
        act = per_layer_sel
    activations = (act + (logits if not value_head else 0)) / GiB
    note = f"{local / 1e9:.2f}B params/GPU; seq {seq}, micro-batch {b}, recompute {r.model.recompute}"
    return RoleMemory(role, params, grads, optimizer, activations, 0.0, note)


def _rollout_role(r: Recipe, gpu_gib: float) -> RoleMemory:
    s, ro = r.model.shape, r.rollout
    dense, expert = param_counts(s)
    weights = (dense + expert) * DTYPE_BYTES[r.model.dtype] / ro.engine_tp / GiB
    head_dim = s.hidden_size // s.num_attention_heads
    kv_per_token = 2 * s.num_layers * s.num_kv_heads * head_dim * 2 / ro.engine_tp
    kv_budget = ro.kv_cache_bytes / GiB if ro.kv_cache_bytes is not None \
        else max(ro.gpu_memory_utilization * gpu_gib - weights, 0.0)
    seq = ro.max_prompt_length + ro.max_response_length
    concurrent = int(kv_budget * GiB / (kv_per_token * seq)) if kv_per_token else 0
    per_engine = r.derived.samples_per_step / ro.engines
    note = (f"KV cache {kv_budget:.1f} GiB holds {concurrent} full-length sequences per engine; "
            f"{per_engine:.0f} samples per engine per step")
    return RoleMemory("rollout", weights, 0, 0, 0, kv_budget, note)


def memory_table(r: Recipe) -> tuple[list[RoleMemory], float]:
    gpu_gib = GPU_TYPES.get(r.cluster.gpu_type)
    if gpu_gib is None:
        raise ValueError(f"cluster.gpu_type {r.cluster.gpu_type!r} unknown; known: {', '.join(GPU_TYPES)}")
    refuse_unplannable(r)
    roles = [_training_role(r, "actor", trainable=True)]
    if r.derived.needs_reference:
        roles.append(_training_role(r, "reference", trainable=False))
    if r.derived.needs_critic:
        roles.append(_training_role(r, "critic", trainable=True, value_head=True))
    if r.reward is not None and r.reward.reward_model is not None:
        roles.append(_reward_model_role(r))
    if r.stage in RL_STAGES:
        roles.append(_rollout_role(r, gpu_gib))
    return roles, gpu_gib


def _reward_model_shape(r: Recipe) -> tuple[ModelShape, str | None]:
    """The reward model's shape and the directory its config.json is in (None: assumed the actor's)."""
    path = r.reward.reward_model.path
    local = next((d for d in (path, f"{path}/hf") if local_hf_config(d)), None)  # HF dir / converted checkpoint
    return (shape_from_hf_config(local)[1] if local else r.model.shape), local


def refuse_unplannable(r: Recipe) -> None:
    """The estimates divide by heads, layers, lengths, engines and GPUs per node. A loaded recipe has
    them >= 1 (validation), but a recipe may be edited in code after loading, and the reward model's
    shape is read here from its own config.json, which load does not check: a zero is refused by name
    (ConfigError, which the CLI prints) rather than ending in a ZeroDivisionError."""
    from megarl.config.validate import range_issues

    issues = range_issues(r)  # the load-time range rules, again on the recipe as it is now
    if r.model.shape is None:
        issues.append(ConfigIssue("model.shape", "unknown: the plan needs it (set model.shape_preset or "
                                                 "model.shape)"))
    if r.reward is not None and r.reward.reward_model is not None:
        try:
            shape, local = _reward_model_shape(r)
        except ValueError as e:
            raise ConfigError([ConfigIssue("reward.reward_model.path", str(e))]) from None
        if local:  # without a config.json the reward model's shape is the actor's, checked above
            for name in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "vocab_size",
                         "max_position_embeddings"):
                value = getattr(shape, name)
                if not isinstance(value, int) or value < 1:
                    issues.append(ConfigIssue("reward.reward_model.path", f"{name} in {local}/config.json: "
                                                                          f"expected an integer >= 1, got {value!r}"))
    ConfigError.raise_if(issues)


def _reward_model_role(r: Recipe) -> RoleMemory:
    shape, local = _reward_model_shape(r)
    m = _training_role(r, "reward_model", trainable=False, value_head=True, shape=shape)
    m.note += "" if local else " (shape assumed = the actor's: no config.json on this machine)"
    return m


def _idle(role: RoleMemory, state: str, params: float = 0.0, kv: float = 0.0) -> RoleMemory:
    """A role's process while it is off the GPU (its runtime overhead) or partly on it."""
    return RoleMemory(f"{role.role} ({state})", params, 0.0, 0.0, 0.0, kv, "")


def handoff_phases(r: Recipe, roles: list[RoleMemory]) -> list[tuple[str, list[RoleMemory], float]]:
    """The three phases of a colocated GPU: what is on each GPU in each (see the module docstring)."""
    engine = next(m for m in roles if m.role == "rollout")
    scorers = [m for m in roles if m.role == "reward_model"]
    gangs = [m for m in roles if m.role not in ("rollout", "reward_model")]
    sync_kv = engine.kv_cache if r.rollout.weight_sync.verify_logprobs else 0.0
    phases = [("training", [*gangs, *scorers, _idle(engine, "asleep")]),
              ("weight sync", [*gangs, *scorers, _idle(engine, "weights" + (" + KV" if sync_kv else ""),
                                                       engine.params, sync_kv)]),
              ("rollout", [engine, *scorers, *(_idle(g, "offloaded") for g in gangs)])]
    return [(f"every GPU, {name}", members, sum(m.total for m in members)) for name, members in phases]


def gpu_pools(r: Recipe, roles: list[RoleMemory]) -> list[tuple[str, list[RoleMemory], float]]:
    """(GPUs, the roles on each of them, GiB per GPU) for the recipe's placement: the resident roles
    added up, or the phases of a colocated GPU hand-off."""
    if handoff(r):
        return handoff_phases(r, roles)
    if r.cluster.placement.mode == "colocated":
        pools = [("every GPU", roles)]
    else:
        rm_pool = "reward-model GPUs" if r.cluster.placement.reward_model_gpus > 0 else "training GPUs"
        pool_of = {"rollout": "rollout GPUs", "reward_model": rm_pool}
        pools = [(name, [m for m in roles if pool_of.get(m.role, "training GPUs") == name])
                 for name in ("training GPUs", "rollout GPUs", "reward-model GPUs")]
    counted_twice = 0 if r.stage in RL_STAGES else OVERHEAD_GIB  # sft/rm/dpo/kto: one process per rank
    return [(name, members, sum(m.total for m in members) - counted_twice * (len(members) - 1))
            for name, members in pools if members]


def gpu_map(r: Recipe) -> list[str]:
    c, p, d = r.cluster, r.parallel, r.derived
    lines = []
    trainers = "actor" + (" + reference" if d.needs_reference else "") + (" + critic" if d.needs_critic else "") \
        + (" + reward model" if r.reward is not None and r.reward.reward_model is not None
           and not (c.placement.mode == "separate" and c.placement.reward_model_gpus) else "")
    lines.append(f"training ranks 0-{d.train_world_size - 1} ({trainers}): {p.describe()}")
    per_stage = d.train_world_size // p.pp
    for stage in range(min(p.pp, 8)):
        first, last = stage * per_stage, (stage + 1) * per_stage - 1
        nodes = sorted({g // c.gpus_per_node for g in (first, last)})
        lines.append(f"  pipeline stage {stage}: ranks {first}-{last} (nodes {'-'.join(map(str, nodes))}), "
                     f"layers {stage * r.model.shape.num_layers // p.pp}-"
                     f"{(stage + 1) * r.model.shape.num_layers // p.pp - 1}; tp groups of {p.tp} consecutive "
                     f"ranks (inside a node{'' if p.tp <= c.gpus_per_node else ' — NO: tp spans nodes'})")
    if p.pp > 8:
        lines.append(f"  ... {p.pp - 8} more stages")
    return lines


def batch_table(r: Recipe) -> list[tuple[str, str]]:
    d, t = r.derived, r.trainer
    rows = []
    if r.stage in RL_STAGES:
        rows.append(("prompts per step", str(t.prompts_per_step)))
        rows.append(("samples per step", f"{d.samples_per_step} (= prompts × n {r.rollout.n})"))
    else:
        rows.append(("samples per step", str(d.samples_per_step)))
    rows += [
        ("optimizer updates per step", f"{d.minibatches_per_step}"
         + (f" × ppo_epochs {r.algorithm.ppo_epochs}" if r.algorithm else "")),
        ("samples per update", str(d.samples_per_minibatch)),
        ("data-parallel ranks", str(d.dp)),
        ("micro-batch per rank", str(t.micro_batch_per_rank)),
        ("gradient accumulation", f"{d.grad_accumulation} (= samples per update / (micro-batch × dp))"),
    ]
    return rows


def _pool_lines(r: Recipe, roles: list[RoleMemory], gpu_gib: float) -> tuple[list[str], bool]:
    """Each GPU pool's roles added up (each hand-off phase's), and the engine budget that would fit."""
    title = ("per GPU, each phase of the colocated hand-off (trainers offloaded while the engines generate, "
             "engines asleep while the trainers train):" if handoff(r) else "per GPU, every resident role at once:")
    out, fits = ["", title], True
    for name, members, gib in gpu_pools(r, roles):
        ok = gib <= gpu_gib
        fits &= ok
        out.append(f"  {name} ({r.cluster.placement.mode}): {' + '.join(m.role for m in members)} = "
                   f"{gib:.1f} GiB  {'fits' if ok else 'DOES NOT FIT'}")
        if not ok and any(m.role == "rollout" for m in members) and r.rollout.kv_cache_bytes is None:
            out.append("    " + _engine_budget_hint(r, members, gpu_gib))
    if r.rollout is not None and r.cluster.placement.mode == "colocated" and not handoff(r):
        out.append("  note: colocated on CPU nothing is handed over: the roles stay resident together")
    return out, fits


def _engine_budget_hint(r: Recipe, members: list[RoleMemory], gpu_gib: float) -> str:
    """vLLM starts after the training roles and claims gpu_memory_utilization × GPU; what is left."""
    engine = next(m for m in members if m.role == "rollout")
    others = sum(m.total for m in members if m is not engine)
    room = gpu_gib - others - OVERHEAD_GIB
    if room <= engine.params:
        return (f"the other roles leave {max(room, 0):.1f} GiB, not even the engine's {engine.params:.1f} GiB of "
                "weights: shard more (tp/pp/engine_tp) or use placement separate")
    return (f"the other roles leave {room:.1f} GiB for the engine: rollout.gpu_memory_utilization <= "
            f"{room / gpu_gib:.2f} ({room - engine.params:.1f} GiB of KV cache) would fit")


def render_plan(r: Recipe, placement_lines: list[str] = ()) -> tuple[str, bool]:
    """The plan as text, and whether every role fits, alone and with the roles sharing its GPUs.
    `placement_lines`: the run's placement map (megarl.launch.placement, which config cannot import)."""
    from megarl.config.validate import summary

    roles, gpu_gib = memory_table(r)
    dense, expert = param_counts(r.model.shape)
    out = [summary(r), "",
           f"model: {r.model.architecture or '?'} ({r.derived.shape_source}), "
           f"{(dense + expert) / 1e9:.2f}B parameters"
           + (f" ({expert / 1e9:.2f}B in experts)" if expert else ""),
           "", f"GPU map ({r.cluster.nodes} nodes × {r.cluster.gpus_per_node} GPUs, "
           f"{r.cluster.placement.mode} placement):"]
    out += ["  " + line for line in gpu_map(r)]
    out += ["  " + line for line in placement_lines]
    out += ["", "batch accounting:"]
    out += [f"  {k:<28} {v}" for k, v in batch_table(r)]
    out += ["", f"memory per GPU on {r.cluster.gpu_type} ({gpu_gib} GiB), GiB "
                f"(+{OVERHEAD_GIB:.0f} GiB runtime overhead in each total):",
            f"  {'role':<12} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'kv':>7} {'total':>7}  fits"]
    fits_all = True
    for m in roles:
        ok = m.total <= gpu_gib
        fits_all &= ok
        out.append(f"  {m.role:<12} {m.params:7.1f} {m.grads:7.1f} {m.optimizer:7.1f} {m.activations:7.1f} "
                   f"{m.kv_cache:7.1f} {m.total:7.1f}  {'yes' if ok else 'NO'}   {m.note}")
    pool_lines, pools_fit = _pool_lines(r, roles, gpu_gib)
    out += pool_lines
    fits_all &= pools_fit
    out += ["", "how each number is computed:"] + ["  " + line for line in __doc__.split("Memory model")[1]
                                                   .strip().splitlines()[1:]]
    return "\n".join(out), fits_all
