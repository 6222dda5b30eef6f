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


def test_multi_turn_incremental_equals_whole(tokenizer):
    """Appending turn by turn (as the rollout does) gives exactly the whole conversation's ids."""
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 3 * 4 + 1?"},
            {"role": "assistant", "content": "Let me compute.", "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "3 * 4"}}}]},
            {"role": "tool", "content": "12"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12 + 1"}}}]},
            {"role": "tool", "content": "13"}, {"role": "assistant", "content": "13"}]
    whole = tokenizer(tokenizer.apply_chat_template(msgs, tools=[CALCULATOR], tokenize=False),
                      add_special_tokens=False)["input_ids"]
    incremental = []
    for k in range(1, len(msgs) + 1):
        r = render_messages(tokenizer, msgs[:k], [CALCULATOR])
        assert r.input_ids[:len(incremental)] == incremental  # each turn only appends
        incremental = r.input_ids
    assert incremental == whole


def test_demo_sft_mix_has_direct_answers_that_train_only_the_answer(tokenizer):
    """The demo's SFT mix: about the asked share calls the calculator; a direct answer trains only
    its one assistant turn (examples/tool_math.py: mixed_sft_rows)."""
    import random

    from examples.tool_math import mixed_sft_rows

    rows = mixed_sft_rows(random.Random(0), 400, 0.5)
    with_tool = [r for r in rows if any("tool_calls" in m for m in r["messages"])]
    assert 160 <= len(with_tool) <= 240
    direct = next(r for r in rows if r not in with_tool)
    assert [m["role"] for m in direct["messages"]] == ["system", "user", "assistant"]
    r = render_messages(tokenizer, direct["messages"], direct["tools"])
    trained = tokenizer.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m])
    assert trained == direct["messages"][-1]["content"] + "<|im_end|>"
    assert all(row["messages"][2].get("tool_calls") for row in mixed_sft_rows(random.Random(0), 50, 1.0))
