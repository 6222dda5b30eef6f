"""FP8 (E4M3) per-tensor quantization of trainer weights for an FP8 vLLM rollout engine.

When the rollout engine runs vLLM's `fp8` quantization with an FP8-serialized checkpoint, its linear
layers hold `weight` as float8_e4m3fn plus a float32 per-tensor `weight_scale`; the weight sync has
to hand over exactly that, in HF names, as the llm-compressor / modelopt HF exports (and AutoFP8)
write it:

    X.weight        float8_e4m3fn, same shape as the bf16 weight
    X.weight_scale  float32, 0-dim scalar;   dequant = X.weight.float() * X.weight_scale

with scale = amax(|W|) / 448 (448 = largest finite e4m3fn value), so the largest weight maps to +-448.

The names match vLLM 0.32 (`vllm/model_executor/layers/quantization/fp8.py`):
  * `Fp8LinearMethod.create_weights` (l. 317-339) registers the per-tensor scale as "weight_scale";
    "weight_scale_inv" is only the *block*-quantized name ("intentional for deepseekv3", l. 338).
  * `Fp8MoEMethod.__init__` (l. 485-487) uses `weight_scale_name = "weight_scale"` unless block-quant,
    so per-expert `experts.N.{gate,up,down}_proj.weight_scale` (Mixtral `experts.N.w{1,2,3}.weight_scale`)
    load into `w13_weight_scale` / `w2_weight_scale` (l. 631-633).
  * A 0-dim scale is accepted: `PerTensorScaleParameter._load_into_shard_id` ("AutoFP8 scales do not
    have a shape", `vllm/model_executor/parameter.py` l. 292-296) and `_is_1d_and_scalar` for row-parallel.
  * The engine multiplies: `weight_bf16 = weight_fp8 * weight_scale` (fp8.py l. 440-443), i.e. the scale
    is the dequantization multiplier, not its inverse.
Dynamic activation scales (`activation_scheme: dynamic`) are assumed, so no `input_scale` is sent.

Only the linear-layer weights of attention and MLP / MoE experts are quantized; embeddings, norms,
routers (`mlp.gate.weight`, `block_sparse_moe.gate.weight`) and `lm_head` stay in the engine dtype,
as in vLLM's FP8 checkpoints: `Fp8Config.get_quant_method` (fp8.py l. 177-208) quantizes only
`LinearBase` / `RoutedExperts` layers (lm_head is a vocab embedding), and the MoE router is a `GateLinear`
built without a quant_config ("Gate always runs at half / full precision", models/mixtral.py l. 109-115).

The quantization itself is nvidia-modelopt's: `FP8QTensor.quantize(w, scales=amax/448)`, the same
arithmetic as modelopt's HF exporter for FP8 weights (`modelopt/torch/export/quant_utils.py` l. 869-881:
`(weight / weights_scaling_factor).to(torch.float8_e4m3fn)`).
The independent check is modelopt's fake-quant (`tensor_quant.scaled_e4m3`, quantize-dequantize, eager
CPU path): dequantize(quantize(w)) reproduces it to float32 rounding, except that the fake-quant
multiplies by 448/amax where the export divides by amax/448, so a value lying exactly on a rounding
midpoint between two e4m3 numbers (common for bf16 weights: ~0.3% of elements) may land on the other
neighbour, one e4m3 step away; either is a valid rounding of the exact value.

modelopt is imported lazily (its import is slow and pulls in megatron plugins); without it the same
arithmetic (bit-identical output) runs in plain torch. `fp8_backend()` / `last_backend()` tell which one ran.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

E4M3_MAX = 448.0
# modelopt's fake-quant treats amax <= 2**-24 as "no range" and uses amax = 1 instead
# (modelopt/torch/quantization/tensor_quant.py `_fp8_eager`); the same rule keeps an all-zero
# weight's scale finite and non-zero (1/448) and agrees with the reference (a weight with amax that
# small -- below 6e-8 -- then quantizes to all zeros, as it does in modelopt).
ZERO_AMAX_EPS = 1.0 / (1 << 24)
SCALE_SUFFIX = ".weight_scale"

# Dense attention / MLP projections and the per-expert projections of Qwen-MoE / DeepSeek-style MoE
# (`mlp.experts.N.gate_proj.weight`) and shared experts. The leading dot keeps fused names such as
# `gate_up_proj.weight` and the router `mlp.gate.weight` out.
FP8_LINEAR_SUFFIXES: tuple[str, ...] = (
    ".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".o_proj.weight",
    ".gate_proj.weight", ".up_proj.weight", ".down_proj.weight",
)
# Mixtral's experts are `block_sparse_moe.experts.N.w1/w2/w3`; `w1`..`w3` are only linear weights
# inside an `experts` list, so they are matched only there.
FP8_EXPERT_SUFFIXES: tuple[str, ...] = (".w1.weight", ".w2.weight", ".w3.weight")

_last_backend: str | None = None


@functools.cache
def _load_modelopt() -> Any | None:
    """modelopt's FP8 entry points (FP8QTensor, scaled_e4m3), or None if modelopt is not importable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from modelopt.torch.quantization.qtensor import FP8QTensor
            from modelopt.torch.quantization.tensor_quant import scaled_e4m3
    except Exception:  # ImportError, or a broken install failing inside its own imports
        return None
    return FP8QTensor, scaled_e4m3


def fp8_backend() -> str:
    """"modelopt" if modelopt's FP8 API is importable here, else "torch" (the plain-torch fallback)."""
    return "modelopt" if _load_modelopt() is not None else "torch"


def last_backend() -> str | None:
    """The backend the most recent `quantize_fp8` of a linear weight used (None before the first)."""
    return _last_backend


def is_fp8_linear(hf_name: str) -> bool:
    """True for the HF linear weights the FP8 engine stores as float8_e4m3fn + weight_scale."""
    if hf_name.endswith(FP8_LINEAR_SUFFIXES):
        return True
    return hf_name.endswith(FP8_EXPERT_SUFFIXES) and ".experts." in hf_name


def _amax(tensor: torch.Tensor, hf_name: str = "tensor") -> torch.Tensor:
    """Per-tensor amax in float32, with the zero-range rule of modelopt's fake-quant."""
    amax = tensor.detach().abs().amax().to(torch.float32)
    if not torch.isfinite(amax):
        raise ValueError(f"{hf_name}: non-finite values (amax={amax.item()}); refusing to sync it as FP8")
    return torch.where(amax <= ZERO_AMAX_EPS, torch.ones_like(amax), amax)


def quantize_fp8(hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) -> what an FP8-serialized checkpoint holds for it.

    Linear weights (`is_fp8_linear`) become `[(name, float8_e4m3fn weight), (name[:-len(".weight")] +
    ".weight_scale", float32 0-dim scale)]` with scale = amax/448 and weight = round(W / scale), on the
    tensor's device; everything else is returned unchanged as `[(name, tensor)]`.
    """
    global _last_backend
    if not is_fp8_linear(hf_name):
        return [(hf_name, tensor)]
    if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn:
        raise ValueError(f"{hf_name}: expected a 2-D floating-point linear weight, got {tuple(tensor.shape)} "
                         f"{tensor.dtype}")
    x = tensor.detach().to(torch.float32)
    scale = _amax(x, hf_name) / E4M3_MAX
    modelopt = _load_modelopt()
    if modelopt is not None:
        fp8_qtensor, _ = modelopt
        qtensor, scale = fp8_qtensor.quantize(x, scales=scale)
        weight = qtensor._quantized_data  # as modelopt's own HF export reads it (export/quant_utils.py)
        _last_backend = "modelopt"
    else:
        # |x| <= amax, so x/scale is within +-448 up to float rounding; the clamp only guards that.
        weight = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        _last_backend = "torch"
    scale_name = hf_name[: -len(".weight")] + SCALE_SUFFIX
    return [(hf_name, weight.contiguous()), (scale_name, scale.to(torch.float32).reshape(()))]


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight.float() * scale, cast to `dtype` -- the dequantization vLLM applies to an fp8 checkpoint."""
    return (weight.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def fake_quant_reference(tensor: torch.Tensor) -> torch.Tensor:
    """modelopt's own FP8 fake-quant (quantize-dequantize) of `tensor` with its per-tensor amax, on CPU.

    Uses `modelopt.torch.quantization.tensor_quant.scaled_e4m3` (E=4, M=3), whose CPU path is modelopt's
    eager `_fp8_eager`: x * (448/amax) clamped to +-448, cast to e4m3fn, times 1/(448/amax). It shares no
    code with `quantize_fp8` beyond the e4m3 cast, which makes it the independent check (equal up to
    float32 rounding, and one e4m3 step at exact rounding ties; see the module docstring). Returns
    float32; raises ModuleNotFoundError if modelopt is not importable.
    """
    modelopt = _load_modelopt()
    if modelopt is None:
        raise ModuleNotFoundError("fake_quant_reference needs nvidia-modelopt (modelopt), which is not importable")
    _, scaled_e4m3 = modelopt
    x = tensor.detach().to(device="cpu", dtype=torch.float32)
    amax = x.abs().amax()
    return scaled_e4m3(x, amax, None, 4, 3)


def fp8_quant_error(tensor: torch.Tensor) -> dict[str, float]:
    """How far the FP8 round trip of `tensor` is from modelopt's fake-quant and from the original.

    max_abs_vs_fake_quant: max |dequantize(quantize(t)) - fake_quant_reference(t)| (NaN without modelopt).
    mismatch_frac_vs_fake_quant: fraction of elements differing from the fake-quant by more than float32
        rounding (rtol 1e-6), i.e. the rounding-tie elements (NaN without modelopt).
    rel_err_vs_original: ||dequantize(quantize(t)) - t||_F / ||t||_F (0 for an all-zero tensor).
    """
    (_, weight), (_, scale) = quantize_fp8("x.q_proj.weight", tensor if tensor.dim() == 2 else tensor.reshape(1, -1))
    x = tensor.detach().to(device="cpu", dtype=torch.float32)
    deq = dequantize_fp8(weight, scale).cpu().reshape(x.shape)
    max_abs = mismatch = float("nan")
    if _load_modelopt() is not None:
        ref = fake_quant_reference(x)
        max_abs = (deq - ref).abs().max().item()
        mismatch = (~torch.isclose(deq, ref, rtol=1e-6, atol=0.0)).float().mean().item()
    norm = x.norm().item()
    rel = (deq - x).norm().item() / norm if norm > 0 else 0.0
    return {"max_abs_vs_fake_quant": max_abs, "mismatch_frac_vs_fake_quant": mismatch, "rel_err_vs_original": rel}


def scale_name(hf_name: str) -> str:
    """The per-tensor scale's name for a quantized linear weight (`X.weight` -> `X.weight_scale`)."""
    if not hf_name.endswith(".weight"):
        raise ValueError(f"{hf_name!r} is not a weight name")
    return hf_name[: -len(".weight")] + SCALE_SUFFIX


FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic"}
"""config.json `quantization_config` of an FP8-serialized checkpoint as vLLM's Fp8Config reads it
(per-tensor weight scales, dynamic activation scales: nothing else is sent)."""


def export_fp8_checkpoint(src_dir: str, out_dir: str) -> dict:
    """An FP8-serialized copy of the HF checkpoint in `src_dir`: every linear weight
    (`is_fp8_linear`) as float8_e4m3fn + its `weight_scale` (`quantize_fp8`, what the weight sync
    then sends), everything else as it is, and `quantization_config` in config.json, so an `fp8`
    engine starts from exactly the tensors (names, shapes, dtypes) each sync replaces. One
    safetensors file at a time. Returns {"quantized": n, "tensors": m}."""
    import json
    import os
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    quantized = total = 0
    for fname in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, fname)
        if fname.endswith(".safetensors"):
            out: dict[str, torch.Tensor] = {}
            with safe_open(src, framework="pt") as f:
                for name in f.keys():
                    pieces = quantize_fp8(name, f.get_tensor(name))
                    quantized += len(pieces) > 1
                    out.update(pieces)
            total += len(out)
            save_file(out, os.path.join(out_dir, fname), metadata={"format": "pt"})
        elif fname.endswith(".safetensors.index.json"):
            with open(src) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            for name, shard in list(weight_map.items()):
                if is_fp8_linear(name):
                    weight_map[scale_name(name)] = shard
            with open(os.path.join(out_dir, fname), "w") as f:
                json.dump(index, f, indent=2)
        elif fname == "config.json":
            with open(src) as f:
                cfg = json.load(f)
            cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
            with open(os.path.join(out_dir, fname), "w") as f:
                json.dump(cfg, f, indent=2)
        elif os.path.isfile(src):
            shutil.copy(src, os.path.join(out_dir, fname))   # tokenizer, generation config
    return {"quantized": quantized, "tensors": total}
