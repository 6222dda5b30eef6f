"""The driver's handles on its processes: `Gang` (the Ray actors of one megatron model: actor,
reference, critic or reward model), `WeightSync` (the actor's senders and the fleet's engines in
one sync group), and the rollout fleet's construction.

Everything that crosses into a gang is a dict of CPU tensors; what comes back is gathered from
each data-parallel replica's reporting rank (`megarl.workers.wire`).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from megarl.config.recipe import Recipe
from megarl.launch.placement import PlacementError, PlacementMap, Slot
from megarl.trainers.common import has_hf_weights

TAG = "rl"
ENGINE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class WorkerLost(RuntimeError):
    """A megatron worker process died; the gang cannot continue without it."""


def start_ray(min_cpus: int = 0) -> None:
    """Join the cluster `megarl launch` brought up (RAY_ADDRESS), else start a private local one
    with at least `min_cpus` logical CPUs (a CPU slot is a logical CPU bundle; each worker sets its
    own thread count)."""
    import ray

    if ray.is_initialized():
        return
    # Every worker process silences third-party import noise before it imports megatron, as a
    # local-group rank does (runtime/quiet.py); the job's runtime env is the one place Ray offers.
    job_env = {"worker_process_setup_hook": "megarl.runtime.quiet.quiet_third_party"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, configure_logging=False, runtime_env=job_env)
    else:
        # No idle workers prestarted for the driver: every megarl actor asks for its own env (threads,
        # devices) so none could use them, and on a small machine their start (~0.5 s of CPU each)
        # competes with the engine's and the ranks' bring-up.
        ray.init(num_cpus=max(4, os.cpu_count() or 1, min_cpus), include_dashboard=False, log_to_driver=True,
                 configure_logging=False, runtime_env=job_env, _system_config={"prestart_worker_first_driver": False})


class RayPlacement:
    """The run's Ray placement group, made from the `PlacementMap`: one bundle per used slot (a GPU,
    or a logical CPU on CPU clusters), pinned to its node. Nodes are ordered with the driver's node
    first, then by address; on GPUs, a node's slots follow the GPU ids Ray reserved, in order."""

    def __init__(self, pmap: PlacementMap, timeout_s: float = 600.0, pin_cpus: bool = False):
        """`pin_cpus` (cluster.cpu_pinning, CPU clusters): every process is pinned to its slot's core."""
        import ray
        from ray.util.placement_group import placement_group

        self.map, self.gpu = pmap, pmap.accelerator == "gpu"
        self.pin = pin_cpus and not self.gpu
        self.node_ips = _ordered_node_ips(pmap.nodes)
        slots = pmap.used_slots()
        unit = "GPU" if self.gpu else "CPU"
        self.pg = placement_group([{unit: 1.0, f"node:{self.node_ips[s.node]}": 0.001} for s in slots],
                                  strategy="PACK")
        if not self.pg.wait(timeout_seconds=timeout_s):
            ray.util.remove_placement_group(self.pg)
            raise PlacementError(f"Ray could not reserve {len(slots)} {unit} bundle(s) for the placement map within "
                                 f"{timeout_s:g}s; the cluster has {ray.available_resources()}")
        self.gpu_ids: dict[Slot, int] = {}  # slot -> the GPU id Ray reserved for it
        self.bundle = self._bundles_by_slot(slots)

    def _bundles_by_slot(self, slots: list[Slot]) -> dict[Slot, int]:
        """Bundle index of each slot. On GPUs, a probe in every bundle reads the GPU id Ray gave it and
        a node's slots take its bundles in GPU-id order, so "dev d" is the node's d-th reserved GPU."""
        if not self.gpu:
            return {s: i for i, s in enumerate(slots)}
        import ray

        probe = ray.remote(num_gpus=1.0, num_cpus=0)(_Probe)
        probes = [probe.options(scheduling_strategy=self._strategy(i)).remote() for i in range(len(slots))]
        found = ray.get([p.where.remote() for p in probes])
        for p in probes:
            ray.kill(p)
        by_node: dict[int, list[tuple[int, int]]] = {}
        for i, (ip, ids) in enumerate(found):
            by_node.setdefault(self.node_ips.index(ip), []).append((int(ids[0]), i))
        out = {}
        for node, bundles in by_node.items():
            mine = sorted(s for s in slots if s.node == node)
            for slot, (gpu_id, index) in zip(mine, sorted(bundles)):
                out[slot] = index
                self.gpu_ids[slot] = gpu_id
        return out

    def _strategy(self, bundle: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)

    def options(self, slot: Slot, env: dict[str, str] | None = None) -> dict:
        """Ray actor options for one process on `slot`: its bundle, its share of the slot, and
        `env` (set before the process starts CUDA)."""
        from megarl.runtime.device import PIN_ENV

        share = self.map.share(slot)
        resources = {"num_gpus": share, "num_cpus": 0} if self.gpu else {"num_cpus": share}
        if self.pin:
            env = {**(env or {}), PIN_ENV: str(slot.device)}
        extra = {"runtime_env": {"env_vars": env}} if env else {}
        return {"scheduling_strategy": self._strategy(self.bundle[slot]), **resources, **extra}

    def engine_options(self, group: list[Slot], config, threads: int | None = None) -> dict:
        """Ray actor options for the engine on the slots `group`. One worker: the engine process
        is that worker, on its slot. Tensor parallelism on GPUs: the engine process holds nothing
        and its placement group is captured, so the workers vLLM's Ray executor creates take the
        group's bundles (one each, `rollout.engine.engine_worker_env`); on CPU the workers are
        children of the engine process on the group's node, whose other slots stay reserved.
        `threads`: the engine's OpenMP threads on CPU (PlacementMap.engine_cpu_threads)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from megarl.rollout.engine import engine_worker_env

        env = engine_worker_env(config, [self.bundle[s] for s in group], self.map.share(group[0]))
        if threads is not None and not self.gpu:
            # idle OpenMP threads sleep instead of spinning, or they would take the cores the
            # training ranks compute on between rollouts (measured: the update 6 % slower)
            env.update(OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
        if len(group) == 1 or not self.gpu:
            return self.options(group[0], env or None)
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.bundle[group[0]],
                                                    placement_group_capture_child_tasks=True)
        return {"scheduling_strategy": strategy, "num_gpus": 0, "num_cpus": 0, "runtime_env": {"env_vars": env}}

    def check(self, role: str, reports: list[dict]) -> None:
        """Every rank of `role` is on the node, with the LOCAL_RANK and GPU, that the map says."""
        for rank, (slot, got) in enumerate(zip(self.map.roles[role], reports, strict=True)):
            want = {"node_ip": self.node_ips[slot.node], "local_rank": self.map.local_rank(role, rank)}
            if self.gpu:
                want["gpu_ids"] = [str(self.gpu_ids[slot])]
            wrong = {k: (v, got[k]) for k, v in want.items() if got[k] != v}
            if wrong:
                raise PlacementError(f"{role} rank {rank} should be on {slot} but is elsewhere: "
                                     + ", ".join(f"{k} {v[1]} (expected {v[0]})" for k, v in wrong.items()))

    def remove(self) -> None:
        import ray

        ray.util.remove_placement_group(self.pg)


class _Probe:
    def where(self) -> tuple[str, list[str]]:
        import ray

        return ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]


def _ordered_node_ips(count: int) -> list[str]:
    """The first `count` alive Ray nodes' addresses: the driver's node, then the others by address."""
    import ipaddress

    import ray

    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n["Alive"]]
    ips = sorted({n["NodeManagerAddress"] for n in alive if n["NodeID"] != here}, key=ipaddress.ip_address)
    ordered = [n["NodeManagerAddress"] for n in alive if n["NodeID"] == here] + ips
    if len(ordered) < count:
        raise PlacementError(f"cluster.nodes: the recipe places work on {count} node(s), but the Ray cluster has "
                             f"{len(ordered)} ({', '.join(ordered)}); start Ray on every node of the allocation "
                             "(megarl launch does) or lower cluster.nodes")
    return ordered[:count]


def place_ranks(recipe: Recipe, init_ckpt: str, role: str, threads: int, placement: RayPlacement) -> list:
    """One Ray actor per rank of `role` on its slot (cheap: nothing is built yet), checked against
    the map: node, LOCAL_RANK and, on GPUs, the GPU Ray gave it."""
    workers = launch_ranks(recipe, init_ckpt, role, threads, placement)
    check_ranks(role, workers, placement)
    return workers


def launch_ranks(recipe: Recipe, init_ckpt: str, role: str, threads: int, placement: RayPlacement) -> list:
    """One Ray actor per rank of `role` on its slot; returns while their processes start."""
    import ray

    from megarl.runtime.device import CUDA, rank_env
    from megarl.workers import worker_class

    cls = ray.remote(worker_class(role))
    world = recipe.derived.train_world_size
    return [cls.options(**placement.options(slot, rank_env(CUDA) if placement.gpu else None))
            .remote(recipe, init_ckpt, role, r, world, threads, placement.map.local_rank(role, r))
            for r, slot in enumerate(placement.map.roles[role])]


def check_ranks(role: str, workers: list, placement: RayPlacement) -> None:
    """Each rank where the map puts it: node, LOCAL_RANK and, on GPUs, the GPU Ray gave it."""
    import ray

    placement.check(role, ray.get([w.placement.remote() for w in workers]))


def get_all_or_first_error(refs: list) -> list:
    """`ray.get(refs)`, but raising as soon as any of them fails: `ray.get` of a list waits for every
    result, and when a node is cut off, the ranks that survive sit in collectives with it until
    their timeout (minutes) while the lost ranks' results already are errors."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)  # raises this result's error now
    return ray.get(refs)


class Gang:
    """The Ray actors of one megatron model group, each on its slot of the placement map; `call`
    runs a method on every rank."""

    def __init__(self, recipe: Recipe, init_ckpt: str, role: str, threads: int, placement: RayPlacement,
                 wait: bool = True):
        """`wait=False` returns while the ranks start: `begin_build()` then `ready()` (several gangs
        launched, then built, come up together)."""
        self.role, self._placement = role, placement
        self.workers = launch_ranks(recipe, init_ckpt, role, threads, placement)
        self.nodes = [placement.node_ips[s.node] for s in placement.map.roles[role]]
        self._building: tuple | None = None
        self.coords: list[dict] = []
        if wait:
            self.ready()

    def begin_build(self) -> None:
        """Check the ranks' places, rendezvous, and start every rank building its model."""
        check_ranks(self.role, self.workers, self._placement)
        host, port = self.call_one(0, "rendezvous")
        self._building = (self.call_async("build", host, port), host, port)

    def ready(self) -> Gang:
        """Wait until every rank has built its model (or raise the first rank's error)."""
        if self.coords:
            return self
        if self._building is None:
            self.begin_build()
        refs, host, port = self._building
        self.coords = self._get(refs, "build")
        self.dp_size = self.coords[0]["dp_size"]
        threads = sorted({c["threads"] for c in self.coords})
        print(f"[{TAG}] {self.role}: {len(self.workers)} rank(s), {'/'.join(map(str, threads))} torch thread(s) "
              f"each; rendezvous {host}:{port}", flush=True)
        return self

    def call_one(self, rank: int, method: str, *args):
        import ray

        return ray.get(getattr(self.workers[rank], method).remote(*args))

    def call(self, method: str, *args, **kwargs) -> list:
        return self._get(self.call_async(method, *args, **kwargs), method)

    def call_async(self, method: str, *args, **kwargs) -> list:
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def call_sharded(self, method: str, batch: dict | list, *args, minibatches: int = 1) -> list:
        """`method(share, *args)` on every rank, each rank given only its data-parallel replica's
        share of `batch` (its part of every mini-batch), put in the object store once per replica."""
        import ray

        from megarl.workers.wire import replica_share

        shares = [ray.put(replica_share(batch, d, self.dp_size, minibatches)) for d in range(self.dp_size)]
        refs = [getattr(w, method).remote(shares[c["dp"]], *args) for w, c in zip(self.workers, self.coords)]
        return self._get(refs, method)

    def _get(self, refs: list, method: str) -> list:
        """The results of one call on every rank. When a rank's process (or its whole node) is gone,
        the surviving ranks fail too (their collectives lose a peer): name the lost ranks and nodes."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return get_all_or_first_error(refs)
        except (RayActorError, RayTaskError) as e:
            lost = self.worker_lost(method, e)
            if lost is None:
                raise
            raise lost from None

    def worker_lost(self, method: str, error: Exception) -> WorkerLost | None:
        """A WorkerLost naming the ranks (and their nodes) that no longer answer, after `error` from
        `method`; None when every rank still answers (the error is the method's own)."""
        from ray.exceptions import RayActorError

        lost = self.lost_ranks()
        if not lost and not isinstance(error, RayActorError):
            return None
        where = ", ".join(f"rank {r} on node {self.nodes[r]}" for r in lost) or str(error).splitlines()[0]
        return WorkerLost(f"{self.role} worker(s) lost during {method}: {where}. Restart the run (on nodes that "
                          "are up): with trainer.resume=auto it continues from the last checkpoint")

    def lost_ranks(self, timeout_s: float = 60.0) -> list[int]:
        """Ranks whose process Ray reports dead within `timeout_s` (killed, or on a node Ray declared
        dead: ~15 s after its processes die with Ray's default health checks). A rank that is only
        slow to answer (still inside a collective) is not counted."""
        import ray
        from ray.exceptions import RayActorError

        pings = {w.pid.remote(): r for r, w in enumerate(self.workers)}
        done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
        dead = []
        for ref in done:
            try:
                ray.get(ref)
            except RayActorError:
                dead.append(pings[ref])
        return sorted(dead)

    def gather(self, method: str, batch: dict | list, *args) -> dict[str, torch.Tensor]:
        """Per-sample tensors of `batch` (each replica given its share), from the reporting rank of
        each data-parallel replica, in row order."""
        from megarl.workers.wire import gather_shares

        return gather_shares(self.call_sharded(method, batch, *args))

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


def handoff_enabled(recipe: Recipe, gpu: bool) -> bool:
    """Colocated on GPUs: the trainer gangs and the engines share devices and take turns on them
    (config.recipe.handoff, the rule `megarl plan` sizes memory by), on the GPUs Ray actually gave."""
    from megarl.config.recipe import handoff

    return gpu and handoff(recipe)


class MemoryHandOff:
    """Who holds the shared GPUs when (colocated placement; every method is a no-op otherwise):

        start     the gangs offload while the engines start and claim their memory, then the
                  engines sleep and the gangs reload
        sync      engines wake their weights (and the KV cache when sync verification needs it),
                  receive the new ones, sleep again (vLLM level 1 keeps them in host memory); the
                  gangs stay resident
        rollout   the gangs offload their models and optimizers (workers/offload.py), the engines
                  wake weights + KV cache and generate, then sleep; the gangs reload, bitwise
    """

    def __init__(self, enabled: bool, gangs: list, fleet=None, verify_sync: bool = False):
        """`gangs`: those that are idle during rollouts (actor, reference, critic; a reward model
        scores while the engines generate and stays)."""
        self.enabled, self.gangs, self.fleet = enabled, [g for g in gangs if g is not None], fleet
        self.sync_wakes = ("weights", "kv_cache") if verify_sync else ("weights",)

    def start_engines(self, build):
        """`build()` -> the fleet, started while the gangs are off the GPUs; left asleep."""
        if not self.enabled:
            self.fleet = build()
            return self.fleet
        for gang in self.gangs:
            gang.call("offload")
        self.fleet = build()
        self.fleet.sleep()
        for gang in self.gangs:
            gang.call("reload")
        return self.fleet

    @contextlib.contextmanager
    def sync_window(self):
        if not self.enabled:
            yield
            return
        self.fleet.wake(self.sync_wakes)
        try:
            yield
        finally:
            self.fleet.sleep()

    @contextlib.contextmanager
    def rollout_window(self):
        if not self.enabled:
            yield
            return
        for gang in self.gangs:
            gang.call("offload")
        self.fleet.wake()
        try:
            yield
        finally:
            self.fleet.sleep()
            for gang in self.gangs:
                gang.call("reload")


class WeightSync:
    """The actor gang's senders and the fleet's engines joined in one sync group (megarl.sync)."""

    def __init__(self, recipe: Recipe, actor: Gang, fleet, hf_cfg: dict):
        from megarl.runtime.rendezvous import Rendezvous
        from megarl.sync.choice import resolve_transport
        from megarl.sync.plan import EngineLayout, WeightSyncPlan

        ro = recipe.rollout
        self.plan = WeightSyncPlan.build(recipe.parallel, EngineLayout(ro.engines, ro.engine_tp),
                                         hf_cfg["model_type"], hf_cfg, bucket_bytes=ro.weight_sync.bucket_mb << 20,
                                         dtype=ENGINE_DTYPES[recipe.model.dtype], quantization=ro.quantization,
                                         transport=resolve_transport(recipe),
                                         transformer_impl=actor.coords[0]["transformer_impl"])
        self.actor, self.fleet, self.config = actor, fleet, ro.weight_sync
        self.generation = 0
        host, port = actor.call_one(0, "sync_open_store", ro.weight_sync.timeout_s)
        self.rendezvous = Rendezvous(host, port, timeout_s=ro.weight_sync.timeout_s)
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
               "sync/buckets": float(len(self.plan.buckets))}
        # where the time went, slowest party of each kind (megarl.sync: WeightSender.send, BucketReceiver)
        for part in ("gather", "pack", "checksum", "send_wait"):
            out[f"sync/sender_{part}_s"] = max(s[f"{part}_seconds"] for s in send_stats)
        for part in ("wait", "verify", "load"):
            out[f"sync/engine_{part}_s"] = max(s[f"{part}_seconds"] for s in recv_stats)
        if self.config.verify_logprobs and verify_tokens:
            out["sync/verify_max_diff"] = self.verify(verify_tokens)
        return out

    def _send(self, receives: list, version: int) -> list[dict]:

        from megarl.rollout.fleet import EngineLost
        from megarl.sync.transport import WeightSyncError

        try:
            return get_all_or_first_error(self.actor.call_async("sync_send", version))
        except Exception as e:  # noqa: BLE001 - a lost trainer rank is named; else usually an engine went away
            lost = self.actor.worker_lost("the weight sync", e)
            if lost is not None:
                raise lost from None
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


def build_fleet(recipe: Recipe, engine_dir: str, placement: RayPlacement, wait: bool = True):
    """The rollout engines, sized so a whole multi-turn conversation fits one context, each on its
    group of slots in the placement map (`RayPlacement.engine_options`); `wait=False`: still
    starting (`fleet.wait_ready()`)."""
    from megarl.data.tokenizer import tokenizer_dir
    from megarl.rollout.engine import EngineConfig
    from megarl.rollout.fleet import RolloutFleet

    ro, mt = recipe.rollout, recipe.rollout.multi_turn
    max_len = ro.max_prompt_length + ro.max_response_length + (mt.max_tool_output_tokens * mt.max_turns if mt else 0)
    config = EngineConfig(engine_dir, tokenizer=tokenizer_dir(recipe.model, engine_dir),
                          trust_remote_code=recipe.model.trust_remote_code, dtype=ENGINE_DTYPES[recipe.model.dtype],
                          max_model_len=max_len, tensor_parallel_size=ro.engine_tp, kv_cache_bytes=ro.kv_cache_bytes,
                          gpu_memory_utilization=ro.gpu_memory_utilization, seed=recipe.trainer.seed,
                          quantization=ro.quantization, device="cuda" if placement.gpu else "cpu",
                          sleep_mode=handoff_enabled(recipe, placement.gpu))
    threads = engine_thread_counts(recipe, placement)
    options = [placement.engine_options(group, config, threads[e]) for e, group in enumerate(placement.map.engines)]
    return RolloutFleet(config, ro.engines, engine_options=options, wait=wait)


def engine_thread_counts(recipe: Recipe, placement: RayPlacement) -> list[int | None]:
    """Each engine's OpenMP threads on CPU: rollout.engine_cpu_threads when set; else with
    synchronous rollouts the training ranks wait while the engines generate, so the engines take
    their node's cores (a pinned process keeps its core)."""
    from megarl.runtime.device import usable_cpus

    if recipe.rollout.engine_cpu_threads:
        return [recipe.rollout.engine_cpu_threads] * len(placement.map.engines)
    alone = recipe.trainer.rollout_mode == "sync" and not placement.pin
    cores_per_slot = max(1, usable_cpus() // placement.map.per_node)
    return [placement.map.engine_cpu_threads(e, alone, cores_per_slot) for e in range(len(placement.map.engines))]


def engine_model_dir(recipe: Recipe, init_ckpt: str | None) -> str:
    """An HF directory with weights for the engines to start from (the weights are replaced by
    the first sync anyway; the engine needs a complete model to build itself). With
    `rollout.quantization: fp8`, an FP8-serialized copy: the engine then holds the very tensors
    (float8 weights + scales) each sync sends, and the plan check compares them all. `init_ckpt`
    (the converted starting checkpoint) is read only when model.path holds no HF weights."""
    hf_dir = recipe.model.path
    if not has_hf_weights(hf_dir):
        from megarl.checkpoint.hf import convert_megatron_to_hf
        from megarl.runtime.local_group import run_local_group

        hf_dir = os.path.join(recipe.trainer.output_dir, "engine_init")
        if not has_hf_weights(hf_dir):
            run_local_group(convert_megatron_to_hf, 1, args=(init_ckpt, hf_dir, 1 << 30, recipe.model.tokenizer),
                            timeout=3600)
    if recipe.rollout.quantization != "fp8":
        return hf_dir
    from megarl.sync.fp8 import export_fp8_checkpoint

    out = os.path.join(recipe.trainer.output_dir, "engine_init_fp8")
    if not has_hf_weights(out):
        export_fp8_checkpoint(hf_dir, out + ".tmp")
        os.replace(out + ".tmp", out)
    return out
