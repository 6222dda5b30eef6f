"""Colocated memory hand-off, the trainer side: a megatron rank's parameters, gradient buffers and
optimizer state leave the accelerator while the rollout engine on the same GPU generates, and come
back bitwise.

How: every distinct storage behind those tensors (megatron DDP's contiguous param/grad buffers,
which the parameters are views of; a frozen model's own parameters; each optimizer state and
fp32 main-parameter shard) is copied to host memory (pinned on GPUs) and then resized to zero
bytes, which frees the device memory while every tensor object, view and optimizer reference
stays valid; `restore` resizes each storage back and copies its bytes in. Nothing is re-created,
so no parameter, hook or optimizer param-group needs re-pointing (verl offloads megatron the same
way). Works on any device: on CPU it is exercised by the tests (bitwise round trip, training after
a hand-off identical to training without one).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class OffloadError(RuntimeError):
    pass


def _optimizer_tensors(optimizer) -> Iterable[torch.Tensor]:
    """Every tensor a megatron optimizer holds: the inner torch optimizer's state and param groups
    (fp32 main parameters / shards), through megatron's wrappers (chained, distributed, mixed)."""
    if optimizer is None:
        return
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", opt)
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        for group in inner.param_groups:
            yield from group["params"]


def _model_tensors(models: list) -> Iterable[torch.Tensor]:
    for model in models:
        ddp_buffers = getattr(model, "buffers", None)                # megatron DDP: param/grad buffers
        for buffer in ddp_buffers if isinstance(ddp_buffers, list) else []:
            for name in ("param_data", "grad_data"):
                t = getattr(buffer, name, None)
                if isinstance(t, torch.Tensor):
                    yield t
        for p in model.parameters():                                 # views of those, or own storage
            yield p
            grad = getattr(p, "main_grad", None)
            if isinstance(grad, torch.Tensor):
                yield grad
        yield from torch.nn.Module.buffers(model)                    # e.g. rotary caches


class Offloaded:
    """The host copies of one rank's device storages, from `offload` until `restore`."""

    def __init__(self, kept: list[tuple[torch.UntypedStorage, torch.Tensor]]):
        self.kept = kept

    @property
    def nbytes(self) -> int:
        return sum(host.numel() for _, host in self.kept)

    def restore(self) -> int:
        """Put every storage back (same bytes, same tensor objects); returns the bytes restored."""
        for storage, host in self.kept:
            storage.resize_(host.numel())
            torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).copy_(host, non_blocking=True)
        if self.kept and self.kept[0][0].device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        restored, self.kept = self.nbytes, []
        return restored


def offload(models: list, optimizer=None) -> Offloaded:
    """Move the storages of `models` (and `optimizer`) to host memory and free them on the device."""
    seen: dict[int, torch.UntypedStorage] = {}
    for t in [*_model_tensors(models), *_optimizer_tensors(optimizer)]:
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage
    kept = []
    for storage in seen.values():
        raw = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        host = torch.empty(raw.numel(), dtype=torch.uint8, pin_memory=storage.device.type == "cuda")
        host.copy_(raw)
        kept.append((storage, host))
    fixed = [s for s, _ in kept if not s.resizable()]
    if fixed:
        raise OffloadError(f"{len(fixed)} storage(s) ({fixed[0].nbytes()} bytes on {fixed[0].device}) cannot be "
                           "freed in place; nothing was offloaded")
    for storage, _ in kept:
        storage.resize_(0)
    return Offloaded(kept)
