"""Rank functions for tests/runtime/test_strict_device.py (run with MEGARL_STRICT_DEVICE=1)."""

from __future__ import annotations


def _error(fn) -> str:
    from megarl.runtime.strict_device import DeviceDisciplineError

    try:
        fn()
    except DeviceDisciplineError as e:
        return str(e)
    return ""


def placement_rules() -> dict:
    """Where tensors land, and which mixes are refused, with the device bound to cpu:0."""
    import torch
    import torch.distributed as dist

    from megarl.runtime.device import CPU, bind_device, current, to_device, to_host
    from megarl.runtime.strict_device import check_host, enable, host_group, is_on_device

    device = bind_device(CPU)
    enable(device)
    host = torch.ones(4)
    on = to_device(torch.ones(4))
    made = torch.zeros(4, device=current())
    view = on[1:] * 2
    beside = torch.zeros(2, device=view.device)
    back = on.cpu()
    layer = torch.nn.Linear(3, 1).to(current())   # Module.to: how models reach the device
    layer(to_device(torch.ones(2, 3))).sum().backward()
    gloo = host_group(dist.new_group(backend="gloo"))
    return {
        "device": str(device),
        "host": is_on_device(host), "to_device": is_on_device(on), "factory": is_on_device(made),
        "view": is_on_device(view), "beside": (str(view.device), is_on_device(beside)),
        "cpu_copy": (is_on_device(back), back is on),
        "grad": is_on_device(layer.weight.grad), "to_host": is_on_device(to_host({"x": on})["x"]),
        "mix": _error(lambda: on + host),
        "scalar_mix": _error(lambda: on * torch.tensor(2.0)),
        "index_with_host": _error(lambda: on[torch.tensor([0, 1])]),
        "reduce_host": _error(lambda: dist.all_reduce(torch.zeros(1))),
        "reduce_device": _error(lambda: dist.all_reduce(torch.zeros(1, device=current()))),
        "reduce_host_group": _error(lambda: dist.all_reduce(torch.zeros(1), group=gloo)),
        "return_device": _error(lambda: check_host({"logp": on}, "Worker.logprobs")),
        "return_host": _error(lambda: check_host({"logp": back}, "Worker.logprobs")),
    }


def sft_step_with(planted_host_batch: bool, model_dir: str) -> str:
    """One real SFT step (megatron schedule, DDP, optimizer) on a tiny model: micro-batches as
    `_microbatches` builds them, or one planted on the host. Returns the strict-mode error or ''."""
    import os
    import tempfile

    from megarl.checkpoint.hf import convert_hf_to_megatron, load_converted
    from megarl.config.loader import load_recipe
    from megarl.config.parallel import ParallelConfig
    from megarl.data.render import Rendered
    from megarl.models.optim import optimizer_config
    from megarl.models.train import train_step, wrap_for_training
    from megarl.trainers.sft import _microbatches

    ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
    convert_hf_to_megatron(model_dir, ckpt)
    recipe = load_recipe("configs/tiny/sft_cpu.yaml", [f"model.path={model_dir}"])
    chunks, config, _ = load_converted(ckpt, ParallelConfig(), options=None)
    config.calculate_per_token_loss = True
    state = wrap_for_training(chunks, config, optimizer_config(recipe), distributed_optimizer=False)
    sample = Rendered(input_ids=list(range(3, 19)), loss_mask=[0] * 4 + [1] * 12, message_spans=[(0, 16)])
    micro = _microbatches([sample, sample], 2, 0, 16)
    if planted_host_batch:   # the bug: a micro-batch left on the host
        micro = [{k: v.cpu() if v is not None else v for k, v in m.items()} for m in micro]
    return _error(lambda: train_step(state, micro, 16))
