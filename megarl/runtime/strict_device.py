"""Strict device mode: a CPU machine that behaves like a GPU one about where tensors live.

On a GPU a micro-batch built on the host, a metric all-reduced from a host tensor over NCCL, or a
model input that never went to the device fails at once; on a CPU machine the same code runs,
because host and device are the same memory. With `MEGARL_STRICT_DEVICE=1` a rank binds the device
`cpu:0` (runtime/device.py), and this torch function mode keeps track of which tensors are "on the
device" and which are "on the host" (plain `cpu`):

- made on the device: a factory given `device=` the bound device, `.to(device)`, or any op with a
  device tensor among its inputs (views, arithmetic, `p.grad` of a device parameter, ...); the
  `.device` of such a tensor reads `cpu:0`, so `device=t.device` places a new tensor beside it;
- on the host: everything else, and what `.cpu()` / `.to("cpu")` return (always a distinct
  tensor in this mode, as on a GPU);
- an error (`DeviceDisciplineError`, naming the op and the megarl line) where megarl code
  (1) mixes device tensors with host tensors that are not 0-dim scalars in one op, as CUDA refuses,
  (2) hands a host tensor to a collective of a group that is NCCL on GPUs (`host_group` marks the
  few deliberately host-side gloo groups), or (3) feeds a host tensor to a model (`check_inputs`).

Ops inside megatron and torch are followed (their results are tagged) but not judged: only megarl
frames are. The mode is per thread (torch function modes are thread-local): `discipline()` enters
it around a unit of work (a worker call, a rank's function). Slow (every op goes through Python):
for the device-discipline tests, never for real runs.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary


class DeviceDisciplineError(RuntimeError):
    """A tensor is on the host where a GPU run needs it on the device (or the reverse)."""


_on_device = WeakIdKeyDictionary()   # tensor -> True: lives on "the device"
_host_groups: set[int] = set()       # ids of process groups that are host-side (gloo) on GPUs too
_device: torch.device | None = None

# ops that legitimately take host and device tensors together (cross-device copies, CPU indices)
_MIXING_ALLOWED = {"copy_", "__setitem__", "__getitem__", "to", "cpu", "cuda", "set_", "index_put_",
                   "__get__", "__set__", "size", "dim", "numel", "item", "tolist"}
_MOVES = {"to", "cpu", "cuda"}
JUDGED = ("megarl.", "tests.")   # whose calls are judged: ours (megatron's and torch's are only followed)
# Frames between a call and the op: an op called through these is judged by who called them. The
# CPU layer's patches run on megatron's behalf, so megatron is the caller there.
_PLUMBING = ("torch._tensor", "torch.overrides", "torch.functional", "torch.nn.functional", "contextlib",
             "megarl.runtime.cpu_compat")
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                "reduce", "gather", "scatter", "all_to_all_single", "send", "recv", "isend", "irecv")


def enable(device: torch.device) -> None:
    """Strict mode for this process, `device` being the bound one (idempotent; `init_distributed`
    calls it after binding). Collectives are checked from now on; ops inside `discipline()`."""
    global _device
    _device = device
    for name in _COLLECTIVES:
        fn = getattr(dist, name)
        if not getattr(fn, "__strict_device__", False):
            setattr(dist, name, _checked_collective(name, fn))


def discipline():
    """Enter the mode on this thread (a no-op context when strict mode is off or already in)."""
    from megarl.runtime.device import strict_device_mode

    if not strict_device_mode() or _in_discipline():
        return contextlib.nullcontext()
    # The CPU layer enters its own torch function mode (cpu_compat.CudaAsCpuMode) for good; it must
    # sit below this one, or leaving this mode would pop it (modes leave in stack order).
    from megarl.runtime import cpu_compat

    cpu_compat.install()
    return _Discipline()


def is_on_device(t: torch.Tensor) -> bool:
    return t in _on_device


def host_group(group):
    """Mark a process group as host-side by design (small gloo control groups); returns it."""
    if group is not None:
        _host_groups.add(id(group))
    return group


def check_inputs(module: torch.nn.Module, what: str) -> None:
    """In strict mode, refuse host tensors as inputs of `module` (a model chunk) by argument."""
    from megarl.runtime.device import strict_device_mode

    if not strict_device_mode():
        return

    def pre_hook(_module, args, kwargs):
        named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
        for name, value in named:
            if isinstance(value, torch.Tensor) and not is_on_device(value):
                raise DeviceDisciplineError(f"{what}: input {name} {tuple(value.shape)} is on the host; the model "
                                            f"is on {_device}: move the micro-batch with runtime.device.to_device"
                                            f"{_caller()}")

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def check_host(value, what: str):
    """Refuse device tensors in what a worker returns across the process boundary; returns `value`."""
    if isinstance(value, torch.Tensor):
        if is_on_device(value):
            raise DeviceDisciplineError(f"{what} returns a device tensor {tuple(value.shape)}: the driver has no "
                                        "device; move it with runtime.device.to_host")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_host(v, f"{what}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_host(v, f"{what}[{i}]")
    return value


# ---- the mode ----------------------------------------------------------------------------------
def _active_modes() -> list:
    from torch.overrides import _get_current_function_mode_stack

    return _get_current_function_mode_stack()


def _in_discipline() -> bool:
    return any(isinstance(m, _Discipline) for m in _active_modes())


class _Discipline(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") == "device":
            # `t.device` of a device tensor says cpu:0, so `device=t.device` makes device tensors
            return _device if args and args[0] in _on_device else func(*args, **kwargs)
        inputs = [t for t in _tensors(args, kwargs)]
        tagged = [t for t in inputs if t in _on_device]
        if tagged and name not in _MIXING_ALLOWED:
            host = [t for t in inputs if t not in _on_device and t.dim() > 0]
            if host and _judged():
                raise DeviceDisciplineError(
                    f"{name}: mixes tensors on the device ({_device}) with host tensors of shape "
                    f"{[tuple(t.shape) for t in host][:3]} (CUDA: 'Expected all tensors to be on the same "
                    f"device'); create them with device=runtime.device.current() or move them with to_device"
                    f"{_caller()}")
        out = func(*args, **kwargs)
        if name in ("__set__", "set_") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            _place(args[0], args[1] in _on_device)   # `p.data = t` (Module.to) / `p.set_(t)`: p is where t is
            return out
        target = _target(name, args, kwargs)
        if target == "host":
            if name in _MOVES and isinstance(out, torch.Tensor) and inputs and out is inputs[0]:
                out = out.clone()   # on a GPU the host copy is a different tensor
            return out
        if target == "device" or (target is None and tagged):
            for t in _tensors((out,), {}):
                _on_device[t] = True
        return out


def _place(t: torch.Tensor, on_device: bool) -> None:
    if on_device:
        _on_device[t] = True
    else:
        _on_device.pop(t, None)


def _target(name: str, args, kwargs) -> str | None:
    """"device" / "host" when the call says where its result goes, else None (follows inputs)."""
    if name == "cpu":
        return "host"
    if name == "cuda":
        return "device"
    where = kwargs.get("device")
    if where is None and name == "to":
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                where = a
            elif isinstance(a, torch.Tensor):
                return "device" if a in _on_device else "host"
    if where is None:
        return None
    where = torch.device(where)
    if where.type == "cuda" or where == _device:
        return "device"
    return "host"


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


def _megarl_frame():
    """The frame that made the op's call (past _PLUMBING), if it is ours (JUDGED)."""
    f = sys._getframe(2)
    while f is not None:
        module = f.f_globals.get("__name__", "")
        if not (module.startswith(_PLUMBING) or module == __name__):
            return f if module.startswith(JUDGED) else None
        f = f.f_back
    return None


def _judged() -> bool:
    return _megarl_frame() is not None


def _caller() -> str:
    f = _megarl_frame()
    return f" (at {f.f_code.co_filename}:{f.f_lineno})" if f is not None else ""


def _checked_collective(name: str, fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        if id(group) not in _host_groups and _in_discipline() and _judged():
            host = [t for t in _tensors(args, kwargs) if t not in _on_device]
            if host:
                raise DeviceDisciplineError(
                    f"torch.distributed.{name} on a host tensor {tuple(host[0].shape)}: the gang's groups are "
                    f"NCCL on GPUs, which only takes device tensors; create it on runtime.device.current(), or "
                    f"mark a deliberately host-side gloo group with strict_device.host_group{_caller()}")
        return fn(*args, **kwargs)

    inner.__strict_device__ = True
    return inner
