"""Reward-model scoring on megatron equals HF's Qwen2ForSequenceClassification, at TP=1 and TP=2."""

import os
import shutil

import pytest
import torch

from megarl.runtime.local_group import run_local_group

SEQUENCES = [[5, 9, 17, 3, 44], [8, 1], [100, 200, 300, 400, 500, 600, 7]]


@pytest.fixture(scope="module")
def reward_model(tiny_hf_models, tmp_path_factory):
    from transformers import AutoConfig, Qwen2ForSequenceClassification

    src = tiny_hf_models["qwen2"]
    out = tmp_path_factory.mktemp("rm")
    cfg = AutoConfig.from_pretrained(src, num_labels=1)
    cfg.architectures = ["Qwen2ForSequenceClassification"]
    torch.manual_seed(1)
    model = Qwen2ForSequenceClassification(cfg).eval()
    model.save_pretrained(out / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), out / "hf" / name)
    run_local_group("megarl.checkpoint.hf:convert_hf_to_megatron", 1, args=(str(out / "hf"), str(out / "mcore")))
    with torch.no_grad():
        expected = [model(torch.tensor([s])).logits[0, 0].item() for s in SEQUENCES]
    return str(out / "mcore"), expected


@pytest.mark.dist
@pytest.mark.parametrize("layout,world", [({}, 1), ({"tp": 2, "sp": True}, 2)], ids=["tp1", "tp2_sp"])
def test_rm_scores_match_hf(reward_model, layout, world):
    ckpt, expected = reward_model
    ranks = run_local_group("tests.reward.rm_checks:rm_scores", world, args=(ckpt, layout, SEQUENCES), timeout=300)
    for got in (r for r in ranks if r is not None):
        assert got == pytest.approx(expected, abs=1e-4)
