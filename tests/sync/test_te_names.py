"""Transformer Engine parameter names in the weight sync plan.

Transformer Engine does not import on this machine, so the names are derived from the structure of
megatron-core's own TE layer spec (`get_gpt_layer_with_transformer_engine_submodules`) with a
stand-in for its `TESpecProvider` that returns marker classes: which norms are fused into which
linear, which are separate modules, and which are IdentityOp. The plan built for
transformer_impl=transformer_engine must name exactly those parameters; the local plan keeps the
local spec's names (which are also the dist checkpoint's keys for both implementations)."""

from __future__ import annotations

import json
import os

import pytest

from megarl.checkpoint.hf_map import TE, param_name
from megarl.config.parallel import ParallelConfig
from megarl.runtime.local_group import run_isolated
from megarl.sync.plan import EngineLayout, WeightSyncPlan


class NormLinear:       # TELayerNormColumnParallelLinear: weight (+ bias) + layer_norm_weight
    pass


class Linear:           # TEColumnParallelLinear / TERowParallelLinear: weight (+ bias)
    pass


class Norm:             # TENorm: weight
    pass


class StandInTE:
    """What megatron's TESpecProvider answers, as markers (same protocol: models/backends.py)."""

    def column_parallel_linear(self):
        return Linear

    def row_parallel_linear(self):
        return Linear

    def linear(self):
        return Linear

    def fuse_layernorm_and_linear(self):
        return True

    def column_parallel_layer_norm_linear(self):
        return NormLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return Norm

    def core_attention(self):
        return object

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        return object

    def activation_func(self):
        return None


def _names(prefix: str, module, bias: bool) -> set[str]:
    if module is NormLinear:
        return {f"{prefix}.weight", f"{prefix}.layer_norm_weight"} | ({f"{prefix}.bias"} if bias else set())
    if module is Linear:
        return {f"{prefix}.weight"} | ({f"{prefix}.bias"} if bias else set())
    if module is Norm:
        return {f"{prefix}.weight"}
    return set()   # IdentityOp


def te_layer_names(num_experts: int | None, qk_layernorm: bool, qkv_bias: bool) -> set[str]:
    """Learnable parameter names of one TE transformer layer (dense MLP; for MoE, without the
    expert and router tensors, which the TE spec does not rename). Imports megatron: run it in
    its own process (pytest's own process never installs the CPU layer)."""
    from megarl.runtime.megatron import gpt_layer_specs as specs

    original = specs.TESpecProvider
    specs.TESpecProvider = StandInTE
    try:
        layer = specs.get_gpt_layer_with_transformer_engine_submodules(num_experts=num_experts,
                                                                       qk_layernorm=qk_layernorm)
    finally:
        specs.TESpecProvider = original
    attn = layer.self_attention.submodules
    names = (_names("input_layernorm", layer.input_layernorm, False)
             | _names("self_attention.linear_qkv", attn.linear_qkv, qkv_bias)
             | _names("self_attention.linear_proj", attn.linear_proj, False)
             | _names("self_attention.q_layernorm", attn.q_layernorm, False)
             | _names("self_attention.k_layernorm", attn.k_layernorm, False)
             | _names("pre_mlp_layernorm", layer.pre_mlp_layernorm, False))
    if num_experts is None:
        mlp = layer.mlp.keywords["submodules"]
        names |= _names("mlp.linear_fc1", mlp.linear_fc1, False) | _names("mlp.linear_fc2", mlp.linear_fc2, False)
    return names


def te_layer_names_of(cases: list[tuple]) -> list[set[str]]:
    return [te_layer_names(*case) for case in cases]


def _cfg(tiny_hf_models, arch: str) -> dict:
    return json.load(open(os.path.join(tiny_hf_models[arch], "config.json")))


def _case(cfg: dict, arch: str) -> tuple:
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or None
    return experts, arch.startswith("qwen3"), arch == "qwen2" or bool(cfg.get("attention_bias"))


ARCHS = ["qwen2", "llama", "qwen3", "qwen3_moe"]


@pytest.fixture(scope="module")
def te_names(tiny_hf_models) -> dict[str, set[str]]:
    """{arch: TE layer names}, derived in one process that imports megatron."""
    cases = [_case(_cfg(tiny_hf_models, a), a) for a in ARCHS]
    return dict(zip(ARCHS, run_isolated("tests.sync.test_te_names:te_layer_names_of", args=(cases,))))


def _plan_layer_names(cfg: dict, impl: str, experts: bool) -> set[str]:
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    plan = WeightSyncPlan.build(ParallelConfig().resolve(1, num_experts=experts), EngineLayout(1, 1),
                                cfg["model_type"], cfg,
                                transformer_impl=impl)
    prefix = "decoder.layers.0."
    names = {e.megatron_name[len(prefix):] for b in plan.buckets for e in b.entries
             if e.megatron_name.startswith(prefix)}
    return {n for n in names if not (experts and n.startswith("mlp."))}


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_names_the_parameters_of_te_layers(arch, tiny_hf_models, te_names):
    cfg = _cfg(tiny_hf_models, arch)
    experts = _case(cfg, arch)[0]
    assert "self_attention.linear_qkv.layer_norm_weight" in te_names[arch]
    assert _plan_layer_names(cfg, TE, bool(experts)) == te_names[arch]
    local = _plan_layer_names(cfg, "local", bool(experts))
    assert "input_layernorm.weight" in local and "self_attention.linear_qkv.layer_norm_weight" not in local


def test_param_name_maps_only_the_fused_norms():
    assert param_name("decoder.layers.3.input_layernorm.weight", TE) == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert param_name("decoder.layers.3.pre_mlp_layernorm.weight", TE) == \
        "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"
    assert param_name("decoder.layers.3.pre_mlp_layernorm.weight", TE, moe=True) == \
        "decoder.layers.3.pre_mlp_layernorm.weight"   # MoE layers keep a separate norm before the router
    assert param_name("decoder.final_layernorm.weight", TE) == "decoder.final_layernorm.weight"
    assert param_name("decoder.layers.3.input_layernorm.weight", "local") == "decoder.layers.3.input_layernorm.weight"


def test_checkpoints_carry_the_te_names_whatever_the_layers(converted):
    """The converter writes the dist checkpoint through the local spec, whose keys map its norms to
    the fused TE names: a checkpoint loads into either implementation, so only live parameter names
    (the weight sync) differ."""
    import torch.distributed.checkpoint as dcp

    keys = set(dcp.FileSystemReader(converted["qwen2"]["ckpt"]).read_metadata().state_dict_metadata)
    assert {"decoder.layers.self_attention.linear_qkv.layer_norm_weight",
            "decoder.layers.mlp.linear_fc1.layer_norm_weight"} <= keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)
