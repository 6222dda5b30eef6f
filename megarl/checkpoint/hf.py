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

import json
import os
import shutil

import torch

from megarl.checkpoint.hf_map import CheckpointMismatch
from megarl.config.parallel import ParallelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
MODEL_SIDE_FILES = ("config.json", "generation_config.json")
MARKER = "megarl_checkpoint.json"
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _hf_cfg(path: str) -> dict:
    from megarl.models.hf_config import read_hf_config

    return read_hf_config(path)


def copy_side_files(src_dir: str, dst_dir: str, tokenizer_dir: str | None = None) -> None:
    """config.json, generation_config.json, the tokenizer files and any remote-code *.py (what
    trust_remote_code loads) from `src_dir` into `dst_dir`; the tokenizer files come from
    `tokenizer_dir` instead when given (the recipe's model.tokenizer), so a checkpoint and its
    export carry the tokenizer the model is trained with."""
    tokenizer_dir = tokenizer_dir or src_dir
    wanted = [(src_dir, name) for name in MODEL_SIDE_FILES] + [(tokenizer_dir, name) for name in TOKENIZER_FILES]
    wanted += [(d, name) for d in sorted({src_dir, tokenizer_dir}) for name in os.listdir(d) if name.endswith(".py")]
    os.makedirs(dst_dir, exist_ok=True)
    for directory, name in wanted:
        if os.path.isfile(os.path.join(directory, name)):
            shutil.copy(os.path.join(directory, name), os.path.join(dst_dir, name))


def convert_hf_to_megatron(hf_dir: str, out_dir: str, tokenizer_dir: str | None = None) -> dict:
    """HF safetensors -> megatron dist checkpoint, streamed tensor by tensor (see stream.py), with
    the tokenizer from `tokenizer_dir` when given (else hf_dir's). Collective over a world-size-1 group."""
    import torch.distributed as dist

    from megarl.checkpoint.manifest import write_manifest
    from megarl.checkpoint.paths import PARTIAL_SUFFIX
    from megarl.checkpoint.stream import ReadOnDemandSafetensors, stream_convert

    cfg = _hf_cfg(hf_dir)
    if dist.get_world_size() != 1:
        raise RuntimeError("convert_hf_to_megatron streams from one process; run it on a world of size 1")
    reader = ReadOnDemandSafetensors(hf_dir)
    dtype = DTYPES.get(reader.dtype())
    reader.close()
    if dtype is None:
        raise CheckpointMismatch(f"unsupported tensor dtype in {hf_dir}")
    from megarl.models.hf_config import megatron_config_from_hf

    arch = cfg.get("model_type")
    megatron_config_from_hf(cfg, ParallelConfig(world_size=1), dtype)  # refuses unsupported configs early
    tmp = out_dir + PARTIAL_SUFFIX
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    written = stream_convert(hf_dir, tmp, arch, cfg, dtype)
    copy_side_files(hf_dir, os.path.join(tmp, "hf"), tokenizer_dir)
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"format": "megatron-dist", "arch": arch, "dtype": dtype, "source": os.path.abspath(hf_dir),
                   "tokenizer": os.path.abspath(tokenizer_dir) if tokenizer_dir else None}, f, indent=1)
    write_manifest(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return {"arch": arch, "dtype": dtype, "chunks": written}


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
    from megarl.models.gpt import build_model_for

    marker = read_marker(ckpt_dir)
    cfg = _hf_cfg(os.path.join(ckpt_dir, "hf"))
    chunks, config, args = build_model_for(cfg, parallel, dtype or marker["dtype"], seed=seed, options=options)
    load_sharded(chunks, ckpt_dir)
    return chunks, config, args


def convert_megatron_to_hf(ckpt_dir: str, out_dir: str, shard_bytes: int = 1 << 30,
                           tokenizer_dir: str | None = None) -> dict:
    """Megatron dist checkpoint -> HF safetensors + config + tokenizer (from `tokenizer_dir` when
    given, else the checkpoint's hf/), streamed one parameter at a time (see stream.py). Collective
    over a world-size-1 group."""
    from megarl.checkpoint.stream import stream_export

    marker = read_marker(ckpt_dir)
    cfg = _hf_cfg(os.path.join(ckpt_dir, "hf"))
    os.makedirs(out_dir, exist_ok=True)
    summary = stream_export(ckpt_dir, out_dir, marker["arch"], cfg, marker["dtype"], shard_bytes)
    copy_side_files(os.path.join(ckpt_dir, "hf"), out_dir, tokenizer_dir)
    return {"arch": marker["arch"], **summary}
