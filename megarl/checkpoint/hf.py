"""HF safetensors <-> megatron dist checkpoint.

A converted checkpoint directory holds the dist checkpoint (layout-free: load it at any TP/PP/EP)
plus `hf/` with the source config.json and tokenizer, which is all export needs:

    <out>/                 megatron dist checkpoint (torch_dist) of the model
    <out>/hf/              config.json, tokenizer files, generation_config.json
    <out>/megarl_checkpoint.json   {"format": "megatron-dist", "arch": ..., "dtype": ...}

Only safetensors are read or written (never pickle). The functions run inside a torch.distributed
group (`run_local_group(..., 1)` from the CLIs).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch

from megarl.checkpoint.hf_map import CheckpointMismatch, hf_to_megatron, megatron_to_hf
from megarl.config.parallel import ParallelConfig

HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")
MARKER = "megarl_checkpoint.json"
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class SafetensorsReader:
    """Lazy access to the tensors of an HF model directory (one file or an index of shards)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            pickled = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
            raise FileNotFoundError(f"no *.safetensors in {path}" + (
                f"; found {os.path.basename(pickled[0])}: pickle checkpoints are refused, convert them to "
                "safetensors first" if pickled else ""))
        self._handles = [safe_open(f, framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def _hf_cfg(path: str) -> dict:
    from megarl.models.hf_config import read_hf_config

    return read_hf_config(path)


def build_model_for(cfg: dict, parallel: ParallelConfig, dtype: str, seed: int = 1234, options=None):
    """Initialise parallel state and build this rank's GPT chunks for an HF config."""
    from megarl.models.gpt import build_gpt_chunks
    from megarl.models.hf_config import BuildOptions, megatron_config_from_hf
    from megarl.runtime.distributed import init_distributed

    options = options or BuildOptions()
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    ctx = init_distributed(parallel, seed=seed, num_experts=num_experts)
    config, args = megatron_config_from_hf(cfg, ctx.parallel, dtype, options)
    chunks = build_gpt_chunks(config, args.vocab_size, args.max_sequence_length, impl=options.transformer_impl,
                              qk_layernorm=args.qk_layernorm, tie_embeddings=args.tie_embeddings,
                              rotary_base=args.rotary_base, head=args.head)
    return chunks, config, args


def convert_hf_to_megatron(hf_dir: str, out_dir: str) -> dict:
    """HF safetensors -> megatron dist checkpoint (collective; world size 1 keeps memory lowest)."""
    import torch.distributed as dist

    from megarl.checkpoint.dist import save_sharded

    cfg = _hf_cfg(hf_dir)
    reader = SafetensorsReader(hf_dir)
    first = reader.get(reader.keys()[0])
    dtype = DTYPES.get(first.dtype)
    if dtype is None:
        raise CheckpointMismatch(f"unsupported tensor dtype {first.dtype} in {hf_dir}")
    chunks, _, args = build_model_for(cfg, ParallelConfig(), dtype)
    model = chunks[0]
    params = dict(model.state_dict(keep_vars=True))
    assigned = set()
    with torch.no_grad():
        for name, tensor in hf_to_megatron(args.arch, cfg, reader.keys(), reader.get):
            if name not in params:
                raise CheckpointMismatch(f"megatron model has no parameter {name} (config/spec mismatch)")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise CheckpointMismatch(f"{name}: checkpoint gives shape {tuple(tensor.shape)}, the model built "
                                         f"from config.json expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            assigned.add(name)
    unassigned = [n for n, p in params.items() if isinstance(p, torch.nn.Parameter) and n not in assigned]
    if unassigned:
        raise CheckpointMismatch(f"no HF tensor maps to megatron parameters {unassigned[:5]}")
    save_sharded([model], out_dir)
    if dist.get_rank() == 0:
        os.makedirs(os.path.join(out_dir, "hf"), exist_ok=True)
        for name in HF_SIDE_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy(os.path.join(hf_dir, name), os.path.join(out_dir, "hf", name))
        with open(os.path.join(out_dir, MARKER), "w") as f:
            json.dump({"format": "megatron-dist", "arch": args.arch, "dtype": dtype,
                       "source": os.path.abspath(hf_dir)}, f, indent=1)
    dist.barrier()
    return {"arch": args.arch, "dtype": dtype, "tensors": len(assigned)}


def read_marker(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, MARKER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir} is not a megarl model checkpoint (no {MARKER})")
    with open(path) as f:
        return json.load(f)


def load_converted(ckpt_dir: str, parallel: ParallelConfig, seed: int = 1234, options=None,
                   dtype: str | None = None):
    """Build the model at `parallel` and load a converted checkpoint into it (collective).
    `dtype` (fp32/bf16/fp16) overrides the checkpoint's; the dist checkpoint casts on load."""
    from megarl.checkpoint.dist import load_sharded

    marker = read_marker(ckpt_dir)
    cfg = _hf_cfg(os.path.join(ckpt_dir, "hf"))
    chunks, config, args = build_model_for(cfg, parallel, dtype or marker["dtype"], seed=seed, options=options)
    load_sharded(chunks, ckpt_dir)
    return chunks, config, args


def convert_megatron_to_hf(ckpt_dir: str, out_dir: str) -> dict:
    """Megatron dist checkpoint -> HF safetensors + config + tokenizer (collective)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    chunks, _, args = load_converted(ckpt_dir, ParallelConfig())
    cfg = _hf_cfg(os.path.join(ckpt_dir, "hf"))
    state = chunks[0].state_dict()
    tensors = dict(megatron_to_hf(args.arch, cfg, lambda n: state[n]))
    if dist.get_rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        for name in HF_SIDE_FILES:
            src = os.path.join(ckpt_dir, "hf", name)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(out_dir, name))
    dist.barrier()
    return {"arch": args.arch, "tensors": len(tensors)}
