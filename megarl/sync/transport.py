"""The sync group and the bucket wire format.

The group spans the trainer's sending ranks and every engine worker. It is built from standalone
process-group objects (`ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPUs — chosen by
`runtime.device`, nothing else differs) over a TCPStore, so it never touches the default
process group: the trainer ranks keep megatron's world, the vLLM workers keep vLLM's.

There is one group per sender: {sender} ∪ receivers, and senders of different pipeline stages
do not wait on each other's groups. The plan's `transport` says how a bucket's bytes travel:

- "broadcast": the bucket is broadcast from its sender to exactly the engines (never to the other
  senders). Works across nodes; on one CPU host every byte crosses the loopback socket twice
  (TP gather, then broadcast) and costs CPU on both ends.
- "shared_memory" (every party on one host, CPU): the sender owns SLOTS bucket buffers in
  /dev/shm that its TP peers and every engine worker map. Each TP rank writes its own shard
  straight into the slot (no gather), the engines read the bucket where it lies (no copy on the
  wire), and two small groups carry a doorbell (bucket k is in slot k % SLOTS) and an ack (every
  engine is done with it, the slot may be rewritten). Separate groups, because an engine verifies
  the next bucket (waiting for its bell) while it is still loading the previous one (not yet
  acked), and a group's operations must be issued in the same order everywhere. Both control
  groups are gloo (a few bytes each). On GPUs the slots are device buffers shared by CUDA IPC
  handle (`CudaIpcSlots`, chosen by the device like the backend; written for colocated GPUs and
  not runnable here: only its selection is tested on CPU). Same interface as a CUDA-IPC variant for
  colocated GPUs would have (slots shared by IPC handle instead of by file); that one is not built.

Wire format of a bucket: a 32-byte header int64[MAGIC, weight version, bucket index, checksum]
followed by the payload (HF tensors at the plan's offsets). The receiver recomputes the checksum
(`payload_checksum`) before anything is loaded.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist

from megarl.runtime.rendezvous import Rendezvous
from megarl.sync.plan import HEADER_BYTES, WeightSyncPlan

MAGIC = 0x6D65_6761_726C_7379  # "megarlsy"


class WeightSyncError(RuntimeError):
    """A sync failed (checksum, version or order mismatch, or a peer went away)."""


CHECKSUM_BLOCK_WORDS = 8192  # 64 KiB blocks
_MASK63 = (1 << 63) - 1


def payload_checksum(payload: torch.Tensor) -> int:
    """A 63-bit checksum of a uint8 payload, computed with tensor ops on the payload's device
    (no host copy on GPUs; ~0.09 s/GB on one CPU core, 3x cheaper than zlib.crc32).

    s1 = sum of the payload's int64 words (mod 2^64): any change of a single word, any bit flip,
    any zeroed or truncated span that was not already zero changes it. s2 = sum over 64 KiB blocks
    of (block index + 1) * block sum: blocks delivered out of order change it. The two are mixed
    with a multiplicative hash. (A CRC would also catch two compensating changes inside one
    block; transport faults do not look like that, and the header's version/bucket index catches
    stale or misrouted buckets.)"""
    n = payload.numel() // 8 * 8
    words = payload[:n].view(torch.int64)
    whole = words.numel() // CHECKSUM_BLOCK_WORDS * CHECKSUM_BLOCK_WORDS
    per_block = words[:whole].view(-1, CHECKSUM_BLOCK_WORDS).sum(1)
    s1 = int(per_block.sum()) + int(words[whole:].sum()) + int(payload[n:].sum())
    index = torch.arange(1, per_block.numel() + 1, dtype=torch.int64, device=payload.device)
    s2 = int((per_block * index).sum())
    return (s1 ^ (s2 * 0x9E3779B97F4A7C15)) & _MASK63


def write_header(buf: torch.Tensor, version: int, bucket: int) -> None:
    payload = buf[HEADER_BYTES:]
    buf[:HEADER_BYTES].view(torch.int64).copy_(
        torch.tensor([MAGIC, version, bucket, payload_checksum(payload)], dtype=torch.int64))


def check_header(buf: torch.Tensor, version: int, bucket: int, where: str) -> None:
    """Raise WeightSyncError unless the header says (MAGIC, version, bucket) and the payload's
    checksum matches the one the sender computed."""
    magic, got_version, got_bucket, checksum = buf[:HEADER_BYTES].view(torch.int64).tolist()
    if magic != MAGIC:
        raise WeightSyncError(f"{where}: not a megarl weight bucket (bad magic {magic:#x})")
    if (got_version, got_bucket) != (version, bucket):
        raise WeightSyncError(f"{where}: expected version {version} bucket {bucket}, got version "
                              f"{got_version} bucket {got_bucket} (sender and receiver plans disagree)")
    actual = payload_checksum(buf[HEADER_BYTES:])
    if actual != checksum:
        raise WeightSyncError(f"{where}: checksum mismatch (sender {checksum:#x}, received {actual:#x}): "
                              "the weights were corrupted in transit")


SLOTS = 3   # shared-memory buckets per sender: one being loaded, one being verified, one being written
SHM_DIR = "/dev/shm"


class SharedSlots:
    """A sender's bucket buffers in host shared memory (files in /dev/shm, mapped MAP_SHARED).

    The sender's lead creates them under fresh names and publishes the paths in the store; its TP
    peers and the engines map them, and the lead unlinks the files once everyone has, so nothing
    is left in /dev/shm even if a process dies later (the mappings live until the processes end)."""

    def __init__(self, paths: list[str], nbytes: int):
        self.paths, self.nbytes = list(paths), nbytes
        self.buffers = [torch.from_file(p, shared=True, size=nbytes, dtype=torch.uint8) for p in self.paths]

    @classmethod
    def create(cls, tag: str, nbytes: int, count: int = SLOTS) -> SharedSlots:
        paths = []
        try:
            for i in range(count):
                path = os.path.join(SHM_DIR, f"megarl-sync-{tag}-{uuid.uuid4().hex[:12]}-{i}")
                paths.append(path)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    # reserve the pages now: a sparse file on a full tmpfs would SIGBUS at first write
                    os.posix_fallocate(fd, 0, nbytes)
                finally:
                    os.close(fd)
        except OSError as e:
            for p in paths:
                if os.path.exists(p):
                    os.unlink(p)
            free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize if os.path.isdir(SHM_DIR) else 0
            raise WeightSyncError(f"the shared-memory weight sync needs {count} x {nbytes / 2**20:.0f} MiB in "
                                  f"{SHM_DIR} ({free / 2**20:.0f} MiB free): {e.strerror}. Lower "
                                  "rollout.weight_sync.bucket_mb, give the container a larger /dev/shm "
                                  "(docker --shm-size), or set rollout.weight_sync.transport: broadcast") from None
        return cls(paths, nbytes)

    @classmethod
    def open(cls, published: str, where: str) -> SharedSlots:
        """Map the slots whose paths the lead published; a process on another host cannot."""
        meta = json.loads(published)
        missing = [p for p in meta["paths"] if not os.path.exists(p)]
        if missing:
            raise WeightSyncError(f"{where}: the shared-memory weight sync buffers {missing[0]} do not exist here; "
                                  "this process is not on the trainer's host. Set rollout.weight_sync.transport: "
                                  "broadcast when engines and trainer ranks are on different nodes")
        return cls(meta["paths"], meta["nbytes"])

    def publish(self) -> str:
        return json.dumps({"kind": "file", "paths": self.paths, "nbytes": self.nbytes})

    def slot(self, bucket_position: int) -> torch.Tensor:
        return self.buffers[bucket_position % len(self.buffers)]

    def unlink(self) -> None:
        for p in self.paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


class CudaIpcSlots:
    """The GPU variant: bucket buffers in the sender's GPU memory, opened by TP peers and engine
    workers through CUDA IPC handles (torch.multiprocessing's reductions). A peer maps the buffer
    on its own index of the same physical GPU (matched by UUID: processes may see different
    CUDA_VISIBLE_DEVICES). The sender keeps the buffers alive; nothing to unlink."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = buffers

    @classmethod
    def create(cls, tag: str, nbytes: int, count: int = SLOTS, device: torch.device | None = None) -> CudaIpcSlots:
        return cls([torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)])

    def publish(self) -> str:
        import base64
        import pickle

        from torch.multiprocessing.reductions import reduce_tensor

        handles = [reduce_tensor(b) for b in self.buffers]
        uuid_ = str(torch.cuda.get_device_properties(self.buffers[0].device).uuid)
        return json.dumps({"kind": "cuda_ipc", "gpu": uuid_,
                           "handles": base64.b64encode(pickle.dumps(handles)).decode()})

    @classmethod
    def open(cls, meta: dict, where: str) -> CudaIpcSlots:
        import base64
        import pickle

        local = [i for i in range(torch.cuda.device_count())
                 if str(torch.cuda.get_device_properties(i).uuid) == meta["gpu"]]
        if not local:
            raise WeightSyncError(f"{where}: the sender's GPU {meta['gpu']} is not visible here, so its CUDA IPC "
                                  "buffers cannot be opened. Set rollout.weight_sync.transport: broadcast")
        buffers = []
        for rebuild, args in pickle.loads(base64.b64decode(meta["handles"])):
            args = list(args)
            args[6] = local[0]     # rebuild_cuda_tensor's storage_device: this process's index of that GPU
            buffers.append(rebuild(*args))
        return cls(buffers)

    def slot(self, bucket_position: int) -> torch.Tensor:
        return self.buffers[bucket_position % len(self.buffers)]

    def unlink(self) -> None:
        pass


def create_slots(tag: str, nbytes: int, device: torch.device) -> SharedSlots | CudaIpcSlots:
    """The shared bucket buffers for a sender on `device` (the one place that picks the kind)."""
    if device.type == "cuda":
        return CudaIpcSlots.create(tag, nbytes, device=device)
    return SharedSlots.create(tag, nbytes)


def open_slots(published: str, where: str) -> SharedSlots | CudaIpcSlots:
    meta = json.loads(published)
    if meta["kind"] == "cuda_ipc":
        return CudaIpcSlots.open(meta, where)
    return SharedSlots.open(published, where)


def settle(buffer: torch.Tensor) -> None:
    """Wait until this process's queued device work on `buffer` is done: a CUDA slot shared by
    IPC is written (sender, TP peers) or read (engine load) by asynchronous kernels, while the
    doorbell, barrier and ack that hand the slot over travel on gloo and do not wait for them.
    Called before every hand-over; a no-op for host memory."""
    if buffer.is_cuda:
        torch.cuda.current_stream(buffer.device).synchronize()


def copy_if_inside(buffer: torch.Tensor):
    """tensor -> tensor, or a private copy when it lies in `buffer` (which is about to be reused)."""
    lo = buffer.data_ptr()
    hi = lo + buffer.numel() * buffer.element_size()

    def detach(x):
        inside = isinstance(x, torch.Tensor) and x.device == buffer.device and lo <= x.data_ptr() < hi
        return x.clone() if inside else x
    return detach


def slot_bytes(plan: WeightSyncPlan, sender: int) -> int:
    return HEADER_BYTES + max((b.nbytes for b in plan.buckets_of(sender)), default=0)


def sender_prefix(plan: WeightSyncPlan, generation: int, sender: int) -> str:
    return f"megarl-sync/{plan.fingerprint}/{generation}/sender{sender}"


class SyncGroup:
    """This process's membership in the sync world: the per-sender groups it belongs to.

    A sender joins only its own group (as rank 0); a receiver joins every sender's group (as
    1 + its receiver index). Groups are joined in sender order, so no two processes wait on each
    other in opposite orders."""

    def __init__(self, plan: WeightSyncPlan, sync_rank: int, rendezvous: Rendezvous,
                 store: dist.Store | None = None, generation: int = 0, device: torch.device | None = None):
        self.plan, self.sync_rank = plan, sync_rank
        self.device = device or torch.device("cpu")
        timeout = timedelta(seconds=rendezvous.timeout_s)
        self.store = store = store if store is not None else rendezvous.connect()
        num_senders = len(plan.senders)
        self.is_sender = sync_rank < num_senders
        self.groups: dict[int, object] = {}
        self.ack_groups: dict[int, object] = {}
        self.slots: dict[int, SharedSlots | CudaIpcSlots] = {}
        shared = plan.transport == "shared_memory"
        for s in plan.senders:
            if self.is_sender and s.index != sync_rank:
                continue
            member = 0 if self.is_sender else 1 + (sync_rank - num_senders)
            name = sender_prefix(plan, generation, s.index)
            if shared and self.is_sender:
                self.slots[s.index] = create_slots(f"{plan.fingerprint[:8]}-g{generation}-s{s.index}",
                                                   slot_bytes(plan, s.index), self.device)
                store.set(name + "/slots", self.slots[s.index].publish())
            elif shared:  # engines map the slots before joining, so the join proves they have
                self.slots[s.index] = open_slots(store.get(name + "/slots").decode(),
                                                 f"engine worker {sync_rank - num_senders}")
            size = 1 + plan.engines.receivers
            data_device = torch.device("cpu") if shared else self.device   # shared: the group only rings
            self.groups[s.index] = _process_group(dist.PrefixStore(name, store), member, size, timeout, data_device)
            if shared:
                self.ack_groups[s.index] = _process_group(dist.PrefixStore(name + "/acks", store), member, size,
                                                          timeout, torch.device("cpu"))

    def broadcast(self, sender: int, buf: torch.Tensor):
        """Start broadcasting `buf` from `sender` to the receivers; returns the async work."""
        return self.groups[sender].broadcast(buf, 0)

    # shared_memory transport: bucket k of a sender lies in its slot k % SLOTS
    def ring(self, sender: int, bucket: int) -> list:
        """Sender: bucket `bucket` is in its slot. Returns the works to keep alive: the doorbell
        and the ack, which completes once every engine is done with the slot."""
        bell = torch.tensor([bucket], dtype=torch.int64)
        ack = torch.zeros(1, dtype=torch.int64)
        return [self.groups[sender].broadcast(bell, 0), self.ack_groups[sender].allreduce([ack]), bell, ack]

    def wait_bell(self, sender: int) -> int:
        """Receiver: the index of the bucket that is now in the sender's next slot."""
        bell = torch.empty(1, dtype=torch.int64)
        self.groups[sender].broadcast(bell, 0).wait()
        return int(bell[0])

    def ack(self, sender: int):
        """Receiver: done with the current slot (async; keep the returned work until it completes)."""
        ack = torch.zeros(1, dtype=torch.int64)
        return self.ack_groups[sender].allreduce([ack]), ack

    def close(self) -> None:
        for slots in self.slots.values():
            if self.is_sender:  # the creator's files (normally unlinked right after the join)
                slots.unlink()
        self.slots.clear()
        self.groups.clear()
        self.ack_groups.clear()
        self.store = None


def _process_group(store, rank: int, size: int, timeout: timedelta, device: torch.device):
    """A standalone process group: NCCL for CUDA tensors, gloo otherwise."""
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    return dist.ProcessGroupGloo(store, rank, size, timeout)
