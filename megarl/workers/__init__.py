"""Megatron ranks as Ray actor bodies, one class per role (`worker_class`):

- actor      `ActorWorker`        trainable policy: log-probs, policy updates, weight-sync sender
- reference  `ReferenceWorker`    frozen policy: log-probs
- critic     `CriticWorker`       trainable value head: values, value updates
- reward_model `RewardModelWorker` frozen scalar head: sequence scores

All build on `megarl.workers.base.MegatronRank`; results travel to the driver as `megarl.workers.wire`
shares. Importing this package is cheap (the role classes load on `worker_class`).
"""

from __future__ import annotations

ACTOR, REFERENCE, CRITIC, REWARD_MODEL = "actor", "reference", "critic", "reward_model"
ROLES = (ACTOR, REFERENCE, CRITIC, REWARD_MODEL)
"""The gang roles; `megarl.launch.placement` gives each its slots under the same names."""


def worker_class(role: str) -> type:
    """The Ray actor body for a megatron gang of `role` (one of ROLES)."""
    if role == ACTOR:
        from megarl.workers.actor import ActorWorker

        return ActorWorker
    if role == CRITIC:
        from megarl.workers.critic import CriticWorker

        return CriticWorker
    if role == REFERENCE:
        from megarl.workers.scorer import ReferenceWorker

        return ReferenceWorker
    if role == REWARD_MODEL:
        from megarl.workers.scorer import RewardModelWorker

        return RewardModelWorker
    raise KeyError(f"unknown worker role {role!r}; valid: {', '.join(ROLES)}")
