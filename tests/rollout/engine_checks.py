"""Runs in an isolated process (vLLM and HF transformers, no megatron layer)."""

from __future__ import annotations

import torch


def hf_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None])[:, 0]


def engine_checks(model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.tool_math import CALCULATOR
    from megarl.data.render import render_prompt
    from megarl.rollout.agent import AgentLoop
    from megarl.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig
    from megarl.rollout.tool_spec import load_tool_specs
    from megarl.rollout.tools import ToolExecutor

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = RolloutEngine(EngineConfig(model_dir, max_model_len=512, kv_cache_bytes=64 << 20))
    prompts = [render_prompt(tok, [{"role": "user", "content": q}], [CALCULATOR]) for q in ("What is 2+3?", "Hi")]
    out = {}
    sampling = SamplingConfig(n=3, temperature=0.7, max_tokens=12, seed=1)
    results = engine.generate(prompts, sampling)
    out["shape"] = [len(r) for r in results]
    out["versions"] = sorted({c.weight_version for r in results for c in r})
    out["distinct_samples"] = len({tuple(c.token_ids) for c in results[0]})
    out["lp_diff"] = max((hf_logprobs(hf, p, c.token_ids, 0.7) - torch.tensor(c.logprobs)).abs().max().item()
                         for p, r in zip(prompts, results) for c in r)
    seq = prompts[0] + results[0][0].token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([seq])).logits[0, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    out["prompt_lp_diff"] = (torch.tensor(engine.prompt_logprobs(seq)) - ref).abs().max().item()
    # new weights in place
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(1.1)
    engine.load_weights(list(hf.state_dict().items()), version=5)
    results = engine.generate(prompts, sampling)
    out["versions_after"] = sorted({c.weight_version for r in results for c in r})
    out["lp_diff_after"] = max((hf_logprobs(hf, p, c.token_ids, 0.7) - torch.tensor(c.logprobs)).abs().max().item()
                               for p, r in zip(prompts, results) for c in r)
    tools = ToolExecutor(load_tool_specs("configs/tools/calculator.yaml"))
    runs = {}
    for schedule in ("lock_step", "per_trajectory"):
        loop = AgentLoop(engine, tok, tools, max_turns=3, max_total_tokens=400, loop=schedule)
        runs[schedule] = [t for g in loop.run(prompts, SamplingConfig(n=2, max_tokens=32, seed=2)) for t in g]
    trajs = runs["lock_step"]
    out["traj_ok"] = all(len(t.response_ids) == len(t.loss_mask) == len(t.rollout_logprobs) and t.finish
                         for t in trajs)
    out["traj_count"] = len(trajs)
    # the per-trajectory schedule (turns batched continuously by the engine) samples the same tokens
    pairs = list(zip(trajs, runs["per_trajectory"], strict=True))
    out["schedules_same_tokens"] = all(a.response_ids == b.response_ids and a.loss_mask == b.loss_mask
                                       for a, b in pairs)
    out["schedules_lp_diff"] = max(abs(x - y) for a, b in pairs for x, y in zip(a.rollout_logprobs, b.rollout_logprobs))
    out["turns"] = [t.turns for t in trajs]
    out["busy_in_loop"] = engine.stream_busy_seconds > 0
    return out
