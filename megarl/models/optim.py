"""The optimizer and its learning-rate schedule from a recipe's `optim` group (megatron's Adam
with fp32 main params, and `OptimizerParamScheduler`): shared by every trainable megatron stage
(SFT, preference, the RL actor and critic)."""

from __future__ import annotations


def optimizer_config(recipe, lr: float | None = None):
    """megatron OptimizerConfig from the recipe's optim group (Adam; fp32 main params)."""
    import torch

    from megarl.runtime.megatron import OptimizerConfig

    o, dtype = recipe.optim, recipe.model.dtype
    lr = o.lr if lr is None else lr
    return OptimizerConfig(optimizer="adam", lr=lr, min_lr=min(o.min_lr, lr), weight_decay=o.weight_decay,
                           adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                           clip_grad=o.clip_grad, bf16=dtype == "bf16", fp16=dtype == "fp16",
                           params_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32))


def lr_scheduler(optimizer, recipe, steps: int):
    """Warmup then constant / cosine / linear decay to min_lr over `steps` optimizer steps."""
    from megarl.runtime.megatron import OptimizerParamScheduler

    o = recipe.optim
    if o.warmup_steps >= max(steps, 1):  # recipes with trainer.steps are refused at load already
        raise ValueError(f"optim.warmup_steps={o.warmup_steps} must be fewer than the run's {steps} optimizer "
                         "steps (the learning rate would never leave its warmup)")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(steps, 1), lr_decay_style=o.lr_scheduler,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(steps, 1), wd_incr_style="constant")
