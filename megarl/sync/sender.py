"""The trainer side of a weight sync: every actor rank walks the same plan.

For each sender in plan order, for each of its buckets, for each tensor, the shards of the
sender's tensor-parallel (or expert-TP) group are written into the bucket as HF tensors at the
plan's offsets (q/k/v and gate/up rows or a split dimension, cast to the engine dtype, or
FP8-quantized whole); the sender stamps the header (checksum) and hands the bucket over:

- transport "broadcast": the bucket is assembled on the sender and broadcast to the engines.
  On CPUs (no FP8), every rank of the sender's TP group writes its own shards into the sender's
  bucket slot in host shared memory (TP groups never span nodes), a barrier says it is complete,
  and the slot is broadcast: no gather, the ranks pack in parallel, and up to SLOTS buckets are in
  flight. Elsewhere (GPUs, FP8, or no room in /dev/shm) the group's ranks gather the shards to the
  sender, which packs the bucket; packing bucket k+1 overlaps the broadcast of bucket k.
- transport "shared_memory": every rank of the group writes its own shard into the sender's
  shared slot (no gather), a barrier of the group says the bucket is complete, the sender rings
  the engines; engines load bucket k and verify k+1 while the ranks write k+2 into the third slot.

The extra memory is two bucket buffers plus the largest gathered tensor (broadcast), or the
sender's three shared slots, mapped once by every engine (shared_memory) — never the model.
Ranks of other data-parallel replicas do nothing.
"""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist

from megarl.checkpoint.hf_map import hf_tensors
from megarl.sync.plan import HEADER_BYTES, SyncEntry, UnsupportedLayout, WeightSyncPlan
from megarl.sync.transport import SyncGroup, open_slots, sender_prefix, settle, write_header


def _works(pending: list) -> list:
    """The async works among what a hand-over returned (the rest are tensors kept alive with them)."""
    return [w for w in pending if not isinstance(w, torch.Tensor)]


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


class WeightSender:
    """Created on every rank of the actor after the model exists (collective-free)."""

    def __init__(self, plan: WeightSyncPlan, chunks: list, corrupt_bucket: int | None = None):
        """`corrupt_bucket`: flip one payload byte of that bucket after its checksum is computed —
        only for testing that receivers detect corruption."""
        from megarl.runtime.megatron import parallel_state as ps

        self.plan, self.corrupt_bucket = plan, corrupt_bucket
        self.chunks = [_unwrap(c) for c in chunks]
        self.pp = ps.get_pipeline_model_parallel_rank()
        self.tp, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.dp, self.cp = ps.get_data_parallel_rank(), ps.get_context_parallel_rank()
        self.ep = ps.get_expert_model_parallel_rank()
        self.etp = ps.get_expert_tensor_parallel_rank()
        self.etp_size = ps.get_expert_tensor_parallel_world_size()
        self.edp = ps.get_expert_data_parallel_rank()
        self._groups = {"tp": ps.get_tensor_model_parallel_group(), "etp": ps.get_expert_tensor_parallel_group()}
        self._group_size = {"tp": self.tp_size, "etp": self.etp_size}
        self._check_layout(plan, ps)
        self.params = {}
        for v, chunk in enumerate(self.chunks):
            for name, p in chunk.named_parameters():
                self.params[(v, name)] = p
        self.entries = plan.local_entries(self.pp, self.ep)
        self.device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self._check_params()
        if self.ep == 0:
            lead = self.tp == 0 and self.dp == 0 and self.cp == 0
        else:
            lead = self.etp == 0 and self.edp == 0
        self.sender = plan.sender_at(self.pp, self.ep) if lead else None
        self.group: SyncGroup | None = None

    # ---- checks ----------------------------------------------------------------------------
    def _check_layout(self, plan: WeightSyncPlan, ps) -> None:
        have = dict(tp=self.tp_size, pp=ps.get_pipeline_model_parallel_world_size(),
                    vpp=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
                    ep=ps.get_expert_model_parallel_world_size(), etp=self.etp_size)
        want = dict(tp=plan.trainer.tp, pp=plan.trainer.pp, vpp=plan.trainer.vpp or 1, ep=plan.trainer.ep,
                    etp=plan.trainer.expert_tp)
        if have != want or len(self.chunks) != want["vpp"]:
            raise UnsupportedLayout(f"the trainer runs {have} with {len(self.chunks)} model chunk(s), but the "
                                    f"weight sync plan was built for {want}: rebuild the plan")

    def _check_params(self) -> None:
        """Every parameter of this rank is in the map (or is the tied output copy), and every
        mapped tensor exists with the shape its shard rule implies."""
        for (v, name), p in self.params.items():
            if (v, name) in self.entries:
                continue
            if name == "output_layer.weight" and self.plan.tied_embeddings:
                continue  # last stage's copy of the tied embedding: the first stage sends it
            raise UnsupportedLayout(f"trainer parameter {name!r} (pipeline rank {self.pp}, chunk {v}, shape "
                                    f"{tuple(p.shape)}) is not in the weight sync map for {self.plan.arch}; "
                                    "it would never reach the engines")
        for (v, name), entry in self.entries.items():
            if (v, name) not in self.params:
                raise UnsupportedLayout(f"the weight sync map expects parameter {name!r} in chunk {v} on "
                                        f"pipeline rank {self.pp}, but the trainer model has no such parameter")
            full = _full_shape(entry, self.plan)
            want = list(full)
            if entry.shard.kind != "replicated":
                size = self._group_size[entry.shard.group]
                want[entry.shard.dim] //= size
            got = list(self.params[(v, name)].shape)
            if got != want:
                raise UnsupportedLayout(f"trainer parameter {name!r} has shape {got}, the weight sync map expects "
                                        f"{want} (full {list(full)}, {entry.shard})")

    # ---- group ----------------------------------------------------------------------------
    def join(self, rendezvous, store=None, generation: int = 0) -> None:
        """Senders join their group (blocks until the engines join too). Called on every actor rank.
        Where the TP ranks write their shards into the sender's slots (shared_memory, and broadcast
        on CPUs), the peers map the slots the sender publishes, and the sender removes the slot
        files once every peer (and engine) has them mapped."""
        self.peer_slots: dict = {}   # sender index -> its slots, on the ranks that write into them
        self.own_slots = None        # broadcast: this sender's staging slots (None: gather instead)
        if self.sender is None:
            peer_of = [s for s in self.plan.senders if self._participates(s)]
            if peer_of and (self.plan.transport == "shared_memory" or self._may_stage()):
                store = rendezvous.connect()
                for s in peer_of:
                    name = sender_prefix(self.plan, generation, s.index)
                    published = store.get(name + "/slots").decode()
                    if json.loads(published)["kind"] == "none":
                        continue  # this sender gathers
                    self.peer_slots[s.index] = open_slots(published, f"trainer rank {dist.get_rank()}")
                    store.set(f"{name}/mapped/{dist.get_rank()}", "1")
            return
        self.group = SyncGroup(self.plan, self.sender.index, rendezvous, store=store, generation=generation,
                               device=self.device)
        name = sender_prefix(self.plan, generation, self.sender.index)
        if self.plan.transport == "shared_memory":
            slots = self.group.slots[self.sender.index]
        elif self._may_stage():
            slots = self.own_slots = self._staging_slots(generation)
            self.group.store.set(name + "/slots", slots.publish() if slots else json.dumps({"kind": "none"}))
        else:
            return
        if slots is not None:
            self.group.store.wait([f"{name}/mapped/{r}" for r in self._peer_ranks(self.sender)])
            slots.unlink()

    def _may_stage(self) -> bool:
        """Broadcast with TP ranks writing into the sender's host shared memory: CPU, no FP8 (whole
        tensors are quantized on the sender), and split tensors to write (TP or expert TP > 1).
        The same answer on every rank of the actor."""
        return (self.plan.transport == "broadcast" and self.device.type == "cpu" and not self.plan.quantization
                and max(self._group_size.values()) > 1)

    def _staging_slots(self, generation: int):
        """This sender's slots in /dev/shm, or None (and a note) when there is no room: then it gathers."""
        from megarl.sync.transport import SLOTS, SharedSlots, WeightSyncError, slot_bytes

        try:
            return SharedSlots.create(f"{self.plan.fingerprint[:8]}-g{generation}-stage{self.sender.index}",
                                      slot_bytes(self.plan, self.sender.index), count=SLOTS)
        except WeightSyncError as e:
            print(f"[weight sync] sender {self.sender.index} gathers its TP shards instead of staging them in "
                  f"shared memory: {e}", flush=True)
            return None

    def _peer_ranks(self, s) -> list[int]:
        """Global ranks (other than this sender) that hold shards of sender `s`'s split tensors."""
        used = {e.shard.group for b in self.plan.buckets_of(s.index) for e in b.entries
                if e.shard.kind != "replicated" and self._group_size[e.shard.group] > 1}
        me = dist.get_rank()
        return sorted({r for g in used for r in dist.get_process_group_ranks(self._groups[g]) if r != me})

    # ---- sending --------------------------------------------------------------------------
    @torch.no_grad()
    def send(self, version: int) -> dict:
        """Collective over the actor ranks (and the engines, for the senders). Returns stats:
        bytes, buckets, seconds, the path of this rank's sender, and where the time went
        (gather, pack, checksum, send_wait)."""
        t0 = time.perf_counter()
        self._clock = {"gather": 0.0, "pack": 0.0, "checksum": 0.0, "send_wait": 0.0}
        sent = buckets = 0
        path = None   # how this rank's own sender sent: shared_memory, staged_broadcast, gathered_broadcast
        for s in self.plan.senders:
            mine = self.sender is not None and self.sender.index == s.index
            if not mine and not self._participates(s):
                continue
            if self.plan.transport == "shared_memory":
                slots = self.group.slots[s.index] if mine else self.peer_slots[s.index]
                n, b = self._send_written(s, mine, version, slots, doorbell=True)
                path = "shared_memory" if mine else path
            elif (self.own_slots if mine else self.peer_slots.get(s.index)) is not None:
                slots = self.own_slots if mine else self.peer_slots[s.index]
                n, b = self._send_written(s, mine, version, slots, doorbell=False)
                path = "staged_broadcast" if mine else path
            else:
                n, b = self._send_broadcast(s, mine, version)
                path = "gathered_broadcast" if mine else path
            sent, buckets = sent + n, buckets + b
        return {"bytes": sent, "buckets": buckets, "seconds": time.perf_counter() - t0, "path": path,
                **{f"{k}_seconds": v for k, v in self._clock.items()}}

    def _timed(self, what: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self._clock[what] += time.perf_counter() - t
        return out

    def _stamp(self, buf: torch.Tensor, version: int, bucket) -> None:
        self._timed("checksum", write_header, buf, version, bucket.index)
        if self.corrupt_bucket == bucket.index:
            buf[HEADER_BYTES + bucket.nbytes // 2] ^= 0x5A

    def _send_broadcast(self, s, mine: bool, version: int) -> tuple[int, int]:
        mine_buckets = self.plan.buckets_of(s.index)
        # Two bucket buffers, reused: the next bucket is packed while the previous one is on
        # the wire (fresh buffers per bucket would pay their page faults every time).
        pool = [torch.empty(HEADER_BYTES + max(b.nbytes for b in mine_buckets), dtype=torch.uint8, device=self.device)
                for _ in range(min(2, len(mine_buckets)))] if mine else []
        in_flight: list = []
        sent = 0
        for k, bucket in enumerate(mine_buckets):
            buf = None
            if mine:
                if len(in_flight) == len(pool):      # the buffer we are about to reuse must be sent
                    self._timed("send_wait", in_flight.pop(0).wait)
                buf = pool[k % len(pool)][:HEADER_BYTES + bucket.nbytes]
            for entry in bucket.entries:
                parts = self._timed("gather", self._gather, entry, s, mine)
                if mine:
                    self._timed("pack", self._pack, entry, dict(enumerate(parts)), len(parts), buf)
            if mine:
                self._stamp(buf, version, bucket)
                in_flight.append(self.group.broadcast(s.index, buf))
                sent += bucket.nbytes
        for work in in_flight:
            self._timed("send_wait", work.wait)
        self._workspace = None
        return sent, len(mine_buckets) if mine else 0

    def _send_written(self, s, mine: bool, version: int, slots, doorbell: bool) -> tuple[int, int]:
        """Every rank writes its own shards into the sender's slot (bucket k in slot k % SLOTS);
        `gather` time is the barriers'. The sender stamps the bucket and hands it over: a
        `doorbell` to engines that map the slot (shared_memory), else a broadcast from the slot.
        The slot is rewritten only once the hand-over's works complete."""
        acks: list = []    # per bucket: the works that complete when every engine is done with it
        sent = 0
        mine_buckets = self.plan.buckets_of(s.index)
        for k, bucket in enumerate(mine_buckets):
            groups = [g for g in self._bucket_groups(bucket) if self._member(s, g)]
            if mine and k >= len(slots.buffers):        # the slot still holds bucket k - SLOTS
                for work in _works(acks[k - len(slots.buffers)]):
                    self._timed("send_wait", work.wait)
            for g in groups:                             # the slot is free for everyone
                self._timed("gather", dist.barrier, group=self._groups[g])
            buf = slots.slot(k)[:HEADER_BYTES + bucket.nbytes]
            for entry in bucket.entries:
                parts = self._own_parts(entry, s, mine)
                if parts:
                    self._timed("pack", self._pack, entry, parts, self._group_size[entry.shard.group], buf)
            if not mine:                                 # (CUDA IPC) a peer's copies have landed; the
                settle(buf)                              # sender settles once, after stamping, below
            for g in groups:                             # every shard of the bucket is written
                self._timed("gather", dist.barrier, group=self._groups[g])
            if mine:
                self._stamp(buf, version, bucket)
                settle(buf)                              # (CUDA IPC) the header is in the slot too
                acks.append(self.group.ring(s.index, bucket.index) if doorbell
                            else [self.group.broadcast(s.index, buf)])
                sent += bucket.nbytes
        for works in acks:
            for work in _works(works):
                self._timed("send_wait", work.wait)
        return sent, len(acks)

    def _bucket_groups(self, bucket) -> list[str]:
        """The TP / expert-TP groups whose ranks write shards of this bucket (sorted: every rank
        enters the barriers in the same order)."""
        return sorted({e.shard.group for e in bucket.entries
                       if e.shard.kind != "replicated" and self._group_size[e.shard.group] > 1})

    def _member(self, s, group: str) -> bool:
        """Is this rank in sender `s`'s TP group ("tp": the dense shards of its stage) or expert-TP
        group ("etp": the shards of its experts)? The same ranks `_gather` collects from."""
        if s.pp_rank != self.pp:
            return False
        if group == "tp":
            return s.ep_rank == 0 and self.dp == 0 and self.cp == 0
        return s.ep_rank == self.ep and self.edp == 0

    def _own_parts(self, entry: SyncEntry, s, mine: bool) -> dict[int, torch.Tensor]:
        """{rank in the entry's TP group: shard} this rank writes: its own shard of a split tensor,
        or the whole tensor (sender only) when it is replicated or not split."""
        rule = entry.shard
        if rule.kind == "replicated" or self._group_size[rule.group] == 1:
            return {0: self.params[(entry.chunk, entry.local_name)].detach()} if mine else {}
        if not self._member(s, rule.group):
            return {}
        local = self.params[(entry.chunk, entry.local_name)]
        return {dist.get_rank(self._groups[rule.group]): local.detach()}

    def _participates(self, s) -> bool:
        """A non-sender rank gathers shards for sender `s` when it is in that sender's TP group
        (dense tensors) or expert-TP group (its experts)."""
        return any(self._member(s, g) and self._group_size[g] > 1 for g in ("tp", "etp"))

    _workspace: torch.Tensor | None = None

    def _gather(self, entry: SyncEntry, s, root: bool) -> list[torch.Tensor] | None:
        """The entry's shards in TP-rank order on the sender ([whole tensor] when not split);
        None elsewhere. Shards land in a reused workspace, not fresh allocations."""
        local = self.params.get((entry.chunk, entry.local_name))
        rule = entry.shard
        size = self._group_size[rule.group]
        if rule.kind == "replicated" or size == 1:
            return [local.detach()] if root else None
        if not root and not self._member(s, rule.group):
            return None  # only the sender's own (dp 0) group gathers; other replicas' groups skip it
        group = self._groups[rule.group]
        shard = local.detach().contiguous()
        parts = None
        if root:
            n = shard.numel()
            need = n * size * shard.element_size()
            if self._workspace is None or self._workspace.numel() < need:
                self._workspace = torch.empty(max(need, self.plan.bucket_bytes // 4), dtype=torch.uint8,
                                              device=shard.device)
            flat = self._workspace[:need].view(shard.dtype)
            parts = [flat[r * n:(r + 1) * n].view(shard.shape) for r in range(size)]
        dist.gather(shard, parts, dst=dist.get_global_rank(group, 0), group=group)
        return parts

    def _pack(self, entry: SyncEntry, parts: dict[int, torch.Tensor], size: int, buf: torch.Tensor) -> None:
        """Write the entry's HF tensors into the bucket straight from shards {TP rank: shard} of a
        `size`-way split (all of them after a gather, one when each rank writes its own): each
        shard's rows (or columns) of q/k/v, gate/up or the plain tensor are copied (and cast) into
        place, so no full-size intermediate is ever built."""
        payload = buf[HEADER_BYTES:]
        if self.plan.quantization == "fp8":
            return self._pack_fp8(entry, [parts[r] for r in range(size)], payload)
        views = [payload[t.offset:t.offset + t.nbytes].view(getattr(torch, t.dtype)).view(t.shape) for t in entry.hf]
        rule = entry.shard
        if entry.how == "qkv":
            dims = self.plan.qkv_dims
            heads, groups = dims["num_attention_heads"], dims.get("num_key_value_heads") or dims["num_attention_heads"]
            d = dims.get("head_dim") or dims["hidden_size"] // heads
            per = heads // groups * d
            g = groups // size
            for r, part in parts.items():
                grouped = part.reshape(g, per + 2 * d, *part.shape[1:])
                for view, lo, hi, width in ((views[0], 0, per, per), (views[1], per, per + d, d),
                                            (views[2], per + d, per + 2 * d, d)):
                    rows = view.narrow(0, r * g * width, g * width)
                    rows.view(g, width, *part.shape[1:]).copy_(grouped[:, lo:hi])
        elif entry.how == "fc1":
            for r, part in parts.items():
                half = part.shape[0] // 2
                views[0].narrow(0, r * half, half).copy_(part[:half])
                views[1].narrow(0, r * half, half).copy_(part[half:])
        elif rule.kind == "split" and size > 1:
            for r, part in parts.items():
                views[0].narrow(rule.dim, r * part.shape[rule.dim], part.shape[rule.dim]).copy_(part)
        else:
            views[0].copy_(parts[0])

    def _pack_fp8(self, entry: SyncEntry, parts: list[torch.Tensor], payload: torch.Tensor) -> None:
        """FP8 needs each HF tensor whole (its amax), so build it, quantize, then copy."""
        from megarl.sync.fp8 import quantize_fp8

        full = full_tensor(entry, parts)
        targets = [t.name for t in entry.hf if not t.name.endswith("_scale")]
        wire = []
        for name, t in hf_tensors(targets, entry.how, full, self.plan.qkv_dims):
            wire += quantize_fp8(name, t)
        if [n for n, _ in wire] != [t.name for t in entry.hf]:
            raise UnsupportedLayout(f"{entry.megatron_name}: produced {[n for n, _ in wire]}, the plan lists "
                                    f"{[t.name for t in entry.hf]}")
        for (_, t), spec in zip(wire, entry.hf):
            payload[spec.offset:spec.offset + spec.nbytes].view(getattr(torch, spec.dtype)).view(spec.shape).copy_(t)



def full_tensor(entry: SyncEntry, parts: list[torch.Tensor]) -> torch.Tensor:
    """The TP=1 megatron tensor from its shards in TP-rank order (`ShardRule`)."""
    rule = entry.shard
    if len(parts) == 1:
        return parts[0]
    if rule.kind == "gated":
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=rule.dim)


def _full_shape(entry: SyncEntry, plan: WeightSyncPlan) -> tuple[int, ...]:
    """The TP=1 megatron shape of an entry, from its HF tensors (inverse of hf_map's transforms)."""
    shapes = [t.shape for t in entry.hf if not t.name.endswith("_scale")]
    if entry.how in ("qkv", "fc1"):
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return shapes[0]
