"""Reward-model scoring on the megatron model layer: a scalar-head GPT (converted from an HF
*ForSequenceClassification checkpoint, or trained by the `rm` stage) scores each sequence by its
value at the last token — what HF's sequence-classification head pools. Runs inside a megatron
rank (a reward worker); the driver reaches it through `RewardEngine(..., rm_scorer=...)`."""

from __future__ import annotations

import torch

from megarl.models.forward import full_logits
from megarl.runtime.device import to_device
from megarl.runtime.megatron import parallel_state as ps


def score_sequences(chunks: list, sequences: list[list[int]], pad_id: int = 0) -> list[float] | None:
    """Scalar reward of each token sequence; None on ranks without the last pipeline stage.
    Sequences are right-padded into one micro-batch: causal attention keeps padding from
    changing the value at each sequence's last token."""
    # sequence/context parallelism split the sequence: pad to a multiple of their sizes
    cp = ps.get_context_parallel_world_size()
    multiple = ps.get_tensor_model_parallel_world_size() * (2 * cp if cp > 1 else 1)
    longest = -(-max(len(s) for s in sequences) // multiple) * multiple
    tokens = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)] = torch.tensor(s)
    values = full_logits(chunks, to_device(tokens))
    if values is None:
        return None
    if values.shape[-1] != 1:
        raise ValueError(f"a reward model needs a scalar head; this model outputs {values.shape[-1]} values")
    last = torch.tensor([len(s) - 1 for s in sequences], device=values.device)
    return values[torch.arange(len(sequences), device=values.device), last, 0].float().tolist()
