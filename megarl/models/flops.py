"""Model FLOPs of a decoder-only transformer from its HF config and the real token counts (padding
excluded), for MFU: achieved FLOP/s over the machine's measured peak.

A forward pass over a causal sequence of L tokens costs

    F(L) = 2·P·L + 2·n_layers·d_attn·L·(L+1)

- P: the weights every token multiplies by (per layer q, k, v, o and the MLP — for MoE the router
  and the top-k experts a token is sent to — plus the LM head; the input embedding is a lookup);
- the second term: QKᵀ and A·V of causal attention, token i attending to i+1 positions, each a
  multiply-add over d_attn = heads × head_dim (Kaplan et al. 2020, "Scaling laws", Table 1;
  Narayanan et al. 2021, appendix).
A training step (forward + backward) is 3·F (the backward computes gradients of activations and of
weights, each as costly as the forward).
"""

from __future__ import annotations


def _dims(cfg: dict) -> tuple[int, int, int]:
    """(hidden, d_attn = heads × head_dim, kv width = kv_heads × head_dim)."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    return hidden, heads * head_dim, kv_heads * head_dim


def token_params(cfg: dict) -> int:
    """P: multiply-accumulate weights per token (see the module docstring)."""
    hidden, d_attn, kv = _dims(cfg)
    attention = hidden * d_attn + 2 * hidden * kv + d_attn * hidden
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if experts:
        ffn = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        mlp = hidden * experts + cfg["num_experts_per_tok"] * 3 * hidden * ffn   # router + gated experts
    else:
        mlp = 3 * hidden * cfg["intermediate_size"]                              # gate, up, down
    return cfg["num_hidden_layers"] * (attention + mlp) + hidden * cfg["vocab_size"]


def forward_flops(cfg: dict, lengths: list[int]) -> float:
    """Σ F(L) over sequences of `lengths` tokens."""
    p, (_, d_attn, _) = token_params(cfg), _dims(cfg)
    layers = cfg["num_hidden_layers"]
    return float(sum(2 * p * n + 2 * layers * d_attn * n * (n + 1) for n in lengths))


def generation_flops(cfg: dict, prompt_lengths: list[int], total_lengths: list[int], group_ids: list[int]) -> float:
    """What an engine with prefix caching computes for a batch: each group's prompt once, then every
    sample's own tokens (generated ones and tool outputs) attending to everything before them."""
    prompts = {g: n for g, n in zip(group_ids, prompt_lengths)}
    shared = forward_flops(cfg, list(prompts.values()))
    own = forward_flops(cfg, total_lengths) - forward_flops(cfg, prompt_lengths)
    return shared + own
