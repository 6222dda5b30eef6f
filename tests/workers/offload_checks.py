"""Rank function for tests/workers/test_offload.py."""

from __future__ import annotations


def train_with_handoffs(ckpt: str, model_dir: str, handoff: bool) -> dict:
    """3 SFT steps on 2 ranks (DDP + distributed optimizer); with `handoff`, the model and optimizer
    go to the host and back before steps 2 and 3 (and once more at the end, checked bitwise)."""
    import torch

    from megarl.checkpoint.hf import load_converted
    from megarl.config.loader import load_recipe
    from megarl.config.parallel import ParallelConfig
    from megarl.data.render import Rendered
    from megarl.models.optim import optimizer_config
    from megarl.models.train import train_step, wrap_for_training
    from megarl.trainers.sft import _microbatches
    from megarl.workers.offload import offload

    recipe = load_recipe("configs/tiny/sft_cpu.yaml", [f"model.path={model_dir}"])
    chunks, config, _ = load_converted(ckpt, ParallelConfig())
    config.calculate_per_token_loss = True
    state = wrap_for_training(chunks, config, optimizer_config(recipe, lr=3e-3), distributed_optimizer=True)
    micro = _microbatches([Rendered(list(range(5, 37)), [0] * 8 + [1] * 24, [(0, 32)])] * 4, 2, 0, 32)
    losses, freed = [], []
    for step in range(3):
        if handoff and step:
            held = offload(state.models, state.optimizer)
            freed.append(sum(p.untyped_storage().nbytes() for p in state.models[0].parameters()))
            held.restore()
        losses.append(train_step(state, micro, 32)["loss"])
    params = [p.detach().clone() for p in state.models[0].parameters()]
    moments = [v.clone() for s in state.optimizer.optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor)]
    held = offload(state.models, state.optimizer)
    offloaded_bytes = held.nbytes
    held.restore()
    same = (all(torch.equal(a, b) for a, b in zip(params, state.models[0].parameters()))
            and all(torch.equal(a, b) for a, b in zip(moments, (v for s in state.optimizer.optimizer.state.values()
                                                               for v in s.values() if isinstance(v, torch.Tensor)))))
    return {"losses": losses, "freed_param_bytes": freed, "offloaded_bytes": offloaded_bytes, "bitwise": same,
            "moments": len(moments)}
