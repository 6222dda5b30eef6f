"""Demo of the foundation: real megatron-core training on 2 gloo ranks on CPU.

Trains the tiny Llama-shaped GPT with tensor parallelism + sequence parallelism, megatron DDP and
the distributed Adam optimizer on a learnable synthetic language (each sequence counts upward in a
random stride mod the vocabulary), saves a dist checkpoint, then resumes it at a different layout
(pipeline parallel, 2 stages) and keeps training. Prints the loss curve and writes
`<out>/summary.json`.

    python examples/parallel_train_demo.py --out runs/demo [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import time

VOCAB, SEQ, MICRO_BS, NUM_MICRO = 128, 32, 4, 2


def counting_batch(step: int, dp_rank: int, dp: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(10_000 * step + dp_rank)
    mbs = []
    for _ in range(NUM_MICRO // dp if dp <= NUM_MICRO else 1):
        start = torch.randint(0, VOCAB, (MICRO_BS, 1), generator=g)
        stride = torch.randint(1, 4, (MICRO_BS, 1), generator=g)
        seq = (start + stride * torch.arange(SEQ + 1)) % VOCAB
        mbs.append(dict(tokens=seq[:, :-1].contiguous(), labels=seq[:, 1:].contiguous(),
                        loss_mask=torch.ones(MICRO_BS, SEQ),
                        position_ids=torch.arange(SEQ).expand(MICRO_BS, SEQ).contiguous(),
                        attention_mask=None))
    return mbs


def train(phase: dict, out_dir: str) -> dict:
    """Runs on every rank: build at the phase's layout, optionally resume, train, optionally save."""
    from megarl.checkpoint.dist import load_checkpoint, save_checkpoint
    from megarl.config.parallel import ParallelConfig
    from megarl.models.tiny import build_tiny_train_state
    from megarl.models.train import train_step
    from megarl.runtime.megatron import parallel_state as ps

    parallel = ParallelConfig(**phase["parallel"])
    state = build_tiny_train_state(parallel, vocab_size=VOCAB, seq_length=SEQ, lr=1e-2)
    ckpt = os.path.join(out_dir, "checkpoint")
    if phase["resume"]:
        load_checkpoint(state, ckpt)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    curve, t0 = [], time.perf_counter()
    for step in range(phase["first_step"], phase["first_step"] + phase["steps"]):
        metrics = train_step(state, counting_batch(step, dp_rank, dp), SEQ)
        curve.append((step, metrics["loss"]))
    seconds = time.perf_counter() - t0
    if phase["save"]:
        save_checkpoint(state, ckpt)
    return {"curve": curve, "seconds": seconds, "layout": parallel.resolve(2).describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    out_dir = os.path.abspath(args.out)

    from megarl.runtime.local_group import run_local_group

    phases = [
        {"name": "train", "parallel": {"tp": 2, "sp": True}, "first_step": 0, "steps": args.steps,
         "resume": False, "save": True},
        {"name": "resume", "parallel": {"pp": 2}, "first_step": args.steps, "steps": args.steps // 4,
         "resume": True, "save": False},
    ]
    summary = {"phases": []}
    for phase in phases:
        print(f"[demo] {phase['name']}: 2 gloo ranks, {phase['parallel']}", flush=True)
        result = run_local_group(train, 2, args=(phase, out_dir), timeout=900)[0]
        for step, loss in result["curve"]:
            if step % 5 == 0 or step == result["curve"][-1][0]:
                print(f"  step {step:3d}  loss {loss:.4f}", flush=True)
        print(f"  {result['layout']}: {len(result['curve'])} steps in {result['seconds']:.1f}s", flush=True)
        summary["phases"].append({"name": phase["name"], **result})
    first = summary["phases"][0]["curve"]
    summary["loss_start"], summary["loss_end"] = first[0][1], summary["phases"][-1]["curve"][-1][1]
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"[demo] loss {summary['loss_start']:.3f} -> {summary['loss_end']:.3f}; "
          f"summary in {os.path.join(args.out, 'summary.json')}")


if __name__ == "__main__":
    main()
