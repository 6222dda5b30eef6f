"""Runs in an isolated process that is the Ray driver of a local cluster with logical GPUs: the
run's placement group and its workers, exactly as the RL driver makes them, minus the models."""

from __future__ import annotations


def placement_checks(recipe_file: str, overrides: list[str], num_gpus: int, address: str | None = None) -> dict:
    """The placement map, what every placed worker reports, and the node addresses in map order;
    on a local Ray with `num_gpus` logical GPUs, or on the cluster at `address`."""
    import ray

    from megarl.config.loader import load_recipe
    from megarl.launch.placement import build_placement
    from megarl.rollout.engine import EngineConfig
    from megarl.trainers.rl.gangs import RayPlacement, place_ranks

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=4, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    try:
        recipe = load_recipe(recipe_file, overrides)
        pmap = build_placement(recipe)
        placement = RayPlacement(pmap, timeout_s=60, pin_cpus=recipe.cluster.cpu_pinning)
        out = {"lines": pmap.lines(), "roles": {}, "engines": [],
               "slot_gpu": {f"{s.node}:{s.device}": placement.gpu_ids.get(s) for s in pmap.used_slots()}}
        alive = []
        for role in pmap.roles:
            workers = place_ranks(recipe, "unused", role, 1, placement)
            out["roles"][role] = ray.get([w.placement.remote() for w in workers])
            if role == "actor":
                out["rendezvous"] = ray.get(workers[0].rendezvous.remote())
            alive += workers
        probe = ray.remote(EngineProbe)
        for engine in pmap.engines:
            config = EngineConfig("unused", tensor_parallel_size=len(engine), device="cuda" if placement.gpu else "cpu")
            where = probe.options(**placement.engine_options(engine, config)).remote()
            out["engines"].append(ray.get(where.workers.remote()))
            alive.append(where)
        out["node_ip"] = ray.util.get_node_ip_address()
        out["node_ips"] = placement.node_ips
        placement.remove()
        return out
    finally:
        ray.shutdown()


class EngineProbe:
    """Stands where an engine process stands and places its workers as vLLM's Ray executor does
    (vllm 0.32, v1/executor/ray_executor.py `_init_workers_ray`): one actor per bundle listed in
    VLLM_RAY_BUNDLE_INDICES of the current (captured) placement group, each asking for
    VLLM_RAY_PER_WORKER_GPUS GPUs. Without them the engine process is its only worker. Returns
    [the engine process's (node ip, GPU ids, CPU cores)] + one (node ip, GPU ids) per worker it placed."""

    def workers(self) -> list:
        import os

        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from megarl.runtime.device import pin_to_slot
        from megarl.trainers.rl.gangs import _Probe

        pin_to_slot()   # as the engine actor does first (rollout/fleet.EngineActorImpl)
        here = (*_Probe().where(), sorted(os.sched_getaffinity(0)))
        bundles = os.environ.get("VLLM_RAY_BUNDLE_INDICES")
        if not bundles:
            return [here]
        pg, per_worker = ray.util.get_current_placement_group(), float(os.environ["VLLM_RAY_PER_WORKER_GPUS"])
        placed = [ray.remote(_Probe).options(num_cpus=0, num_gpus=per_worker, scheduling_strategy=(
            PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True,
                                             placement_group_bundle_index=int(b)))).remote()
                  for b in bundles.split(",")]
        return [here] + ray.get([p.where.remote() for p in placed])


if __name__ == "__main__":  # on a simulated node: python -m tests.launch.placement_checks RECIPE JSON_OVERRIDES
    import json
    import os
    import sys

    # Marked: a Ray driver's stdout may also carry messages the GCS pushes to every driver.
    print("PLACEMENT", json.dumps(placement_checks(sys.argv[1], json.loads(sys.argv[2]), 0, os.environ["RAY_ADDRESS"])))
