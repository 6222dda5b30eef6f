"""Chat rendering: loss only on assistant tokens; incremental == whole; prompts continue exactly."""

import pytest

from examples.tool_math import CALCULATOR, sft_row
from megarl.data.render import render_messages, render_prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_models["qwen2"])


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    import random

    row = sft_row(random.Random(3))
    r = render_messages(tokenizer, row["messages"], row["tools"])
    trained = tokenizer.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m])
    answer = row["messages"][-1]["content"]
    call = row["messages"][2]["tool_calls"][0]["function"]["arguments"]["expression"]
    assert trained.startswith("<tool_call>") and call in trained and trained.endswith(answer + "<|im_end|>")
    assert "What" not in trained and "<|im_start|>" not in trained and "tool_response" not in trained
    assert trained.count("<|im_end|>") == 2  # the model learns to end both of its turns


def test_incremental_prefixes_match_rollout_prompts(tokenizer):
    """The tokens before each assistant turn are exactly what a rollout would feed the engine."""
    import random

    msgs = sft_row(random.Random(5))["messages"]
    full = render_messages(tokenizer, msgs, [CALCULATOR])
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            prompt = render_prompt(tokenizer, msgs[:i], [CALCULATOR])
            assert full.input_ids[:len(prompt)] == prompt
            assert full.message_spans[i][0] + len(prompt) - full.message_spans[i][0] == len(prompt)
