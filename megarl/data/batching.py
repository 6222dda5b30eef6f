"""Token-budget micro-batches: group samples so each micro-batch holds at most `max_tokens`
tokens (packed or padded), instead of a fixed number of sequences. Long and short samples then
cost what they weigh, and no sample is ever cut."""

from __future__ import annotations


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit-decreasing bins of sample indices with total length <= max_tokens.

    Deterministic for a given input (ties broken by index). A sample longer than the budget is an
    error naming it: it could only fit by truncation."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sample {i} has {n} tokens, more than the micro-batch budget of {max_tokens} "
                         f"({len(too_long)} such samples); raise the budget or reject them upstream")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins
