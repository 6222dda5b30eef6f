"""Which transformer-layer implementation a run uses: Transformer Engine or megatron-core local.

Kept free of megatron imports so recipes can be validated (and this logic tested) anywhere.
"""

from __future__ import annotations

import importlib.util

from megarl.runtime.device import DeviceSpec

LOCAL, TE = "local", "transformer_engine"

# Fused kernels that need CUDA, TE or apex; megatron raises for rope / grad-accumulation fusion
# without their kernels, so each is on only where its kernel is installed (kernel_fusions).
UNFUSED_KERNELS = dict(bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
                       apply_rope_fusion=False, persist_layer_norm=False)


def kernel_fusions(impl: str, cuda: bool, installed=None) -> dict:
    """megatron's fusion switches for a model built with `impl` on this device: all off on CPU;
    on CUDA bias+dropout+add (torch's JIT fuser), RoPE and masked softmax with Transformer Engine
    (its fused rope; its attention replaces the softmax), gradient-accumulation fusion and the
    persistent layer norm where apex's kernels are installed. `installed(module)` is injectable."""
    if not cuda:
        return dict(UNFUSED_KERNELS)
    installed = installed or (lambda name: importlib.util.find_spec(name) is not None)
    return dict(bias_dropout_fusion=True, masked_softmax_fusion=impl == TE, apply_rope_fusion=impl == TE,
                gradient_accumulation_fusion=installed("fused_weight_gradient_mlp_cuda"),
                persist_layer_norm=installed("fast_layer_norm"))
TRANSFORMER_IMPLS = ("auto", LOCAL, TE)


def transformer_engine_available() -> bool:
    """True when Transformer Engine's torch extension imports (it needs CUDA libraries)."""
    return transformer_engine_import_error() is None


def transformer_engine_import_error() -> str | None:
    """Why Transformer Engine does not import here (None when it does)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "not installed"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - e.g. "cudnn shared object not found" on CPU machines
        return f"import failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    return None


def explain_transformer_impl(requested: str, impl: str, device: DeviceSpec, te_error: str | None = None) -> str:
    """One line for the run's log: which layers it uses and why (an `auto` choice is never silent)."""
    if requested != "auto":
        return f"{impl} (model.transformer_impl: {requested})"
    if impl == TE:
        return f"{TE} (auto: CUDA and Transformer Engine present)"
    if not device.is_cuda:
        return f"{LOCAL} (auto: no CUDA device; Transformer Engine layers need one)"
    return (f"{LOCAL} (auto: Transformer Engine {te_error or 'unavailable'}; megatron's local layers are slower "
            "on GPUs and have no FP8: install megarl[gpu], or set model.transformer_impl: local to silence this)")


def select_transformer_impl(requested: str, device: DeviceSpec, fp8: str | None = None,
                            te_available: bool | None = None) -> str:
    """Resolve "auto" | "local" | "transformer_engine" for this device; refuse impossible combos."""
    if requested not in TRANSFORMER_IMPLS:
        raise ValueError(f"model.transformer_impl must be one of {TRANSFORMER_IMPLS}, got {requested!r}")
    if te_available is None:
        te_available = device.is_cuda and transformer_engine_available()
    impl = requested
    if requested == "auto":
        impl = TE if (device.is_cuda and te_available) else LOCAL
    if impl == TE and not (device.is_cuda and te_available):
        raise RuntimeError("model.transformer_impl=transformer_engine needs CUDA and an importable "
                           "Transformer Engine (pip install megarl[gpu]); use 'local' or 'auto' on CPU")
    if fp8 and impl != TE:
        raise ValueError(f"model.fp8={fp8!r} needs model.transformer_impl=transformer_engine "
                         f"(FP8 GEMMs are TE kernels); this run resolved to {impl!r}")
    return impl
