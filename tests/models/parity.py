"""Rank functions for the converter parity tests (run through run_local_group)."""

from __future__ import annotations

import torch

from megarl.checkpoint.hf import convert_hf_to_megatron, convert_megatron_to_hf, load_converted
from megarl.config.parallel import ParallelConfig
from megarl.models.forward import full_logits


def convert_round_trip(jobs: list[tuple[str, str, str]]) -> list[dict]:
    """For each (hf_dir, ckpt_dir, back_dir): HF -> megatron -> HF."""
    out = []
    for hf_dir, ckpt_dir, back_dir in jobs:
        out.append(convert_hf_to_megatron(hf_dir, ckpt_dir))
        convert_megatron_to_hf(ckpt_dir, back_dir)
    return out


def megatron_logits(ckpt_dirs: list[str], parallel: dict, tokens: torch.Tensor) -> list:
    """Full logits of `tokens` for each converted checkpoint, built at `parallel`."""
    out = []
    for ckpt in ckpt_dirs:
        chunks, _, _ = load_converted(ckpt, ParallelConfig(**parallel))
        out.append(full_logits(chunks, tokens))
    return out


def packed_vs_padded(ckpt_dir: str, parallel: dict, lengths: list[int]) -> dict:
    """Logits of sequences packed in one row vs the same sequences right-padded in a batch."""
    from megarl.models.packing import pack

    chunks, _, _ = load_converted(ckpt_dir, ParallelConfig(**parallel))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,), generator=g) for n in lengths]
    row = pack(seqs, pad_to=sum(lengths) + 4)
    packed = full_logits(chunks, row.tokens, row.attention_mask, row.position_ids)
    longest = max(lengths)
    padded_tokens = torch.stack([torch.cat([s, torch.zeros(longest - len(s), dtype=s.dtype)]) for s in seqs])
    padded = full_logits(chunks, padded_tokens)
    if packed is None:
        return {}
    pieces = row.split(packed)
    diffs = [(p - padded[i, :len(p)]).abs().max().item() for i, p in enumerate(pieces)]
    # a sequence packed after another must not see it: compare against seeing it as a prefix
    leak = (full_logits(chunks, torch.cat(seqs[:2])[None])[0, lengths[0]:] - pieces[1]).abs().max().item()
    return {"diffs": diffs, "leak_if_unmasked": leak}
