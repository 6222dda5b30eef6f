"""Benchmark: RolloutFleet throughput vs calling vllm.LLM.generate directly, same prompts, same run.

The fleet (one engine actor on a local Ray cluster, requests chunked and dispatched continuously)
must keep >= 90% of the direct in-process engine's generated tokens per second.

    python bench/rollout.py [--prompts 64] [--n 4] [--max-tokens 64] [--repeats 3]

Last stdout line: {"fleet_tokens_per_s": A, "direct_tokens_per_s": B, "fleet_vs_direct": A/B, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def best_rate(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN JIT for new shapes
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - t0))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from megarl.models.tiny_hf import make_tiny_model

    model = os.path.join(tempfile.mkdtemp(prefix="megarl-bench-rollout-"), "model")
    make_tiny_model(model, arch="qwen2", logit_scale=4.0)
    prompts = [[1, 2, 3, 4 + (i % 50), 5 + i % 7] for i in range(args.prompts)]
    from megarl.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig

    config = EngineConfig(model, max_model_len=512, kv_cache_bytes=128 << 20)
    sampling = SamplingConfig(n=args.n, max_tokens=args.max_tokens, seed=0)

    # direct: vllm.LLM.generate on the same prompts
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = RolloutEngine(config).llm
    params = SamplingParams(n=args.n, max_tokens=args.max_tokens, seed=0, logprobs=0)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def direct():
        outs = llm.generate(inputs, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    direct_rate = best_rate(direct, args.repeats)

    import ray

    from megarl.rollout.fleet import RolloutFleet

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        fleet = RolloutFleet(config, num_engines=1, cpus_per_engine=2)

        def via_fleet():
            return sum(len(c.token_ids) for r in fleet.generate(prompts, sampling) for c in r)

        fleet_rate = best_rate(via_fleet, args.repeats)
        fleet.shutdown()
    finally:
        ray.shutdown()
    print(json.dumps({"fleet_tokens_per_s": round(fleet_rate), "direct_tokens_per_s": round(direct_rate),
                      "fleet_vs_direct": round(fleet_rate / direct_rate, 3), "prompts": args.prompts, "n": args.n,
                      "max_tokens": args.max_tokens}))


if __name__ == "__main__":
    main()
