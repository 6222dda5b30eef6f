"""`TrajectoryBatch`: the one batch type of an RL step.

Built once from the agent loop's trajectories (token ids as generated, never re-tokenized); each
stage adds its fields: rewards, old / reference log-probs, values, advantages. Token tensors are
[B, S-1], aligned with the *labels* (position t predicts token t+1), so `mask[i, t] = 1` marks a
model-generated response token that is trained on; prompt tokens, tool observations and padding
are 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TrajectoryBatch:
    tokens: torch.Tensor             # [B, S] prompt + response, right-padded with pad_id
    mask: torch.Tensor               # [B, S-1] 1 = trained response token (label position)
    rollout_logp: torch.Tensor       # [B, S-1] engine log-probs of the labels (0 off-mask)
    group_ids: torch.Tensor          # [B] prompt index within the step (GRPO groups)
    prompt_lengths: list[int]
    response_lengths: list[int]
    weight_versions: list[int]
    scores: torch.Tensor | None = None              # [B] scalar reward
    components: list[dict] = field(default_factory=list)
    reward_failed: list[bool] = field(default_factory=list)
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def from_trajectories(cls, trajectories: list, group_ids: list[int], pad_id: int,
                          multiple: int = 1) -> TrajectoryBatch:
        """Pad every sample to the longest (rounded up so S-1 is a multiple of `multiple`: TP
        sequence-parallel and context-parallel splits)."""
        longest = max(t.total_tokens for t in trajectories)
        inputs = -(-(longest - 1) // multiple) * multiple
        s = inputs + 1
        b = len(trajectories)
        tokens = torch.full((b, s), pad_id, dtype=torch.long)
        mask = torch.zeros((b, s - 1), dtype=torch.float32)
        rollout = torch.zeros((b, s - 1), dtype=torch.float32)
        versions = []
        for i, t in enumerate(trajectories):
            ids = t.prompt_ids + t.response_ids
            tokens[i, :len(ids)] = torch.tensor(ids)
            p, r = len(t.prompt_ids), len(t.response_ids)
            # response token j sits at position p + j; it is the label of position p + j - 1
            mask[i, p - 1:p - 1 + r] = torch.tensor(t.loss_mask, dtype=torch.float32)
            rollout[i, p - 1:p - 1 + r] = torch.tensor(t.rollout_logprobs, dtype=torch.float32)
            versions.append(min(t.weight_versions) if t.weight_versions else -1)
        rollout *= mask
        return cls(tokens, mask, rollout, torch.tensor(group_ids), [len(t.prompt_ids) for t in trajectories],
                   [len(t.response_ids) for t in trajectories], versions)

    def tensors(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The named per-sample tensors (what a worker needs), skipping unset ones."""
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
