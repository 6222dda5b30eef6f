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
import struct
import time
from collections.abc import Callable, Iterator

import torch

from megarl.sync.plan import HEADER_BYTES, WeightSyncPlan
from megarl.sync.transport import Rendezvous, SyncGroup, WeightSyncError, check_header


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
    """Refuse a plan whose HF tensors differ from the engine's checkpoint (names or shapes)."""
    have = {n: s for n, s in checkpoint_shapes(model_dir).items() if not n.endswith("rotary_emb.inv_freq")}
    if plan.tied_embeddings:
        have.pop("lm_head.weight", None)
    want = {n: s for n, s in plan.hf_shapes().items() if not n.endswith("_scale")}
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


class BucketReceiver:
    """Receives a plan's buckets in order, verified, as (HF name, tensor) pairs."""

    def __init__(self, plan: WeightSyncPlan, group: SyncGroup, recyclable: Callable[[], bool] | None = None):
        """`recyclable()` is asked after a bucket's tensors were consumed: True when the consumer
        holds no reference to them any more, so the buffer can receive another bucket (fresh
        buffers per bucket pay their page faults every time). None: never reuse."""
        self.plan, self.group, self.recyclable = plan, group, recyclable
        self.error: WeightSyncError | None = None
        self.stats: dict = {}

    def tensors(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the plan's HF tensors bucket by bucket; stats (seconds waiting for the network,
        verifying, and inside the consumer, i.e. vLLM loading) land in `self.stats`."""
        t0 = time.perf_counter()
        buckets = self.plan.buckets
        received = 0
        wait = verify = load = 0.0

        free: list[torch.Tensor] = []
        largest = max((b.nbytes for b in buckets), default=0) + HEADER_BYTES

        def post(i):
            b = buckets[i]
            whole = free.pop() if free else torch.empty(largest, dtype=torch.uint8)
            buf = whole[:HEADER_BYTES + b.nbytes]
            return b, whole, buf, self.group.broadcast(b.sender, buf)

        nxt = post(0) if buckets else None
        for i in range(len(buckets)):
            bucket, whole, buf, work = nxt
            nxt = post(i + 1) if i + 1 < len(buckets) else None   # overlap: next recv in flight
            t = time.perf_counter()
            work.wait()
            wait += time.perf_counter() - t
            received += bucket.nbytes
            if self.error is not None:
                free.append(whole)
                continue  # draining after a failure: receive, load nothing
            t = time.perf_counter()
            try:
                check_header(buf, version, bucket.index,
                             f"bucket {bucket.index} from sender {bucket.sender} "
                             f"({bucket.entries[0].megatron_name} ...)")
            except WeightSyncError as e:
                self.error = e
                free.append(whole)
                continue
            finally:
                verify += time.perf_counter() - t
            payload = buf[HEADER_BYTES:]
            t = time.perf_counter()
            for entry in bucket.entries:
                for spec in entry.hf:
                    yield spec.name, payload[spec.offset:spec.offset + spec.nbytes].view(
                        getattr(torch, spec.dtype)).view(spec.shape)
            load += time.perf_counter() - t
            if self.recyclable is not None and self.recyclable():
                free.append(whole)
            del buf, payload
        self.stats = {"bytes": received, "buckets": len(buckets), "seconds": time.perf_counter() - t0,
                      "wait_seconds": wait, "verify_seconds": verify, "load_seconds": load}


class WeightReceiverExtension:
    """Mixed into vLLM's worker (`EngineConfig.worker_extension_cls`)."""

    def megarl_sync_join(self, plan: WeightSyncPlan, rendezvous: Rendezvous, engine_index: int,
                         generation: int = 0) -> int:
        check_plan_against_checkpoint(plan, self.vllm_config.model_config.model)
        worker = getattr(self, "rank", 0) or 0
        rank = plan.receiver_rank(engine_index, worker)
        self._megarl_sync = SyncGroup(plan, rank, rendezvous, generation=generation)
        return rank

    def megarl_sync_receive(self, version: int) -> dict:
        group = getattr(self, "_megarl_sync", None)
        if group is None:
            raise WeightSyncError("this engine has not joined a weight sync group (megarl_sync_join)")
        receiver = BucketReceiver(group.plan, group, recyclable=_no_pending_layer_loads)
        self.megarl_reload_weights(receiver.tensors(version))
        if receiver.error is not None:
            raise receiver.error
        return receiver.stats

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


def _no_pending_layer_loads() -> bool:
    """True when vLLM's layerwise reload holds no buffered (unprocessed) weights: every tensor
    handed over so far has been copied into the model. It buffers a layer's tensors by reference
    until the layer is complete (vllm/model_executor/model_loader/reload/layerwise.py)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    return not any(info.loaded_weights for info in list(LAYERWISE_INFO.values()))
