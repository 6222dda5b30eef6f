"""Preference stages on the megatron model layer: `dpo` (every DPO-family loss), `kto`, and `rm`
(Bradley–Terry reward model with a scalar head).

Driver (`run`): the starting model as a megatron checkpoint (rm: the LM body with a fresh scalar
head, an HF *ForSequenceClassification built once), `train_rank` on every rank (local gloo ranks on
CPU, or this process under torchrun), then the final weights exported to HF in `<output_dir>/hf`
(rm: a sequence-classification checkpoint that PPO's `reward.reward_model` and the reward engine
load).

One step (`train_rank`): the sampler hands out `samples_per_step` examples (pairs for dpo/rm,
completions for kto); each data-parallel rank takes its share in micro-batches of
`micro_batch_per_rank` examples. All segments of a micro-batch (chosen and rejected; KTO's
completion and its KL partner) are packed into ONE row with a block-diagonal causal mask, so a
pair is one forward through the TP/PP-sharded model. The loss function on the last pipeline stage
sums each segment's response log-probs (or reads the reward head at its last token), and applies
the algorithm library's loss (`PREFERENCE_LOSSES`, `bradley_terry_loss`) to them; megatron's
per-token loss mode divides by the step's example count across all ranks, so every example weighs
the same however the step is cut.

Reference log-probs (dpo, kto): `reference: model` keeps a frozen copy of the starting weights on
each rank and scores each step's examples with it (same packing, one extra forward-only pass);
`precomputed` scores the whole train/eval set once before training into
`<output_dir>/reference_logps/` and reuses it (also on resume); orpo/simpo use none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from functools import partial

from megarl.config.recipe import Recipe
from megarl.trainers.common import initial_checkpoint, run_ranks
from megarl.trainers.runner import StagePolicy, StageResult, open_metrics

# per-example metric sums collected on the last stage; the first two are always loss and weight
PAIR_SUMS = ("loss", "examples", "accuracy", "reward_chosen", "reward_rejected", "margin", "logp_chosen",
             "logp_rejected")
KTO_SUMS = ("loss", "examples", "desirable", "reward_desirable", "undesirable", "reward_undesirable", "kl",
            "kl_batches")


def prepare(recipe: Recipe) -> str:
    """The starting megatron checkpoint (converted once; rm: the LM body with a fresh scalar head)."""
    os.makedirs(recipe.trainer.output_dir, exist_ok=True)
    if recipe.stage == "rm":
        from megarl.trainers.common import scalar_head_hf_dir

        return initial_checkpoint(recipe, "rm", scalar_head_hf_dir(recipe.model.path, recipe.trainer.output_dir,
                                                                   "sequence", "rm", recipe.model.trust_remote_code))
    return initial_checkpoint(recipe, recipe.stage)


def run(recipe: Recipe) -> int:
    return run_ranks(recipe, recipe.stage, train_rank, prepare(recipe))


# ---- data -> packed micro-batches -------------------------------------------------------------
def pack_examples(examples: list, weights: list[float], seq: int, pad_id: int, lm: bool) -> dict:
    """One packed row holding every segment of `examples`, right-padded to `seq` tokens.

    lm=True (dpo/kto): each segment contributes its inputs ids[:-1] with labels ids[1:] and the
    response mask shifted the same way. lm=False (rm): each segment is fed up to its scored token
    (see scored_length) and `last` is that token's position, where the reward head is read."""
    import torch

    from megarl.models.packing import pack
    from megarl.runtime.device import to_device

    pieces, labels, masks, last = [], [], [], []
    offset = 0
    for ex in examples:
        for seg in ex.segments:
            ids = torch.tensor(seg.input_ids)
            if lm:
                pieces.append(ids[:-1])
                labels.append(ids[1:])
                masks.append(torch.tensor(seg.loss_mask[1:], dtype=torch.float))
            else:
                pieces.append(ids[:scored_length(seg)])
            offset += pieces[-1].numel()
            last.append(offset - 1)
    row = pack(pieces, pad_to=seq, pad_id=pad_id)
    n = len(pieces)
    seg_ids = torch.repeat_interleave(torch.arange(n + (1 if row.padding else 0)),
                                      torch.tensor(row.lengths + ([row.padding] if row.padding else [])))
    mb = {"tokens": row.tokens, "position_ids": row.position_ids, "attention_mask": row.attention_mask,
          "seg_ids": seg_ids, "num_segments": n, "last": torch.tensor(last),
          "weight": torch.tensor(weights, dtype=torch.float)}
    if lm:
        mb["labels"] = torch.cat(labels + ([torch.full((row.padding,), pad_id)] if row.padding else []))[None]
        mb["mask"] = torch.cat(masks + ([torch.zeros(row.padding)] if row.padding else []))[None]
    if examples and examples[0].desirable is not None:
        mb["desirable"] = torch.tensor([bool(e.desirable) for e in examples])
    return to_device(mb)   # packed on the host, trained on the device


def scored_length(seg) -> int:
    """A reward model reads its head at the last token the assistant wrote (its end-of-turn token),
    which is where a rollout's sequence ends when the reward engine scores it; template text after
    it is not fed."""
    return max(i for i, m in enumerate(seg.loss_mask) if m) + 1


def packed_length(examples: list, lm: bool) -> int:
    return sum(len(seg) - 1 if lm else scored_length(seg) for ex in examples for seg in ex.segments)


def segment_logps(per_token_nll, mb: dict):
    """Σ and count of response log-probs per segment, from megatron's per-token CE [1, T]."""
    import torch

    n = mb["num_segments"]
    logp = -per_token_nll[0].float() * mb["mask"][0]
    sums = torch.zeros(n + 1, dtype=logp.dtype, device=logp.device).index_add(0, mb["seg_ids"], logp)[:n]
    counts = torch.zeros(n + 1, device=logp.device).index_add(0, mb["seg_ids"], mb["mask"][0])[:n]
    return sums, counts


# ---- objectives (last pipeline stage) ----------------------------------------------------------
def pair_objective(output, mb: dict, recipe: Recipe):
    """DPO-family or Bradley–Terry loss of one packed micro-batch -> (Σ weighted loss, metric sums)."""
    import torch

    from megarl.algorithms.preference import PREFERENCE_LOSSES, bradley_terry_loss

    p, w = recipe.preference, mb["weight"]
    if recipe.stage == "rm":
        values = output[0, mb["last"], 0].float()
        chosen, rejected = values[0::2], values[1::2]
        margin = mb.get("margin") if p.margin else None
        loss, _ = bradley_terry_loss(chosen, rejected, margin)
        logp_c = logp_r = torch.zeros_like(chosen)
    else:
        sums, counts = segment_logps(output, mb)
        logp_c, logp_r = sums[0::2], sums[1::2]
        avg_c, avg_r = logp_c / counts[0::2].clamp(min=1), logp_r / counts[1::2].clamp(min=1)
        kind = p.loss_type
        fn = PREFERENCE_LOSSES.get(kind)
        # each loss takes only its own options (it refuses others); an unset one keeps the loss's default
        options = {"simpo": {"gamma": p.simpo_gamma}, "sigmoid": {"label_smoothing": p.label_smoothing},
                   "robust": {"label_smoothing": p.label_smoothing}}.get(kind, {})
        options = {k: v for k, v in options.items() if v is not None}
        if kind in ("orpo", "simpo"):
            nll = {"chosen_nll": -avg_c} if kind == "orpo" else {}
            loss, _ = fn(policy_chosen_avg=avg_c, policy_rejected_avg=avg_r, beta=p.beta, **nll, **options)
            chosen, rejected = p.beta * avg_c.detach(), p.beta * avg_r.detach()
        else:
            ref = mb["ref"]  # [examples, 2 segments, (sum, count)]
            ref_c, ref_r = ref[:, 0, 0], ref[:, 1, 0]
            if kind == "ipo":  # IPO is defined on length-normalised log-probs
                ref_c, ref_r = ref_c / ref[:, 0, 1].clamp(min=1), ref_r / ref[:, 1, 1].clamp(min=1)
                pc, pr = avg_c, avg_r
            else:
                pc, pr = logp_c, logp_r
            loss, _ = fn(pc, pr, ref_c, ref_r, beta=p.beta, **options)
            chosen, rejected = p.beta * (pc - ref_c).detach(), p.beta * (pr - ref_r).detach()
        if p.ftx:
            loss = loss + p.ftx * -avg_c
    d = (chosen - rejected).detach()
    accuracy = (d > 0).float() + 0.5 * (d == 0).float()  # ties (e.g. policy == reference) count half
    stats = torch.stack([loss.detach(), torch.ones_like(d), accuracy, chosen.detach(), rejected.detach(), d,
                         logp_c.detach(), logp_r.detach()])
    return (loss * w).sum(), (stats.double() * w.double()).sum(1)


def kto_objective(output, mb: dict, recipe: Recipe):
    """KTO loss of one packed micro-batch: z0 is the mean policy/reference log-ratio of the KL
    partners of this micro-batch across the data-parallel ranks (no gradient). The logged `kl` is
    that estimate itself; the loss uses it clamped at 0, as the paper does."""
    import torch
    import torch.distributed as dist

    from megarl.algorithms.preference import kto_loss
    from megarl.runtime.megatron import parallel_state as ps

    p, w = recipe.preference, mb["weight"]
    sums, _ = segment_logps(output, mb)
    ref = mb["ref"]
    kl = torch.stack([((sums[1::2].detach() - ref[:, 1, 0]) * w).sum(), w.sum()]).double()
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(kl, group=ps.get_data_parallel_group())
    z0 = (kl[0] / kl[1].clamp(min=1)).float()
    desirable = mb["desirable"]
    loss, m = kto_loss(sums[0::2], ref[:, 0, 0], desirable, z0, beta=p.beta,
                       desirable_weight=p.kto_desirable_weight, undesirable_weight=p.kto_undesirable_weight)
    reward = m["reward"].double()
    dw, uw = desirable.double() * w.double(), (~desirable).double() * w.double()
    one = torch.ones((), dtype=torch.float64, device=reward.device)
    stats = torch.stack([(loss.detach().double() * w.double()).sum(), w.double().sum(), dw.sum(), (reward * dw).sum(),
                         uw.sum(), (reward * uw).sum(), z0.detach().double(), one])
    return (loss * w).sum(), stats


def metric_names(stage: str) -> tuple[str, ...]:
    return KTO_SUMS if stage == "kto" else PAIR_SUMS


def summarize(stage: str, sums, prefix: str = "") -> dict[str, float]:
    """Named means from reduced metric sums."""
    s = dict(zip(metric_names(stage), (float(v) for v in sums)))
    if stage == "kto":
        # kl: KTO's KL-baseline estimate (mean policy/reference log-ratio on mismatched pairs; it
        # can be negative on data the policy did not sample — the loss uses max(0, kl))
        out = {"loss": s["loss"] / max(s["examples"], 1), "kl": s["kl"] / max(s["kl_batches"], 1)}
        if s["desirable"]:
            out["reward/desirable"] = s["reward_desirable"] / s["desirable"]
        if s["undesirable"]:
            out["reward/undesirable"] = s["reward_undesirable"] / s["undesirable"]
    else:
        n = max(s["examples"], 1)
        out = {"loss": s["loss"] / n, "reward/accuracy": s["accuracy"] / n, "reward/chosen": s["reward_chosen"] / n,
               "reward/rejected": s["reward_rejected"] / n, "reward/margin": s["margin"] / n}
        if stage != "rm":
            out.update({"logp/chosen": s["logp_chosen"] / n, "logp/rejected": s["logp_rejected"] / n})
    return {prefix + k: v for k, v in out.items()}


def _forward_step(data_iterator, model, objective, sink: list):
    import torch

    mb = next(data_iterator)
    out = model(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb.get("labels"))

    def loss_func(output):
        loss_sum, stats = objective(output, mb)
        sink.append(stats)
        n = stats[1].detach().float()
        return loss_sum, n.to(torch.int), {"loss_sum_count": torch.stack([loss_sum.detach().float(), n])}

    return out, loss_func


def _logp_forward_step(data_iterator, model, sink: list):
    """Reference pass: Σ/count of response log-probs per segment, nothing to back-propagate."""
    import torch

    mb = next(data_iterator)
    out = model(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])

    def collect(output):
        sums, counts = segment_logps(output, mb)
        sink.append(torch.stack([sums.detach(), counts], dim=-1))
        return (output.sum() * 0.0, torch.ones((), dtype=torch.int, device=output.device),
                {"loss_sum_count": torch.zeros(2, device=output.device)})

    return out, collect


# ---- one rank -----------------------------------------------------------------------------------
class _Batches:
    """Cuts a list of examples into this rank's packed micro-batches, all padded to the length the
    data-parallel ranks agree on (pipeline stages exchange fixed shapes)."""

    def __init__(self, recipe: Recipe, pad_id: int):
        from megarl.runtime.megatron import parallel_state as ps

        self.micro = recipe.trainer.micro_batch_per_rank
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.multiple = recipe.parallel.tp if recipe.parallel.sp else 1
        self.pad_id, self.lm = pad_id, recipe.stage != "rm"

    def unit(self) -> int:
        """Examples per data-parallel sweep of one micro-batch each."""
        return self.dp * self.micro

    def mine(self, examples: list, weights: list[float]) -> tuple[list[dict], int, list[int]]:
        """(this rank's micro-batches, padded length, positions of its examples in `examples`)."""
        import torch
        import torch.distributed as dist

        from megarl.runtime.device import current

        per = len(examples) // self.dp
        positions = list(range(self.dp_rank * per, (self.dp_rank + 1) * per))
        groups = [positions[i:i + self.micro] for i in range(0, per, self.micro)]
        longest = torch.tensor([max(packed_length([examples[j] for j in g], self.lm) for g in groups)],
                               device=current())
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        seq = math.ceil(int(longest) / self.multiple) * self.multiple
        micro = [pack_examples([examples[j] for j in g], [weights[j] for j in g], seq, self.pad_id, self.lm)
                 for g in groups]
        return micro, seq, positions


def _reduce_sums(local, last_stage: bool):
    """Metric sums of one schedule: summed over data-parallel ranks on the last stage, then taken
    from the last stage's (tp 0, dp 0) rank so that every rank returns the same numbers."""
    import torch.distributed as dist

    from megarl.models.train import sums_from_reporter
    from megarl.runtime.megatron import parallel_state as ps

    if last_stage and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(local, group=ps.get_data_parallel_group())
    return sums_from_reporter(local)


class ReferenceLogps:
    """Reference Σ log-probs (and token counts) per example segment: [examples, segments, 2].

    mode "model": a frozen copy of the starting model scores each batch when asked.
    mode "precomputed": the whole dataset is scored once (in batches, with the same packing) and
    kept in `<output_dir>/reference_logps/<split>.pt`, keyed by the data file and the model."""

    def __init__(self, recipe: Recipe, init_ckpt: str, options, batches: _Batches):
        from megarl.checkpoint.hf import load_converted

        self.recipe, self.batches, self.mode = recipe, batches, recipe.preference.reference
        self.chunks, self.config, _ = load_converted(init_ckpt, recipe.parallel, seed=recipe.trainer.seed,
                                                     options=options, dtype=recipe.model.dtype)
        for c in self.chunks:
            c.eval()
            c.requires_grad_(False)
        self.init_ckpt = init_ckpt
        self.tables: dict[str, object] = {}

    def score(self, examples: list):
        """[len(examples), segments, 2] on every rank; len(examples) must split over the DP ranks
        in whole micro-batches (callers pad with weight-0 repeats)."""
        import torch
        import torch.distributed as dist

        from megarl.models.train import TrainState, run_schedule
        from megarl.runtime.device import current
        from megarl.runtime.megatron import parallel_state as ps

        micro, seq, positions = self.batches.mine(examples, [1.0] * len(examples))
        sink: list = []
        with torch.no_grad():
            run_schedule(TrainState(self.chunks, None, self.config), micro, seq, forward_only=True,
                         forward_step=partial(_logp_forward_step, sink=sink))
        nseg = len(examples[0].segments)
        table = torch.zeros(len(examples), nseg, 2, dtype=torch.float64, device=current())
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            table[positions] = torch.cat(sink).double().view(len(positions), nseg, 2)
        dist.all_reduce(table)  # each example filled by exactly one rank
        return table.cpu()   # kept (and saved) on the host; micro-batches take their rows to the device

    def precompute(self, split: str, dataset) -> None:
        import torch
        import torch.distributed as dist

        key = hashlib.sha256(json.dumps([os.path.abspath(dataset.path), os.path.getsize(dataset.path),
                                         os.path.getmtime(dataset.path), os.path.abspath(self.init_ckpt),
                                         len(dataset)]).encode()).hexdigest()[:16]
        path = os.path.join(self.recipe.trainer.output_dir, "reference_logps", f"{split}-{key}.pt")
        if os.path.isfile(path):
            self.tables[split] = torch.load(path, map_location="cpu")
            return
        unit = self.batches.unit()
        chunk = max(unit, (self.recipe.derived.samples_per_step // unit) * unit)
        parts = []
        for i in range(0, len(dataset), chunk):
            part = dataset.examples[i:i + chunk]
            filler = (-len(part)) % unit
            parts.append(self.score(part + [part[0]] * filler)[:len(part)])
        self.tables[split] = torch.cat(parts)
        if dist.get_rank() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(self.tables[split], path + ".tmp")
            os.replace(path + ".tmp", path)
        dist.barrier()

    def release_model(self) -> None:
        """Precomputed tables hold everything: free the frozen copy."""
        self.chunks = None

    def lookup(self, split: str, indices: list[int], examples: list):
        if split in self.tables:
            return self.tables[split][indices]
        return self.score(examples)


def _datasets(recipe: Recipe, tokenizer, rank0: bool):
    """(train, eval or None) preference / KTO datasets; rank 0 writes the rejected rows."""
    from megarl.data.preference import PreferenceDataset

    t, p, stage = recipe.trainer, recipe.preference, recipe.stage
    kind = "kto" if stage == "kto" else "preference"
    max_length = recipe.data.max_length or recipe.model.shape.max_position_embeddings
    rejected = recipe.data.rejected_path or os.path.join(t.output_dir, "rejected_rows.jsonl")
    data = PreferenceDataset(recipe.data.train, kind, tokenizer, max_length, recipe.data.format,
                             recipe.data.on_bad_row, rejected if rank0 else None, margin=p.margin)
    eval_data = (PreferenceDataset(recipe.data.eval, kind, tokenizer, max_length, recipe.data.format,
                                   recipe.data.on_bad_row, rejected.replace(".jsonl", "_eval.jsonl") if rank0 else None,
                                   margin=p.margin) if recipe.data.eval else None)
    for d in (data, eval_data):
        if d is not None and d.report.rejected and rank0:
            print(f"[{stage}] {d.report.render()}", flush=True)
    if stage == "kto" and rank0:
        print(f"[{stage}] {data.num_desirable} desirable, {len(data) - data.num_desirable} undesirable examples",
              flush=True)
    return data, eval_data


class _PreferenceRank:
    """This rank's trainable model, the reference log-probs and the batching: runs examples through
    megatron's schedule for training or evaluation and returns the reduced metric sums."""

    def __init__(self, recipe: Recipe, init_ckpt: str, tokenizer, data, eval_data):
        from megarl.trainers.common import build_options, build_trainable

        self.recipe, self.stage = recipe, recipe.stage
        self.state = build_trainable(recipe, init_ckpt)
        self.batches = _Batches(recipe, tokenizer.pad_token_id)
        self.eval_data = eval_data
        self.objective = partial(kto_objective if self.stage == "kto" else pair_objective, recipe=recipe)
        self.reference = None
        if recipe.preference.reference in ("model", "precomputed"):
            self.reference = ReferenceLogps(recipe, init_ckpt, build_options(recipe), self.batches)
            if recipe.preference.reference == "precomputed":
                self._precompute(data, eval_data)

    def _precompute(self, data, eval_data) -> None:
        import torch.distributed as dist

        t0 = time.perf_counter()
        self.reference.precompute("train", data)
        if eval_data is not None:
            self.reference.precompute("eval", eval_data)
        self.reference.release_model()
        if dist.get_rank() == 0:
            print(f"[{self.stage}] reference log-probs precomputed in {time.perf_counter() - t0:.1f}s", flush=True)

    def _micro_batches(self, split: str, indices: list[int], examples: list, weights: list[float]):
        import torch

        from megarl.runtime.device import to_device

        micro, seq, positions = self.batches.mine(examples, weights)
        per = self.batches.micro
        ref = self.reference.lookup(split, indices, examples) if self.reference is not None else None
        for k, mb in enumerate(micro):
            mine = positions[k * per:(k + 1) * per]
            if ref is not None:
                mb["ref"] = to_device(ref[mine].float())
            if self.recipe.preference.margin:
                mb["margin"] = to_device(torch.tensor([examples[j].margin for j in mine]))
        return micro, seq

    def run(self, split: str, indices: list[int], examples: list, weights: list[float], train: bool):
        """Metric sums over these examples (a training step's forward/backward when `train`)."""
        import torch

        from megarl.models.train import TrainState, run_schedule
        from megarl.runtime.device import current
        from megarl.runtime.megatron import parallel_state as ps

        micro, seq = self._micro_batches(split, indices, examples, weights)
        sink: list = []
        ts = TrainState(self.state.models, self.state.optimizer, self.state.config)
        step_fn = partial(_forward_step, objective=self.objective, sink=sink)
        with torch.set_grad_enabled(train):
            run_schedule(ts, micro, seq, forward_only=not train, forward_step=step_fn)
        local = (torch.stack(sink).sum(0) if sink
                 else torch.zeros(len(metric_names(self.stage)), dtype=torch.float64, device=current()))
        return _reduce_sums(local.double(), ps.is_pipeline_last_stage(ignore_virtual=True))

    def evaluate(self) -> dict:
        """Metrics over the whole eval set, in sweeps padded with weight-0 repeats (they count nowhere)."""
        unit = self.batches.unit()
        chunk = max(unit, (self.recipe.derived.samples_per_step // unit) * unit)
        total = None
        for i in range(0, len(self.eval_data), chunk):
            idx = list(range(i, min(i + chunk, len(self.eval_data))))
            filler = (-len(idx)) % unit
            idx_all = idx + [idx[0]] * filler
            sums = self.run("eval", idx_all, [self.eval_data.examples[j] for j in idx_all],
                            [1.0] * len(idx) + [0.0] * filler, train=False)
            total = sums if total is None else total + sums
        return summarize(self.stage, total, "eval/")

    def optimizer_step(self, step: int) -> dict:
        from megarl.models.train import optimizer_update

        grad_norm = optimizer_update(self.state, f"step {step}")
        return {"grad_norm": grad_norm, "lr": self.state.optimizer.param_groups[0]["lr"]}


def train_rank(recipe: Recipe, init_ckpt: str) -> StageResult:
    import torch.distributed as dist

    from megarl.data.tokenizer import load_tokenizer
    from megarl.models.optim import lr_scheduler
    from megarl.trainers.common import after_rank_step, any_rank, resume_stage, total_steps

    t, stage = recipe.trainer, recipe.stage
    rank0 = dist.get_rank() == 0
    tokenizer = load_tokenizer(recipe.model, os.path.join(init_ckpt, "hf"))
    data, eval_data = _datasets(recipe, tokenizer, rank0)
    me = _PreferenceRank(recipe, init_ckpt, tokenizer, data, eval_data)
    steps = total_steps(recipe, len(data))
    scheduler = lr_scheduler(me.state.optimizer, recipe, steps)
    step, sampler, _ = resume_stage(recipe, me.state, scheduler, len(data), stage)
    policy = StagePolicy(recipe, steps, agree=any_rank)
    logger = open_metrics(recipe, step) if rank0 else None
    try:
        if eval_data is not None and step == 0:
            _report(logger, stage, 0, me.evaluate())
        while step < steps:
            t0 = time.perf_counter()
            indices = sampler.take(recipe.derived.samples_per_step)
            sums = me.run("train", indices, [data.examples[i] for i in indices], [1.0] * len(indices), train=True)
            record = {**summarize(stage, sums), **me.optimizer_step(step + 1)}
            scheduler.step(increment=1)
            step += 1
            record["seconds"] = round(time.perf_counter() - t0, 4)
            if eval_data is not None and ((t.eval_freq and step % t.eval_freq == 0) or step == steps):
                record.update(me.evaluate())
            _report(logger, stage, step, record, steps)
            stopped = after_rank_step(recipe, policy, step, me.state, init_ckpt, sampler, scheduler)
            if stopped is not None:
                return stopped
    finally:
        if logger:
            logger.close()
    return policy.result(step)


def _report(logger, stage: str, step: int, record: dict, steps: int | None = None) -> None:
    if logger is None:
        return
    logger.log(step, record)
    print(f"[{stage}] step {step}{f'/{steps}' if steps else ''} {_brief(record)}", flush=True)


def _brief(record: dict) -> str:
    keys = ("loss", "reward/accuracy", "reward/margin", "kl", "eval/loss", "eval/reward/accuracy")
    return " ".join(f"{k} {record[k]:.4f}" for k in keys if k in record)
