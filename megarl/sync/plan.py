"""`WeightSyncPlan`: which trainer rank sends which tensor, in which bucket, at which byte offset.

Computed once per (trainer layout, engine layout, architecture) from the HF config alone — no
model, no tensors — so the driver builds it and ships the same object to every sender and
receiver. It is the whole contract of a sync:

- the name/layout map: every megatron parameter of every rank (TP/PP/VPP/EP shards, local layer
  and expert numbering) -> its TP=1 global name (`megarl.checkpoint.hf_map`) -> the HF tensors and
  full shapes vLLM loads (fused QKV split per KV group, fused gate/up split, experts, tied
  embeddings sent once);
- senders: one per (pipeline stage, expert-parallel rank) — the rank with TP rank 0 and data/
  context/expert-data rank 0 there. It gathers the TP (or expert-TP) shards and sends its stage's
  layers; nobody else sends;
- buckets: each sender's tensors packed in model order into buckets of at most `bucket_bytes`
  (one tensor larger than that travels alone). A megatron tensor is never split across buckets,
  so vLLM always receives complete q/k/v and gate/up groups (a partial fused group would load
  uninitialised memory without any error: reference/vllm_cpu/FINDINGS.md).

Anything the map does not know — an architecture, a parameter name, a layout it cannot split — is
refused by name (`UnsupportedLayout`), never guessed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from megarl.checkpoint.hf_map import full_plan, param_name
from megarl.config.parallel import ParallelConfig

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
HEADER_BYTES = 32  # int64[4]: magic, weight version, bucket index, crc32 of the payload
TRANSPORTS = ("broadcast", "shared_memory")
ALIGN = 64         # every tensor starts on a 64-byte boundary (aligned views on the receiver)


class UnsupportedLayout(ValueError):
    """The map does not know this architecture, parameter or layout; the message names it."""


@dataclass(frozen=True)
class EngineLayout:
    """The receiving side: `num_engines` vLLM engines of `tensor_parallel_size` workers each.
    Every worker receives every bucket (vLLM shards full HF tensors itself)."""

    num_engines: int = 1
    tensor_parallel_size: int = 1

    @property
    def receivers(self) -> int:
        return self.num_engines * self.tensor_parallel_size


@dataclass(frozen=True)
class ShardRule:
    """How a megatron tensor is split over its tensor-parallel group.

    kind: "replicated" (every rank holds it whole), "split" (concatenate shards along `dim`), or
    "gated" (each shard is [gate_r; up_r]: the full tensor is [cat(gate_r); cat(up_r)] — plain
    concatenation would interleave gate and up and corrupt the MLP silently).
    group: "tp" for dense tensors, "etp" for expert tensors (expert tensor parallelism)."""

    kind: str
    dim: int = 0
    group: str = "tp"


REPLICATED = ShardRule("replicated")


@dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str    # torch dtype name ("float32", "bfloat16", "float8_e4m3fn", ...)
    offset: int   # byte offset in the bucket payload
    nbytes: int


@dataclass(frozen=True)
class SyncEntry:
    """One megatron tensor: where the sender finds it and the HF tensors it becomes."""

    megatron_name: str      # TP=1 global name (hf_map)
    local_name: str         # name in the sender's model chunk (local layer / expert numbering)
    chunk: int              # model chunk (virtual pipeline stage) on the sender
    shard: ShardRule
    how: str                # hf_map transform: "copy" | "qkv" | "fc1"
    hf: tuple[HFTensor, ...]


@dataclass(frozen=True)
class Sender:
    index: int       # rank in the sync world (receivers follow the senders)
    pp_rank: int
    ep_rank: int


@dataclass(frozen=True)
class Bucket:
    index: int
    sender: int
    nbytes: int      # payload bytes (the header comes on top)
    entries: tuple[SyncEntry, ...]

    @property
    def hf_names(self) -> list[str]:
        return [t.name for e in self.entries for t in e.hf]


@dataclass(frozen=True)
class WeightSyncPlan:
    arch: str
    trainer: ParallelConfig
    engines: EngineLayout
    dtype: str
    bucket_bytes: int
    quantization: str | None
    senders: tuple[Sender, ...]
    buckets: tuple[Bucket, ...]
    num_layers: int
    num_experts: int = 0
    tied_embeddings: bool = False
    qkv_dims: dict = field(default_factory=dict, compare=False)
    """num_attention_heads / num_key_value_heads / head_dim / hidden_size: what splitting a fused
    QKV tensor needs (`hf_map.split_qkv`)."""
    fingerprint: str = field(default="", compare=False)
    transport: str = "broadcast"
    """How bucket bytes travel (megarl.sync.transport): "broadcast" over the group, or
    "shared_memory" slots when every sender, TP peer and engine is on one CPU host."""

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, trainer: ParallelConfig, engines: EngineLayout, arch: str, cfg: dict,
              bucket_bytes: int = 512 << 20, dtype: str = "float32",
              quantization: str | None = None, transport: str = "broadcast",
              transformer_impl: str = "local") -> WeightSyncPlan:
        """The plan for a resolved trainer layout (`trainer.world_size` set) and an engine layout.
        `cfg` is the HF config.json of the actor; `dtype` the engine's; `quantization` None or
        "fp8" (linear weights sent as float8_e4m3fn + per-tensor scales); `transformer_impl` the
        actor's layers ("local" or "transformer_engine": the parameter names the senders walk)."""
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedLayout(f"weight sync has no layout map for architecture {arch!r} "
                                    f"(known: {', '.join(SUPPORTED_ARCHS)})")
        if dtype not in DTYPE_BYTES or dtype == "float8_e4m3fn":
            raise UnsupportedLayout(f"engine dtype {dtype!r} is not one of float32, bfloat16, float16")
        if quantization not in (None, "fp8"):
            raise UnsupportedLayout(f"rollout quantization {quantization!r} is not supported (None or 'fp8')")
        if transport not in TRANSPORTS:
            raise UnsupportedLayout(f"weight sync transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
        if transport == "shared_memory" and quantization:
            raise UnsupportedLayout("the shared_memory weight sync writes TP shards where they lie, but FP8 "
                                    "quantization needs each tensor whole: use transport broadcast with fp8")
        if trainer.world_size is None:
            raise ValueError("WeightSyncPlan.build needs a resolved trainer layout (world_size set)")
        if bucket_bytes < 1 << 16:
            raise ValueError(f"bucket_bytes={bucket_bytes} is too small (at least 64 KiB)")
        layers = cfg["num_hidden_layers"]
        num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
        vpp = trainer.vpp or 1
        if layers % (trainer.pp * vpp):
            raise UnsupportedLayout(f"{layers} layers do not split evenly over pp={trainer.pp} x vpp={vpp} "
                                    "(uneven pipeline layouts are not mapped)")
        if num_experts and num_experts % trainer.ep:
            raise UnsupportedLayout(f"{num_experts} experts do not split over ep={trainer.ep}")
        groups = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        if groups % trainer.tp:
            raise UnsupportedLayout(f"{groups} KV heads do not split over tp={trainer.tp}")
        archs = cfg.get("architectures") or [""]
        if not archs[0].endswith("ForCausalLM"):
            raise UnsupportedLayout(f"{archs[0] or 'this model'} has no LM head; only causal LMs are synced "
                                    "to rollout engines")

        shapes = hf_shapes(arch, cfg)
        ep_size = trainer.ep
        senders = tuple(Sender(p * ep_size + e, p, e) for p in range(trainer.pp) for e in range(ep_size))
        per_sender: dict[int, list[tuple[str, str, int, ShardRule, str, list[str]]]] = {s.index: [] for s in senders}
        for checkpoint_name, hf_names, how in full_plan(arch, cfg):
            name = param_name(checkpoint_name, transformer_impl, moe=bool(num_experts))
            p, v, e, local = locate(name, layers, trainer.pp, vpp, num_experts, ep_size)
            per_sender[p * ep_size + e].append((name, local, v, shard_rule(name), how, hf_names))

        buckets: list[Bucket] = []
        for s in senders:
            current: list[SyncEntry] = []
            used = 0
            for name, local, v, rule, how, hf_names in per_sender[s.index]:
                outs = []
                for hf_name in hf_names:
                    outs += _wire_tensors(hf_name, shapes[hf_name], dtype, quantization)
                size = sum(_aligned(n) for *_, n in outs)
                if current and used + size > bucket_bytes:
                    buckets.append(Bucket(len(buckets), s.index, used, tuple(current)))
                    current, used = [], 0
                tensors = []
                for hf_name, shape, tdtype, nbytes in outs:
                    tensors.append(HFTensor(hf_name, shape, tdtype, used, nbytes))
                    used += _aligned(nbytes)
                current.append(SyncEntry(name, local, v, rule, how, tuple(tensors)))
            if current:
                buckets.append(Bucket(len(buckets), s.index, used, tuple(current)))
        plan = cls(arch, trainer, engines, dtype, bucket_bytes, quantization, senders, tuple(buckets), layers,
                   num_experts, bool(cfg.get("tie_word_embeddings", False)),
                   {k: cfg[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")
                    if cfg.get(k) is not None}, transport=transport)
        digest = hashlib.sha256(repr((plan.arch, plan.trainer, plan.engines, plan.dtype, plan.quantization,
                                      plan.transport, plan.buckets)).encode()).hexdigest()[:16]
        object.__setattr__(plan, "fingerprint", digest)
        return plan

    # ---- queries ---------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Ranks in the sync group: the senders, then every engine worker."""
        return len(self.senders) + self.engines.receivers

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def num_params(self) -> int:
        return sum(_numel(t.shape) for b in self.buckets for e in b.entries for t in e.hf
                   if not t.name.endswith("_scale"))

    def receiver_rank(self, engine: int, worker: int = 0) -> int:
        return len(self.senders) + engine * self.engines.tensor_parallel_size + worker

    def sender_at(self, pp_rank: int, ep_rank: int) -> Sender:
        return self.senders[pp_rank * self.trainer.ep + ep_rank]

    def buckets_of(self, sender: int) -> list[Bucket]:
        return [b for b in self.buckets if b.sender == sender]

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for b in self.buckets for e in b.entries for t in e.hf}

    def local_entries(self, pp_rank: int, ep_rank: int) -> dict[tuple[int, str], SyncEntry]:
        """{(chunk, local name): entry} of every megatron tensor a rank at (pp_rank, ep_rank) holds:
        its stage's dense tensors (listed under ep rank 0's sender) and its own experts."""
        out = {}
        for b in self.buckets:
            s = self.senders[b.sender]
            if s.pp_rank != pp_rank:
                continue
            for e in b.entries:
                expert = ".local_experts." in e.local_name
                if (expert and s.ep_rank == ep_rank) or (not expert and s.ep_rank == 0):
                    out[(e.chunk, e.local_name)] = e
        return out

    def summary(self) -> str:
        mb = self.total_bytes / 2**20
        largest = max(b.nbytes for b in self.buckets) / 2**20
        return (f"weight sync plan {self.fingerprint}: {self.arch}, {self.num_params:,} params, {mb:.1f} MiB "
                f"{self.dtype}{' + fp8 linears' if self.quantization else ''} in {len(self.buckets)} buckets "
                f"(<= {self.bucket_bytes / 2**20:.0f} MiB, largest {largest:.1f} MiB) from {len(self.senders)} "
                f"sender(s) to {self.engines.receivers} engine worker(s) by {self.transport}")


# ---- the layout map ---------------------------------------------------------------------------
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def locate(name: str, layers: int, pp: int, vpp: int, num_experts: int, ep: int) -> tuple[int, int, int, str]:
    """(pp rank, model chunk, ep rank, local name) holding the TP=1 megatron tensor `name`.

    Layer i lives in global chunk c = i // n (n = layers per chunk), i.e. on pp rank c % pp as
    virtual stage c // pp, with local index i % n (megatron's interleaved assignment); expert g on
    ep rank g // (E/ep) as local expert g % (E/ep)."""
    n = layers // (pp * vpp)
    if name == "embedding.word_embeddings.weight":
        return 0, 0, 0, name
    if name in ("decoder.final_layernorm.weight", "output_layer.weight"):
        return pp - 1, vpp - 1, 0, name
    m = _LAYER.match(name)
    if not m:
        raise UnsupportedLayout(f"weight sync does not know megatron parameter {name!r}")
    i, rest = int(m.group(1)), m.group(2)
    c = i // n
    p, v, local = c % pp, c // pp, i % n
    e = 0
    mx = _EXPERT.match(rest)
    if mx:
        per = num_experts // ep
        g = int(mx.group(1))
        e = g // per
        rest = f"mlp.experts.local_experts.{g % per}.{mx.group(2)}"
    return p, v, e, f"decoder.layers.{local}.{rest}"


def shard_rule(name: str) -> ShardRule:
    """How megatron's local GPT layers split `name` (TP=1 global name) over tensor parallelism."""
    expert = ".mlp.experts.local_experts." in name
    group = "etp" if expert else "tp"
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return ShardRule("split", 0, "tp")       # vocab-parallel rows
    if name.endswith((".linear_qkv.weight", ".linear_qkv.bias")):
        return ShardRule("split", 0, "tp")       # whole KV groups per rank: shards concatenate
    if name.endswith(".linear_proj.weight") or name.endswith(".linear_fc2.weight"):
        return ShardRule("split", 1, group)      # row parallel
    if name.endswith(".linear_fc1.weight"):
        return ShardRule("gated", 0, group)      # column parallel [gate_r; up_r]
    if name.endswith(("layernorm.weight", ".layer_norm_weight", ".mlp.router.weight")):
        return REPLICATED
    raise UnsupportedLayout(f"weight sync has no shard rule for megatron parameter {name!r}")


def hf_shapes(arch: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Full shapes of every HF tensor vLLM loads for this config (what the engine's checkpoint holds)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or h // heads
    ffn = cfg.get("intermediate_size")
    moe_ffn = cfg.get("moe_intermediate_size") or ffn
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    shapes: dict[str, tuple[int, ...]] = {}
    for _, hf_names, _ in full_plan(arch, cfg):
        for n in hf_names:
            shapes[n] = _hf_shape(n, h, v, heads, groups, d, ffn, moe_ffn, experts)
    return shapes


def _hf_shape(n, h, v, heads, groups, d, ffn, moe_ffn, experts) -> tuple[int, ...]:
    if n in ("model.embed_tokens.weight", "lm_head.weight"):
        return (v, h)
    if n.endswith(("layernorm.weight", "model.norm.weight")):
        return (h,)
    if n.endswith(("q_norm.weight", "k_norm.weight")):
        return (d,)
    if n.endswith("q_proj.weight"):
        return (heads * d, h)
    if n.endswith(("k_proj.weight", "v_proj.weight")):
        return (groups * d, h)
    if n.endswith("q_proj.bias"):
        return (heads * d,)
    if n.endswith(("k_proj.bias", "v_proj.bias")):
        return (groups * d,)
    if n.endswith("o_proj.weight"):
        return (h, heads * d)
    if ".experts." in n:
        if n.endswith(("gate_proj.weight", "up_proj.weight", "w1.weight", "w3.weight")):
            return (moe_ffn, h)
        if n.endswith(("down_proj.weight", "w2.weight")):
            return (h, moe_ffn)
    if n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
        return (experts, h)
    if n.endswith(("gate_proj.weight", "up_proj.weight")):
        return (ffn, h)
    if n.endswith("down_proj.weight"):
        return (h, ffn)
    raise UnsupportedLayout(f"weight sync does not know the shape of HF tensor {n!r}")


def _wire_tensors(hf_name: str, shape: tuple[int, ...], dtype: str, quantization: str | None):
    """[(name, shape, dtype, nbytes)] this HF tensor travels as."""
    if quantization == "fp8":
        from megarl.sync.fp8 import is_fp8_linear, scale_name

        if is_fp8_linear(hf_name):
            return [(hf_name, shape, "float8_e4m3fn", _numel(shape)), (scale_name(hf_name), (), "float32", 4)]
    return [(hf_name, shape, dtype, _numel(shape) * DTYPE_BYTES[dtype])]


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
