"""`PolicyWorker`: one megatron rank of the actor (trainable), the reference (frozen), the PPO
critic (trainable, value head) or a reward model (frozen, scalar head).

The driver starts one per rank (a Ray actor each; together they are a torch.distributed gang
with megatron's TP/PP/DP groups) and calls the same method on every rank of the gang:

    compute_logprobs(batch)  per-token log-probs (and entropy) of the labels, at the rollout temperature
    score(sequences)         reward-model scores (value at each sequence's last token)
    update(batch)            ppo_epochs × mini-batches of policy-loss updates -> metrics
    sync_*                   the weight sync sender (megarl.sync) towards the rollout engines
    save / load              dist checkpoint + this rank's extra state (scheduler, RNG, driver state)

The loss is built from the algorithm registries (`POLICY_LOSSES`, `token_kl`); per-token
aggregation weights come from the driver, so every aggregation mode is exact however the
mini-batch is cut into micro-batches and data-parallel shares (megatron's per-token loss mode
divides by the mini-batch's token count across all ranks).
"""

from __future__ import annotations

import os
import time
from functools import partial

import torch

ACTOR, REFERENCE, CRITIC, REWARD = "actor", "reference", "critic", "reward"
RM_CHUNK = 16  # sequences per reward-model forward
BATCH_FIELDS = ("tokens", "mask", "old_logp", "ref_logp", "advantages", "is_weight", "loss_weight", "values",
                "returns")


class WorkerError(RuntimeError):
    """A worker method failed; carries the remote traceback as text (the driver process never
    imports megatron, so megatron exception types must not travel back)."""


def _plain_errors(cls):
    """Re-raise every public method's exception as WorkerError(traceback text)."""
    import functools
    import traceback

    for name, fn in list(vars(cls).items()):
        if callable(fn) and not name.startswith("_"):
            def wrap(f):
                @functools.wraps(f)
                def inner(*args, **kwargs):
                    try:
                        return f(*args, **kwargs)
                    except Exception:  # noqa: BLE001 - converted, not swallowed
                        raise WorkerError(traceback.format_exc()) from None
                return inner
            setattr(cls, name, wrap(fn))
    return cls


@_plain_errors
class PolicyWorker:
    def __init__(self, recipe, init_ckpt: str, role: str, rank: int, world: int, master_addr: str,
                 master_port: int, threads: int = 1):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        torch.set_num_threads(threads)
        from megarl.runtime import cpu_compat

        cpu_compat.install()
        from megarl.checkpoint.hf import load_converted
        from megarl.models.hf_config import BuildOptions
        from megarl.runtime.device import select_device

        self.recipe, self.role, self.rank, self.init_ckpt = recipe, role, rank, init_ckpt
        options = BuildOptions.from_recipe(recipe.model, select_device(recipe.cluster.device))
        chunks, config, _ = load_converted(init_ckpt, recipe.parallel, seed=recipe.trainer.seed, options=options,
                                           dtype=recipe.model.dtype)
        self.config = config
        self.models = chunks
        self.optimizer = self.scheduler = None
        if role in (ACTOR, CRITIC):
            self._make_trainable(chunks, config)
        self.sender = None
        self._store = None

    def _make_trainable(self, chunks, config) -> None:
        from megarl.models.train import wrap_for_training
        from megarl.trainers.common import lr_scheduler, optimizer_config

        o = self.recipe.optim
        config.calculate_per_token_loss = True
        lr = (o.critic_lr or o.lr) if self.role == CRITIC else o.lr
        state = wrap_for_training(chunks, config, optimizer_config(self.recipe, lr),
                                  distributed_optimizer=o.distributed_optimizer)
        self.models, self.optimizer = state.models, state.optimizer
        self.scheduler = lr_scheduler(self.optimizer, self.recipe, self.recipe.trainer.steps or 1)

    # ---- where this rank sits ------------------------------------------------------------------
    def coords(self) -> dict:
        from megatron.core import parallel_state as ps

        return {"rank": self.rank, "dp": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size(),
                "tp": ps.get_tensor_model_parallel_rank(), "cp": ps.get_context_parallel_rank(),
                "last_stage": ps.is_pipeline_last_stage(ignore_virtual=True)}

    def _reporter(self) -> bool:
        c = self.coords()
        return c["last_stage"] and c["tp"] == 0 and c["cp"] == 0

    def _from_reporter(self, sums: torch.Tensor) -> torch.Tensor:
        """The metric sums of the reporting rank of data-parallel replica 0 (already reduced over
        DP on the last stage), on every rank of the gang."""
        from megarl.models.train import sums_from_reporter

        return sums_from_reporter(sums)

    def _my_rows(self, n: int) -> slice:
        from megatron.core import parallel_state as ps

        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if n % dp:
            raise ValueError(f"{n} samples do not split over {dp} data-parallel ranks")
        per = n // dp
        return slice(r * per, (r + 1) * per)

    def _microbatches(self, batch: dict, rows: slice, micro: int) -> list[dict]:
        tokens = batch["tokens"][rows]
        s = tokens.shape[1] - 1
        out = []
        for i in range(0, tokens.shape[0], micro):
            mb = {"tokens": tokens[i:i + micro, :-1].contiguous(), "labels": tokens[i:i + micro, 1:].contiguous(),
                  "position_ids": torch.arange(s).expand(min(micro, tokens.shape[0] - i), s).contiguous()}
            for name in BATCH_FIELDS[1:]:
                if name in batch:
                    mb[name] = batch[name][rows][i:i + micro].contiguous()
            out.append(mb)
        return out

    # ---- log-probs ----------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, batch: dict, with_entropy: bool = False) -> bytes | None:
        """torch.save bytes of (dp rank, {"logp": [rows, S-1], "entropy": ...}) on the reporting
        rank of each DP replica, None elsewhere. (Bytes, because importing megatron registers a
        storage reducer that would make plain pickles of these tensors unloadable in the driver.)"""
        from megarl.models.train import TrainState, run_schedule
        from megarl.runtime.local_group import to_bytes

        t0 = time.perf_counter()
        temperature = self.recipe.rollout.temperature
        rows = self._my_rows(batch["tokens"].shape[0])
        micro = self._microbatches(batch, rows, self.recipe.trainer.micro_batch_per_rank)
        collected: list[dict] = []
        step = partial(_logprob_forward_step, temperature=temperature, with_entropy=with_entropy,
                       per_token_mode=self.config.calculate_per_token_loss, sink=collected)
        state = TrainState(self.models, self.optimizer, self.config)
        run_schedule(state, micro, micro[0]["tokens"].shape[1], forward_only=True, forward_step=step)
        if not self._reporter():
            return None
        out = {"logp": torch.cat([c["logp"] for c in collected]), "seconds": time.perf_counter() - t0}
        if with_entropy:
            out["entropy"] = torch.cat([c["entropy"] for c in collected])
        return to_bytes((self.coords()["dp"], out))

    # ---- reward model ---------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> bytes | None:
        """torch.save bytes of (dp rank, {"scores": [rows], "seconds"}) for this replica's share of
        `sequences` (a multiple of the DP size), on its reporting rank; None elsewhere."""
        from megarl.reward.rm_scorer import score_sequences
        from megarl.runtime.local_group import to_bytes

        t0 = time.perf_counter()
        mine = sequences[self._my_rows(len(sequences))]
        scores = []
        for i in range(0, len(mine), RM_CHUNK):
            scores += score_sequences(self.models, mine[i:i + RM_CHUNK]) or []
        if not self._reporter():
            return None
        return to_bytes((self.coords()["dp"], {"scores": torch.tensor(scores, dtype=torch.float64),
                                               "seconds": time.perf_counter() - t0}))

    # ---- update -------------------------------------------------------------------------------
    def update(self, batch: dict, minibatches: int, kl_coef: float = 0.0) -> dict:
        """ppo_epochs × `minibatches` optimizer updates over the batch (rows already shuffled by the
        driver); returns the averaged metrics (identical on every rank)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megarl.models.train import TrainState, run_schedule

        a = self.recipe.algorithm
        n = batch["tokens"].shape[0]
        per = n // minibatches
        state = TrainState(self.models, self.optimizer, self.config)
        totals = torch.zeros(8, dtype=torch.float64)  # pg, count, clip, approx_kl, kl, entropy, grad_norm, updates
        t0 = time.perf_counter()
        for _ in range(a.ppo_epochs):
            for m in range(minibatches):
                mini = {k: v[m * per:(m + 1) * per] for k, v in batch.items()}
                rows = self._my_rows(per)
                micro = self._microbatches(mini, rows, self.recipe.trainer.micro_batch_per_rank)
                sums: list[torch.Tensor] = []
                step = partial(_policy_forward_step, recipe=self.recipe, kl_coef=kl_coef, sink=sums)
                run_schedule(state, micro, micro[0]["tokens"].shape[1], forward_step=step)
                ok, grad_norm, _ = self.optimizer.step()
                if not ok:
                    raise FloatingPointError("optimizer step skipped: non-finite gradients in the policy update")
                self.scheduler.step(increment=1)
                local = torch.stack(sums).sum(0) if sums else torch.zeros(6, dtype=torch.float64)
                if ps.is_pipeline_last_stage(ignore_virtual=True):
                    dist.all_reduce(local, group=ps.get_data_parallel_group())
                totals[:6] += local
                totals[6] += float(grad_norm)
                totals[7] += 1
        shared = self._from_reporter(totals[:6])
        count = max(float(shared[1]), 1.0)
        out = {"actor/pg_loss": float(shared[0]) / count, "actor/clip_frac": float(shared[2]) / count,
               "actor/approx_kl": float(shared[3]) / count, "actor/grad_norm": float(totals[6] / max(totals[7], 1)),
               "actor/lr": self.optimizer.param_groups[0]["lr"], "actor/updates": float(totals[7]),
               "timing/update_compute_s": time.perf_counter() - t0}
        if "ref_logp" in batch:
            out["actor/kl_ref"] = float(shared[4]) / count
        if a.entropy_coef > 0:  # computed in the loss only when it is part of it
            out["actor/entropy"] = float(shared[5]) / count
        return out

    # ---- critic ---------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_values(self, batch: dict) -> bytes | None:
        """torch.save bytes of (dp rank, {"values": [rows, S-1], "seconds"}): V(state at position t),
        aligned with the labels like the log-probs."""
        from megarl.models.train import TrainState, run_schedule
        from megarl.runtime.local_group import to_bytes

        t0 = time.perf_counter()
        rows = self._my_rows(batch["tokens"].shape[0])
        micro = self._microbatches(batch, rows, self.recipe.trainer.micro_batch_per_rank)
        collected: list[torch.Tensor] = []
        step = partial(_value_forward_step, sink=collected, per_token_mode=self.config.calculate_per_token_loss)
        run_schedule(TrainState(self.models, self.optimizer, self.config), micro, micro[0]["tokens"].shape[1],
                     forward_only=True, forward_step=step)
        if not self._reporter():
            return None
        return to_bytes((self.coords()["dp"], {"values": torch.cat(collected), "seconds": time.perf_counter() - t0}))

    def update_critic(self, batch: dict, minibatches: int) -> dict:
        """ppo_epochs × mini-batches of clipped value-loss updates (token-mean)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megarl.models.train import TrainState, run_schedule

        a = self.recipe.algorithm
        n = batch["tokens"].shape[0]
        per = n // minibatches
        state = TrainState(self.models, self.optimizer, self.config)
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, count, clip sum
        grad_norms = []
        for _ in range(a.ppo_epochs):
            for m in range(minibatches):
                mini = {k: v[m * per:(m + 1) * per] for k, v in batch.items()}
                micro = self._microbatches(mini, self._my_rows(per), self.recipe.trainer.micro_batch_per_rank)
                sums: list[torch.Tensor] = []
                run_schedule(state, micro, micro[0]["tokens"].shape[1],
                             forward_step=partial(_critic_forward_step, clip=a.value_clip, sink=sums))
                ok, grad_norm, _ = self.optimizer.step()
                if not ok:
                    raise FloatingPointError("optimizer step skipped: non-finite gradients in the critic update")
                self.scheduler.step(increment=1)
                grad_norms.append(float(grad_norm))
                local = torch.stack(sums).sum(0) if sums else torch.zeros(3, dtype=torch.float64)
                if ps.is_pipeline_last_stage(ignore_virtual=True):
                    dist.all_reduce(local, group=ps.get_data_parallel_group())
                totals += local
        shared = self._from_reporter(totals)
        count = max(float(shared[1]), 1.0)
        return {"critic/value_loss": float(shared[0]) / count, "critic/value_clip_frac": float(shared[2]) / count,
                "critic/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
                "critic/lr": self.optimizer.param_groups[0]["lr"]}

    # ---- weight sync (megarl.sync) ------------------------------------------------------------
    def sync_open_store(self, host: str = "127.0.0.1", timeout_s: float = 600.0) -> int | None:
        """Rank 0 (always sender 0) hosts the sync group's rendezvous store; returns its port."""
        from megarl.sync.transport import open_store

        if self.rank != 0:
            return None
        self._store, port = open_store(host, 0, timeout_s)
        return port

    def sync_join(self, plan, rendezvous, generation: int = 0) -> None:
        from megarl.sync.sender import WeightSender

        self.sender = WeightSender(plan, self.models)
        self.sender.join(rendezvous, store=self._store if self.rank == 0 else None, generation=generation)

    def sync_send(self, version: int) -> dict:
        return self.sender.send(version)

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, path: str, driver_state: dict) -> None:
        import shutil

        import torch.distributed as dist

        from megarl.checkpoint.dist import save_sharded
        from megarl.checkpoint.hf import MARKER
        from megarl.runtime.seed import rng_state

        init = self.init_ckpt

        def finish(tmp):
            shutil.copytree(os.path.join(init, "hf"), os.path.join(tmp, "hf"), dirs_exist_ok=True)
            shutil.copy(os.path.join(init, MARKER), os.path.join(tmp, MARKER))

        extra = {"driver": driver_state, "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                 "rng": rng_state(), "rank": dist.get_rank()}
        save_sharded(self.models, path, self.optimizer, extra, finish)

    def load(self, path: str) -> dict:
        import torch.distributed as dist

        from megarl.checkpoint.dist import load_extra, load_sharded
        from megarl.runtime.seed import set_rng_state

        load_sharded(self.models, path, self.optimizer)
        extra = load_extra(path) or {}
        if self.scheduler is not None and extra.get("scheduler"):
            self.scheduler.load_state_dict(extra["scheduler"])
        if extra.get("rank") == dist.get_rank():
            set_rng_state(extra["rng"])
        return extra.get("driver", {})

    def pid(self) -> int:
        return os.getpid()


# ---- forward steps for megatron's schedule ---------------------------------------------------------
def _logprob_forward_step(data_iterator, model, temperature: float, with_entropy: bool, per_token_mode: bool,
                          sink: list):
    from megarl.models.logprobs import token_entropy, token_logprobs

    mb = next(data_iterator)
    logits = model(mb["tokens"], mb["position_ids"], None)

    def collect(output):
        out = {"logp": token_logprobs(output, mb["labels"], temperature).detach()}
        if with_entropy:
            out["entropy"] = token_entropy(output, temperature).detach()
        sink.append(out)
        zero = output.sum() * 0.0
        report = {"loss_sum_count": torch.zeros(2)}
        return (zero, torch.tensor(1, dtype=torch.int), report) if per_token_mode else (zero, report)

    return logits, collect


def _value_forward_step(data_iterator, model, sink: list, per_token_mode: bool):
    mb = next(data_iterator)
    values = model(mb["tokens"], mb["position_ids"], None)

    def collect(output):
        sink.append(output.squeeze(-1).float().detach())
        zero = output.sum() * 0.0
        report = {"loss_sum_count": torch.zeros(2)}
        return (zero, torch.tensor(1, dtype=torch.int), report) if per_token_mode else (zero, report)

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
        sink.append(torch.tensor([float(loss_sum.detach()), n, float(m["value_clip_frac"]) * n], dtype=torch.float64))
        return loss_sum, count.to(torch.int), {"loss_sum_count": torch.stack([loss_sum.detach(), count])}

    return values, loss_func


def _policy_forward_step(data_iterator, model, recipe, kl_coef: float, sink: list):
    """Per-token policy loss: registry loss × rollout-correction weight, + KL to the reference
    (kl in loss) − entropy bonus; returned as (Σ w·ℓ, Σ mask) for megatron's per-token mode."""
    from megarl.algorithms.kl import token_kl
    from megarl.algorithms.losses import POLICY_LOSSES
    from megarl.models.logprobs import token_entropy, token_logprobs

    a = recipe.algorithm
    mb = next(data_iterator)
    logits = model(mb["tokens"], mb["position_ids"], None)

    def loss_func(output):
        mask = mb["mask"]
        logp = token_logprobs(output, mb["labels"], recipe.rollout.temperature)
        per_token, m = POLICY_LOSSES.get(a.policy_loss)(logp, mb["old_logp"], mb["advantages"], mask,
                                                         clip_low=a.clip_ratio_low, clip_high=a.clip_ratio_high,
                                                         **({"dual_clip": a.dual_clip} if a.policy_loss == "ppo"
                                                            else {}))
        if "is_weight" in mb:
            per_token = per_token * mb["is_weight"]
        total = per_token
        kl = torch.zeros_like(logp)
        if "ref_logp" in mb:
            kl = token_kl(logp, mb["ref_logp"], a.kl.estimator, a.kl.clamp)
            if kl_coef > 0 and a.kl.placement == "loss":
                total = total + kl_coef * kl
        entropy = None
        if a.entropy_coef > 0:
            entropy = token_entropy(output, recipe.rollout.temperature)
            total = total - a.entropy_coef * entropy
        weight = mb["loss_weight"]
        loss_sum = (total * weight).sum()
        count = mask.sum()
        n = float(count)
        ent_sum = float((entropy.detach() * mask).sum()) if entropy is not None else 0.0
        sink.append(torch.tensor([float((per_token.detach() * mask).sum()), n, float(m["clip_frac"]) * n,
                                  float(m.get("approx_kl", 0.0)) * n, float((kl.detach() * mask).sum()), ent_sum],
                                 dtype=torch.float64))
        return loss_sum, count.to(torch.int), {"loss_sum_count": torch.stack([loss_sum.detach(), count])}

    return logits, loss_func
