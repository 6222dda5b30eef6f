"""Forward-only passes through megatron's pipeline schedule: full-vocabulary logits (for parity
checks and debugging) gathered from the tensor-parallel shards on the last pipeline stage."""

from __future__ import annotations

import torch

from megarl.models.heads import ScalarHead
from megarl.runtime.megatron import gather_from_tensor_model_parallel_region, get_forward_backward_func
from megarl.runtime.megatron import parallel_state as ps


def full_logits(chunks: list, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Logits [b, s, vocab] (or values [b, s, 1] for a scalar head) of `tokens` [b, s] (one
    micro-batch); None on ranks that are not on the last pipeline stage. `attention_mask`
    [b, 1, s, s] (True = masked) replaces the causal mask."""
    b, s = tokens.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=tokens.device).expand(b, s).contiguous()
    batch = {"tokens": tokens, "position_ids": position_ids, "attention_mask": attention_mask}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["tokens"], mb["position_ids"], mb["attention_mask"])
        vocab_parallel = not isinstance(getattr(model, "output_layer", None), ScalarHead)

        def collect(output):
            full = gather_from_tensor_model_parallel_region(output) if vocab_parallel else output
            return output.sum() * 0.0, {"logits": full.detach()}

        return out, collect

    for m in chunks:
        m.eval()
    n = len(chunks)
    iterators = [iter([batch]) for _ in range(n)] if n > 1 else iter([batch])
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=chunks if n > 1 else chunks[0],
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs[0]["logits"]
