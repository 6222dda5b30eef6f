"""The SFT stage end to end on the tiny model: trains (loss falls), exports HF, and resumes exactly:
N steps straight == N/2, stop, resume, N/2 (weights, optimizer, LR schedule, RNG, data position);
a damaged newest checkpoint is named and the one before it resumed from."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from examples.tool_math import sft_row
from megarl.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    import random

    path = tmp_path_factory.mktemp("sft_data") / "sft.jsonl"
    rng = random.Random(0)
    rows = [sft_row(rng) for _ in range(64)]
    rows.append({"messages": [{"role": "user", "content": "x " * 600}, {"role": "assistant", "content": "y"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def recipe(tmp_path, converted, sft_data, name, **trainer):
    data = {
        "defaults": [os.path.join(ROOT, "configs/tiny/base.yaml")],
        "stage": "sft",
        "model": {"path": converted["qwen2"]["ckpt"], "shape_preset": "tiny-qwen2"},
        "data": {"train": sft_data, "max_length": 512},
        "optim": {"lr": 3.0e-3, "lr_scheduler": "cosine", "warmup_steps": 2, "min_lr": 1.0e-4},
        "trainer": {"steps": 8, "samples_per_step": 8, "micro_batch_per_rank": 2, "save_freq": 4,
                    "output_dir": str(tmp_path / name), **trainer},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.dist
def test_sft_trains_exports_and_resumes_exactly(tmp_path, converted, sft_data, capfd):
    straight = recipe(tmp_path, converted, sft_data, "straight")
    assert cli(["train", straight]) == 0
    ref = metrics(tmp_path / "straight")
    assert [m["step"] for m in ref] == list(range(1, 9))
    assert ref[-1]["loss"] < ref[0]["loss"] - 1.0, "SFT did not learn"
    rejected = [json.loads(line) for line in open(tmp_path / "straight" / "rejected_rows.jsonl")]
    assert [(r["row"], [p["kind"] for p in r["problems"]]) for r in rejected] == [(65, ["too_long"])]
    assert "> data.max_length 512" in rejected[0]["problems"][0]["detail"]

    resumed = recipe(tmp_path, converted, sft_data, "resumed", max_steps_this_run=4)
    assert cli(["train", resumed]) == 0
    assert not os.path.exists(tmp_path / "resumed" / "hf"), "an interrupted run must not export"
    assert cli(["train", resumed]) == 0  # resume: auto
    got = metrics(tmp_path / "resumed")
    assert [m["step"] for m in got] == list(range(1, 9))
    for a, b in zip(ref, got):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), (a, b)
    w_ref = load_file(tmp_path / "straight" / "hf" / "model.safetensors")
    w_got = load_file(tmp_path / "resumed" / "hf" / "model.safetensors")
    assert all(torch.equal(w_ref[k], w_got[k]) for k in w_ref)
    initial = load_file(os.path.join(converted["qwen2"]["hf"], "model.safetensors"))
    assert not torch.equal(initial["lm_head.weight"], w_ref["lm_head.weight"])
    damaged_newest_checkpoint_is_named_and_the_one_before_resumed(tmp_path / "resumed", resumed, ref, w_ref, capfd)


@pytest.mark.dist
def test_bf16_sft_checkpoints_and_resumes(tmp_path, converted, sft_data):
    """bf16 weights (fp32 master copies in the optimizer): a checkpoint is written and resumed (the
    local spec's norms used to stay fp32, which broke every save of a bf16 model)."""
    run = recipe(tmp_path, converted, sft_data, "bf16", steps=4, save_freq=2, max_steps_this_run=2)
    data = yaml.safe_load(open(run))
    data["model"]["dtype"] = "bf16"
    open(run, "w").write(yaml.safe_dump(data))
    assert cli(["train", run]) == 0
    assert os.path.isdir(tmp_path / "bf16" / "checkpoints" / "step_000002")
    assert cli(["train", run]) == 0  # resume: auto
    assert [m["step"] for m in metrics(tmp_path / "bf16")] == [1, 2, 3, 4]
    assert os.path.isfile(tmp_path / "bf16" / "hf" / "model.safetensors")


def damaged_newest_checkpoint_is_named_and_the_one_before_resumed(run, resumed, ref, w_ref, capfd):
    """Truncate a file of the final checkpoint: an explicit resume from it is refused naming the file;
    `resume: auto` says why it skips it and redoes steps 5-8 from step 4, exactly."""
    newest = run / "checkpoints" / "step_000008"
    assert (newest / "manifest.json").is_file() and (run / "checkpoints" / "step_000004" / "manifest.json").is_file()
    shard = max((p for p in newest.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(10)
    capfd.readouterr()
    assert cli(["train", resumed, "--set", f"trainer.resume={newest}"]) == 1
    assert f"{shard.name} is 10 bytes, the manifest says" in capfd.readouterr().err
    assert cli(["train", resumed]) == 0
    out = capfd.readouterr().out
    assert f"skipping checkpoint {newest}: {shard.name} is 10 bytes" in out and "resumed from" in out
    got = metrics(run)
    assert [(m["step"], m["loss"]) for m in got] == [(m["step"], m["loss"]) for m in ref]
    w_got = load_file(run / "hf" / "model.safetensors")
    assert all(torch.equal(w_ref[k], w_got[k]) for k in w_ref)


@pytest.mark.dist
def test_sft_with_tensor_and_sequence_parallel(tmp_path, converted, sft_data, monkeypatch):
    """The same trainer at TP=2 with sequence parallelism (micro-batches padded to a multiple of tp),
    in strict device mode."""
    monkeypatch.setenv("MEGARL_STRICT_DEVICE", "1")   # every tensor where a GPU run needs it (runtime/strict_device.py)
    path = recipe(tmp_path, converted, sft_data, "tp2", steps=3, save_freq=0)
    data = yaml.safe_load(open(path))
    data["parallel"] = {"tp": 2, "sp": True}
    open(path, "w").write(yaml.safe_dump(data))
    assert cli(["train", path]) == 0
    got = metrics(tmp_path / "tp2")
    assert [m["step"] for m in got] == [1, 2, 3] and got[-1]["loss"] < got[0]["loss"]
    assert os.path.isfile(tmp_path / "tp2" / "hf" / "model.safetensors")
