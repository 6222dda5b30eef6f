"""Per-patch behaviour checks of the CPU compatibility layer, run inside one spawned rank
(so the pytest process itself never has megatron's CUDA-as-CPU mode installed)."""

from __future__ import annotations

import queue
import sys
import traceback

import numpy as np
import torch

from megarl.runtime import cpu_compat


def _triton_free_import():
    import megatron.core  # noqa: F401

    stub = sys.modules[cpu_compat.PAGED_STASH]
    try:
        stub.paged_stash_copy_kernel()
    except RuntimeError as e:
        assert "triton" in str(e)
    else:
        raise AssertionError("the paged-stash stub must refuse to run")


def _deferred_torch_compile():
    import megatron.core.jit as jit

    assert torch.compile.__module__ == "torch", "torch.compile must be torch's own after install()"
    assert jit.jit_fuser is not torch.compile, "megatron's fuser must be the deferring one"
    assert "torch._inductor" not in sys.modules, "megatron's import must not load the compiler"
    fused = jit.jit_fuser(lambda x: x + 1, backend="eager")
    assert float(fused(torch.tensor(1.0))) == 2.0 and "torch._dynamo" in sys.modules  # compiled at first call


def _timers_without_wandb():
    import megatron.core.timers as timers

    assert timers.wandb is None and sys.modules.get("wandb", "absent") is not None


def _rng_tracker_on_cpu():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megarl.config.parallel import ParallelConfig
    from megarl.runtime.distributed import init_distributed

    init_distributed(ParallelConfig(), seed=7)
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        forked = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork() must not advance the default generator"
    plain = torch.rand(4)
    assert not torch.equal(forked, plain), "the tracked stream must differ from the default one"
    init_distributed(ParallelConfig(), seed=7)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), forked), "the tracked stream must be reproducible"


def _current_device_cpu():
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def _cuda_placements_to_cpu():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    t = torch.ones(2)
    assert t.cuda() is t and t.pin_memory() is t
    assert t.to("cuda").device.type == "cpu"
    assert torch.tensor([1, 2], pin_memory=True).device.type == "cpu"
    assert t.type() == "torch.cuda.FloatTensor"
    assert t.to(torch.float64).dtype == torch.float64  # other conversions untouched


def _noop_cuda_synchronize():
    assert torch.cuda.synchronize() is None


def _noop_cuda_streams():
    side = torch.cuda.Stream()
    assert side is torch.cuda.current_stream(), "one shared stream: no cross-stream bookkeeping"
    with torch.cuda.stream(side):
        x = torch.ones(1) + 1
    event = torch.cuda.Event()
    event.record()
    side.wait_event(event)
    assert event.query() and x.item() == 2.0


def _moe_split_sizes_numpy():
    import megatron.core.transformer.moe.token_dispatcher as td

    out = td.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [3, 1]
    t = torch.tensor([1])
    assert td.maybe_move_tensor_to_cpu(t) is t


def _optimizer_checkpoint_patches():
    """8 + 9 + 10: load a dist checkpoint into a fresh distributed optimizer (torch AdamW)."""
    import tempfile

    from megarl.checkpoint.dist import load_checkpoint, save_checkpoint
    from megarl.models.train import train_step
    from tests.dist.scenarios import SEQ, build, my_microbatches

    state = build(_parallel(), moe=False)
    train_step(state, my_microbatches(0), SEQ)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(state, d + "/ckpt")
        fresh = build(_parallel(), moe=False, seed=5)
        assert len(fresh.optimizer.optimizer.state) == 0  # a never-stepped torch AdamW: no state
        load_checkpoint(fresh, d + "/ckpt")  # 8: no AssertionError, 9: no KeyError 'step'
    steps = [st["step"] for st in fresh.optimizer.optimizer.state.values()]
    assert steps and all(float(s) == 1.0 for s in steps)
    assert len({id(s) for s in steps}) == len(steps), "10: every param needs its own Adam step"


def _parallel():
    from megarl.config.parallel import ParallelConfig

    return ParallelConfig()


def _sequence_parallel_torch_norm():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                            sequence_parallel=True, tensor_model_parallel_size=2)
    norm = WrappedTorchNorm(cfg, 8)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    assert norm(torch.ones(3, 8)).shape == (3, 8)


def _torch_norm_params_dtype():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                            params_dtype=torch.bfloat16, bf16=True)
    assert [p.dtype for p in WrappedTorchNorm(cfg, 8).parameters()] == [torch.bfloat16]


def _in_process_ckpt_queue():
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fsa

    assert isinstance(fsa._results_queue, queue.Queue)


def _unbatched_p2p_on_gloo():
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2, batch_p2p_comm=True)
    assert cfg.batch_p2p_comm is False


CHECKS = {
    "triton_free_import": _triton_free_import,
    "deferred_torch_compile": _deferred_torch_compile,
    "timers_without_wandb": _timers_without_wandb,
    "rng_tracker_on_cpu": _rng_tracker_on_cpu,
    "current_device_cpu": _current_device_cpu,
    "cuda_placements_to_cpu": _cuda_placements_to_cpu,
    "noop_cuda_synchronize": _noop_cuda_synchronize,
    "noop_cuda_streams": _noop_cuda_streams,
    "moe_split_sizes_numpy": _moe_split_sizes_numpy,
    "prime_empty_adam_state": _optimizer_checkpoint_patches,
    "tolerate_missing_adam_step": _optimizer_checkpoint_patches,
    "unshare_adam_step": _optimizer_checkpoint_patches,
    "sequence_parallel_torch_norm": _sequence_parallel_torch_norm,
    "torch_norm_params_dtype": _torch_norm_params_dtype,
    "in_process_ckpt_queue": _in_process_ckpt_queue,
    "unbatched_p2p_on_gloo": _unbatched_p2p_on_gloo,
}


def run_checks() -> dict:
    """{patch name: None if its check passed, else the traceback}, plus the applied list."""
    applied = cpu_compat.install()
    results, done = {}, {}
    for name, check in CHECKS.items():
        if check not in done:
            try:
                check()
                done[check] = None
            except Exception:  # noqa: BLE001 - reported per patch
                done[check] = traceback.format_exc()
        results[name] = done[check]
    return {"applied": list(applied), "results": results}
