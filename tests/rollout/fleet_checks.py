"""Runs in an isolated process that is the Ray driver of a local 2-CPU cluster."""

from __future__ import annotations


def fleet_checks(model_dir: str) -> dict:
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from megarl.rollout.engine import EngineConfig, SamplingConfig
    from megarl.rollout.fleet import RolloutFleet

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        fleet = RolloutFleet(EngineConfig(model_dir, max_model_len=256, kv_cache_bytes=32 << 20), num_engines=2,
                             cpus_per_engine=1, chunk_size=2)
        prompts = [[1, 2, 3 + i] for i in range(6)]
        results = fleet.generate(prompts, SamplingConfig(n=2, max_tokens=8, seed=3))
        out["shape"] = [len(r) for r in results]
        out["lengths_ok"] = all(len(c.token_ids) == len(c.logprobs) > 0 for r in results for c in r)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            for p in hf.parameters():
                p.mul_(1.05)
        fleet.load_weights(list(hf.state_dict().items()), version=7)
        ray.kill(fleet.actors[0])  # an engine dies between steps
        results = fleet.generate(prompts, SamplingConfig(n=1, max_tokens=8, seed=3))
        out["after_kill_shape"] = [len(r) for r in results]
        out["after_kill_versions"] = sorted({c.weight_version for r in results for c in r})
        out["restarts"] = fleet.restarts
        out["events"] = [e.what for e in fleet.events]
        fleet.shutdown()
    finally:
        ray.shutdown()
    return out
