"""`CriticWorker`: one megatron rank of the PPO critic (a value head on the LM body, trainable).

    compute_values(batch)                wire share of V(state at position t), aligned with the labels
    update_critic(batch, minibatches)    ppo_epochs × mini-batches of clipped value-loss updates -> metrics
"""

from __future__ import annotations

import time
from functools import partial

import torch

from megarl.workers.base import TrainableRank, forward_only_loss


class CriticWorker(TrainableRank):
    def _learning_rate(self) -> float:
        o = self.recipe.optim
        return o.critic_lr or o.lr

    def compute_values(self, batch: dict) -> bytes | None:
        """Wire share (dp rank, {"values": [rows, S-1], "seconds"}): V(state at position t), aligned
        with the labels like the log-probs; None off the reporting rank."""
        t0 = time.perf_counter()
        collected = self._forward_only(batch, _value_forward_step)
        if not self._reporter():
            return None
        return self._share({"values": torch.cat(collected), "seconds": time.perf_counter() - t0})

    def update_critic(self, batch: dict, minibatches: int) -> dict:
        """ppo_epochs × mini-batches of clipped value-loss updates (token-mean)."""
        step = partial(_critic_forward_step, clip=self.recipe.algorithm.value_clip)
        shared, grad_norms = self._optimize(batch, minibatches, step, 3, "critic")  # loss sum, count, clip sum
        count = max(float(shared[1]), 1.0)
        return {"critic/value_loss": float(shared[0]) / count, "critic/value_clip_frac": float(shared[2]) / count,
                "critic/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
                "critic/lr": self.optimizer.param_groups[0]["lr"]}


def _value_forward_step(data_iterator, model, sink: list, per_token_mode: bool):
    mb = next(data_iterator)
    values = model(mb["tokens"], mb["position_ids"], None)

    def collect(output):
        sink.append(output.squeeze(-1).float().detach())
        return forward_only_loss(output, per_token_mode)

    return values, collect


def _critic_forward_step(data_iterator, model, clip: float | None, sink: list):
    from megarl.algorithms.losses import value_loss_per_token

    mb = next(data_iterator)
    values = model(mb["tokens"], mb["position_ids"], None)

    def loss_func(output):
        mask = mb["mask"]
        per_token, m = value_loss_per_token(output.squeeze(-1).float(), mb["values"], mb["returns"], mask, clip)
        loss_sum = (per_token * mask).sum()
        count = mask.sum()
        n = float(count)
        sink.append(torch.tensor([float(loss_sum.detach()), n, float(m["value_clip_frac"]) * n], dtype=torch.float64,
                                 device=output.device))
        return loss_sum, count.to(torch.int), {"loss_sum_count": torch.stack([loss_sum.detach(), count])}

    return values, loss_func
