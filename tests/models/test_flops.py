"""Model FLOPs (megarl.models.flops) against the parameters transformers actually builds, and the
attention and prefix-sharing terms by hand."""

import pytest

from megarl.models.flops import forward_flops, generation_flops, token_params


def _model(arch: str):
    import torch
    import transformers as tf

    from megarl.models.tiny_hf import hf_config

    cfg = hf_config(arch, vocab_size=1000, eos_id=1, pad_id=0, hidden=64, layers=3, heads=4, kv_heads=2, ffn=96,
                    experts=4)
    return cfg.to_dict(), tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3_moe"])
def test_token_params_are_the_weights_a_token_multiplies_by(arch):
    cfg, model = _model(arch)
    weights = {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n}
    experts = sum(v for n, v in weights.items() if ".experts." in n)
    want = sum(weights.values()) - experts
    if arch == "qwen3_moe":  # a token visits top-k of the experts, not all of them
        assert experts > 0
        want += experts * cfg["num_experts_per_tok"] // (cfg.get("num_experts") or cfg["num_local_experts"])
    assert token_params(cfg) == want


def test_forward_attention_and_prefix_sharing_terms():
    cfg, _ = _model("qwen2")
    p, d_attn, layers = token_params(cfg), 4 * 16, 3
    assert forward_flops(cfg, [5]) == 2 * p * 5 + 2 * layers * d_attn * 5 * 6
    assert forward_flops(cfg, [5, 7]) == forward_flops(cfg, [5]) + forward_flops(cfg, [7])
    # two samples of one prompt (3 tokens) and one of another: each prompt is computed once
    prompts, totals, groups = [3, 3, 4], [8, 6, 9], [0, 0, 1]
    shared = forward_flops(cfg, [3, 4])
    own = sum(forward_flops(cfg, [t]) - forward_flops(cfg, [q]) for q, t in zip(prompts, totals))
    assert generation_flops(cfg, prompts, totals, groups) == pytest.approx(shared + own)
    assert generation_flops(cfg, prompts, totals, groups) < forward_flops(cfg, totals)
