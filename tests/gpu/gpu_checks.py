"""Rank functions of the GPU smoke tests (tests/gpu/test_gpu_smoke.py), each run on one fresh CUDA
rank (run_local_group, NCCL, world size 1) from the bundle `tools/gpu_smoke.py prepare` builds."""

from __future__ import annotations

import os
from functools import partial


def _fp32_matmuls() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False   # parity at fp32 precision, not TF32's
    torch.backends.cudnn.allow_tf32 = False


def _model(bundle: str, recipe_path: str):
    """(recipe, model chunks, config) on this rank's CUDA device, from the bundle's checkpoint."""
    from megarl.checkpoint.hf import load_converted
    from megarl.config.loader import load_recipe
    from megarl.config.parallel import ParallelConfig
    from megarl.models.hf_config import BuildOptions
    from megarl.runtime.device import CUDA

    recipe = load_recipe(recipe_path, [f"model.path={os.path.join(bundle, 'tiny_qwen2')}", "cluster.device=cuda",
                                       "model.transformer_impl=local"])
    options = BuildOptions.from_recipe(recipe.model, CUDA)
    chunks, config, _ = load_converted(os.path.join(bundle, "ckpt"), ParallelConfig(), options=options)
    return recipe, chunks, config


def converter_parity(bundle: str) -> dict:
    """The converted checkpoint's logits on CUDA vs transformers' (fp32, CPU, made at prepare time)."""
    import torch

    from megarl.models.forward import full_logits
    from megarl.runtime.device import to_device

    _fp32_matmuls()
    _, chunks, _ = _model(bundle, "configs/tiny/sft_cpu.yaml")
    ref = torch.load(os.path.join(bundle, "reference_logits.pt"), map_location="cpu")
    logits = full_logits(chunks, to_device(ref["tokens"]))
    return {"device": str(next(chunks[0].parameters()).device), "logits_device": str(logits.device),
            "max_abs_diff": float((logits.float().cpu() - ref["logits"]).abs().max())}


def sft_steps(bundle: str, steps: int = 4) -> dict:
    """SFT updates of the real train step (DDP, distributed optimizer, per-token loss) on CUDA."""
    import torch

    from megarl.data.render import Rendered
    from megarl.models.optim import optimizer_config
    from megarl.models.train import train_step, wrap_for_training
    from megarl.trainers.sft import _microbatches

    recipe, chunks, config = _model(bundle, "configs/tiny/sft_cpu.yaml")
    config.calculate_per_token_loss = True
    state = wrap_for_training(chunks, config, optimizer_config(recipe, lr=3e-3), distributed_optimizer=True)
    micro = _microbatches([Rendered(list(range(5, 37)), [0] * 8 + [1] * 24, [(0, 32)])] * 4, 2, 0, 32)
    losses = [train_step(state, micro, 32)["loss"] for _ in range(steps)]
    return {"losses": losses, "micro_batch_device": str(micro[0]["tokens"].device),
            "grad_buffer_device": str(next(p for p in state.models[0].parameters()).main_grad.device),
            "cuda_max_memory_mb": torch.cuda.max_memory_allocated() / 2**20}


def policy_update(bundle: str) -> dict:
    """The actor's objective (workers/actor.py `_policy_forward_step`) and log-prob pass
    (workers/base.py `_logprob_forward_step`) through megatron's schedule on CUDA: one update on
    positive advantages raises the log-probs of the sampled tokens."""
    import torch

    from megarl.algorithms.policy_loss import PolicyLossConfig
    from megarl.models.optim import optimizer_config
    from megarl.models.train import TrainState, optimizer_update, run_schedule, wrap_for_training
    from megarl.runtime.device import to_device
    from megarl.workers.actor import _policy_forward_step
    from megarl.workers.base import _logprob_forward_step

    recipe, chunks, config = _model(bundle, "configs/tiny/grpo_cpu.yaml")
    config.calculate_per_token_loss = True
    state = wrap_for_training(chunks, config, optimizer_config(recipe, lr=1e-3), distributed_optimizer=True)
    tokens = torch.arange(3, 3 + 4 * 33).reshape(4, 33) % 200
    s = tokens.shape[1] - 1
    mb = to_device({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "position_ids": torch.arange(s).expand(4, s).contiguous(), "mask": torch.ones(4, s)})

    def logprobs():
        sink: list = []
        with torch.no_grad():
            run_schedule(TrainState(state.models, state.optimizer, config), [mb], s, forward_only=True,
                         forward_step=partial(_logprob_forward_step, temperature=1.0, with_entropy=False,
                                              per_token_mode=True, sink=sink))
        return sink[0]["logp"]

    before = logprobs()
    batch = dict(mb, old_logp=before, advantages=torch.ones_like(before), loss_weight=mb["mask"] / mb["mask"].sum())
    sums: list = []
    cfg = PolicyLossConfig.from_algorithm(recipe.algorithm)
    run_schedule(state, [batch], s, forward_step=partial(_policy_forward_step, cfg=cfg, temperature=1.0,
                                                           kl_coef=0.0, sink=sums))
    grad_norm = optimizer_update(state, "policy")
    after = logprobs()
    return {"logp_device": str(before.device), "sums_device": str(sums[0].device), "grad_norm": grad_norm,
            "mean_logp_before": float(before.mean()), "mean_logp_after": float(after.mean())}


def ipc_round_trip(bundle: str) -> dict:
    """A CUDA-IPC slot written by another process on the same GPU (as a TP peer or colocated
    sender does), settled before the hand-over, read here with its checksum verified."""
    import torch
    import torch.multiprocessing as mp

    from megarl.sync.plan import HEADER_BYTES
    from megarl.sync.transport import CudaIpcSlots, check_header

    nbytes = 1 << 20
    slots = CudaIpcSlots.create("smoke", HEADER_BYTES + nbytes, count=2, device=torch.device("cuda", 0))
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    child = ctx.Process(target=_ipc_writer, args=(slots.publish(), nbytes, done))
    child.start()
    result = done.get(timeout=180)
    child.join(timeout=60)
    check_header(slots.slot(1)[:HEADER_BYTES + nbytes], 9, 1, "smoke slot 1")
    payload = slots.slot(1)[HEADER_BYTES:HEADER_BYTES + nbytes]
    return {"writer": result, "payload_sum": int(payload.sum()), "expected_sum": int(sum(range(256)) * (nbytes // 256))}


def _ipc_writer(published: str, nbytes: int, done) -> None:
    import json

    import torch

    from megarl.sync.plan import HEADER_BYTES
    from megarl.sync.transport import open_slots, settle, write_header

    try:
        slots = open_slots(published, "smoke writer")
        buf = slots.slot(1)[:HEADER_BYTES + nbytes]
        buf[HEADER_BYTES:] = (torch.arange(nbytes, device=buf.device) % 256).to(torch.uint8)
        write_header(buf, 9, 1)
        settle(buf)
        done.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the reader
        done.put(json.dumps({"error": repr(e)}))


def offload_round_trip(bundle: str) -> dict:
    """Colocated hand-off on the GPU: a trained DDP model and its distributed optimizer leave the
    device (memory actually freed) and come back bitwise (workers/offload.py)."""
    import torch

    from megarl.data.render import Rendered
    from megarl.models.optim import optimizer_config
    from megarl.models.train import train_step, wrap_for_training
    from megarl.trainers.sft import _microbatches
    from megarl.workers.offload import offload

    recipe, chunks, config = _model(bundle, "configs/tiny/sft_cpu.yaml")
    config.calculate_per_token_loss = True
    state = wrap_for_training(chunks, config, optimizer_config(recipe, lr=3e-3), distributed_optimizer=True)
    micro = _microbatches([Rendered(list(range(5, 37)), [0] * 8 + [1] * 24, [(0, 32)])] * 4, 2, 0, 32)
    train_step(state, micro, 32)
    params = [p.detach().clone() for p in state.models[0].parameters()]
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    held = offload(state.models, state.optimizer)
    held_bytes = held.nbytes
    torch.cuda.empty_cache()
    offloaded = torch.cuda.memory_allocated()
    held.restore()
    same = all(torch.equal(a, b) for a, b in zip(params, state.models[0].parameters()))
    loss = train_step(state, micro, 32)["loss"]
    return {"resident_mb": resident / 2**20, "offloaded_mb": offloaded / 2**20, "held_mb": held_bytes / 2**20,
            "bitwise": same, "loss_after": loss}


def te_fp8_forward(bundle: str) -> dict:
    """A Transformer Engine linear forward under FP8 autocast (only where TE imports)."""
    import torch
    import transformer_engine.pytorch as te

    layer = te.Linear(256, 256, params_dtype=torch.bfloat16).cuda()
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    with te.fp8_autocast(enabled=True):
        y = layer(x)
    ref = x @ layer.weight.t()
    return {"rel_err": float((y.float() - ref.float()).norm() / ref.float().norm())}
