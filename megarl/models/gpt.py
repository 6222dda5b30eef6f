"""GPT-family megatron-core models: layer-spec selection and construction of model chunks.

The layer implementation is the only thing that differs between a GPU and a CPU run:
`transformer_engine` (TE layers, required for FP8) on CUDA when TE imports, `local` (pure
megatron-core modules) otherwise. Context parallelism with the local spec uses
`AllGatherContextParallelAttention`, since stock megatron-core implements CP only in TE.
"""

from __future__ import annotations

from megarl.config.parallel import ParallelConfig
from megarl.models.hf_config import BuildOptions, megatron_config_from_hf
from megarl.models.impl import LOCAL, TE
from megarl.runtime.distributed import init_distributed
from megarl.runtime.megatron import (
    GPTModel,
    ModuleSpec,
    TransformerConfig,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megarl.runtime.megatron import parallel_state as ps


def layer_spec(config: TransformerConfig, impl: str, qk_layernorm: bool = False) -> ModuleSpec:
    """The transformer-layer spec for `impl` ("local" or "transformer_engine")."""
    num_experts = config.num_moe_experts
    if impl == TE:
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=qk_layernorm)
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                    qk_layernorm=qk_layernorm, normalization=config.normalization)
    if config.context_parallel_size > 1:
        from megarl.models.attention import AllGatherContextParallelAttention

        spec.submodules.self_attention.submodules.core_attention = AllGatherContextParallelAttention
    return spec


def build_gpt_chunks(config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                     impl: str = LOCAL, qk_layernorm: bool = False, tie_embeddings: bool = False,
                     rotary_base: int = 10000, head: str = "lm") -> list[GPTModel]:
    """This rank's model chunks: one GPTModel, or one per virtual pipeline stage (interleaved PP).
    `head` is "lm" (vocab logits: actor, reference) or "scalar"/"scalar_bias" (critic value /
    reward score)."""
    from megarl.models.heads import LM, SCALAR, SCALAR_WITH_BIAS, attach_scalar_head

    if head not in (LM, SCALAR, SCALAR_WITH_BIAS):
        raise ValueError(f"head must be {LM!r}, {SCALAR!r} or {SCALAR_WITH_BIAS!r}, got {head!r}")
    if head != LM and tie_embeddings:
        tie_embeddings = False  # a scalar head has no vocabulary to tie
    spec = layer_spec(config, impl, qk_layernorm)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        chunks.append(GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=tie_embeddings,
            position_embedding_type="rope",
            rotary_base=rotary_base,
            vp_stage=stage,
        ))
        if head != LM:
            attach_scalar_head(chunks[-1], config, bias=head == SCALAR_WITH_BIAS)
    return chunks


def build_model_for(cfg: dict, parallel: ParallelConfig, dtype: str, seed: int = 1234,
                    options: BuildOptions | None = None):
    """Initialise parallel state and build this rank's GPT chunks for an HF config dict.
    Returns (chunks, TransformerConfig, GPTArgs)."""
    options = options or BuildOptions()
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    ctx = init_distributed(parallel, seed=seed, num_experts=num_experts)
    config, args = megatron_config_from_hf(cfg, ctx.parallel, dtype, options)
    chunks = build_gpt_chunks(config, args.vocab_size, args.max_sequence_length, impl=options.transformer_impl,
                              qk_layernorm=args.qk_layernorm, tie_embeddings=args.tie_embeddings,
                              rotary_base=args.rotary_base, head=args.head)
    from megarl.runtime.device import current
    from megarl.runtime.strict_device import check_inputs

    # On GPUs megatron built them on the device already (no CPU initialisation); on CPU this is
    # where strict device mode learns that the parameters live on the device.
    # (A converter builds on the meta device to learn names and shapes only: left there.)
    chunks = [chunk if any(p.is_meta for p in chunk.parameters()) else chunk.to(current()) for chunk in chunks]
    if options.why and ctx.rank == 0:
        print(f"[model] transformer layers: {options.why}", flush=True)
    for i, chunk in enumerate(chunks):
        check_inputs(chunk, f"model chunk {i}")
    return chunks, config, args
