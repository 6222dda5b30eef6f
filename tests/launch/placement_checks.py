"""Runs in an isolated process that is the Ray driver of a local cluster with logical GPUs: the
run's placement group and its workers, exactly as the RL driver makes them, minus the models."""

from __future__ import annotations


def placement_checks(recipe_file: str, overrides: list[str], num_gpus: int, address: str | None = None) -> dict:
    """The placement map, what every placed worker reports, and the node addresses in map order;
    on a local Ray with `num_gpus` logical GPUs, or on the cluster at `address`."""
    import ray

    from megarl.config.loader import load_recipe
    from megarl.launch.placement import build_placement
    from megarl.trainers.rl.gangs import RayPlacement, _Probe, place_ranks

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=4, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    try:
        recipe = load_recipe(recipe_file, overrides)
        pmap = build_placement(recipe)
        placement = RayPlacement(pmap, timeout_s=60)
        out = {"lines": pmap.lines(), "roles": {}, "engines": [],
               "slot_gpu": {f"{s.node}:{s.device}": placement.gpu_ids.get(s) for s in pmap.used_slots()}}
        alive = []
        for role in pmap.roles:
            workers = place_ranks(recipe, "unused", role, 1, placement)
            out["roles"][role] = ray.get([w.placement.remote() for w in workers])
            if role == "actor":
                out["rendezvous"] = ray.get(workers[0].rendezvous.remote())
            alive += workers
        probe = ray.remote(_Probe)
        for engine in pmap.engines:
            where = probe.options(**placement.options(engine[0])).remote()
            out["engines"].append(ray.get(where.where.remote()))
            alive.append(where)
        out["node_ip"] = ray.util.get_node_ip_address()
        out["node_ips"] = placement.node_ips
        placement.remove()
        return out
    finally:
        ray.shutdown()


if __name__ == "__main__":  # on a simulated node: python -m tests.launch.placement_checks RECIPE JSON_OVERRIDES
    import json
    import os
    import sys

    # Marked: a Ray driver's stdout may also carry messages the GCS pushes to every driver.
    print("PLACEMENT", json.dumps(placement_checks(sys.argv[1], json.loads(sys.argv[2]), 0, os.environ["RAY_ADDRESS"])))
