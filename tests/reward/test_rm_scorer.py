"""Reward-model scoring on megatron equals HF's Qwen2ForSequenceClassification, at TP=1 and TP=2."""

import pytest
import torch

from megarl.runtime.local_group import run_local_group

SEQUENCES = [[5, 9, 17, 3, 44], [8, 1], [100, 200, 300, 400, 500, 600, 7]]


@pytest.fixture(scope="module")
def reward_model(tiny_hf_models, tmp_path_factory):
    from tests.conftest import make_scalar_head_model

    model, _, ckpt = make_scalar_head_model(tiny_hf_models["qwen2"], tmp_path_factory.mktemp("rm"),
                                            "Qwen2ForSequenceClassification", seed=1)
    with torch.no_grad():
        expected = [model(torch.tensor([s])).logits[0, 0].item() for s in SEQUENCES]
    return ckpt, expected


@pytest.mark.dist
@pytest.mark.parametrize("layout,world", [({}, 1), ({"tp": 2, "sp": True}, 2)], ids=["tp1", "tp2_sp"])
def test_rm_scores_match_hf(reward_model, layout, world):
    ckpt, expected = reward_model
    ranks = run_local_group("tests.reward.rm_checks:rm_scores", world, args=(ckpt, layout, SEQUENCES), timeout=300)
    for got in (r for r in ranks if r is not None):
        assert got == pytest.approx(expected, abs=1e-4)
