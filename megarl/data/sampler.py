"""Deterministic, resumable sampling: a seeded permutation per epoch, and a position that is part
of every checkpoint, so a resumed run continues with exactly the rows it would have seen next."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0


class EpochSampler:
    def __init__(self, num_rows: int, seed: int, shuffle: bool = True, state: SamplerState | None = None):
        if num_rows < 1:
            raise ValueError("the dataset has no usable rows")
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.state = state or SamplerState()
        self._order = self._permutation(self.state.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def take(self, n: int) -> list[int]:
        """The next n row indices (crossing epochs as needed)."""
        out = []
        while len(out) < n:
            if self.state.position == self.num_rows:
                self.state = SamplerState(self.state.epoch + 1, 0)
                self._order = self._permutation(self.state.epoch)
            k = min(n - len(out), self.num_rows - self.state.position)
            out += self._order[self.state.position:self.state.position + k].tolist()
            self.state.position += k
        return out

    def state_dict(self) -> dict:
        return asdict(self.state)

    @classmethod
    def from_state(cls, num_rows: int, seed: int, shuffle: bool, state: dict) -> EpochSampler:
        return cls(num_rows, seed, shuffle, SamplerState(**state))
