"""A tiny Llama-shaped megatron GPT config (RMSNorm, SwiGLU, GQA, RoPE; optional top-2 MoE) for
tests, demos and benchmarks: large enough to exercise every parallel dimension (4 heads over 2 KV
groups, 4 layers for pp=2 × vpp=2, 4 experts for ep=2), small enough for a 2-core CPU."""

from __future__ import annotations

import torch

from megarl.config.parallel import ParallelConfig
from megarl.models.impl import UNFUSED_KERNELS
from megarl.runtime.megatron import OptimizerConfig, TransformerConfig

TINY_NUM_EXPERTS = 4


def tiny_transformer_config(parallel: ParallelConfig, moe: bool = False, num_layers: int = 4,
                            hidden_size: int = 64) -> TransformerConfig:
    moe_kw = {}
    if moe:
        moe_kw = dict(num_moe_experts=TINY_NUM_EXPERTS, moe_router_topk=2, moe_aux_loss_coeff=0.0,
                      moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False)
    return TransformerConfig(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=2 * hidden_size, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp, context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep, expert_tensor_parallel_size=parallel.etp,
        sequence_parallel=parallel.sp, pipeline_dtype=torch.float32, params_dtype=torch.float32,
        use_cpu_initialization=True, deterministic_mode=True,
        **UNFUSED_KERNELS, **moe_kw)


def build_tiny_train_state(parallel: ParallelConfig, moe: bool = False, seed: int = 1234,
                           vocab_size: int = 128, seq_length: int = 32, lr: float = 3e-3):
    """Initialise the process group's parallel state for `parallel` and build the tiny GPT with
    megatron DDP and the distributed Adam optimizer (every rank calls it)."""
    from megarl.models.gpt import build_gpt_chunks
    from megarl.models.train import wrap_for_training
    from megarl.runtime.distributed import init_distributed

    ctx = init_distributed(parallel, seed=seed, num_experts=TINY_NUM_EXPERTS if moe else None)
    config = tiny_transformer_config(ctx.parallel, moe)
    chunks = build_gpt_chunks(config, vocab_size, seq_length)
    optim = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=1.0,
                            params_dtype=torch.float32)
    return wrap_for_training(chunks, config, optim, distributed_optimizer=True)
