"""Model shapes: read from a local HF config.json, or from a named preset when the weights are not
on this machine (planning a 70B run from a laptop)."""

from __future__ import annotations

import json
import os

from megarl.config.recipe import ModelShape

PRESETS: dict[str, tuple[str, ModelShape]] = {
    # the shape tools/make_tiny_model.py writes (used until the tiny model exists on disk)
    "tiny-qwen2": ("qwen2", ModelShape(4, 128, 4, 2, 256, 1024, 2048)),
    "llama3-8b": ("llama", ModelShape(32, 4096, 32, 8, 14336, 128256, 8192)),
    "llama3-70b": ("llama", ModelShape(80, 8192, 64, 8, 28672, 128256, 8192)),
    "qwen2.5-7b": ("qwen2", ModelShape(28, 3584, 28, 4, 18944, 152064, 32768)),
    "qwen3-8b": ("qwen3", ModelShape(36, 4096, 32, 8, 12288, 151936, 40960)),
    "qwen3-30b-a3b": ("qwen3_moe", ModelShape(48, 2048, 32, 4, 6144, 151936, 40960, num_experts=128,
                                              moe_topk=8, moe_ffn_hidden_size=768)),
    "mixtral-8x7b": ("mixtral", ModelShape(32, 4096, 32, 8, 14336, 32000, 32768, num_experts=8, moe_topk=2)),
}

HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                  "qwen3_moe": "qwen3_moe", "mixtral": "mixtral"}


def shape_from_hf_config(path: str) -> tuple[str | None, ModelShape]:
    """(architecture, shape) from `<path>/config.json`. Raises ValueError naming a missing key."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)

    def need(*keys):
        for k in keys:
            if k in cfg and cfg[k] is not None:
                return cfg[k]
        raise ValueError(f"{path}/config.json has none of {keys}")

    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    heads = need("num_attention_heads")
    shape = ModelShape(
        num_layers=need("num_hidden_layers"), hidden_size=need("hidden_size"), num_attention_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, ffn_hidden_size=need("intermediate_size"),
        vocab_size=need("vocab_size"), max_position_embeddings=need("max_position_embeddings"),
        num_experts=experts or None, moe_topk=cfg.get("num_experts_per_tok") if experts else None,
        moe_ffn_hidden_size=cfg.get("moe_intermediate_size") if experts else None,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    return HF_MODEL_TYPES.get(cfg.get("model_type", "")), shape


def local_hf_config(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))
