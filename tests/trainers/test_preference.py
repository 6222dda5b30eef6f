"""Preference stages (dpo, kto, rm) on the megatron model layer.

- the packed pipeline objective at TP=2+SP and PP=2 equals the single-rank value, and equals the
  algorithm library's loss applied to log-probs (rewards) computed independently with HF
- end to end through `megarl train`: DPO learns (held-out accuracy rises from 0.5), resumes
  exactly with precomputed reference log-probs; the reward model trains, exports to HF, and the
  exported model ranks the held-out pairs as the trainer measured; KTO trains with its KL baseline
- data: every bad row is reported by kind
"""

import json
import os
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

from examples.tool_math import kto_row, preference_row
from megarl.algorithms.preference import PREFERENCE_LOSSES, bradley_terry_loss, kto_loss
from megarl.cli import main as cli
from megarl.runtime.local_group import run_local_group

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BETA = 0.5  # preference_checks uses it


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref_data")
    rng, held_out = random.Random(0), random.Random(1)
    return {"train": _write(root / "train.jsonl", [preference_row(rng) for _ in range(96)]),
            "eval": _write(root / "eval.jsonl", [preference_row(held_out) for _ in range(32)]),
            "kto": _write(root / "kto.jsonl", [kto_row(rng) for _ in range(48)]),
            "small": _write(root / "small.jsonl", [preference_row(held_out) for _ in range(8)]),
            "kto_small": _write(root / "kto_small.jsonl", [kto_row(held_out) for _ in range(8)])}


def _hf_segment_logps(hf_dir, examples):
    """(Σ response log-probs, response tokens) per segment with plain transformers, fp32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ex in examples:
            row = []
            for seg in ex.segments:
                ids = torch.tensor(seg.input_ids)
                logp = torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1).gather(-1, ids[1:, None])[:, 0]
                mask = torch.tensor(seg.loss_mask[1:], dtype=torch.float)
                row.append([float((logp * mask).sum()), float(mask.sum())])
            out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def _examples(path, kind, hf_dir):
    from transformers import AutoTokenizer

    from megarl.data.preference import PreferenceDataset

    return PreferenceDataset(path, kind, AutoTokenizer.from_pretrained(hf_dir), 512).examples


def _expected_pair_loss(loss_type, logps, ref):
    pc, pr, rc, rr = logps[:, 0, 0], logps[:, 1, 0], ref[:, 0, 0], ref[:, 1, 0]
    avg_c, avg_r = pc / logps[:, 0, 1], pr / logps[:, 1, 1]
    if loss_type == "sigmoid_ftx":  # + 0.5 × the chosen response's token-mean NLL
        return _expected_pair_loss("sigmoid", logps, ref) + 0.5 * float((-avg_c).mean())
    fn = PREFERENCE_LOSSES.get(loss_type)
    if loss_type == "orpo":
        loss, _ = fn(policy_chosen_avg=avg_c, policy_rejected_avg=avg_r, chosen_nll=-avg_c, beta=BETA)
    elif loss_type == "simpo":
        loss, _ = fn(policy_chosen_avg=avg_c, policy_rejected_avg=avg_r, beta=BETA)
    elif loss_type == "ipo":
        loss, _ = fn(avg_c, avg_r, rc / ref[:, 0, 1], rr / ref[:, 1, 1], beta=BETA)
    else:
        loss, _ = fn(pc, pr, rc, rr, beta=BETA)
    return float(loss.mean())


LAYOUTS = [({}, 1), ({"tp": 2, "sp": True}, 2), ({"pp": 2}, 2)]


@pytest.mark.dist
def test_packed_pipeline_objective_matches_single_rank_and_library(converted, pref_data):
    ckpt, hf = converted["qwen2"]["ckpt"], converted["qwen2"]["hf"]
    pairs = _examples(pref_data["small"], "preference", hf)
    logps = _hf_segment_logps(hf, pairs)
    g = torch.Generator().manual_seed(0)
    ref = logps.clone()
    ref[..., 0] += torch.randn(ref.shape[:2], generator=g, dtype=torch.float64) * 8.0  # a different "reference"
    kto = _examples(pref_data["kto_small"], "kto", hf)
    kto_logps = _hf_segment_logps(hf, kto)
    kto_ref = kto_logps.clone()
    kto_ref[..., 0] += torch.randn(kto_ref.shape[:2], generator=g, dtype=torch.float64)

    types = ["sigmoid", "ipo", "hinge", "simpo", "orpo", "sigmoid_ftx"]
    results = {}
    for layout, world in LAYOUTS:
        got = run_local_group("tests.trainers.preference_checks:pipeline_pair_losses", world,
                              args=(ckpt, layout, pref_data["small"], types, ref), timeout=600)
        assert all(r == got[0] for r in got), "ranks disagree"
        kto_got = run_local_group("tests.trainers.preference_checks:pipeline_pair_losses", world,
                                  args=(ckpt, layout, pref_data["kto_small"], ["kto"], kto_ref), timeout=600)
        results[str(layout)] = {**got[0], **kto_got[0]}

    single = results["{}"]
    for loss_type in types:
        want = _expected_pair_loss(loss_type, logps, ref)
        assert abs(single[loss_type]["loss"] - want) < 1e-4, (loss_type, single[loss_type]["loss"], want)
        for layout in results:
            assert abs(results[layout][loss_type]["loss"] - single[loss_type]["loss"]) < 1e-5, (layout, loss_type)
            assert results[layout][loss_type]["reward/accuracy"] == single[loss_type]["reward/accuracy"]
    # a non-trivial comparison: the random reference makes the DPO loss differ from log 2
    assert abs(single["sigmoid"]["loss"] - 0.6931) > 0.05
    # KTO: z0 from the KL partners of each micro-batch of 2 (dp = 1 here)
    desirable = torch.tensor([e.desirable for e in kto])
    want = []
    for k in range(0, len(kto), 2):
        sl = slice(k, k + 2)
        z0 = (kto_logps[sl, 1, 0] - kto_ref[sl, 1, 0]).mean()
        loss, _ = kto_loss(kto_logps[sl, 0, 0], kto_ref[sl, 0, 0], desirable[sl], z0, beta=BETA)
        want.append(loss)
    want = float(torch.cat(want).mean())
    for layout in results:
        assert abs(results[layout]["kto"]["loss"] - want) < 1e-4, (layout, results[layout]["kto"]["loss"], want)


@pytest.mark.dist
def test_reward_model_objective_matches_hf_sequence_classifier(tmp_path, converted, pref_data):
    from tests.conftest import make_scalar_head_model

    model, hf, ckpt = make_scalar_head_model(converted["qwen2"]["hf"], tmp_path, "Qwen2ForSequenceClassification", 3)
    from megarl.trainers.preference import scored_length

    pairs = _examples(pref_data["small"], "preference", hf)
    with torch.no_grad():
        scores = torch.tensor([[float(model(torch.tensor(seg.input_ids[:scored_length(seg)])[None]).logits[0, 0])
                                for seg in ex.segments] for ex in pairs])
    loss, m = bradley_terry_loss(scores[:, 0], scores[:, 1])
    dummy = torch.zeros(len(pairs), 2, 2, dtype=torch.float64)
    for layout, world in [({}, 1), ({"tp": 2, "sp": True}, 2)]:
        got = run_local_group("tests.trainers.preference_checks:pipeline_pair_losses", world,
                              args=(ckpt, layout, pref_data["small"], ["bradley_terry"], dummy), timeout=600)[0]
        assert abs(got["bradley_terry"]["loss"] - float(loss.mean())) < 1e-4, (layout, got, float(loss.mean()))
        assert got["bradley_terry"]["reward/accuracy"] == float(m["reward_accuracy"].mean())


def _recipe(tmp_path, ckpt, data, name, stage="dpo", preference=None, **trainer):
    body = {
        "defaults": [os.path.join(ROOT, "configs/tiny/base.yaml")],
        "stage": stage,
        "model": {"path": ckpt, "shape_preset": "tiny-qwen2"},
        "data": {"train": data["kto" if stage == "kto" else "train"], "max_length": 512},
        "optim": {"lr": 5.0e-4},
        "trainer": {"steps": 6, "samples_per_step": 8, "micro_batch_per_rank": 2, "save_freq": 3, "eval_freq": 3,
                    "output_dir": str(tmp_path / name), **trainer},
    }
    if stage != "kto":
        body["data"]["eval"] = data["eval"]
    if preference:
        body["preference"] = preference
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def _metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.dist
def test_dpo_learns_and_resumes_exactly_with_precomputed_reference(tmp_path, converted, pref_data):
    ckpt = converted["qwen2"]["ckpt"]
    pref = {"loss_type": "sigmoid", "beta": 0.1, "reference": "precomputed"}
    straight = _recipe(tmp_path, ckpt, pref_data, "straight", preference=pref)
    assert cli(["train", straight]) == 0
    ref = _metrics(tmp_path / "straight")
    assert [m["step"] for m in ref] == list(range(0, 7))
    assert ref[0]["eval/reward/accuracy"] == 0.5  # policy == reference: every pair ties
    assert ref[-1]["eval/reward/accuracy"] > 0.6 and ref[-1]["eval/loss"] < ref[0]["eval/loss"]
    assert ref[-1]["reward/margin"] > 0 and {"logp/chosen", "logp/rejected", "grad_norm", "lr"} <= set(ref[-1])
    tables = os.listdir(tmp_path / "straight" / "reference_logps")
    assert sorted(t.split("-")[0] for t in tables) == ["eval", "train"]

    resumed = _recipe(tmp_path, ckpt, pref_data, "resumed", preference=pref, max_steps_this_run=3)
    assert cli(["train", resumed]) == 0
    assert not os.path.exists(tmp_path / "resumed" / "hf"), "an interrupted run must not export"
    assert cli(["train", resumed]) == 0
    got = _metrics(tmp_path / "resumed")
    assert [m["step"] for m in got] == list(range(0, 7))
    for a, b in zip(ref, got):
        a.pop("seconds", None), b.pop("seconds", None)
        assert a == b, (a, b)
    w_ref = load_file(tmp_path / "straight" / "hf" / "model.safetensors")
    w_got = load_file(tmp_path / "resumed" / "hf" / "model.safetensors")
    assert all(torch.equal(w_ref[k], w_got[k]) for k in w_ref)


@pytest.mark.dist
def test_dpo_ipo_with_frozen_reference_model_at_tp2(tmp_path, converted, pref_data, monkeypatch):
    monkeypatch.setenv("MEGARL_STRICT_DEVICE", "1")   # every tensor where a GPU run needs it (runtime/strict_device.py)
    path = _recipe(tmp_path, converted["qwen2"]["ckpt"], pref_data, "ipo",
                   preference={"loss_type": "ipo", "beta": 0.5}, steps=4, save_freq=0, eval_freq=4)
    body = yaml.safe_load(open(path))
    body["parallel"] = {"tp": 2, "sp": True}
    open(path, "w").write(yaml.safe_dump(body))
    assert cli(["train", path]) == 0
    m = _metrics(tmp_path / "ipo")
    assert m[0]["eval/reward/accuracy"] == 0.5
    assert m[-1]["eval/loss"] < m[0]["eval/loss"] and m[-1]["eval/reward/accuracy"] > 0.5
    assert not os.path.exists(tmp_path / "ipo" / "reference_logps")  # reference: model (auto) scores on the fly


@pytest.mark.dist
def test_reward_model_trains_and_its_export_ranks_pairs(tmp_path, converted, pref_data, monkeypatch):
    import transformers

    from megarl.trainers.preference import scored_length

    path = _recipe(tmp_path, converted["qwen2"]["hf"], pref_data, "rm", stage="rm", save_freq=0)
    monkeypatch.setenv("MEGARL_STRICT_DEVICE", "1")
    assert cli(["train", path]) == 0
    m = _metrics(tmp_path / "rm")
    assert m[-1]["eval/loss"] < m[0]["eval/loss"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "hf").eval()
    assert type(model).__name__ == "Qwen2ForSequenceClassification"
    pairs = _examples(pref_data["eval"], "preference", converted["qwen2"]["hf"])
    with torch.no_grad():
        scores = [[float(model(torch.tensor(seg.input_ids[:scored_length(seg)])[None]).logits[0, 0])
                   for seg in ex.segments] for ex in pairs]
    accuracy = sum(c > r for c, r in scores) / len(scores)
    assert accuracy == m[-1]["eval/reward/accuracy"], (accuracy, m[-1])


@pytest.mark.dist
def test_kto_trains_with_kl_baseline(tmp_path, converted, pref_data, monkeypatch):
    monkeypatch.setenv("MEGARL_STRICT_DEVICE", "1")   # every tensor where a GPU run needs it (runtime/strict_device.py)
    path = _recipe(tmp_path, converted["qwen2"]["ckpt"], pref_data, "kto", stage="kto", save_freq=0, steps=4)
    assert cli(["train", path]) == 0
    m = _metrics(tmp_path / "kto")
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert m[0]["kl"] == 0.0 and m[-1]["kl"] != 0.0  # policy == reference at the first step
    assert m[-1]["loss"] < m[0]["loss"] and {"reward/desirable", "reward/undesirable"} <= set(m[-1])


def test_bad_preference_rows_are_reported_by_kind(tmp_path, converted):
    from transformers import AutoTokenizer

    from megarl.data.preference import PreferenceDataset
    from megarl.data.readers import DatasetError

    tok = AutoTokenizer.from_pretrained(converted["qwen2"]["hf"])
    good = preference_row(random.Random(0))
    rows = [good,
            {**good, "rejected": good["chosen"]},                      # identical
            {"prompt": "hi", "chosen": "a"},                            # no rejected
            {**good, "chosen": [{"role": "assistant", "content": "x " * 600}]}]  # too long
    path = _write(tmp_path / "p.jsonl", rows)
    data = PreferenceDataset(path, "preference", tok, 512, rejected_path=str(tmp_path / "rej.jsonl"))
    assert [e.row for e in data.examples] == [1]
    assert {k: [r for r, _ in v] for k, v in data.report.problems.items()} == {
        "identical_pair": [2], "bad_schema": [3], "too_long": [4]}
    with pytest.raises(DatasetError, match="bad_margin"):
        PreferenceDataset(path, "preference", tok, 512, on_bad_row="fail", margin=True)
    one = _write(tmp_path / "k.jsonl", [kto_row(random.Random(0))])
    with pytest.raises(DatasetError, match="no_kl_partner"):
        PreferenceDataset(one, "kto", tok, 512)
