"""What crosses between the driver and a worker gang.

In: each data-parallel replica gets only its share of a batch (`replica_share`: its part of every
optimizer mini-batch), put in the object store once per replica and read by that replica's ranks.
Out: each replica's share of a per-sample result, from that replica's reporting rank.

A share is `(dp_rank, {name: tensor [rows, ...], "seconds": float})` serialised with torch.save.
Bytes, not the objects: importing megatron (which every worker does) registers a storage reducer
that would make plain pickles of these tensors unloadable in the driver, which never imports
megatron.
"""

from __future__ import annotations

import io

import torch


def replica_rows(n: int, dp_rank: int, dp_size: int, minibatches: int = 1) -> list[int]:
    """The rows of an `n`-sample batch that data-parallel replica `dp_rank` works on: its equal,
    consecutive part of each optimizer mini-batch (`minibatch_slices`), in mini-batch order."""
    from megarl.algorithms.policy_loss import minibatch_slices

    rows = []
    for mini in minibatch_slices(n, minibatches):
        size = mini.stop - mini.start
        if size % dp_size:
            raise ValueError(f"mini-batches of {size} samples do not split over {dp_size} data-parallel replicas")
        per = size // dp_size
        rows += range(mini.start + dp_rank * per, mini.start + (dp_rank + 1) * per)
    return rows


def replica_share(batch: dict | list, dp_rank: int, dp_size: int, minibatches: int = 1) -> dict | list:
    """`batch` (per-sample tensors, or a list of samples) cut to replica `dp_rank`'s rows."""
    n = len(batch) if isinstance(batch, list) else batch["tokens"].shape[0]
    rows = replica_rows(n, dp_rank, dp_size, minibatches)
    if isinstance(batch, list):
        return [batch[i] for i in rows]
    index = torch.tensor(rows, dtype=torch.long)
    return {k: v.index_select(0, index) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in batch.items()}


def encode_share(dp_rank: int, tensors: dict) -> bytes:
    """This replica's share: per-sample tensors (rows in this replica's order) and "seconds"."""
    from megarl.runtime.device import to_host

    buf = io.BytesIO()
    torch.save((int(dp_rank), to_host(tensors)), buf)   # the driver has no device: host tensors only
    return buf.getvalue()


def decode_share(data: bytes) -> tuple[int, dict]:
    return torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")


def gather_shares(shares: list) -> dict[str, torch.Tensor]:
    """The whole batch from one share per replica (None from the non-reporting ranks): per-sample
    tensors concatenated in data-parallel rank order (= row order for a one-mini-batch share),
    "seconds" the slowest replica's."""
    parts = sorted((decode_share(s) for s in shares if s is not None), key=lambda p: p[0])
    if not parts:
        raise ValueError("no worker reported a share")
    out = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1] if k != "seconds"}
    if "seconds" in parts[0][1]:
        out["seconds"] = max(p[1]["seconds"] for p in parts)  # model compute inside the workers
    return out
