"""Benchmark: streaming HF -> megatron conversion of a generated >= 1.5B-parameter bf16 model.

Generates a random Qwen2-shaped bf16 checkpoint (written shard by shard), converts it with
`megarl convert hf-to-megatron` semantics in a fresh process, and reports the wall time and the
converting process's peak RSS relative to the checkpoint size (goal: < 0.25), then checks a few
converted tensors against the source.

    python bench/convert.py [--workdir DIR] [--layers 32] [--keep]

Last stdout line: {"params": N, "seconds": S, "peak_rss_ratio": R, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def generate(out: str, layers: int, hidden: int = 2048, ffn: int = 5632, heads: int = 16, kv_heads: int = 2,
             vocab: int = 32000) -> int:
    """Write a random bf16 Qwen2 checkpoint, one layer per shard; returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    os.makedirs(out, exist_ok=True)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    d = hidden // heads

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, params = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal params
        save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            params += v.numel()

    shard("model-embed.safetensors", {"model.embed_tokens.weight": rnd(vocab, hidden),
                                      "lm_head.weight": rnd(vocab, hidden),
                                      "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    for i in range(layers):
        p = f"model.layers.{i}"
        shard(f"model-layer{i:03d}.safetensors", {
            f"{p}.self_attn.q_proj.weight": rnd(heads * d, hidden), f"{p}.self_attn.q_proj.bias": rnd(heads * d),
            f"{p}.self_attn.k_proj.weight": rnd(kv_heads * d, hidden), f"{p}.self_attn.k_proj.bias": rnd(kv_heads * d),
            f"{p}.self_attn.v_proj.weight": rnd(kv_heads * d, hidden), f"{p}.self_attn.v_proj.bias": rnd(kv_heads * d),
            f"{p}.self_attn.o_proj.weight": rnd(hidden, heads * d),
            f"{p}.mlp.gate_proj.weight": rnd(ffn, hidden), f"{p}.mlp.up_proj.weight": rnd(ffn, hidden),
            f"{p}.mlp.down_proj.weight": rnd(hidden, ffn),
            f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return params


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: across fork+exec Linux carries
    the parent's peak into the child's ru_maxrss, which would charge the generator's memory here."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def convert_and_measure(hf_dir: str, out_dir: str) -> dict:
    """Runs in the converting rank: convert, then report this process's peak RSS."""
    from megarl.checkpoint.hf import convert_hf_to_megatron

    t0 = time.perf_counter()
    summary = convert_hf_to_megatron(hf_dir, out_dir)
    seconds = time.perf_counter() - t0
    return {**summary, "seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}


def export_and_measure(ckpt_dir: str, out_dir: str) -> dict:
    """Runs in the exporting rank: megatron -> HF, then report this process's peak RSS."""
    from megarl.checkpoint.hf import convert_megatron_to_hf

    t0 = time.perf_counter()
    summary = convert_megatron_to_hf(ckpt_dir, out_dir, shard_bytes=128 << 20)
    return {**summary, "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}


def spot_check(hf_dir: str, out_dir: str) -> float:
    """Max abs difference of a few converted tensors (read back from the dist checkpoint) vs the source."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    reader = dcp.FileSystemReader(out_dir)
    md = reader.read_metadata().state_dict_metadata
    key = "decoder.layers.mlp.linear_fc2.weight"
    target = {key: torch.empty(tuple(md[key].size), dtype=md[key].properties.dtype)}
    dcp.load(target, storage_reader=reader, no_dist=True)
    worst = 0.0
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    for layer in (0, target[key].shape[0] - 1):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        with safe_open(os.path.join(hf_dir, weight_map[name]), "pt") as f:
            src = f.get_tensor(name)
        worst = max(worst, (target[key][layer].float() - src.float()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="megarl-bench-convert-")
    hf_dir, out_dir = os.path.join(work, "hf"), os.path.join(work, "mcore")
    from megarl.runtime.local_group import run_local_group

    t0 = time.perf_counter()
    params = generate(hf_dir, args.layers)
    ckpt_bytes = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    print(f"[bench] generated {params / 1e9:.2f}B params, {ckpt_bytes / 2**30:.2f} GiB in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    # by module path: a function of a script's __main__ makes the spawned rank re-run that script
    [r] = run_local_group("bench.convert:convert_and_measure", 1, args=(hf_dir, out_dir), timeout=900)
    err = spot_check(hf_dir, out_dir)
    # fresh spawned processes carry 'megarl.checkpoint' code only: the export direction, same bound
    [e] = run_local_group("bench.convert:export_and_measure", 1, args=(out_dir, os.path.join(work, "hf_back")),
                          timeout=900)
    result = {"params": params, "seconds": round(r["seconds"], 1),
              "peak_rss_ratio": round(r["peak_rss_bytes"] / ckpt_bytes, 4),
              "peak_rss_mb": round(r["peak_rss_bytes"] / 2**20), "checkpoint_mb": round(ckpt_bytes / 2**20),
              "spot_check_max_abs_diff": err, "export_seconds": round(e["seconds"], 1),
              "export_peak_rss_ratio": round(e["peak_rss_bytes"] / ckpt_bytes, 4)}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
