"""What a worker gang sends back to the driver: each data-parallel replica's share of a
per-sample result, from that replica's reporting rank.

A share is `(dp_rank, {name: tensor [rows, ...], "seconds": float})` serialised with torch.save.
Bytes, not the objects: importing megatron (which every worker does) registers a storage reducer
that would make plain pickles of these tensors unloadable in the driver, which never imports
megatron.
"""

from __future__ import annotations

import io

import torch


def encode_share(dp_rank: int, tensors: dict) -> bytes:
    """This replica's share: per-sample tensors (rows in this replica's order) and "seconds"."""
    buf = io.BytesIO()
    torch.save((int(dp_rank), tensors), buf)
    return buf.getvalue()


def decode_share(data: bytes) -> tuple[int, dict]:
    return torch.load(io.BytesIO(data), weights_only=False)


def gather_shares(shares: list) -> dict[str, torch.Tensor]:
    """The whole batch from one share per replica (None from the non-reporting ranks): per-sample
    tensors concatenated in data-parallel rank order (= row order, see `MegatronRank._my_rows`),
    "seconds" the slowest replica's."""
    parts = sorted((decode_share(s) for s in shares if s is not None), key=lambda p: p[0])
    if not parts:
        raise ValueError("no worker reported a share")
    out = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1] if k != "seconds"}
    if "seconds" in parts[0][1]:
        out["seconds"] = max(p[1]["seconds"] for p in parts)  # model compute inside the workers
    return out
