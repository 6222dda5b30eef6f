"""`verify_logprobs`: after a sync, the trainer and every engine score the same fixed token
sequences; any difference beyond the tolerance fails the step and names the engine, sequence and
position. Checksums prove the bytes arrived; this proves the engine computes what the trainer
computes (a wrong layout map, a stale layer, a kernel that did not re-pack would all show here)."""

from __future__ import annotations

import random

from megarl.sync.transport import WeightSyncError


def verification_sequences(vocab_size: int, count: int = 2, length: int = 16, seed: int = 0) -> list[list[int]]:
    """Fixed pseudo-random token sequences (lengths divisible by 8, so any TP/SP/CP split fits)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(count)]


def compare_logprobs(trainer: list[list[float]], engines: list[list[list[float]]], tolerance: float) -> float:
    """Largest |trainer - engine| over every engine, sequence and position; raises WeightSyncError
    when it exceeds `tolerance`."""
    worst, where = 0.0, None
    for e, per_engine in enumerate(engines):
        if len(per_engine) != len(trainer):
            raise WeightSyncError(f"engine {e} scored {len(per_engine)} sequences, the trainer {len(trainer)}")
        for s, (ref, got) in enumerate(zip(trainer, per_engine)):
            if len(ref) != len(got):
                raise WeightSyncError(f"engine {e} sequence {s}: {len(got)} log-probs, the trainer has {len(ref)}")
            for i, (a, b) in enumerate(zip(ref, got)):
                if abs(a - b) > worst:
                    worst, where = abs(a - b), (e, s, i + 1)
    if worst > tolerance:
        e, s, i = where
        raise WeightSyncError(f"after the sync engine {e} disagrees with the trainer: log-prob of token {i} of "
                              f"verification sequence {s} differs by {worst:.3g} (tolerance {tolerance:g})")
    return worst
