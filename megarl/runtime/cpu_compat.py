"""CPU compatibility layer for megatron-core 0.19.2 (torch CPU build, gloo, no TE/Apex/triton).

megatron-core is written for CUDA: ~100 call sites ask for `torch.cuda.current_device()`, ~70
hard-code `device="cuda"`, MoE dispatch uses CUDA streams, and the TE/Apex-less optimizer path has
checkpoint bugs. Each fix below is a `CompatPatch` naming the upstream file it fixes, the error it
prevents, and the condition under which it is needed; `install()` applies exactly the needed ones,
once per process, and must run before the first `import megatron.core` (the first patch stubs a
module that `import megatron.core` itself pulls in): megarl imports megatron only through
`megarl.runtime.megatron`, which calls it first. Two patches only make that import cheaper (COST:
the compiler and wandb that megatron loads at import, ~2 s of CPU per rank); they hold while
install() imports megatron.core and are undone after it. On a CUDA machine with TE the device patches are
skipped, so the same model code runs unchanged on GPUs.

Every patch is exercised by tests/runtime/test_cpu_compat.py; the parallel-equivalence tests in
tests/dist/ show the patched stack computes the same numbers as a single rank.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import os
import queue
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megarl.runtime.device import current  # import-light: no torch or megatron at its top

MEGATRON_VERSION_VERIFIED = "0.19.2"
MP_CKPT_QUEUE_ENV = "MEGARL_MP_CKPT_QUEUE"  # =1 keeps megatron's spawned queue (async checkpoint saves)
SKIP_ENV = "MEGARL_CPU_COMPAT_SKIP"  # comma-separated patch names to leave out (diagnosis and tests)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompatPatch:
    name: str
    upstream: str
    """File (and line in 0.19.2) in megatron/core whose behaviour the patch fixes."""
    error: str
    """What happens without it."""
    needed: Callable[[], bool]
    apply: Callable[[], None]


def _no_cuda() -> bool:
    return not torch.cuda.is_available()


def _no_triton() -> bool:
    return importlib.util.find_spec("triton") is None


# ---- 1. triton-free import -------------------------------------------------------------------
PAGED_STASH = "megatron.core.transformer.moe.ops.paged_stash"


def _stub_paged_stash() -> None:
    # Only MoE "paged stash" (a GPU-only feature) uses these kernels; the stub raises if called.
    mod = types.ModuleType(PAGED_STASH)
    mod.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*args, **kwargs):
        raise RuntimeError("MoE paged-stash triton kernels are unavailable without triton (GPU-only)")

    mod.paged_stash_copy_kernel = _unavailable
    mod.paged_stash_pop_kernel = _unavailable
    mod.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[PAGED_STASH] = mod


# ---- 1b. import megatron.core lighter: compile deferred on CPU, timers without wandb ------------
_UNDO_AFTER_IMPORT: list[Callable[[], None]] = []
"""Import-time patches hold only while install() imports megatron.core; then they are undone."""


def _deferred_torch_compile() -> None:
    # ~30 megatron functions are wrapped by torch.compile at import (jit.py's jit_fuser, the
    # inference router), which imports torch._dynamo and torch._inductor: 1.6 s of CPU in every
    # process, on CPU for kernels that never run (every fusion is off: models.impl.kernel_fusions).
    # While megatron imports, a function is compiled on its first call instead.
    real = torch.compile

    def deferred(model=None, **options):
        if model is None:
            return lambda fn: deferred(fn, **options)
        if not isinstance(model, types.FunctionType):
            return real(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return call

    torch.compile = deferred
    _UNDO_AFTER_IMPORT.append(lambda: setattr(torch, "compile", real))


def _timers_without_wandb() -> None:
    # megatron.core.timers imports wandb (0.6 s of CPU per process) only to write timings to it,
    # which megarl never asks for; hidden while megatron imports, timers keeps `wandb = None`. A
    # later `import wandb` (megarl.metrics on the logging rank) is unaffected.
    if "wandb" not in sys.modules:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError
        _UNDO_AFTER_IMPORT.append(lambda: sys.modules.pop("wandb", None))


# ---- 2. tensor-parallel RNG tracker on the CPU generator -------------------------------------
def _rng_tracker_on_cpu() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        # Same contract as CudaRNGStatesTracker.add, but the tracked generator is the CPU one:
        # fork() then swaps CPU RNG state exactly as it swaps the CUDA state on GPUs.
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker.add = add
    # fork() warns "CPU RNG state changed within GPU RNG context" whenever dropout draws inside it;
    # expected here since the tracked generator *is* the CPU generator.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


# ---- 3. torch.cuda.current_device() -> cpu -------------------------------------------------
# "cpu" is the rank's bound device (runtime.device.current()): plain cpu, or cpu:0 in strict device
# mode, where megatron's buffers must count as device tensors like everything it places on "cuda".
def _current_device_cpu() -> None:
    torch.cuda.current_device = current


# ---- 4. device="cuda", .cuda(), pin_memory, Tensor.type() -> CPU ------------------------------
def _is_cuda_device(d) -> bool:
    return (isinstance(d, str) and d.startswith("cuda")) or (isinstance(d, torch.device) and d.type == "cuda")


class CudaAsCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call in the process (like set_default_device).

    `Tensor.type()` reports `torch.cuda.*` because the optimizer accepts only CUDA-typed params
    (distrib_optimizer.py:401/466, optimizer.py:1009/1028).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=current())
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], current()) + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


_cuda_as_cpu_mode: CudaAsCpuMode | None = None


def _enter_cuda_as_cpu_mode() -> None:
    global _cuda_as_cpu_mode
    _cuda_as_cpu_mode = CudaAsCpuMode()
    _cuda_as_cpu_mode.__enter__()  # process-wide for the main thread; deliberately never exited


# ---- 5. torch.cuda.synchronize() ------------------------------------------------------------
def _noop_synchronize() -> None:
    torch.cuda.synchronize = lambda *a, **k: None


# ---- 6. CUDA streams and events ---------------------------------------------------------------
class _CpuStream:
    """One shared no-op stream, so `current_stream() != side_stream` is False and no
    record_stream() is attempted."""

    _instance = None

    def __new__(cls, *args, **kwargs):
        if cls._instance is None:
            cls._instance = object.__new__(cls)
        return cls._instance

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    @staticmethod
    def priority_range():
        return (0, 0)


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _noop_streams() -> None:
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    torch.cuda.default_stream = lambda device=None: _CpuStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


# ---- 7. MoE all-to-all split sizes as numpy for CPU tensors ------------------------------------
def _moe_split_sizes_numpy() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# ---- 8-10. DistributedOptimizer over torch AdamW (no TE/Apex FusedAdam) -----------------------
def _no_apex_or_te_optimizer() -> bool:
    import megatron.core.optimizer.distrib_optimizer as do

    return not getattr(do, "HAVE_APEX_OR_TE", True)


def _prime_empty_adam_state() -> None:
    import megatron.core.optimizer.distrib_optimizer as do

    original = do.DistributedOptimizer.state_dict

    def state_dict(self):
        if not self.ddp_config.use_megatron_fsdp and len(self.optimizer.state) == 0:
            if getattr(self, "init_state_fn", None) is not None:
                self.init_state_fn(self.optimizer, self.config)
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self.optimizer.state[p].setdefault("step", torch.tensor(0.0))
        return original(self)

    do.DistributedOptimizer.state_dict = state_dict


class _SkipMissing(dict):
    def __missing__(self, key):
        return None  # the caller skips non-tensors


def _tolerate_missing_step() -> None:
    import megatron.core.optimizer.distrib_optimizer as do

    original = do.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        return original(self, model_param, _SkipMissing(tensors))

    do.DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _unshare_adam_step() -> None:
    import megatron.core.optimizer.distrib_optimizer as do

    original = do.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        out = original(self, state_dict)
        for st in self.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
        return out

    do.DistributedOptimizer.load_state_dict = load_state_dict


# ---- 11. sequence parallel with the torch norm ---------------------------------------------
def _sequence_parallel_torch_norm() -> None:
    import megatron.core.transformer.torch_norm as torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, *args, **kwargs)
        # A per-token norm is exact on sequence shards; SP only needs its params tagged so that
        # finalize_model_grads all-reduces their partial grads over TP (what apex's norm does).
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        norm = original_new(cls, cfg, hidden_size, eps, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new)


# ---- 12. the torch norm in the model's dtype -------------------------------------------------------
def _torch_norm_params_dtype() -> None:
    import megatron.core.transformer.torch_norm as torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        # megatron builds torch.nn.RMSNorm/LayerNorm without a dtype: fp32 weights in a bf16 model,
        # which megatron's fp16/bf16 optimizer then pairs with the wrong model tensors on save
        return original_new(cls, config, hidden_size, eps, *args, **kwargs).to(dtype=config.params_dtype)

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new)


# ---- 13. in-process results queue for synchronous checkpoint saves ----------------------------
def _in_process_ckpt_queue() -> None:
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fsa

    fsa._results_queue = queue.Queue()


# ---- 14. unbatched pipeline p2p on gloo ------------------------------------------------------
def _unbatched_p2p() -> None:
    from megatron.core.model_parallel_config import ModelParallelConfig

    original = ModelParallelConfig.__post_init__

    def post_init(self):
        # With pp=2 the previous and next stage are the same peer. Batched p2p posts
        # send_prev, recv_prev, send_next, recv_next; gloo matches same-peer, same-tag messages in
        # posting order, so recv_prev receives the peer's send_prev: activations and gradients of
        # the interleaved (VPP) schedule get swapped and the loss is silently wrong. The unbatched
        # path orders sends/receives by even/odd rank and is exact.
        self.batch_p2p_comm = False
        original(self)

    ModelParallelConfig.__post_init__ = post_init


def _no_cuda_sync_ckpt() -> bool:
    return _no_cuda() and not os.environ.get(MP_CKPT_QUEUE_ENV)


PATCHES: tuple[CompatPatch, ...] = (
    CompatPatch(
        "triton_free_import", "transformer/moe/ops/paged_stash.py:4",
        "`import megatron.core` fails: ModuleNotFoundError: No module named 'triton'",
        _no_triton, _stub_paged_stash),
    CompatPatch(
        "deferred_torch_compile", "jit.py:21 (jit_fuser = torch.compile), transformer/moe/router.py:918",
        "COST: importing megatron.core imports torch._dynamo and torch._inductor (1.6 s of CPU per "
        "process) to wrap kernels that never run on CPU",
        _no_cuda, _deferred_torch_compile),
    CompatPatch(
        "timers_without_wandb", "timers.py:13",
        "COST: importing megatron.core imports wandb (0.6 s of CPU per process) for a timers writer "
        "megarl never uses",
        lambda: True, _timers_without_wandb),
    CompatPatch(
        "rng_tracker_on_cpu", "tensor_parallel/random.py:303",
        "model_parallel_cuda_manual_seed: AssertionError: Torch not compiled with CUDA enabled",
        _no_cuda, _rng_tracker_on_cpu),
    CompatPatch(
        "current_device_cpu", "models/common/embeddings/rotary_pos_embedding.py:162 (+~100 sites)",
        "torch.cuda.current_device(): AssertionError: Torch not compiled with CUDA enabled",
        _no_cuda, _current_device_cpu),
    CompatPatch(
        "cuda_placements_to_cpu",
        "pipeline_parallel/schedules.py:749, optimizer/optimizer.py:698, distrib_optimizer.py:477, "
        "models/common/embeddings/rope_utils.py:62 (+~70 sites)",
        "device='cuda' tensors assert; optimizer TypeError 'Wrapped parameters must be one of "
        "torch.cuda.FloatTensor'; pin_memory needs an accelerator",
        _no_cuda, _enter_cuda_as_cpu_mode),
    CompatPatch(
        "noop_cuda_synchronize", "pipeline_parallel/p2p_communication.py:263,419",
        "pipeline p2p: torch.cuda.synchronize() asserts without CUDA",
        _no_cuda, _noop_synchronize),
    CompatPatch(
        "noop_cuda_streams", "transformer/moe/token_dispatcher.py:469,922",
        "MoE dispatcher: RuntimeError: torch.cuda.Stream requires CUDA support",
        _no_cuda, _noop_streams),
    CompatPatch(
        "moe_split_sizes_numpy", "transformer/moe/moe_utils.py:1184",
        "MoE all-to-all: TypeError: all_to_all_single(): incompatible function arguments",
        _no_cuda, _moe_split_sizes_numpy),
    CompatPatch(
        "prime_empty_adam_state", "optimizer/distrib_optimizer.py:838",
        "checkpoint load into a fresh optimizer: AssertionError (len(steps) == 1)",
        _no_apex_or_te_optimizer, _prime_empty_adam_state),
    CompatPatch(
        "tolerate_missing_adam_step", "optimizer/distrib_optimizer.py:1223",
        "checkpoint load: KeyError: 'step'",
        _no_apex_or_te_optimizer, _tolerate_missing_step),
    CompatPatch(
        "unshare_adam_step", "optimizer/distrib_optimizer.py:1025-1031",
        "SILENT: one shared Adam `step` tensor is incremented once per param after a resume, "
        "so bias correction is wrong and resumed training diverges",
        _no_apex_or_te_optimizer, _unshare_adam_step),
    CompatPatch(
        "sequence_parallel_torch_norm", "transformer/torch_norm.py:50",
        "sequence_parallel=True: AssertionError: sequence parallel not supported by torch LayerNorm",
        lambda: True, _sequence_parallel_torch_norm),
    CompatPatch(
        "torch_norm_params_dtype", "transformer/torch_norm.py:71",
        "bf16 model with the local spec: norm weights stay fp32, every checkpoint save fails "
        "(AssertionError: Optimizer shape ((128,) does not match model shape ((256,)))",
        lambda: True, _torch_norm_params_dtype),
    CompatPatch(
        "in_process_ckpt_queue", "dist_checkpointing/strategies/filesystem_async.py:53-66",
        "each dist-checkpoint save spawns a Manager (~4 s) and hangs forever from a script "
        "without an `if __name__ == '__main__'` guard",
        _no_cuda_sync_ckpt, _in_process_ckpt_queue),
    CompatPatch(
        "unbatched_p2p_on_gloo", "pipeline_parallel/p2p_communication.py (_batched_p2p_ops)",
        "SILENT: interleaved pipeline (VPP) with pp=2 on gloo computes a wrong loss "
        "(same-peer messages matched out of order)",
        _no_cuda, _unbatched_p2p),
)

_applied: tuple[str, ...] | None = None


def install() -> tuple[str, ...]:
    """Apply every needed patch once per process; returns the names applied.

    Must run before megatron.core is first imported (otherwise the triton stub comes too late).
    """
    global _applied
    if _applied is not None:
        return _applied
    if "megatron.core" in sys.modules and _no_triton() and PAGED_STASH not in sys.modules:
        raise RuntimeError("megatron.core was imported before megarl.runtime.cpu_compat.install(); "
                           "import megarl.runtime first")
    skip = {name.strip() for name in os.environ.get(SKIP_ENV, "").split(",") if name.strip()}
    unknown = skip - {p.name for p in PATCHES}
    if unknown:
        raise ValueError(f"{SKIP_ENV} names unknown patches {sorted(unknown)}; "
                         f"known: {[p.name for p in PATCHES]}")
    applied = []
    for patch in PATCHES:
        if patch.name not in skip and patch.needed():
            patch.apply()
            applied.append(patch.name)
    import megatron.core  # noqa: F401 - under the import-time patches, which end here

    while _UNDO_AFTER_IMPORT:
        _UNDO_AFTER_IMPORT.pop()()
    _check_version()
    _applied = tuple(applied)
    log.debug("megatron-core CPU compatibility patches applied: %s", ", ".join(_applied) or "none")
    return _applied


def applied_patches() -> tuple[str, ...]:
    return _applied or ()


def _check_version() -> None:
    from importlib.metadata import version

    found = version("megatron-core")
    if found != MEGATRON_VERSION_VERIFIED:
        log.warning("megatron-core %s: the CPU compatibility layer was verified against %s only",
                    found, MEGATRON_VERSION_VERIFIED)
