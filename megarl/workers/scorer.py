"""Frozen megatron ranks that only score: `ReferenceWorker` (the KL reference policy's log-probs)
and `RewardModelWorker` (a scalar-head reward model's sequence scores)."""

from __future__ import annotations

import time

import torch

from megarl.workers.base import MegatronRank

RM_CHUNK = 16  # sequences per reward-model forward


class ReferenceWorker(MegatronRank):
    def compute_logprobs(self, batch: dict, with_entropy: bool = False) -> bytes | None:
        """Wire share (dp rank, {"logp": [rows, S-1], "entropy": ..., "seconds"}) on the reporting
        rank of each DP replica, None elsewhere (`megarl.workers.wire.gather_shares` joins them)."""
        return self._logprobs(batch, with_entropy)


class RewardModelWorker(MegatronRank):
    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> bytes | None:
        """Wire share (dp rank, {"scores": [rows], "seconds"}) of `sequences` (this replica's share),
        on its reporting rank; None elsewhere."""
        from megarl.reward.rm_scorer import score_sequences

        t0 = time.perf_counter()
        mine = sequences
        scores = []
        for i in range(0, len(mine), RM_CHUNK):
            scores += score_sequences(self.models, mine[i:i + RM_CHUNK]) or []
        if not self._reporter():
            return None
        return self._share({"scores": torch.tensor(scores, dtype=torch.float64), "seconds": time.perf_counter() - t0})
