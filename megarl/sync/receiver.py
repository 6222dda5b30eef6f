"""The engine side of a weight sync: a vLLM worker extension.

vLLM mixes `WeightReceiverExtension` into its worker class (`worker_extension_cls`), so its
methods run inside every engine worker through `collective_rpc`:

- `megarl_sync_join(plan, rendezvous, engine_index)` checks the plan against the checkpoint the
  engine was started from (every HF name and shape; anything else is refused by name) and joins
  the sync group;
- `megarl_sync_receive(version)` streams the buckets into ONE `reload_weights` call: the recv of
  bucket k+1 is posted before bucket k is handed to vLLM, each bucket's checksum is verified
  before any of its tensors is loaded, and vLLM processes a layer as soon as its tensors are in.

On a checksum failure nothing more is loaded; the remaining buckets are drained (so the trainer
never blocks) and WeightSyncError is raised after vLLM has put the layers it did not receive
back. The engine then holds a mix of versions, which `RolloutEngine` records and refuses to
sample from until a sync succeeds.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator

import torch

from megarl.runtime.rendezvous import Rendezvous
from megarl.sync.plan import HEADER_BYTES, WeightSyncPlan
from megarl.sync.transport import SyncGroup, WeightSyncError, check_header, copy_if_inside, settle


def checkpoint_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} from the safetensors headers of an HF checkpoint (no tensor data read)."""
    out = {}
    for fname in sorted(os.listdir(model_dir)):
        if not fname.endswith(".safetensors"):
            continue
        with open(os.path.join(model_dir, fname), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                out[name] = tuple(meta["shape"])
    return out


def check_plan_against_checkpoint(plan: WeightSyncPlan, model_dir: str) -> None:
    """Refuse a plan whose HF tensors differ from the engine's checkpoint (names or shapes), FP8
    weight scales included: an fp8 engine starts from an FP8-serialized checkpoint
    (`sync.fp8.export_fp8_checkpoint`) holding exactly what the sync sends."""
    have = {n: s for n, s in checkpoint_shapes(model_dir).items() if not n.endswith("rotary_emb.inv_freq")}
    if plan.tied_embeddings:
        have.pop("lm_head.weight", None)
    want = dict(plan.hf_shapes())
    missing = sorted(set(have) - set(want))
    unknown = sorted(set(want) - set(have))
    wrong = sorted(n for n in set(want) & set(have) if tuple(want[n]) != tuple(have[n]))
    if missing or unknown or wrong:
        parts = []
        if missing:
            parts.append(f"the engine's checkpoint has tensors the plan never sends: {missing[:5]}")
        if unknown:
            parts.append(f"the plan sends tensors the engine does not have: {unknown[:5]}")
        if wrong:
            parts.append("shape mismatch: " + ", ".join(f"{n} plan {want[n]} engine {have[n]}" for n in wrong[:5]))
        raise WeightSyncError(f"weight sync plan {plan.fingerprint} does not fit the engine model in {model_dir}: "
                              + "; ".join(parts))


def _where(bucket) -> str:
    return f"bucket {bucket.index} from sender {bucket.sender} ({bucket.entries[0].megatron_name} ...)"


class BucketReceiver:
    """Receives a plan's buckets in order, verified, as (HF name, tensor) pairs."""

    def __init__(self, plan: WeightSyncPlan, group: SyncGroup, release: Callable[[torch.Tensor], None] | None = None):
        """The tensors yielded for a bucket are views of its buffer, valid until the buffer is
        reused two buckets later. `release(buffer)` is called before that: the consumer must then
        stop referring to it (vLLM's reload buffers an incomplete layer's tensors by reference;
        `_detach_pending_layer_loads` copies those out). None: the consumer copies at once."""
        self.plan, self.group, self.release = plan, group, release
        self.error: WeightSyncError | None = None
        self.stats: dict = {}
        self._clock = {"wait": 0.0, "verify": 0.0, "load": 0.0}

    def tensors(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the plan's HF tensors bucket by bucket; stats (seconds waiting for the network,
        verifying, and inside the consumer, i.e. vLLM loading) land in `self.stats`."""
        t0 = time.perf_counter()
        self._clock = {"wait": 0.0, "verify": 0.0, "load": 0.0}
        if self.plan.transport == "shared_memory":
            yield from self._shared(version)
        else:
            yield from self._broadcast(version)
        self.stats = {"bytes": self.plan.total_bytes, "buckets": len(self.plan.buckets),
                      "seconds": time.perf_counter() - t0, **{f"{k}_seconds": v for k, v in self._clock.items()}}

    def _broadcast(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        buckets = self.plan.buckets
        largest = max((b.nbytes for b in buckets), default=0) + HEADER_BYTES
        pool = [torch.empty(largest, dtype=torch.uint8, device=self.group.device) for _ in range(min(2, len(buckets)))]

        def post(i):
            b = buckets[i]
            buf = pool[i % len(pool)][:HEADER_BYTES + b.nbytes]
            return buf, self.group.broadcast(b.sender, buf)

        nxt = post(0) if buckets else None
        for i, bucket in enumerate(buckets):
            buf, work = nxt
            if i + 1 < len(buckets):   # overlap: the next recv goes into the other buffer
                if i >= 1 and self.release is not None:
                    self.release(pool[(i + 1) % len(pool)])
                nxt = post(i + 1)
            t = time.perf_counter()
            work.wait()
            self._clock["wait"] += time.perf_counter() - t
            yield from self._verified(buf, bucket, version)

    def _shared(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """A helper thread waits for each bucket's doorbell and verifies its checksum while this
        thread hands the previous bucket to the consumer (torch releases the GIL in both)."""
        ready: queue.Queue = queue.Queue()
        checks = {"wait": 0.0, "verify": 0.0}

        def ring_and_verify():
            position = {s.index: 0 for s in self.plan.senders}
            try:
                for bucket in self.plan.buckets:
                    s = bucket.sender
                    t = time.perf_counter()
                    rung = self.group.wait_bell(s)
                    checks["wait"] += time.perf_counter() - t
                    if rung != bucket.index:
                        raise WeightSyncError(f"sender {s} rang for bucket {rung}, the plan expects bucket "
                                              f"{bucket.index} (sender and receiver plans disagree)")
                    slot = self.group.slots[s].slot(position[s])
                    position[s] += 1
                    t = time.perf_counter()
                    error = None
                    try:
                        check_header(slot[:HEADER_BYTES + bucket.nbytes], version, bucket.index, _where(bucket))
                    except WeightSyncError as e:
                        error = e
                    checks["verify"] += time.perf_counter() - t
                    ready.put((bucket, slot, error))
            except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which raises it
                ready.put(e)

        helper = threading.Thread(target=ring_and_verify, name="megarl-sync-verify", daemon=True)
        helper.start()
        acks: list = []
        try:
            for _ in self.plan.buckets:
                t = time.perf_counter()
                item = ready.get()
                self._clock["wait"] += time.perf_counter() - t
                if isinstance(item, BaseException):
                    raise item
                bucket, slot, error = item
                if error is not None and self.error is None:
                    self.error = error
                if self.error is None:
                    yield from self._tensors_of(slot[:HEADER_BYTES + bucket.nbytes], bucket)
                if self.release is not None:
                    self.release(slot)
                settle(slot)   # (CUDA IPC) the load's copy kernels have read the slot: only then ack it
                acks.append(self.group.ack(bucket.sender))
            for work, _ in acks:
                work.wait()
        finally:
            helper.join()
        self._clock["verify"] += checks["verify"]

    def _verified(self, buf: torch.Tensor, bucket, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        if self.error is not None:
            return  # draining after a failure: receive, load nothing
        t = time.perf_counter()
        try:
            check_header(buf, version, bucket.index, _where(bucket))
        except WeightSyncError as e:
            self.error = e
            return
        finally:
            self._clock["verify"] += time.perf_counter() - t
        yield from self._tensors_of(buf, bucket)

    def _tensors_of(self, buf: torch.Tensor, bucket) -> Iterator[tuple[str, torch.Tensor]]:
        payload = buf[HEADER_BYTES:]
        t = time.perf_counter()
        for entry in bucket.entries:
            for spec in entry.hf:
                yield spec.name, payload[spec.offset:spec.offset + spec.nbytes].view(
                    getattr(torch, spec.dtype)).view(spec.shape)
        self._clock["load"] += time.perf_counter() - t


class WeightReceiverExtension:
    """Mixed into vLLM's worker (`EngineConfig.worker_extension_cls`)."""

    def megarl_sync_join(self, plan: WeightSyncPlan, rendezvous: Rendezvous, engine_index: int,
                         generation: int = 0) -> int:
        from megarl.sync.direct_load import DirectLoader

        check_plan_against_checkpoint(plan, self.vllm_config.model_config.model)
        worker = getattr(self, "rank", 0) or 0
        rank = plan.receiver_rank(engine_index, worker)
        self._megarl_direct, self._megarl_direct_why = DirectLoader.build(
            self.model_runner.get_model(), plan.hf_shapes(), plan.engines.tensor_parallel_size)
        self._megarl_sync = SyncGroup(plan, rank, rendezvous, generation=generation, device=_worker_device(self))
        return rank

    def megarl_sync_receive(self, version: int) -> dict:
        group = getattr(self, "_megarl_sync", None)
        if group is None:
            raise WeightSyncError("this engine has not joined a weight sync group (megarl_sync_join)")
        direct = getattr(self, "_megarl_direct", None)
        # kernel-format fast path (sync/direct_load.py), else vLLM's layerwise reload
        consume, release = ((direct.load, direct.detach) if direct is not None
                            else (self.megarl_reload_weights, _detach_pending_layer_loads))
        receiver = BucketReceiver(group.plan, group, release=release)
        consume(receiver.tensors(version))
        if receiver.error is not None:
            raise receiver.error
        if direct is not None:
            direct.finish()
        return {**receiver.stats, "load_path": "direct" if direct is not None else "reload",
                "reload_reason": getattr(self, "_megarl_direct_why", "")}

    def megarl_reload_weights(self, named_tensors) -> None:
        """vLLM's in-place reload plus the fixes it needs (rollout/vllm_compat.py)."""
        from megarl.rollout.vllm_compat import cpu_moe_prepack_after_reload

        self.reload_weights(weights_iterator=named_tensors)
        cpu_moe_prepack_after_reload(self.model_runner.get_model())

    def megarl_reload_from_path(self, path: str) -> None:
        """Reload every weight from an HF safetensors directory (the disk fallback path)."""
        from megarl.rollout.vllm_compat import cpu_moe_prepack_after_reload

        self.reload_weights(weights_path=path)
        cpu_moe_prepack_after_reload(self.model_runner.get_model())

    def megarl_sync_leave(self) -> None:
        group = getattr(self, "_megarl_sync", None)
        if group is not None:
            group.close()
        self._megarl_sync = None


def _worker_device(worker) -> torch.device:
    """Where this vLLM worker keeps its weights (buckets are received there: NCCL on GPUs)."""
    device = getattr(worker, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def _detach_pending_layer_loads(buffer: torch.Tensor) -> int:
    """Copy out every tensor vLLM's layerwise reload still buffers by reference inside `buffer`
    (a layer's tensors are kept until the layer is complete, and a layer's weight and bias may
    come in different buckets: vllm/model_executor/model_loader/reload/layerwise.py). Returns
    how many were copied; the buffer can then be rewritten."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    detach, copied = copy_if_inside(buffer), 0
    for info in list(LAYERWISE_INFO.values()):
        for _, bound in info.loaded_weights:
            for key, value in list(bound.arguments.items()):
                bound.arguments[key] = detach(value)
                copied += bound.arguments[key] is not value
    return copied
