"""The engine side's fast path: synced tensors go straight into vLLM's kernel-format weights.

vLLM's in-place `reload_weights` is generic: per layer it re-creates the checkpoint-layout
parameters, copies the incoming tensors into them through the weight loaders, runs the layer's
`process_weights_after_loading` (on CPU: the oneDNN repack of every linear weight) and copies the
result back. For a model made only of unquantized linear layers, embeddings and norms, with one
engine worker (no engine TP), the bucket already holds each fused weight in kernel order: the
plan lays q, k, v (and gate, up) out back to back, exactly `qkv_proj` / `gate_up_proj`. So a
linear layer is updated by pointing its weight at the bucket and running vLLM's own
`process_weights_after_loading` (the repack reads the bucket; no staging copy); embeddings and
norms are copied in place. On 2 CPU cores this halves the engine's load of a 124M model
(bench/weight_sync.py).

`DirectLoader.build` checks coverage up front: every parameter of every module must be one of
those kinds and fed by exactly the plan's tensors (names and shapes). Anything else — MoE
layers, quantized layers, engine tensor parallelism, a name vLLM maps differently — returns
None and the sync uses `reload_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from megarl.sync.transport import copy_if_inside

NORM_CLASSES = ("RMSNorm", "LayerNorm", "GemmaRMSNorm")


@dataclass
class _Target:
    """One module and the HF tensors (in order) that make each of its parameters."""

    module: torch.nn.Module
    kind: str                                    # "linear" | "embedding" | "copy"
    pieces: dict[str, list[str]]                 # parameter name -> HF tensor names, concatenated on dim 0
    got: dict[str, torch.Tensor] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [n for names in self.pieces.values() for n in names]


class DirectLoader:
    def __init__(self, targets: list[_Target]):
        self.targets = targets
        self.by_name = {n: t for t in targets for n in t.names()}

    @classmethod
    def build(cls, model: torch.nn.Module, hf_shapes: dict[str, tuple[int, ...]],
              tensor_parallel_size: int) -> tuple[DirectLoader | None, str]:
        """(loader, "") when every module is covered; (None, why not) otherwise."""
        if tensor_parallel_size != 1:
            return None, f"engine tensor parallelism ({tensor_parallel_size}): workers hold slices"
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and current_platform.is_zen_cpu():
            return None, "zentorch linear kernels may keep a reference to the loaded weight"
        packed = getattr(model, "packed_modules_mapping", None) or {}
        targets: list[_Target] = []
        for name, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            cls_name = type(module).__name__
            method = type(getattr(module, "quant_method", None)).__name__
            if method == "UnquantizedLinearMethod" and set(own) <= {"weight", "bias"}:
                prefix, _, leaf = name.rpartition(".")
                parts = [f"{prefix}.{p}" if prefix else p for p in packed.get(leaf, [leaf])]
                pieces = {p: [f"{part}.{p}" for part in parts] for p in own}
                shapes = [hf_shapes.get(n, (0, 0)) for n in pieces["weight"]]
                have = (sum(sh[0] for sh in shapes), shapes[0][1])
                want = (getattr(module, "output_size_per_partition", getattr(module, "output_size", -1)),
                        getattr(module, "input_size_per_partition", getattr(module, "input_size", -1)))
                if have != want or any(sh[1] != want[1] for sh in shapes):
                    return None, f"{name}: its pieces {pieces['weight']} do not make its {want} weight"
                if "bias" in own and sum(hf_shapes.get(n, (0,))[0] for n in pieces["bias"]) != own["bias"].shape[0]:
                    return None, f"{name}: its bias pieces {pieces['bias']} do not make its bias"
                targets.append(_Target(module, "linear", pieces))
            elif method == "UnquantizedEmbeddingMethod" and set(own) == {"weight"}:
                shape = hf_shapes.get(f"{name}.weight")
                if shape is None or shape[0] > own["weight"].shape[0] or tuple(shape[1:]) != own["weight"].shape[1:]:
                    return None, f"{name}: the plan's {shape} does not fit its {tuple(own['weight'].shape)} weight"
                targets.append(_Target(module, "embedding", {"weight": [f"{name}.weight"]}))
            elif cls_name in NORM_CLASSES:
                if any(hf_shapes.get(f"{name}.{p}") != tuple(x.shape) for p, x in own.items()):
                    return None, f"{name}: the plan's shapes differ from its parameters"
                targets.append(_Target(module, "copy", {p: [f"{name}.{p}"] for p in own}))
            else:
                return None, f"{name} ({cls_name}, {method}) has no direct load"
        loader = cls(targets)
        needed, sent = set(loader.by_name), set(hf_shapes)
        if needed != sent or len(needed) != sum(len(t.names()) for t in targets):
            return None, (f"the plan's tensors and the engine's modules differ: missing {sorted(needed - sent)[:3]}, "
                          f"unused {sorted(sent - needed)[:3]}")
        return loader, ""

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Apply each module as soon as all its tensors are in. Pieces left over by a failed sync
        are dropped first: they must never complete a module of the next one."""
        for t in self.targets:
            t.got = {}
        for name, tensor in named_tensors:
            target = self.by_name[name]
            target.got[name] = tensor
            if len(target.got) == len(target.names()):
                self._apply(target)

    def detach(self, buffer: torch.Tensor) -> int:
        """Copy out tensors still waiting for the rest of their module that live in `buffer`."""
        detach, copied = copy_if_inside(buffer), 0
        for t in self.targets:
            for n, x in t.got.items():
                t.got[n] = detach(x)
                copied += t.got[n] is not x
        return copied

    def finish(self) -> None:
        waiting = [n for t in self.targets for n in t.got]
        if waiting:
            raise RuntimeError(f"direct load ended with incomplete modules (waiting: {waiting[:3]})")

    @torch.no_grad()
    def _apply(self, target: _Target) -> None:
        module, got = target.module, target.got
        tensors = {p: _concat([got[n] for n in names]) for p, names in target.pieces.items()}
        if target.kind == "copy":
            for p, x in tensors.items():
                getattr(module, p).data.copy_(x)
        elif target.kind == "embedding":
            w = tensors["weight"]
            module.weight.data[:w.shape[0]].copy_(w)   # vLLM pads the vocabulary; padding rows stay
            module.quant_method.process_weights_after_loading(module)   # CPU: rebuild the lm-head kernel
        else:
            w = tensors["weight"]
            if "bias" in tensors:
                module.bias.data.copy_(tensors["bias"])
            if module.weight.shape == w.shape:         # kernel reads the weight itself (GPU, CPU fallback)
                module.weight.data.copy_(w)
            else:                                      # CPU: the kernel holds a packed copy; repack from w
                module.weight = torch.nn.Parameter(w, requires_grad=False)
                module.quant_method.process_weights_after_loading(module)
                if module.weight.numel() and module.weight.data_ptr() == w.data_ptr():
                    module.weight = torch.nn.Parameter(w.clone(), requires_grad=False)  # must not alias a bucket
        target.got = {}


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts stacked on dim 0 — as a view when they lie back to back in one buffer (the plan
    lays fused groups out that way), else copied."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    end = first.data_ptr()
    adjacent = all(p.is_contiguous() and p.dtype == first.dtype and p.shape[1:] == first.shape[1:] for p in parts)
    storage = first.untyped_storage().data_ptr()
    for p in parts:
        adjacent = adjacent and p.data_ptr() == end and p.untyped_storage().data_ptr() == storage
        end = p.data_ptr() + p.numel() * p.element_size()
    if adjacent:
        rows = sum(p.shape[0] for p in parts)
        return torch.as_strided(first, (rows, *first.shape[1:]), first.stride())
    return torch.cat(parts, dim=0)
