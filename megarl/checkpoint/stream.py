"""Streaming HF -> megatron conversion: peak memory bounded by a few tensors, not the model.

1. Build the megatron model on the `meta` device (no memory) and ask megatron itself for its
   sharded state dict: the exact checkpoint keys, global shapes and offsets (layer-stacked
   tensors, the [gate; up] halves of fc1, `_extra_state` objects) the loader will request.
2. Turn it into torch.distributed.checkpoint's form with megatron's own translation, and save it
   with a planner that materialises each chunk only when the writer asks for it: the chunk's
   megatron parameter is computed from the HF tensors (hf_map), read from the safetensors file with
   plain reads (no mmap, so the page cache does not count against this process), sliced exactly as
   megatron's meta view of that parameter, written, and dropped.

The output is the same torch_dist checkpoint megatron writes, loadable at any TP/PP/EP.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from megarl.checkpoint.hf_map import CheckpointMismatch, check_hf_names, full_plan, hf_tensors, megatron_tensor

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


class ReadOnDemandSafetensors:
    """Tensors of an HF directory read with pread on demand: nothing stays mapped or cached."""

    def __init__(self, path: str):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
            raise FileNotFoundError(f"no *.safetensors in {path}" + (
                f"; found {pickled[0]}: pickle checkpoints are refused, convert them to safetensors first"
                if pickled else ""))
        self._index: dict[str, tuple[int, int, int, torch.dtype, list[int]]] = {}
        self._fds = []
        for name in files:
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
            self._fds.append(fd)
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, n, 8))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self._index[key] = (fd, 8 + n + begin, end - begin, SAFETENSORS_DTYPES[info["dtype"]], info["shape"])

    def keys(self) -> list[str]:
        return list(self._index)

    def dtype(self) -> torch.dtype:
        return next(iter(self._index.values()))[3]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._index[name][4])

    def get(self, name: str) -> torch.Tensor:
        fd, offset, length, dtype, shape = self._index[name]
        buf = bytearray(length)
        view = memoryview(buf)
        done = 0
        while done < length:  # pread may return short reads for large tensors
            chunk = os.pread(fd, min(length - done, 1 << 30), offset + done)
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape) if length else \
            torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them after large frees)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _MegatronTensorSource:
    """Produces the data of one checkpoint chunk at a time from HF tensors.

    A chunk is a view (shape, stride, offset) of a megatron TP=1 parameter. The [gate; up] halves
    of fc1 are read straight from gate_proj / up_proj; other chunks slice the computed parameter,
    which is cached until a different parameter is asked for."""

    def __init__(self, arch: str, cfg: dict, reader: ReadOnDemandSafetensors):
        self.cfg, self.reader = cfg, reader
        self.plan = {name: (sources, how) for name, sources, how in full_plan(arch, cfg)}
        self._last: tuple[str, torch.Tensor] | None = None

    def chunk(self, name: str, shape: tuple, stride: tuple, offset: int) -> torch.Tensor:
        sources, how = self.plan[name]
        if how == "fc1":
            rows = self.reader.shape(sources[0])[0]
            cols = self.reader.shape(sources[0])[1]
            half = rows * cols
            if tuple(shape) == (rows, cols) and tuple(stride) == (cols, 1) and offset in (0, half):
                return self.reader.get(sources[0 if offset == 0 else 1])
        return self._param(name).as_strided(shape, stride, offset)

    def _param(self, name: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        self._last = None  # drop before reading the next one
        _release_freed_memory()
        out = megatron_tensor(*self.plan[name], self.cfg, self.reader.get)
        self._last = (name, out)
        return out


def stream_convert(hf_dir: str, out_dir: str, arch: str, cfg: dict, dtype: str) -> int:
    """Write the megatron dist checkpoint for `hf_dir` into `out_dir`; returns the tensors written."""
    import torch.distributed.checkpoint as dcp

    from megarl.checkpoint.dist import sharded_state
    from megarl.config.parallel import ParallelConfig
    from megarl.models.gpt import build_model_for
    from megarl.runtime.megatron import (
        MCoreSavePlanner,
        ShardedObject,
        ShardedTensor,
        _replace_state_dict_keys_with_sharded_keys,
        extract_sharded_tensors,
        mcore_to_pyt_state_dict,
        nested_values,
        save_preprocess,
    )

    reader = ReadOnDemandSafetensors(hf_dir)
    check_hf_names(arch, cfg, reader.keys())
    with torch.device("meta"):
        chunks, _, _ = build_model_for(cfg, ParallelConfig(), dtype)
    model = chunks[0]
    param_names = {id(p): n for n, p in model.named_parameters()}
    planned = {name: (sources, how) for name, sources, how in full_plan(arch, cfg)}
    missing = sorted(set(param_names.values()) - set(planned))
    if missing:
        raise CheckpointMismatch(f"no HF tensor maps to megatron parameters {missing[:5]}")
    params = dict(model.named_parameters())
    for name, (sources, how) in planned.items():  # every shape, before any data is read
        if name not in params:
            raise CheckpointMismatch(f"megatron model has no parameter {name} (config/spec mismatch)")
        shapes = [reader.shape(s) for s in sources]
        got = shapes[0] if how == "copy" else (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
        if got != tuple(params[name].shape):
            raise CheckpointMismatch(f"{name}: checkpoint gives shape {got}, the model built from config.json "
                                     f"expects {tuple(params[name].shape)}")
    sharded = sharded_state([model])
    sharded_part, common = save_preprocess(sharded, validate_access_integrity=False)
    sharded_part["common_state"] = ShardedObject(key="common_state", data=common, global_shape=(1,),
                                                 global_offset=(0,), replica_id=0)

    # Where each checkpoint chunk's data comes from: (parameter name, view geometry)
    chunk_source: dict[tuple[str, tuple[int, ...]], tuple[str, tuple, tuple, int]] = {}
    tensors, _ = extract_sharded_tensors(sharded_part)
    for sh in nested_values(tensors):
        if not isinstance(sh, ShardedTensor):
            continue
        base = sh.data._base if sh.data._base is not None else sh.data
        name = param_names.get(id(base))
        if name is None:
            raise CheckpointMismatch(f"checkpoint key {sh.key} is not a view of a model parameter")
        chunk_source[(sh.key, tuple(sh.global_offset))] = (
            name, tuple(sh.data.shape), tuple(sh.data.stride()), sh.data.storage_offset())

    source = _MegatronTensorSource(arch, cfg, reader)
    dtype_t = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    class StreamingPlanner(MCoreSavePlanner):
        def lookup_object(self, index):
            obj = super().lookup_object(index)
            if not (torch.is_tensor(obj) and obj.is_meta):
                return obj
            piece = source.chunk(*chunk_source[(index.fqn, tuple(index.offset))]).to(dtype_t)
            return piece.reshape(obj.shape).contiguous()

    pyt_sd = mcore_to_pyt_state_dict(_replace_state_dict_keys_with_sharded_keys(sharded_part, True)[0], False)
    # One file per chunk: torch's writer keeps every tensor of a file alive until the file is closed
    # (filesystem.py `tensor_dict`), so per-chunk files are what bound memory to one chunk.
    writer = dcp.FileSystemWriter(out_dir, single_file_per_rank=False, thread_count=1, sync_files=False)
    dcp.save(pyt_sd, storage_writer=writer,
             planner=StreamingPlanner(dedup_replicated_tensors=False, flatten_state_dict=False,
                                      flatten_sharded_tensors=False))
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, f)
    reader.close()
    return len(chunk_source)



def stream_export(ckpt_dir: str, out_dir: str, arch: str, cfg: dict, dtype: str,
                  shard_bytes: int = 1 << 30) -> dict:
    """Megatron dist checkpoint -> HF safetensors, one parameter in memory at a time.

    Each megatron TP=1 parameter is assembled from the checkpoint chunks megatron's own (meta)
    sharded state dict names, split into its HF tensors (hf_map), and written straight into
    safetensors shards of about `shard_bytes` whose headers were laid out in advance (with a
    model.safetensors.index.json when there are several).
    """
    from megarl.checkpoint.dist import sharded_state
    from megarl.config.parallel import ParallelConfig
    from megarl.models.gpt import build_model_for
    from megarl.runtime.megatron import ShardedTensor, extract_sharded_tensors, nested_values, save_preprocess

    with torch.device("meta"):
        chunks, _, _ = build_model_for(cfg, ParallelConfig(), dtype)
    model = chunks[0]
    params = dict(model.named_parameters())
    param_names = {id(p): n for n, p in params.items()}
    sharded_part, _ = save_preprocess(sharded_state([model]), validate_access_integrity=False)
    tensors, _ = extract_sharded_tensors(sharded_part)
    pieces: dict[str, list[ShardedTensor]] = {}
    for sh in nested_values(tensors):
        if isinstance(sh, ShardedTensor):
            base = sh.data._base if sh.data._base is not None else sh.data
            pieces.setdefault(param_names[id(base)], []).append(sh)

    os.makedirs(out_dir, exist_ok=True)
    plan = full_plan(arch, cfg)
    layout = [(hf_name, t.shape, t.dtype) for name, targets, how in plan
              for hf_name, t in hf_tensors(targets, how, params[name], cfg)]  # meta: shapes only
    writer = _SafetensorsShardWriter(out_dir, layout, shard_bytes)
    regions = _RegionReader(ckpt_dir)
    for name, targets, how in plan:
        meta = params[name]
        real = torch.empty(meta.shape, dtype=meta.dtype)
        for sh in pieces[name]:
            view = real.as_strided(sh.data.shape, sh.data.stride(), sh.data.storage_offset())
            local_shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            try:
                regions.read(sh.key, tuple(sh.global_offset), view.view(local_shape))  # straight into `real`
            except RuntimeError:  # a view that cannot take the checkpoint's shape: go through a copy
                view.copy_(regions.read(sh.key, tuple(sh.global_offset),
                                        torch.empty(local_shape, dtype=view.dtype)).reshape(view.shape))
        for hf_name, t in hf_tensors(targets, how, real, cfg):
            writer.write(hf_name, t)
        del real
        _release_freed_memory()
    return {"tensors": len(layout), "files": writer.finish()}


SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class _SafetensorsShardWriter:
    """Writes safetensors shards whose headers are laid out up front from the tensors' shapes, so
    each tensor goes to disk the moment it exists (no shard is ever buffered in memory)."""

    def __init__(self, out_dir: str, layout: list[tuple[str, torch.Size, torch.dtype]], shard_bytes: int):
        self.out_dir = out_dir
        shards: list[list[tuple[str, torch.Size, torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype, nbytes))
            size += nbytes
        self.names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        if len(shards) == 1:
            self.names = ["model.safetensors"]
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, file offset, nbytes)
        self.fds = []
        for fname, items in zip(self.names, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype, nbytes in items:
                header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
            fd = os.open(os.path.join(out_dir, fname), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, struct.pack("<Q", len(blob)) + blob, 0)
            start = 8 + len(blob)
            for name, _, _, nbytes in items:
                self.where[name] = (fd, start + header[name]["data_offsets"][0], nbytes)
            self.fds.append(fd)
        self.shards = shards

    def write(self, name: str, tensor: torch.Tensor) -> None:
        fd, offset, nbytes = self.where.pop(name)
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise CheckpointMismatch(f"{name}: {data.nbytes} bytes, its header says {nbytes}")
        view = memoryview(data)
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, view[done:], offset + done)

    def finish(self) -> int:
        if self.where:
            raise CheckpointMismatch(f"tensors never written: {sorted(self.where)[:5]}")
        for fd in self.fds:
            os.close(fd)
        if len(self.names) > 1:
            weight_map = {name: fname for fname, items in zip(self.names, self.shards) for name, *_ in items}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        return len(self.names)


class _RegionReader:
    """Reads one region of one checkpoint tensor (only the storage chunks that overlap it)."""

    def __init__(self, ckpt_dir: str):
        import torch.distributed.checkpoint as dcp

        self.reader = dcp.FileSystemReader(ckpt_dir)
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def read(self, key: str, offsets: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
        """Fill `out` with the region of `key` starting at `offsets` (the shape of `out`)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.metadata.state_dict_metadata.get(key)
        if md is None:
            raise CheckpointMismatch(f"checkpoint has no tensor {key!r}")
        items = create_read_items_for_chunk_list(
            key, md, [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=out.shape)])

        class Into(LoadPlanner):
            def set_up_planner(self, *a, **k):
                pass

            def create_local_plan(self):
                return LoadPlan(items)

            def create_global_plan(self, plans):
                return plans

            def finish_plan(self, plan):
                return plan

            def load_bytes(self, read_item, value):
                raise CheckpointMismatch(f"{key} is stored as bytes, expected a tensor")

            def resolve_tensor(self, read_item):
                view = out
                for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                    view = view.narrow(dim, start, length)
                return view

            def commit_tensor(self, read_item, tensor):
                pass

        self.reader.read_data(LoadPlan(items), Into()).wait()
        return out
