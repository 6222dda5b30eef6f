"""Packing variable-length sequences into one row without cross-contamination.

Sequences are concatenated and attend only inside themselves: a block-diagonal causal mask on
the local (CPU) attention; on GPUs with Transformer Engine the same packing is expressed as
THD `PackedSeqParams` (cu_seqlens) and no mask is materialised. Rotary embeddings need no
per-sequence restart on the mask path: RoPE scores depend only on the distance q_pos - k_pos,
and cross-sequence pairs are masked, so each packed sequence computes exactly what it computes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedRow:
    tokens: torch.Tensor          # [1, T]
    position_ids: torch.Tensor    # [1, T], restarting at 0 for each sequence
    attention_mask: torch.Tensor  # [1, 1, T, T] bool, True = masked out
    cu_seqlens: torch.Tensor      # [n + 1] int32 offsets of each sequence
    lengths: list[int]
    padding: int = 0

    def split(self, per_token: torch.Tensor) -> list[torch.Tensor]:
        """[1, T, ...] per-token values -> one tensor per packed sequence (padding dropped)."""
        pieces = per_token[0].split(self.lengths + ([self.padding] if self.padding else []), dim=0)
        return list(pieces[:len(self.lengths)])


def pack(sequences: list[torch.Tensor], pad_to: int | None = None, pad_id: int = 0) -> PackedRow:
    """Concatenate 1-D token tensors into one row; optional padding (its own masked-off segment)
    up to `pad_to` tokens (e.g. a multiple of tp·cp)."""
    lengths = [int(s.numel()) for s in sequences]
    total = sum(lengths)
    pad = 0 if pad_to is None else pad_to - total
    if pad < 0:
        raise ValueError(f"{total} tokens do not fit in pad_to={pad_to}")
    tokens = torch.cat(list(sequences) + ([torch.full((pad,), pad_id, dtype=sequences[0].dtype)] if pad else []))
    seg = torch.repeat_interleave(torch.arange(len(lengths) + (1 if pad else 0)),
                                  torch.tensor(lengths + ([pad] if pad else [])))
    pos = torch.cat([torch.arange(n) for n in lengths + ([pad] if pad else [])])
    causal = torch.ones(tokens.numel(), tokens.numel(), dtype=torch.bool).tril()
    allowed = causal & (seg[:, None] == seg[None, :])
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PackedRow(tokens[None], pos[None], ~allowed[None, None], cu, lengths, pad)


def packed_seq_params(row: PackedRow):
    """The TE (GPU) form of the same packing: THD layout with cu_seqlens."""
    from megarl.runtime.megatron import PackedSeqParams

    max_len = max(row.lengths)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=row.cu_seqlens, cu_seqlens_kv=row.cu_seqlens,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)
