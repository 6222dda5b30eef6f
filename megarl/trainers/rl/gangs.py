"""The driver's handles on its processes: `Gang` (the Ray actors of one megatron model: actor,
reference, critic or reward model), `WeightSync` (the actor's senders and the fleet's engines in
one sync group), and the rollout fleet's construction.

Everything that crosses into a gang is a dict of CPU tensors; what comes back is gathered from
each data-parallel replica's reporting rank (`megarl.workers.wire`).
"""

from __future__ import annotations

import os
import socket
import time

import torch

from megarl.config.recipe import Recipe
from megarl.trainers.common import has_hf_weights

TAG = "rl"
ENGINE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class WorkerLost(RuntimeError):
    """A megatron worker process died; the gang cannot continue without it."""


def start_ray() -> None:
    """Join the cluster `megarl launch` brought up (RAY_ADDRESS), else start a private local one
    with logical CPUs >= actors (each worker sets its own thread count)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, configure_logging=False)
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True,
                 configure_logging=False)


class Gang:
    """The Ray actors of one megatron model group; `call` runs a method on every rank."""

    def __init__(self, recipe: Recipe, init_ckpt: str, role: str, threads: int):
        import ray

        from megarl.workers import worker_class

        world = recipe.derived.train_world_size
        port = _free_port()
        cls = ray.remote(num_cpus=0)(worker_class(role))  # logical 0: CPU threads are set explicitly
        self.role = role
        self.workers = [cls.remote(recipe, init_ckpt, role, r, world, "127.0.0.1", port, threads)
                        for r in range(world)]
        threads = sorted({c["threads"] for c in self.call("coords")})  # up and built (or this raises)
        print(f"[{TAG}] {role}: {world} rank(s), {'/'.join(map(str, threads))} torch thread(s) each", flush=True)

    def call(self, method: str, *args, **kwargs) -> list:
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(self.call_async(method, *args, **kwargs))
        except RayActorError as e:
            raise WorkerLost(f"a {self.role} worker died during {method}: {str(e).splitlines()[0]}. Restart the "
                             "run: with trainer.resume=auto it continues from the last checkpoint") from None

    def call_async(self, method: str, *args, **kwargs) -> list:
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def gather(self, method: str, *args) -> dict[str, torch.Tensor]:
        """Per-sample tensors from the reporting rank of each data-parallel replica, in row order."""
        from megarl.workers.wire import gather_shares

        return gather_shares(self.call(method, *args))

    def logprobs(self, batch: dict, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        return self.gather("compute_logprobs", batch, with_entropy)

    def reward_scorer(self, dp: int):
        """`RewardEngine`'s rm_scorer: token sequences -> reward-model scores, the list padded with
        copies to a multiple of the data-parallel size (each replica scores an equal share)."""
        def scorer(sequences: list[list[int]]) -> list[float]:
            pad = (-len(sequences)) % dp
            return self.gather("score", list(sequences) + [sequences[0]] * pad)["scores"][:len(sequences)].tolist()

        return scorer

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)


class WeightSync:
    """The actor gang's senders and the fleet's engines joined in one sync group (megarl.sync)."""

    def __init__(self, recipe: Recipe, actor: Gang, fleet, hf_cfg: dict):
        from megarl.sync.choice import resolve_transport
        from megarl.sync.plan import EngineLayout, WeightSyncPlan
        from megarl.sync.transport import Rendezvous

        ro = recipe.rollout
        self.plan = WeightSyncPlan.build(recipe.parallel, EngineLayout(ro.engines, ro.engine_tp),
                                         hf_cfg["model_type"], hf_cfg, bucket_bytes=ro.weight_sync.bucket_mb << 20,
                                         dtype=ENGINE_DTYPES[recipe.model.dtype], quantization=ro.quantization,
                                         transport=resolve_transport(recipe))
        self.actor, self.fleet, self.config = actor, fleet, ro.weight_sync
        self.generation = 0
        port = actor.call("sync_open_store", "127.0.0.1", ro.weight_sync.timeout_s)[0]
        self.rendezvous = Rendezvous("127.0.0.1", port, timeout_s=ro.weight_sync.timeout_s)
        self._join()
        print(f"[{TAG}] {self.plan.summary()}", flush=True)

    def _join(self) -> None:
        import ray

        engines = self.fleet.join_weight_sync_async(self.plan, self.rendezvous, self.generation)
        senders = self.actor.call_async("sync_join", self.plan, self.rendezvous, self.generation)
        ray.get(senders + engines)

    def push(self, version: int, verify_tokens: list[list[int]] | None = None) -> dict:
        """Send the actor's weights as `version` to every engine (and verify log-probs if asked)."""
        t0 = time.perf_counter()
        receives = self.fleet.receive_weights_async(version)
        send_stats = self._send(receives, version)
        recv_stats = self.fleet.finish_receive(receives, version)
        out = {"sync/seconds": time.perf_counter() - t0, "sync/bytes": float(self.plan.total_bytes),
               "sync/buckets": float(len(self.plan.buckets)),
               "sync/engine_load_s": max(s["load_seconds"] for s in recv_stats),
               "sync/sender_gather_s": max(s["gather_seconds"] for s in send_stats)}
        if self.config.verify_logprobs and verify_tokens:
            out["sync/verify_max_diff"] = self.verify(verify_tokens)
        return out

    def _send(self, receives: list, version: int) -> list[dict]:
        import ray

        from megarl.rollout.fleet import EngineLost
        from megarl.sync.transport import WeightSyncError

        try:
            return ray.get(self.actor.call_async("sync_send", version))
        except ray.exceptions.RayActorError as e:
            raise WorkerLost(f"an actor worker died during the weight sync: {str(e).splitlines()[0]}") from None
        except Exception as e:  # noqa: BLE001 - a sender's transport error usually means an engine went away
            try:
                self.fleet.finish_receive(receives, version)
            except EngineLost:
                raise
            except Exception:  # noqa: BLE001 - the engines' own failure adds nothing to the sender's
                pass
            raise WeightSyncError(f"the weight sync to version {version} failed on the trainer side: "
                                  f"{str(e).strip().splitlines()[-1]}") from None

    def verify(self, seqs: list[list[int]]) -> float:
        from megarl.sync.verify import compare_logprobs

        tokens = torch.tensor(seqs)
        batch = {"tokens": tokens, "mask": torch.ones(len(seqs), tokens.shape[1] - 1)}
        trainer = self.actor.logprobs(batch)["logp"].tolist()
        return compare_logprobs(trainer, self.fleet.prompt_logprobs(seqs), self.config.logprob_tolerance)


def build_fleet(recipe: Recipe, engine_dir: str):
    """The rollout engines, sized so a whole multi-turn conversation fits one context."""
    from megarl.data.tokenizer import tokenizer_dir
    from megarl.rollout.engine import EngineConfig
    from megarl.rollout.fleet import RolloutFleet

    ro, mt = recipe.rollout, recipe.rollout.multi_turn
    max_len = ro.max_prompt_length + ro.max_response_length + (mt.max_tool_output_tokens * mt.max_turns if mt else 0)
    config = EngineConfig(engine_dir, tokenizer=tokenizer_dir(recipe.model, engine_dir),
                          trust_remote_code=recipe.model.trust_remote_code, dtype=ENGINE_DTYPES[recipe.model.dtype],
                          max_model_len=max_len, tensor_parallel_size=ro.engine_tp, kv_cache_bytes=ro.kv_cache_bytes,
                          gpu_memory_utilization=ro.gpu_memory_utilization, seed=recipe.trainer.seed,
                          quantization=ro.quantization)
    return RolloutFleet(config, ro.engines)


def engine_model_dir(recipe: Recipe, init_ckpt: str) -> str:
    """An HF directory with weights for the engines to start from (the weights are replaced by
    the first sync anyway; the engine needs a complete model to build itself)."""
    if has_hf_weights(recipe.model.path):
        return recipe.model.path
    from megarl.checkpoint.hf import convert_megatron_to_hf
    from megarl.runtime.local_group import run_local_group

    out = os.path.join(recipe.trainer.output_dir, "engine_init")
    if not has_hf_weights(out):
        run_local_group(convert_megatron_to_hf, 1, args=(init_ckpt, out, 1 << 30, recipe.model.tokenizer), timeout=3600)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
