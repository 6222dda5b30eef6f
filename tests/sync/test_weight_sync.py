"""Weight sync from megatron shards to vLLM engines: the plan (fast, pure) and real syncs between
a gloo trainer world (TP=2, PP=2, EP=2) and one or two vLLM engines in their own processes.

After a sync the engine's prompt log-probs must equal the megatron model's on the same tokens
(fp32, 1e-4); the trainer's weights are perturbed first, so an engine that kept its old weights
fails (the "before" difference is asserted to be large)."""

from __future__ import annotations

import threading

import pytest
import torch

from megarl.config.parallel import ParallelConfig
from megarl.models.hf_config import read_hf_config
from megarl.runtime.rendezvous import Rendezvous
from megarl.sync.plan import EngineLayout, UnsupportedLayout, WeightSyncPlan, locate
from megarl.sync.transport import WeightSyncError, check_header, write_header

SEQS = [[5, 17, 99, 3, 250, 41, 7, 8, 100, 9, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8]]  # lengths % 4 == 0 (SP)
TOL = 1e-4


def _plan(cfg, arch, parallel: dict, engines: int, **kw) -> WeightSyncPlan:
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    world = kw.pop("world", 2)
    return WeightSyncPlan.build(ParallelConfig(**parallel).resolve(world, num_experts=num_experts),
                                EngineLayout(engines), arch, cfg, **kw)


# ---- the plan ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cfgs(tiny_hf_models):
    return {a: read_hf_config(d) for a, d in tiny_hf_models.items()}


def test_locate_follows_megatron_interleaved_layer_assignment():
    # 8 layers, pp=2, vpp=2: chunks of 2 layers; global chunk c -> pp rank c % 2, virtual stage c // 2
    # (megatron: offset = vp_stage * layers/vpp + pp_rank * layers/(pp*vpp))
    want = {0: (0, 0, 0), 1: (0, 0, 1), 2: (1, 0, 0), 3: (1, 0, 1), 4: (0, 1, 0), 5: (0, 1, 1), 6: (1, 1, 0),
            7: (1, 1, 1)}
    for i, (p, v, j) in want.items():
        assert locate(f"decoder.layers.{i}.mlp.linear_fc2.weight", 8, 2, 2, 0, 1) == (
            p, v, 0, f"decoder.layers.{j}.mlp.linear_fc2.weight")
    # expert 5 of 8 on ep=2 -> ep rank 1, local expert 1
    assert locate("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight", 4, 1, 1, 8, 2) == (
        0, 0, 1, "decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight")
    assert locate("output_layer.weight", 8, 2, 2, 0, 1) == (1, 1, 0, "output_layer.weight")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe", "mixtral", "qwen2_tied"])
def test_plan_covers_the_checkpoint_once_with_whole_fused_groups(arch, cfgs, tiny_hf_models):
    from megarl.sync.receiver import check_plan_against_checkpoint, checkpoint_shapes

    cfg = cfgs[arch]
    parallel = dict(ep=2) if "moe" in arch or arch == "mixtral" else dict(pp=2)
    plan = _plan(cfg, cfg["model_type"], parallel, 2, bucket_bytes=64 << 10)
    check_plan_against_checkpoint(plan, tiny_hf_models[arch])  # names and shapes == the engine's
    names = [t.name for b in plan.buckets for e in b.entries for t in e.hf]
    assert len(names) == len(set(names))
    ckpt = checkpoint_shapes(tiny_hf_models[arch])
    assert plan.num_params == sum(torch.Size(s).numel() for n, s in ckpt.items()
                                  if not (plan.tied_embeddings and n == "lm_head.weight"))
    assert len(plan.buckets) > 2
    for b in plan.buckets:
        spans = sorted((t.offset, t.offset + t.nbytes) for e in b.entries for t in e.hf)
        assert all(a[1] <= c[0] for a, c in zip(spans, spans[1:]))           # no overlap
        assert all(o % 64 == 0 for o, _ in spans) and spans[-1][1] <= b.nbytes
        assert b.nbytes <= plan.bucket_bytes or len(b.entries) == 1         # only a lone big tensor exceeds it
        for e in b.entries:                                                  # q/k/v and gate/up together
            if e.how == "qkv":
                assert [t.name.split(".")[-2] for t in e.hf] == ["q_proj", "k_proj", "v_proj"]
    senders = {plan.senders[b.sender] for b in plan.buckets}
    assert len(senders) == 2                                                 # pp=2 or ep=2: two senders


def test_plan_refuses_what_the_map_does_not_know(cfgs):
    cfg = dict(cfgs["qwen2"])
    with pytest.raises(UnsupportedLayout, match="deepseek_v3"):
        _plan(cfg, "deepseek_v3", {}, 1, world=1)
    with pytest.raises(UnsupportedLayout, match="do not split evenly"):
        _plan(cfg, "qwen2", dict(pp=3), 1, world=3)
    with pytest.raises(UnsupportedLayout, match="no LM head"):
        _plan({**cfg, "architectures": ["Qwen2ForTokenClassification"]}, "qwen2", {}, 1, world=1)
    from megarl.sync.plan import shard_rule

    with pytest.raises(UnsupportedLayout, match="linear_q_down_proj"):
        shard_rule("decoder.layers.0.self_attention.linear_q_down_proj.weight")  # MLA: not mapped
    with pytest.raises(UnsupportedLayout, match="mtp.layers.0"):
        locate("mtp.layers.0.enorm.weight", 4, 1, 1, 0, 1)
    with pytest.raises(UnsupportedLayout, match="'nvlink' is not one of broadcast, shared_memory"):
        _plan(cfg, "qwen2", {}, 1, world=1, transport="nvlink")
    with pytest.raises(UnsupportedLayout, match="FP8 quantization needs each tensor whole"):
        _plan(cfg, "qwen2", {}, 1, world=1, transport="shared_memory", quantization="fp8")


def test_slot_kind_follows_the_device(monkeypatch):
    """CUDA senders get CUDA-IPC slots (GPU-only: here only the selection and the refusal on a host
    without that GPU run), CPU senders /dev/shm files."""
    import json

    from megarl.sync import transport

    made = []
    monkeypatch.setattr(transport.CudaIpcSlots, "create",
                        classmethod(lambda cls, tag, nbytes, count=3, device=None: made.append(device) or "ipc"))
    assert transport.create_slots("t", 1 << 16, torch.device("cuda", 1)) == "ipc" and made == [torch.device("cuda", 1)]
    cpu = transport.create_slots("t", 1 << 16, torch.device("cpu"))
    try:
        assert isinstance(cpu, transport.SharedSlots)
        assert isinstance(transport.open_slots(cpu.publish(), "engine worker 0"), transport.SharedSlots)
    finally:
        cpu.unlink()
    published = json.dumps({"kind": "cuda_ipc", "gpu": "GPU-0000", "handles": ""})
    with pytest.raises(WeightSyncError, match="GPU GPU-0000 is not visible here.*transport: broadcast"):
        transport.open_slots(published, "engine worker 0")


def test_shared_memory_slots_refuse_a_receiver_on_another_host():
    """An engine that cannot see the sender's /dev/shm files (another node) is told what to set."""
    from megarl.sync.transport import SLOTS, SharedSlots

    slots = SharedSlots.create("test", 1 << 16)
    try:
        published = slots.publish()
        peer = SharedSlots.open(published, "engine worker 0")
        slots.slot(1)[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        assert peer.slot(1 + SLOTS)[:4].tolist() == [1, 2, 3, 4]   # one mapping: bucket k lies in slot k % SLOTS
    finally:
        slots.unlink()
    assert peer.slot(1)[:4].tolist() == [1, 2, 3, 4]          # mappings outlive the files
    with pytest.raises(WeightSyncError, match="not on the trainer's host.*transport: broadcast"):
        SharedSlots.open(published, "engine worker 0")
    with pytest.raises(WeightSyncError, match=r"needs 3 x .* MiB in /dev/shm .*bucket_mb.*--shm-size"):
        SharedSlots.create("test", 1 << 50)                    # more than any /dev/shm holds: refused up front
    assert _shm_files() == []


def test_plan_refuses_an_engine_with_another_model(cfgs, tiny_hf_models):
    from megarl.sync.receiver import check_plan_against_checkpoint

    plan = _plan(cfgs["qwen2"], "qwen2", {}, 1, world=1)
    with pytest.raises(WeightSyncError, match="does not fit the engine model"):
        check_plan_against_checkpoint(plan, tiny_hf_models["qwen3"])


def test_plan_fingerprint_is_stable_and_layout_specific(cfgs):
    a = _plan(cfgs["qwen2"], "qwen2", dict(tp=2), 1)
    assert a.fingerprint == _plan(cfgs["qwen2"], "qwen2", dict(tp=2), 1).fingerprint
    assert a.fingerprint != _plan(cfgs["qwen2"], "qwen2", dict(pp=2), 1).fingerprint
    assert a.fingerprint != _plan(cfgs["qwen2"], "qwen2", dict(tp=2), 2).fingerprint


def test_fp8_plan_sends_linear_weights_as_fp8_with_scales(cfgs):
    plan = _plan(cfgs["qwen3_moe"], "qwen3_moe", dict(ep=2), 1, quantization="fp8")
    tensors = {t.name: t for b in plan.buckets for e in b.entries for t in e.hf}
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "float8_e4m3fn"
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == ()
    assert tensors["model.layers.0.mlp.experts.3.down_proj.weight"].dtype == "float8_e4m3fn"
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert tensors[kept].dtype == "float32"


def test_fp8_engine_starts_from_an_fp8_checkpoint_the_plan_check_covers(cfgs, tiny_hf_models, tmp_path):
    """An fp8 engine's start directory holds exactly what the sync sends: float8 linear weights and
    their scales (checked by name and shape), the rest as it was; the plain checkpoint is refused,
    naming the scales it lacks."""
    import json
    import os

    from safetensors.torch import load_file

    from megarl.sync.fp8 import dequantize_fp8, export_fp8_checkpoint
    from megarl.sync.receiver import check_plan_against_checkpoint

    src = tiny_hf_models["qwen3_moe"]
    out = str(tmp_path / "fp8")
    summary = export_fp8_checkpoint(src, out)
    plan = _plan(cfgs["qwen3_moe"], "qwen3_moe", dict(ep=2), 1, quantization="fp8")
    check_plan_against_checkpoint(plan, out)
    with pytest.raises(WeightSyncError, match=r"the plan sends tensors the engine does not have: \[.*weight_scale"):
        check_plan_against_checkpoint(plan, src)
    before, after = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert after[q].dtype == torch.float8_e4m3fn and after[q + "_scale"].shape == ()
    assert torch.allclose(dequantize_fp8(after[q], after[q + "_scale"]), before[q], rtol=0.07, atol=1e-6)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert summary["quantized"] == sum(1 for n in after if n.endswith("_scale")) > 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"] == {"quant_method": "fp8", "activation_scheme": "dynamic"}
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_bucket_header_detects_corruption_version_and_order():
    buf = torch.zeros(32 + 1024, dtype=torch.uint8)
    buf[32:] = torch.arange(1024) % 251
    write_header(buf, version=7, bucket=3)
    check_header(buf, 7, 3, "b3")
    with pytest.raises(WeightSyncError, match="expected version 8"):
        check_header(buf, 8, 3, "b3")
    with pytest.raises(WeightSyncError, match="bucket 4"):
        check_header(buf, 7, 4, "b3")
    buf[500] ^= 1
    with pytest.raises(WeightSyncError, match="checksum mismatch"):
        check_header(buf, 7, 3, "b3")


# ---- real syncs ---------------------------------------------------------------------------------
_STORES = []  # kept alive for the module: every round's members connect to their store as clients


def _store_port() -> int:
    """A rendezvous store hosted by this process, bound to a port it got from the OS (port 0) and
    only then published to the round: no port is picked free here and bound later elsewhere."""
    from megarl.runtime.rendezvous import open_store

    store, port = open_store("127.0.0.1", 0, timeout_s=300)
    _STORES.append(store)
    return port


class _Hosts:
    """vLLM engines (IsolatedActor) per tiny model, started on first use and shared by the module."""

    def __init__(self, models):
        self.models, self.hosts = models, {}

    def get(self, arch: str, i: int):
        from megarl.runtime.local_group import IsolatedActor

        if (arch, i) not in self.hosts:
            self.hosts[(arch, i)] = IsolatedActor("tests.sync.sync_checks:EngineHost", args=(self.models[arch],),
                                                  env={"OMP_NUM_THREADS": "1"})
        return self.hosts[(arch, i)]

    def close(self):
        for h in self.hosts.values():
            h.close()


@pytest.fixture(scope="module")
def hosts(tiny_hf_models):
    h = _Hosts(tiny_hf_models)
    yield h
    h.close()


def _run(ckpt, parallel, rounds, receivers_per_round):
    """Run the trainer rounds in a 2-rank world while each round's receivers (callables that get
    the round and return a result) run in the main thread. Returns (trainer results, receiver results)."""
    from megarl.runtime.local_group import run_local_group

    box: dict = {}

    def trainer():
        try:
            box["trainer"] = run_local_group("tests.sync.sync_checks:trainer_rounds", 2,
                                             args=(ckpt, parallel, rounds, SEQS), timeout=400)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    thread = threading.Thread(target=trainer)
    thread.start()
    results = []
    try:
        for r, receive in zip(rounds, receivers_per_round):
            results.append(receive(r) if receive else None)
    finally:
        thread.join()
    if "error" in box:
        raise box["error"]
    return box["trainer"], results


def _engines_round(engines, score: bool = True):
    def receive(r):
        rv = Rendezvous("127.0.0.1", r["port"], timeout_s=60)
        joins = [e.call_async("join", r["plan"], rv, i, r.get("generation", 0)) for i, e in enumerate(engines)]
        for j in joins:
            j.result()
        recvs = [e.call_async("receive", r["version"]) for e in engines]
        return [x.result() for x in recvs] + ([e.call("prompt_logprobs", SEQS) for e in engines] if score else [])
    return receive


def _shm_files() -> list[str]:
    import os

    return sorted(f for f in os.listdir("/dev/shm") if f.startswith("megarl-sync-"))


def _max_diff(a, b) -> float:
    return max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s, t))


def _trainer_logprobs(out) -> list:
    return next(o["logprobs"] for o in out if o["logprobs"] is not None)


@pytest.mark.dist
@pytest.mark.parametrize("arch,parallel", [("qwen2", dict(pp=2)), ("qwen3_moe", dict(ep=2))],
                         ids=["pp2", "ep2"])
def test_sync_into_one_then_two_engines(arch, parallel, hosts, converted, cfgs):
    cfg = cfgs[arch]
    a, b = hosts.get(arch, 0), hosts.get(arch, 1)
    before = a.call("prompt_logprobs", SEQS)
    rounds = [dict(plan=_plan(cfg, arch, parallel, 1, bucket_bytes=256 << 10), port=_store_port(), version=1),
              dict(plan=_plan(cfg, arch, parallel, 2, bucket_bytes=256 << 10, transport="shared_memory"),
                   port=_store_port(), version=2, generation=1)]
    trainer, (one, two) = _run(converted[arch]["ckpt"], parallel, rounds, [_engines_round([a]), _engines_round([a, b])])
    ref = _trainer_logprobs(trainer)
    assert _max_diff(before, ref) > 0.05                       # the sync has something to change
    assert one[0]["ok"] and _max_diff(one[1], ref) <= TOL      # one engine, broadcast
    # dense models load straight into the kernels; MoE layers go through vLLM's reload
    assert one[0]["load_path"] == ("direct" if arch == "qwen2" else "reload"), one[0]["reload_reason"]
    assert arch == "qwen2" or "FusedMoE" in one[0]["reload_reason"]
    assert two[0]["ok"] and two[1]["ok"]                       # two engines, shared memory
    assert _max_diff(two[2], ref) <= TOL and _max_diff(two[3], ref) <= TOL
    assert b.call("generate_version", SEQS[1]) == 2
    senders = [o["rounds"][0] for o in trainer]
    assert all(s["buckets"] > 0 for s in senders)              # both stages / both EP ranks sent
    assert _shm_files() == []                                  # the slots were unlinked at the join


@pytest.mark.dist
def test_tp2_sync_detects_corruption_refuses_unknown_layouts_and_carries_fp8(hosts, converted, cfgs):
    from megarl.runtime.local_group import IsolatedActor
    from megarl.sync.fp8 import dequantize_fp8, fake_quant_reference

    arch, parallel = "qwen2", dict(tp=2)
    cfg = cfgs[arch]
    a, b = hosts.get(arch, 0), hosts.get(arch, 1)
    plan1 = _plan(cfg, arch, parallel, 1, bucket_bytes=128 << 10)
    shm1 = _plan(cfg, arch, parallel, 1, bucket_bytes=128 << 10, transport="shared_memory")
    plain = [IsolatedActor("tests.sync.sync_checks:PlainReceiver") for _ in range(2)]

    def plain_round(r):
        rv = Rendezvous("127.0.0.1", r["port"], timeout_s=60)
        return plain[r["receiver"]].call("receive", r["plan"], rv, 0, r["version"])

    def failing_round(r):
        res = _engines_round([a], score=False)(r)
        try:
            res.append(a.call("generate_version", SEQS[1]))
        except Exception as e:  # noqa: BLE001 - the refusal is what we assert on
            res.append(str(e))
        return res

    rounds = [
        dict(plan=plan1, port=_store_port(), version=1),
        dict(plan=_plan(cfg, arch, parallel, 2, bucket_bytes=128 << 10), port=_store_port(), version=2, generation=1),
        dict(plan=plan1, port=_store_port(), version=3, corrupt_bucket=2, generation=2),
        dict(plan=plan1, port=_store_port(), version=4, generation=3),
        dict(wrong_plan=_plan(cfg, arch, dict(pp=2), 1)),
        dict(extra_param=True, plan=plan1),
        dict(plan=_plan(cfg, arch, parallel, 1), port=_store_port(), version=5, receiver=0),
        dict(plan=_plan(cfg, arch, parallel, 1, quantization="fp8"), port=_store_port(), version=5, receiver=1),
        # shared memory: both TP ranks write their shards into the slots; corruption is caught the same way
        dict(plan=shm1, port=_store_port(), version=6, corrupt_bucket=3, generation=4),
        dict(plan=_plan(cfg, arch, parallel, 2, bucket_bytes=128 << 10, transport="shared_memory"),
             port=_store_port(), version=7, generation=5),
    ]
    receivers = [_engines_round([a]), _engines_round([a, b]), failing_round, _engines_round([a]), None, None,
                 plain_round, plain_round, failing_round, _engines_round([a, b])]
    try:
        trainer, res = _run(converted[arch]["ckpt"], parallel, rounds, receivers)
    finally:
        for p in plain:
            p.close()
    ref = _trainer_logprobs(trainer)
    # broadcast on CPU: both TP ranks write into the sender's shared-memory slot, which is broadcast;
    # FP8 gathers whole tensors on the sender to quantize them
    paths = [r["path"] for r in trainer[0]["rounds"]]
    assert paths == ["staged_broadcast"] * 5 + ["gathered_broadcast"] + ["shared_memory"] * 2, paths
    assert all(r["path"] is None for r in trainer[1]["rounds"])       # rank 1 is no sender, only writes
    assert res[0][0]["ok"] and _max_diff(res[0][1], ref) <= TOL and res[0][0]["load_path"] == "direct"
    assert res[1][0]["ok"] and res[1][1]["ok"] and _max_diff(res[1][3], ref) <= TOL
    # corrupted bucket: detected, named, and the engine refuses to sample until the next good sync
    bad = res[2][0]
    assert not bad["ok"] and "bucket 2" in bad["error"] and "checksum mismatch" in bad["error"]
    assert not bad["consistent"] and "mix of versions" in res[2][-1]
    assert res[3][0]["ok"] and _max_diff(res[3][1], ref) <= TOL
    bad = res[8][0]
    assert not bad["ok"] and "bucket 3" in bad["error"] and "checksum mismatch" in bad["error"]
    assert not bad["consistent"] and "mix of versions" in res[8][-1]
    assert res[9][0]["ok"] and res[9][1]["ok"] and _max_diff(res[9][2], ref) <= TOL and _max_diff(res[9][3], ref) <= TOL
    assert a.call("generate_version", SEQS[1]) == 7
    assert _shm_files() == []
    # unknown layouts are refused by name
    refusals = trainer[0]["refusals"]
    assert "weight sync plan was built for" in refusals["wrong_plan"] and "'pp': 2" in refusals["wrong_plan"]
    assert "linear_extra" in refusals["extra_param"]
    # FP8: what arrives dequantizes to modelopt's fake-quant of the full-precision weights
    full, fp8 = res[6]["tensors"], res[7]["tensors"]
    assert res[6]["error"] is None and res[7]["error"] is None
    name = "model.layers.1.mlp.gate_proj.weight"
    assert fp8[name].dtype == torch.float8_e4m3fn
    deq = dequantize_fp8(fp8[name], fp8[name + "_scale"])
    fq = fake_quant_reference(full[name])
    off = ~torch.isclose(deq, fq, rtol=1e-6, atol=0.0)
    assert off.float().mean() < 1e-3          # equal to fp32 rounding but for rare midpoints (see fp8.py)
    assert (deq - full[name]).abs().max() <= 0.07 * full[name].abs().max()
    assert torch.equal(fp8["model.embed_tokens.weight"], full["model.embed_tokens.weight"])


def test_verify_logprobs_names_the_disagreeing_engine():
    from megarl.sync.verify import compare_logprobs, verification_sequences

    seqs = verification_sequences(1000)
    assert seqs == verification_sequences(1000) and all(len(s) % 8 == 0 for s in seqs)
    ref = [[-1.0, -2.0], [-0.5]]
    assert compare_logprobs(ref, [ref, [[-1.0, -2.00001], [-0.5]]], 1e-3) <= 1e-4
    with pytest.raises(WeightSyncError, match=r"engine 1 .* token 2 of verification sequence 0"):
        compare_logprobs(ref, [ref, [[-1.0, -2.5], [-0.5]]], 1e-3)


def test_direct_loader_uses_bucket_views_and_drops_a_failed_syncs_leftovers():
    from megarl.sync.direct_load import DirectLoader, _concat

    buf = torch.arange(12.0)
    a, b = buf[:4].view(2, 2), buf[4:8].view(2, 2)
    fused = _concat([a, b])                                   # back to back in one bucket: a view, no copy
    assert fused.shape == (4, 2) and fused.data_ptr() == a.data_ptr() and torch.equal(fused, buf[:8].view(4, 2))
    swapped = _concat([b, a])                                 # not in order: copied
    assert swapped.data_ptr() != b.data_ptr() and torch.equal(swapped, torch.cat([b, a]))

    class RMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2))
            self.bias = torch.nn.Parameter(torch.zeros(2))

    model = torch.nn.Sequential()
    model.add_module("norm", RMSNorm())
    loader, why = DirectLoader.build(model, {"norm.weight": (2,), "norm.bias": (2,)}, 1)
    assert loader is not None, why
    loader.load([("norm.weight", torch.ones(2))])             # a sync that failed after one tensor
    loader.load([("norm.bias", torch.full((2,), 2.0))])       # must not complete the module with the stale weight
    assert model.norm.weight.tolist() == [0, 0] and model.norm.bias.tolist() == [0, 0]
    loader.load([("norm.weight", torch.full((2,), 3.0)), ("norm.bias", torch.full((2,), 4.0))])
    loader.finish()
    assert model.norm.weight.tolist() == [3, 3] and model.norm.bias.tolist() == [4, 4]
    assert DirectLoader.build(model, {"norm.weight": (2,)}, 1)[0] is None           # a tensor the plan never sends
    assert "engine tensor parallelism" in DirectLoader.build(model, {}, 2)[1]
    model.add_module("odd", torch.nn.Linear(2, 2))
    assert "odd (Linear" in DirectLoader.build(model, {"norm.weight": (2,), "norm.bias": (2,)}, 1)[1]


def test_an_engine_acks_a_slot_only_after_its_reads_have_settled(cfgs, monkeypatch):
    """Shared slots (CUDA IPC on GPUs) are read by the engine's asynchronous copy kernels, and the
    ack that frees a slot travels on gloo, which does not wait for them: every bucket's tensors are
    handed to the loader, then the slot settles (a stream sync on CUDA), and only then is it acked."""
    from megarl.sync import receiver as receiver_mod
    from megarl.sync.plan import HEADER_BYTES

    plan = _plan(cfgs["qwen2"], "qwen2", {}, 1, world=1, transport="shared_memory", bucket_bytes=1 << 16)
    assert len(plan.buckets) > 3
    events: list = []

    class Done:
        def wait(self):
            pass

    class Slots:   # one buffer per bucket: this fake sender never reuses a slot
        def __init__(self):
            self.buffers = {}

        def slot(self, position):
            return self.buffers[position]

    class Group:
        def __init__(self):
            self.slots = {s.index: Slots() for s in plan.senders}
            self.rung = {s.index: 0 for s in plan.senders}

        def wait_bell(self, sender):   # the sender has written its next bucket into the next slot
            bucket = plan.buckets_of(sender)[self.rung[sender]]
            buf = torch.randint(0, 255, (HEADER_BYTES + bucket.nbytes,), dtype=torch.uint8)
            write_header(buf, 3, bucket.index)
            self.slots[sender].buffers[self.rung[sender]] = buf
            self.rung[sender] += 1
            return bucket.index

        def ack(self, sender):
            events.append(("ack", sender))
            return Done(), None

    slot_bucket = {}
    monkeypatch.setattr(receiver_mod, "settle", lambda slot: events.append(("settle", slot_bucket[slot.data_ptr()])))
    group = Group()
    receiver = receiver_mod.BucketReceiver(plan, group)
    owner = {t.name: b.index for b in plan.buckets for e in b.entries for t in e.hf}
    for name, tensor in receiver.tensors(3):
        slot_bucket.setdefault(tensor.untyped_storage().data_ptr(), owner[name])
        events.append(("load", owner[name]))
    assert receiver.error is None
    for b in plan.buckets:
        last_load = max(i for i, e in enumerate(events) if e == ("load", b.index))
        settled = events.index(("settle", b.index))
        acks = [i for i, e in enumerate(events) if e[0] == "ack"]
        assert last_load < settled < acks[b.index], (b.index, events)
