"""Name and layout map between Hugging Face checkpoints and megatron-core's local GPT layers.

Megatron names here are those of a TP=1, PP=1 GPTModel built with the local spec; the dist
checkpoint then reshards them to any TP/PP/EP layout. The transforms are pure reshapes and
concatenations (bit-exact both ways):

- attention: HF q/k/v -> `linear_qkv` with the rows grouped per KV group,
  [q(heads/groups · d), k(d), v(d)] for each of the `groups` KV heads (GQA-aware); same for biases
- MLP: HF gate/up -> `linear_fc1` = [gate; up]; down -> `linear_fc2`
- MoE: router `gate` -> `mlp.router`; expert e's gate/up/down (Mixtral: w1/w3/w2) ->
  `mlp.experts.local_experts.e.linear_fc1/linear_fc2`
- q/k RMSNorm (Qwen3) -> `q_layernorm`/`k_layernorm`; tied embeddings have no output layer

The names are the local spec's, which are also the dist checkpoint's keys for either layer
implementation (the local spec maps its norms to the fused names in `sharded_state_dict_keys_map`).
A live model's parameters differ under Transformer Engine, which fuses each norm into the linear
after it: `param_name(name, "transformer_engine")` gives those (the weight sync walks parameters).

Every HF tensor must be consumed and every megatron tensor produced: anything else is an error
that names the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

# Buffers some HF checkpoints carry that are recomputed from the config, never weights.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointMismatch(ValueError):
    pass


def _dims(cfg: dict) -> tuple[int, int, int]:
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return heads, groups, head_dim


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: dict) -> torch.Tensor:
    heads, groups, d = _dims(cfg)
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape((heads + 2 * groups) * d, *rest)


def split_qkv(qkv: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, groups, d = _dims(cfg)
    rest = qkv.shape[1:]
    per = heads // groups * d
    g = qkv.reshape(groups, per + 2 * d, *rest)
    q, k, v = g[:, :per], g[:, per:per + d], g[:, per + d:]
    return (q.reshape(heads * d, *rest).contiguous(), k.reshape(groups * d, *rest).contiguous(),
            v.reshape(groups * d, *rest).contiguous())


def _expert_names(arch: str, prefix: str, e: int) -> tuple[str, str, str]:
    """HF (gate, up, down) weight names of expert e."""
    if arch == "mixtral":
        base = f"{prefix}.block_sparse_moe.experts.{e}"
        return f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"
    base = f"{prefix}.mlp.experts.{e}"
    return f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"


def _router_name(arch: str, prefix: str) -> str:
    return f"{prefix}.block_sparse_moe.gate.weight" if arch == "mixtral" else f"{prefix}.mlp.gate.weight"


def layer_plan(arch: str, cfg: dict, i: int) -> list[tuple[str, list[str], str]]:
    """[(megatron name, [hf names], transform)] for decoder layer i; transform in
    {"copy", "qkv", "fc1"}."""
    hf = f"model.layers.{i}"
    mc = f"decoder.layers.{i}"
    attn = f"{hf}.self_attn"
    plan = [
        (f"{mc}.input_layernorm.weight", [f"{hf}.input_layernorm.weight"], "copy"),
        (f"{mc}.self_attention.linear_qkv.weight", [f"{attn}.{p}_proj.weight" for p in "qkv"], "qkv"),
        (f"{mc}.self_attention.linear_proj.weight", [f"{attn}.o_proj.weight"], "copy"),
        (f"{mc}.pre_mlp_layernorm.weight", [f"{hf}.post_attention_layernorm.weight"], "copy"),
    ]
    if arch == "qwen2" or cfg.get("attention_bias"):
        plan.append((f"{mc}.self_attention.linear_qkv.bias", [f"{attn}.{p}_proj.bias" for p in "qkv"], "qkv"))
    if arch in ("qwen3", "qwen3_moe"):
        plan += [(f"{mc}.self_attention.q_layernorm.weight", [f"{attn}.q_norm.weight"], "copy"),
                 (f"{mc}.self_attention.k_layernorm.weight", [f"{attn}.k_norm.weight"], "copy")]
    if arch in ("qwen3_moe", "mixtral"):
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        plan.append((f"{mc}.mlp.router.weight", [_router_name(arch, hf)], "copy"))
        for e in range(experts):
            gate, up, down = _expert_names(arch, hf, e)
            ex = f"{mc}.mlp.experts.local_experts.{e}"
            plan += [(f"{ex}.linear_fc1.weight", [gate, up], "fc1"), (f"{ex}.linear_fc2.weight", [down], "copy")]
    else:
        plan += [(f"{mc}.mlp.linear_fc1.weight", [f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"], "fc1"),
                 (f"{mc}.mlp.linear_fc2.weight", [f"{hf}.mlp.down_proj.weight"], "copy")]
    return plan


TE = "transformer_engine"
# Under Transformer Engine the norm before a column-parallel linear is that linear's `layer_norm_*`
# (megatron-core's TE spec: linear_qkv = TELayerNormColumnParallelLinear, input_layernorm = IdentityOp;
# for dense MLPs linear_fc1 likewise, pre_mlp_layernorm = IdentityOp; MoE layers keep a TENorm).
_TE_FUSED_NORMS = ((".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
                   (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"))


def param_name(name: str, impl: str = "local", moe: bool = False) -> str:
    """The live parameter name of local-spec megatron tensor `name` in a model built with `impl`."""
    if impl != TE:
        return name
    for local, fused in _TE_FUSED_NORMS:
        if name.endswith(local) and not (moe and local.startswith(".pre_mlp")):
            return name[:-len(local)] + fused
    return name


def full_plan(arch: str, cfg: dict) -> list[tuple[str, list[str], str]]:
    plan = [("embedding.word_embeddings.weight", ["model.embed_tokens.weight"], "copy")]
    for i in range(cfg["num_hidden_layers"]):
        plan += layer_plan(arch, cfg, i)
    plan.append(("decoder.final_layernorm.weight", ["model.norm.weight"], "copy"))
    archs = cfg.get("architectures") or [""]
    if archs[0].endswith(("ForTokenClassification", "ForSequenceClassification")):
        plan.append(("output_layer.weight", ["score.weight"], "copy"))  # critic value / reward score
        if archs[0].endswith("ForTokenClassification"):
            plan.append(("output_layer.bias", ["score.bias"], "copy"))
    elif not cfg.get("tie_word_embeddings", False):
        plan.append(("output_layer.weight", ["lm_head.weight"], "copy"))
    return plan


def check_hf_names(arch: str, cfg: dict, hf_names: list[str]) -> None:
    """Raise CheckpointMismatch naming missing and unknown HF tensors (before reading any data)."""
    needed = {n for _, names, _ in full_plan(arch, cfg) for n in names}
    present = {n for n in hf_names if not n.endswith(IGNORED_HF_SUFFIXES)}
    if cfg.get("tie_word_embeddings", False):
        present.discard("lm_head.weight")  # some tied checkpoints still store it
    missing, unknown = sorted(needed - present), sorted(present - needed)
    if missing or unknown:
        raise CheckpointMismatch(
            f"HF checkpoint does not match its config.json ({arch}, {cfg['num_hidden_layers']} layers): "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} " if missing else "")
            + (f"unknown {unknown[:5]}{' ...' if len(unknown) > 5 else ''}" if unknown else ""))


def megatron_tensor(sources: list[str], how: str, cfg: dict, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """One megatron (TP=1) tensor from its HF sources (a `full_plan` entry)."""
    tensors = [get(n) for n in sources]
    if how == "qkv":
        return fuse_qkv(*tensors, cfg)
    if how == "fc1":
        return torch.cat(tensors, dim=0)
    return tensors[0]


def hf_to_megatron(arch: str, cfg: dict, hf_names: list[str], get: Callable[[str], torch.Tensor]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) one at a time, reading HF tensors through `get`."""
    check_hf_names(arch, cfg, hf_names)
    for name, sources, how in full_plan(arch, cfg):
        yield name, megatron_tensor(sources, how, cfg, get)


def hf_tensors(targets: list[str], how: str, tensor: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of one megatron (TP=1) tensor (the inverse of `megatron_tensor`)."""
    if how == "qkv":
        return list(zip(targets, split_qkv(tensor, cfg)))
    if how == "fc1":
        return list(zip(targets, (c.contiguous() for c in tensor.chunk(2, dim=0))))
    return [(targets[0], tensor)]


def megatron_to_hf(arch: str, cfg: dict, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from megatron TP=1 tensors read through `get`."""
    for name, targets, how in full_plan(arch, cfg):
        yield from hf_tensors(targets, how, get(name), cfg)
