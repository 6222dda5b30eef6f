"""`ActorWorker`: one megatron rank of the trainable policy. It computes the old log-probs
(and entropy) of a batch, runs the policy updates and sends its weights to the rollout engines.

    compute_logprobs(batch, with_entropy)   wire share of per-token log-probs (megarl.workers.wire)
    update(batch, minibatches, kl_coef)     ppo_epochs × mini-batches of policy-loss updates -> metrics;
                                            a batch without old_logp (exactly on-policy) takes them from
                                            the update's own forward (`on_policy_inputs`)
    sync_open_store / sync_join / sync_send the weight sync sender (megarl.sync)

The objective is `megarl.algorithms.policy_loss.policy_loss` (a pure tensor function); the
per-token aggregation weights come from the driver, so every aggregation mode is exact however
a mini-batch is cut into micro-batches and data-parallel shares.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from megarl.algorithms.correction import MISMATCH_KEYS
from megarl.algorithms.policy_loss import (
    METRIC_SUMS,
    ON_POLICY_SUMS,
    PolicyLossConfig,
    on_policy_inputs,
    policy_loss,
)
from megarl.workers.base import TrainableRank


class ActorWorker(TrainableRank):
    def _setup(self) -> None:
        super()._setup()
        self.sender = None
        self._store = None

    def compute_logprobs(self, batch: dict, with_entropy: bool = False) -> bytes | None:
        """Wire share (dp rank, {"logp": [rows, S-1], "entropy": ..., "seconds"}) on the reporting
        rank of each DP replica, None elsewhere (`megarl.workers.wire.gather_shares` joins them)."""
        return self._logprobs(batch, with_entropy)

    def update(self, batch: dict, minibatches: int, kl_coef: float = 0.0) -> dict:
        """ppo_epochs × `minibatches` optimizer updates over the batch (rows already shuffled by the
        driver); returns the averaged metrics (identical on every rank)."""
        a = self.recipe.algorithm
        t0 = time.perf_counter()
        on_policy = "old_logp" not in batch  # the update's own forward gives the old log-probs
        names = METRIC_SUMS + (ON_POLICY_SUMS if on_policy else ())
        step = partial(_policy_forward_step, cfg=PolicyLossConfig.from_algorithm(a),
                       temperature=self.recipe.rollout.temperature, kl_coef=kl_coef)
        shared, grad_norms = self._optimize(batch, minibatches, step, len(names), "policy")
        s = dict(zip(names, (float(x) for x in shared)))
        count = max(s["tokens"], 1.0)
        out = {"actor/pg_loss": s["pg_loss"] / count, "actor/clip_frac": s["clip_frac"] / count,
               "actor/approx_kl": s["approx_kl"] / count,
               "actor/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
               "actor/lr": self.optimizer.param_groups[0]["lr"], "actor/updates": float(len(grad_norms)),
               "timing/update_compute_s": time.perf_counter() - t0}
        if "ref_logp" in batch:
            out["actor/kl_ref"] = s["kl_ref"] / count
        if a.entropy_coef > 0:  # computed in the loss only when it is part of it
            out["actor/entropy"] = s["entropy"] / count
        if on_policy:  # what the skipped old-log-prob pass would have reported
            out.update({key: s[name] / count for name, key in MISMATCH_KEYS.items()})
            out["actor/entropy_rollout"] = s["entropy_rollout"] / count
        return out

    # ---- weight sync (megarl.sync) ------------------------------------------------------------
    def sync_open_store(self, timeout_s: float = 600.0) -> tuple[str, int] | None:
        """Rank 0 (always sender 0) hosts the sync group's rendezvous store on its node's routable
        address; returns (address, port), the port bound before it is published."""
        import ray

        from megarl.runtime.rendezvous import open_store

        if self.rank != 0:
            return None
        host = ray.util.get_node_ip_address()
        self._store, port = open_store(host, 0, timeout_s)
        return host, port

    def sync_join(self, plan, rendezvous, generation: int = 0) -> None:
        from megarl.sync.sender import WeightSender

        self.sender = WeightSender(plan, self.models)
        self.sender.join(rendezvous, store=self._store if self.rank == 0 else None, generation=generation)

    def sync_send(self, version: int) -> dict:
        return self.sender.send(version)


def _policy_forward_step(data_iterator, model, cfg: PolicyLossConfig, temperature: float, kl_coef: float,
                         sink: list):
    """Megatron forward step: the policy objective of one micro-batch as (Σ w·ℓ, Σ mask) for the
    per-token loss mode; its metric sums go to `sink`."""
    from megarl.models.logprobs import token_entropy, token_logprobs

    mb = next(data_iterator)
    logits = model(mb["tokens"], mb["position_ids"], None)

    def loss_func(output):
        logp = token_logprobs(output, mb["labels"], temperature)
        entropy = token_entropy(output, temperature) if cfg.entropy_coef > 0 else None
        old_logp, is_weight, extra = mb.get("old_logp"), mb.get("is_weight"), None
        if old_logp is None:  # exactly on-policy: this forward is the old policy's
            if entropy is None:
                with torch.no_grad():
                    entropy = token_entropy(output, temperature)
            old_logp, is_weight, extra = on_policy_inputs(logp, mb["rollout_logp"], mb["mask"], entropy, cfg)
        loss_sum, count, sums = policy_loss(logp, old_logp, mb["advantages"], mb["mask"], mb["loss_weight"],
                                            cfg, is_weight=is_weight, ref_logp=mb.get("ref_logp"),
                                            kl_coef=kl_coef, entropy=entropy)
        sink.append(sums if extra is None else torch.cat([sums, extra]))
        return loss_sum, count.to(torch.int), {"loss_sum_count": torch.stack([loss_sum.detach(), count])}

    return logits, loss_func
