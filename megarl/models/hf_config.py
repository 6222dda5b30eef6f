"""Hugging Face config.json -> megatron-core TransformerConfig and GPTModel arguments.

Supported: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm), Qwen3-MoE and Mixtral. Anything
this mapping cannot represent exactly is refused by name instead of being approximated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megarl.config.parallel import ParallelConfig
from megarl.models.impl import kernel_fusions

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE = ("qwen3_moe", "mixtral")


@dataclass(frozen=True)
class GPTArgs:
    """What GPTModel needs besides the TransformerConfig."""

    arch: str
    vocab_size: int
    max_sequence_length: int
    rotary_base: float
    tie_embeddings: bool
    qk_layernorm: bool
    head: str = "lm"
    """"lm" for *ForCausalLM, "scalar_bias" for *ForTokenClassification (critic), "scalar" for
    *ForSequenceClassification (reward model)."""


SCALAR_HEAD_SUFFIXES = ("ForTokenClassification", "ForSequenceClassification")


def head_of(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if archs and archs[0].endswith(SCALAR_HEAD_SUFFIXES):
        if cfg.get("num_labels", len(cfg.get("id2label", {}) or {0: 0})) != 1:
            raise NotImplementedError(f"{archs[0]} with more than one label is not a critic/reward model")
        return "scalar_bias" if archs[0].endswith("ForTokenClassification") else "scalar"
    return "lm"


def read_hf_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported yet (only default RoPE)")
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json gives no rope_theta")
    return float(theta)


@dataclass(frozen=True)
class BuildOptions:
    """Recipe choices that shape the megatron model (from `model.*`)."""

    transformer_impl: str = "local"  # resolved: "local" or "transformer_engine"
    fp8: str | None = None           # "e4m3" | "hybrid" (TE only)
    fp8_recipe: str = "delayed"
    recompute: str = "none"          # "none" | "selective" | "full"
    why: str = ""                    # which layers and why, for the log (explain_transformer_impl)

    @classmethod
    def from_recipe(cls, model_cfg, device) -> BuildOptions:
        from megarl.models.impl import (
            explain_transformer_impl,
            select_transformer_impl,
            transformer_engine_import_error,
        )

        te_error = transformer_engine_import_error() if device.is_cuda else "not used without CUDA"
        impl = select_transformer_impl(model_cfg.transformer_impl, device, fp8=model_cfg.fp8,
                                       te_available=te_error is None)
        why = explain_transformer_impl(model_cfg.transformer_impl, impl, device, te_error)
        return cls(impl, model_cfg.fp8, model_cfg.fp8_recipe, model_cfg.recompute, why)

    def config_kwargs(self) -> dict:
        kw: dict = {}
        if self.fp8:
            kw.update(fp8=self.fp8, fp8_recipe=self.fp8_recipe)
        if self.recompute == "selective":
            kw.update(recompute_granularity="selective")
        elif self.recompute == "full":
            kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        return kw


def megatron_config_from_hf(cfg: dict, parallel: ParallelConfig, dtype: str = "fp32",
                            options: BuildOptions | None = None, **overrides):
    """(TransformerConfig, GPTArgs) for an HF config dict at the given parallel layout."""
    arch = cfg.get("model_type")
    if arch not in SUPPORTED:
        raise NotImplementedError(f"model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED)}")
    rotary_base = _rope_theta(cfg)
    import torch

    from megarl.runtime.device import current as current_device
    from megarl.runtime.megatron import TransformerConfig

    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    window = cfg.get("sliding_window")
    if window is not None and cfg.get("use_sliding_window", True) and window < cfg["max_position_embeddings"]:
        raise NotImplementedError(f"sliding-window attention (window {window}) is not supported yet")
    params_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    kw = dict(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads, kv_channels=head_dim,
        ffn_hidden_size=cfg["intermediate_size"], normalization="RMSNorm", layernorm_epsilon=cfg["rms_norm_eps"],
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_layernorm=arch in ("qwen3", "qwen3_moe"),
        hidden_dropout=0.0, attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=dtype == "bf16", fp16=dtype == "fp16",
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp, context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep, expert_tensor_parallel_size=parallel.etp,
        # built where the rank's device is: CPU initialisation only on CPU (megatron otherwise
        # initialises every weight in fp32 on the host and copies it over)
        sequence_parallel=parallel.sp, use_cpu_initialization=current_device().type != "cuda",
        **kernel_fusions((options or BuildOptions()).transformer_impl, current_device().type == "cuda"),
    )
    if arch in MOE:
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise NotImplementedError("Qwen3-MoE with dense layers (mlp_only_layers/decoder_sparse_step) "
                                      "is not supported yet")
        kw.update(num_moe_experts=experts, moe_router_topk=cfg["num_experts_per_tok"],
                  moe_ffn_hidden_size=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
                  # HF renormalises the top-k of a softmax over all experts (norm_topk_prob) - the same
                  # as megatron's softmax over the top-k logits (pre_softmax=False).
                  moe_router_pre_softmax=not cfg.get("norm_topk_prob", True),
                  moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                  moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False)
    kw.update((options or BuildOptions()).config_kwargs())
    kw.update(overrides)
    args = GPTArgs(arch=arch, vocab_size=cfg["vocab_size"], max_sequence_length=cfg["max_position_embeddings"],
                   rotary_base=rotary_base, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   qk_layernorm=kw["qk_layernorm"], head=head_of(cfg))
    return TransformerConfig(**kw), args
