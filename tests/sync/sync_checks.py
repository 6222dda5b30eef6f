"""Both sides of a real weight sync, for tests and the benchmark.

`EngineHost` / `PlainReceiver` run in their own process (an `IsolatedActor`: no megatron layer);
`trainer_rounds` runs on every rank of a `run_local_group` world (megatron on gloo). The test
process hosts each round's rendezvous store (bound to port 0, then published); every rank and
engine joins it as a client.
"""

from __future__ import annotations

import torch


class EngineHost:
    def __init__(self, model_dir: str, dtype: str = "float32", quantization: str | None = None):
        from megarl.rollout.engine import EngineConfig, RolloutEngine

        torch.set_num_threads(1)
        self.engine = RolloutEngine(EngineConfig(model_dir, dtype=dtype, max_model_len=256,
                                                 kv_cache_bytes=32 << 20, quantization=quantization))

    def join(self, plan, rendezvous, engine_index: int, generation: int):
        return self.engine.join_weight_sync(plan, rendezvous, engine_index, generation)

    def receive(self, version: int) -> dict:
        from megarl.sync.transport import WeightSyncError

        try:
            return {"ok": True, **self.engine.receive_weights(version)}
        except WeightSyncError as e:
            return {"ok": False, "error": str(e), "consistent": self.engine.weights_consistent}

    def prompt_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        return [self.engine.prompt_logprobs(s) for s in seqs]

    def generate_version(self, prompt: list[int]) -> int:
        from megarl.rollout.engine import SamplingConfig

        return self.engine.generate([prompt], SamplingConfig(max_tokens=2))[0][0].weight_version


def perturb_(chunks) -> None:
    """A deterministic, value-dependent change of every weight: identical on every replica of a
    parameter (DP, TP-replicated norms), so the trainer holds one well-defined new model."""
    with torch.no_grad():
        for c in chunks:
            for p in c.parameters():
                p.add_(0.05 * torch.sin(p * 997.0))


class PlainReceiver:
    """A receiver without vLLM: joins the sync group and keeps the verified tensors it gets."""

    def __init__(self):
        torch.set_num_threads(1)

    def receive(self, plan, rendezvous, receiver_index: int, version: int) -> dict:
        from megarl.sync.receiver import BucketReceiver
        from megarl.sync.transport import SyncGroup

        group = SyncGroup(plan, plan.receiver_rank(receiver_index), rendezvous)
        receiver = BucketReceiver(plan, group)
        tensors = {name: t.clone() for name, t in receiver.tensors(version)}
        return {"tensors": tensors, "error": str(receiver.error) if receiver.error else None}


def trainer_rounds(ckpt_dir: str, parallel: dict, rounds: list[dict], seqs: list[list[int]]) -> dict:
    """Load the converted model at `parallel`, perturb it, run each sync round
    ({plan, port, version, corrupt_bucket}) and score `seqs`. Also returns what the sender says
    about a plan for another layout and about a parameter the map does not know."""
    import torch.distributed as dist

    from megarl.checkpoint.hf import load_converted
    from megarl.config.parallel import ParallelConfig
    from megarl.models.forward import full_logits
    from megarl.runtime.rendezvous import Rendezvous
    from megarl.sync.plan import UnsupportedLayout
    from megarl.sync.sender import WeightSender

    torch.set_num_threads(1)
    chunks, _, _ = load_converted(ckpt_dir, ParallelConfig(**parallel), dtype="fp32")
    perturb_(chunks)
    out: dict = {"rounds": [], "refusals": {}}
    for r in rounds:
        if r.get("wrong_plan") is not None:
            try:
                WeightSender(r["wrong_plan"], chunks)
            except UnsupportedLayout as e:
                out["refusals"]["wrong_plan"] = str(e)
            continue
        if r.get("extra_param"):
            extra = torch.nn.Parameter(torch.zeros(3))
            chunks[0].decoder.layers[0].self_attention.register_parameter("linear_extra", extra)
            try:
                WeightSender(r["plan"], chunks)
            except UnsupportedLayout as e:
                out["refusals"]["extra_param"] = str(e)
            del chunks[0].decoder.layers[0].self_attention.linear_extra
            continue
        sender = WeightSender(r["plan"], chunks, corrupt_bucket=r.get("corrupt_bucket"))
        # the test process hosts the round's store (bound, then published): every member is a client
        sender.join(Rendezvous("127.0.0.1", r["port"], timeout_s=60), generation=r.get("generation", 0))
        out["rounds"].append(sender.send(r["version"]))
        dist.barrier()  # the store host (rank 0) outlives every member's use of it
    lps = []
    for s in seqs:
        logits = full_logits(chunks, torch.tensor([s]))  # collective: every rank runs every sequence
        if logits is not None:
            lps.append(torch.log_softmax(logits[0, :-1].float(), -1).gather(1, torch.tensor(s[1:])[:, None])[:, 0])
    out["logprobs"] = [x.tolist() for x in lps] if lps else None
    return out
