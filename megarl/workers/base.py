"""`MegatronRank`: one megatron rank as the body of a Ray actor, and `TrainableRank`, one that
also holds an optimizer and its LR schedule. The role classes (actor, critic, reference, reward
model) add their methods on top.

The driver starts one actor per rank (together they are a torch.distributed gang with megatron's
TP/PP/DP groups) and calls the same method on every rank. A call that fails raises `WorkerError`
with the remote traceback as text, for every public method of every subclass.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
import traceback
from datetime import timedelta
from functools import partial

import torch

from megarl.workers.wire import encode_share

BATCH_FIELDS = ("tokens", "mask", "old_logp", "rollout_logp", "ref_logp", "advantages", "is_weight", "loss_weight",
                "values", "returns")


GANG_TIMEOUT_S = 600.0  # a rank that does not join (or answer a collective) within this fails the gang


def _ray_gpu_ids() -> list[str]:
    import ray

    return [str(g) for g in ray.get_gpu_ids()]


class WorkerError(RuntimeError):
    """A worker method failed; carries the remote traceback as text (the driver process never
    imports megatron, so megatron exception types must not travel back)."""


def _plain(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        from megarl.runtime.strict_device import check_host, discipline

        try:
            with discipline():   # strict device mode (tests): per call, the mode is per thread
                return check_host(fn(*args, **kwargs), fn.__qualname__)
        except WorkerError:
            raise  # already converted (an overriding method called the base one)
        except Exception:  # noqa: BLE001 - converted, not swallowed
            raise WorkerError(traceback.format_exc()) from None

    inner.__plain_errors__ = True
    return inner


def _plain_errors(cls):
    """Re-raise the exceptions of every public method defined in `cls` as WorkerError(traceback)."""
    for name, fn in list(vars(cls).items()):
        if inspect.isfunction(fn) and not name.startswith("_") and not getattr(fn, "__plain_errors__", False):
            setattr(cls, name, _plain(fn))
    return cls


class MegatronRank:
    """One rank of a megatron model group: builds the model from a converted checkpoint, knows where
    it sits (coords, reporting rank, its data-parallel rows), cuts micro-batches, saves and loads.

    Subclasses' public methods are wrapped by `_plain_errors` (see `__init_subclass__`)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _plain_errors(cls)

    def __init__(self, recipe, init_ckpt: str, role: str, rank: int, world: int, threads: int = 1,
                 local_rank: int = 0):
        """Cheap: the gang meets in `build`, after rank 0 has bound its store (`rendezvous`)."""
        from megarl.runtime.device import pin_to_slot

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
        pin_to_slot()
        torch.set_num_threads(threads)
        self.recipe, self.role, self.rank, self.world, self.init_ckpt = recipe, role, rank, world, init_ckpt
        self._gang_store = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: host the gang's store on this node's routable address and return (address, port).
        The port is bound here (port 0) and only then published, so no other process can take it."""
        import ray

        from megarl.runtime.rendezvous import open_store

        host = ray.util.get_node_ip_address()
        self._gang_store, port = open_store(host, 0, GANG_TIMEOUT_S)
        return host, port

    def build(self, host: str, port: int) -> dict:
        """Join the gang's process group through rank 0's store, then build the model; returns coords."""
        import torch.distributed as dist

        from megarl.runtime import cpu_compat

        cpu_compat.install()
        from megarl.checkpoint.hf import load_converted
        from megarl.models.hf_config import BuildOptions
        from megarl.runtime.device import DEVICE_INDEX_ENV, select_device
        from megarl.runtime.rendezvous import Rendezvous

        os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port))  # for anything that reads them
        if _ray_gpu_ids():  # Ray shows this process only the GPU(s) it assigned: the first is ours
            os.environ[DEVICE_INDEX_ENV] = "0"
        device = select_device(self.recipe.cluster.device)
        store = self._gang_store or Rendezvous(host, port, GANG_TIMEOUT_S).connect()
        dist.init_process_group(device.backend, store=store, rank=self.rank, world_size=self.world,
                                timeout=timedelta(seconds=GANG_TIMEOUT_S))
        options = BuildOptions.from_recipe(self.recipe.model, device)
        chunks, config, _ = load_converted(self.init_ckpt, self.recipe.parallel, seed=self.recipe.trainer.seed,
                                           options=options, dtype=self.recipe.model.dtype)
        self.config = config
        self.transformer_impl = options.transformer_impl   # the weight sync plan names its parameters
        self.models = chunks
        self.optimizer = self.scheduler = None
        self._setup()
        return self.coords()

    def placement(self) -> dict:
        """Where Ray put this process: node address and name, LOCAL_RANK, the accelerators Ray
        assigned and what the process sees of them (checked by the driver against its map)."""
        import socket

        import ray

        gpu_ids = _ray_gpu_ids()
        return {"rank": self.rank, "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "local_rank": int(os.environ["LOCAL_RANK"]), "gpu_ids": gpu_ids,
                "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "cores": sorted(os.sched_getaffinity(0))}

    def _setup(self) -> None:
        """Role-specific state once the model is built (nothing for a frozen rank)."""

    # ---- where this rank sits ------------------------------------------------------------------
    def coords(self) -> dict:
        from megarl.runtime.megatron import parallel_state as ps

        return {"rank": self.rank, "dp": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size(),
                "tp": ps.get_tensor_model_parallel_rank(), "cp": ps.get_context_parallel_rank(),
                "last_stage": ps.is_pipeline_last_stage(ignore_virtual=True), "threads": torch.get_num_threads(),
                "transformer_impl": self.transformer_impl}

    def _reporter(self) -> bool:
        c = self.coords()
        return c["last_stage"] and c["tp"] == 0 and c["cp"] == 0

    def _share(self, tensors: dict) -> bytes | None:
        """`tensors` as this replica's wire share on its reporting rank; None elsewhere."""
        return encode_share(self.coords()["dp"], tensors) if self._reporter() else None

    def _from_reporter(self, sums: torch.Tensor) -> torch.Tensor:
        """The metric sums of the reporting rank of data-parallel replica 0 (already reduced over
        DP on the last stage), on every rank of the gang."""
        from megarl.models.train import sums_from_reporter

        return sums_from_reporter(sums)

    def _microbatches(self, batch: dict, micro: int) -> list[dict]:
        """`batch` (this replica's share) as micro-batches of `micro` samples on the device: tokens/labels
        shifted by one, position ids, and every other known per-sample field."""
        from megarl.runtime.device import to_device

        tokens = batch["tokens"]
        s = tokens.shape[1] - 1
        out = []
        for i in range(0, tokens.shape[0], micro):
            mb = {"tokens": tokens[i:i + micro, :-1].contiguous(), "labels": tokens[i:i + micro, 1:].contiguous(),
                  "position_ids": torch.arange(s).expand(min(micro, tokens.shape[0] - i), s).contiguous()}
            for name in BATCH_FIELDS[1:]:
                if name in batch:
                    mb[name] = batch[name][i:i + micro].contiguous()
            out.append(to_device(mb))
        return out

    # ---- forward-only passes ------------------------------------------------------------------
    def _forward_only(self, batch: dict, forward_step) -> list:
        """Run `forward_step(data_iterator, model, sink=..., per_token_mode=...)` over this replica's
        share without gradients; returns what it appended to the sink (last pipeline stage only)."""
        from megarl.models.train import TrainState, run_schedule

        micro = self._microbatches(batch, self.recipe.trainer.micro_batch_per_rank)
        collected: list = []
        step = partial(forward_step, sink=collected, per_token_mode=self.config.calculate_per_token_loss)
        with torch.no_grad():
            run_schedule(TrainState(self.models, self.optimizer, self.config), micro, micro[0]["tokens"].shape[1],
                         forward_only=True, forward_step=step)
        return collected

    def _logprobs(self, batch: dict, with_entropy: bool) -> bytes | None:
        """Wire share (dp rank, {"logp": [rows, S-1], "entropy"?, "seconds"}) of the per-token
        log-probs (and entropy) of the labels at the rollout temperature; None off the reporter."""
        t0 = time.perf_counter()
        step = partial(_logprob_forward_step, temperature=self.recipe.rollout.temperature, with_entropy=with_entropy)
        collected = self._forward_only(batch, step)
        if not self._reporter():
            return None
        out = {"logp": torch.cat([c["logp"] for c in collected]), "seconds": time.perf_counter() - t0}
        if with_entropy:
            out["entropy"] = torch.cat([c["entropy"] for c in collected])
        return self._share(out)

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, path: str, driver_state: dict, driver_files: dict | None = None) -> None:
        """Dist checkpoint of the model (and optimizer) + this rank's extra state: the driver's,
        the LR schedule's and the RNG's; the starting model's HF files travel along, and so do
        `driver_files` ({name: object ref of bytes}, written by rank 0 under driver/: fetched by
        that rank only, covered by the manifest)."""
        import shutil

        import torch.distributed as dist

        from megarl.checkpoint.dist import save_sharded
        from megarl.checkpoint.hf import MARKER
        from megarl.runtime.seed import rng_state

        init = self.init_ckpt

        def finish(tmp):
            shutil.copytree(os.path.join(init, "hf"), os.path.join(tmp, "hf"), dirs_exist_ok=True)
            shutil.copy(os.path.join(init, MARKER), os.path.join(tmp, MARKER))
            if driver_files:
                import ray

                os.makedirs(os.path.join(tmp, "driver"), exist_ok=True)
                for name, ref in driver_files.items():
                    with open(os.path.join(tmp, "driver", name), "wb") as f:
                        f.write(ray.get(ref))

        extra = {"driver": driver_state, "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                 "rng": rng_state(), "rank": dist.get_rank()}
        save_sharded(self.models, path, self.optimizer, extra, finish)

    def load(self, path: str) -> dict:
        """Restore what `save` wrote; returns the driver state."""
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

    # ---- colocated hand-off (workers/offload.py) ----------------------------------------------------
    def offload(self) -> int:
        """Model (and optimizer) storages to host memory, the device's freed; returns the bytes."""
        from megarl.workers.offload import offload

        self._offloaded = offload(self.models, self.optimizer)
        return self._offloaded.nbytes

    def reload(self) -> int:
        """Back on the device, bitwise; returns the bytes."""
        held, self._offloaded = getattr(self, "_offloaded", None), None
        return held.restore() if held is not None else 0

    def pid(self) -> int:
        return os.getpid()


_plain_errors(MegatronRank)


class TrainableRank(MegatronRank):
    """A rank with an optimizer (megatron DDP + Adam, per-token loss mode) and its LR schedule."""

    def _learning_rate(self) -> float:
        return self.recipe.optim.lr

    def _setup(self) -> None:
        from megarl.models.optim import lr_scheduler, optimizer_config
        from megarl.models.train import wrap_for_training

        o = self.recipe.optim
        self.config.calculate_per_token_loss = True
        state = wrap_for_training(self.models, self.config, optimizer_config(self.recipe, self._learning_rate()),
                                  distributed_optimizer=o.distributed_optimizer)
        self.models, self.optimizer = state.models, state.optimizer
        self.scheduler = lr_scheduler(self.optimizer, self.recipe, self.recipe.trainer.steps or 1)

    def _optimize(self, batch: dict, minibatches: int, forward_step, width: int,
                  what: str) -> tuple[torch.Tensor, list[float]]:
        """ppo_epochs × `minibatches` optimizer updates over this replica's share of the batch (rows
        shuffled by the driver; the share holds its part of each mini-batch, in order, so cutting
        it with `minibatch_slices` gives this replica's part of each update), then one step of the
        LR schedule.
        `forward_step(data_iterator, model, sink)` appends a float64 [width] tensor of metric sums per
        micro-batch. Returns (the sums over all updates, reduced over DP, identical on every rank;
        each update's grad norm)."""
        import torch.distributed as dist

        from megarl.algorithms.policy_loss import minibatch_slices
        from megarl.models.train import TrainState, optimizer_update, run_schedule
        from megarl.runtime.device import current
        from megarl.runtime.megatron import parallel_state as ps

        state = TrainState(self.models, self.optimizer, self.config)
        totals = torch.zeros(width, dtype=torch.float64, device=current())
        grad_norms: list[float] = []
        for _ in range(self.recipe.algorithm.ppo_epochs):
            for rows in minibatch_slices(batch["tokens"].shape[0], minibatches):
                mini = {k: v[rows] for k, v in batch.items()}
                micro = self._microbatches(mini, self.recipe.trainer.micro_batch_per_rank)
                sums: list[torch.Tensor] = []
                run_schedule(state, micro, micro[0]["tokens"].shape[1], forward_step=partial(forward_step, sink=sums))
                grad_norms.append(optimizer_update(state, what))
                local = torch.stack(sums).sum(0) if sums else torch.zeros(width, dtype=torch.float64, device=current())
                if ps.is_pipeline_last_stage(ignore_virtual=True):
                    dist.all_reduce(local, group=ps.get_data_parallel_group())
                totals += local
        # the LR schedule counts RL steps (trainer.steps, optim.warmup_steps), not optimizer updates
        self.scheduler.step(increment=1)
        return self._from_reporter(totals), grad_norms


# ---- forward steps for megatron's schedule ---------------------------------------------------------
def forward_only_loss(output: torch.Tensor, per_token_mode: bool):
    """The loss-function result of a forward-only pass: zero, in the shape megatron's schedule
    expects for the model's loss mode."""
    zero = output.sum() * 0.0
    report = {"loss_sum_count": torch.zeros(2, device=output.device)}
    return (zero, torch.ones((), dtype=torch.int, device=output.device), report) if per_token_mode else (zero, report)


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
        return forward_only_loss(output, per_token_mode)

    return logits, collect
