"""Each problem kind is found in a crafted dataset and reported with its row; clean rows pass."""

import json

import pytest

from megarl.cli import main as cli
from megarl.data.batching import token_budget_batches
from megarl.data.checks import CheckContext, check_dataset
from megarl.data.sampler import EpochSampler

CALC = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}


def call(name="calculator", args=None, raw=None):
    fn = {"name": name, "arguments": raw if raw is not None else (args or {"expression": "1+1"})}
    return {"type": "function", "function": fn}


GOOD_SFT = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "", "tool_calls": [call()]},
                         {"role": "tool", "content": "2"}, {"role": "assistant", "content": "2"}],
            "tools": [CALC]}

SFT_ROWS = [  # (row, expected problem kind or None)
    (GOOD_SFT, None),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]}, "bad_role_order"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "2"},
                   {"role": "assistant", "content": "a"}]}, "tool_result_without_call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call()]},
                   {"role": "assistant", "content": "a"}], "tools": [CALC]}, "call_without_result"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls":
                   [call(raw="{not json")]}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}],
      "tools": [CALC]}, "malformed_tool_call"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "<tool_call>\n{oops\n</tool_call>"}]}, "malformed_tool_call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls":
                   [call("search")]}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}],
      "tools": [CALC]}, "unknown_tool"),
    ({"messages": [{"role": "user", "content": "q"}] + [m for _ in range(3) for m in (
        {"role": "assistant", "content": "", "tool_calls": [call()]}, {"role": "tool", "content": "2"})]
        + [{"role": "assistant", "content": "2"}], "tools": [CALC]}, "repeated_tool_call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call()]},
                   {"role": "tool", "content": "9 " * 300}, {"role": "assistant", "content": "a"}], "tools": [CALC]},
     "tool_output_too_long"),
    ({"messages": [{"role": "user", "content": "q " * 400}, {"role": "assistant", "content": "a"}]}, "too_long"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "bad_role"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, None),  # ShareGPT
    ({"messages": []}, "no_messages"),
    ({"text": "no messages here"}, "bad_schema"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_models["qwen2"])


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_every_sft_problem_kind_is_reported_with_its_row(tmp_path, tokenizer):
    path = write(tmp_path, [r for r, _ in SFT_ROWS])
    ctx = CheckContext(tokenizer=tokenizer, max_length=300, max_tool_output_tokens=200)
    report = check_dataset(path, "sft", ctx)
    assert report.total == len(SFT_ROWS)
    for n, (_, expected) in enumerate(SFT_ROWS, start=1):
        kinds = {k for k, hits in report.problems.items() for row, _ in hits if row == n}
        if expected is None:
            assert not kinds, f"row {n} should be clean, got {kinds}"
        else:
            assert expected in kinds, f"row {n}: expected {expected}, got {kinds}"
    text = report.render()
    assert "unknown_tool: 1 (rows 7)" in text and "e.g. row 7: message 1: tool 'search' is not declared" in text


def test_rl_prompts_preference_and_kto_checks(tmp_path, tokenizer):
    prompts = [{"messages": [{"role": "user", "content": "2+2?"}], "ground_truth": "4"},
               {"prompt": "x " * 500},
               {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    report = check_dataset(write(tmp_path, prompts, "p.jsonl"), "grpo",
                           CheckContext(tokenizer=tokenizer, max_prompt_length=64))
    assert [r for r, _ in report.problems["prompt_too_long"]] == [2]
    assert [r for r, _ in report.problems["bad_role_order"]] == [3]
    prefs = [{"prompt": "q", "chosen": "good", "rejected": "bad"},
             {"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
              "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
             {"chosen": "only chosen"}]
    report = check_dataset(write(tmp_path, prefs, "pref.jsonl"), "dpo", CheckContext())
    assert [r for r, _ in report.problems["prompt_mismatch"]] == [2]
    assert [r for r, _ in report.problems["bad_schema"]] == [3] and report.rejected == 2
    kto = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": "yes"}]
    report = check_dataset(write(tmp_path, kto, "kto.jsonl"), "kto", CheckContext())
    assert [r for r, _ in report.problems["bad_label"]] == [2]


def test_cli_reports_writes_rejected_rows_and_exit_codes(tmp_path, capsys, tiny_hf_models):
    path = write(tmp_path, [r for r, _ in SFT_ROWS[:4]])
    out = tmp_path / "rejected.jsonl"
    code = cli(["data", "check", path, "--stage", "sft", "--tokenizer", tiny_hf_models["qwen2"],
                "--rejected-out", str(out), "--json"])
    text = capsys.readouterr().out
    assert code == 1 and "4 rows, stage sft: 1 ok, 3 rejected" in text
    rejected = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rejected] == [2, 3, 4] and rejected[0]["data"] == SFT_ROWS[1][0]
    assert json.loads(text.strip().splitlines()[-1])["rejected"] == 3
    assert cli(["data", "check", write(tmp_path, [GOOD_SFT], "ok.jsonl"), "--stage", "sft"]) == 0


def test_recipe_driven_check_uses_declared_tools(tmp_path, capsys, monkeypatch):
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = [{"messages": [{"role": "user", "content": "q"}], "ground_truth": "1"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls":
                          [call("shell")]}, {"role": "tool", "content": "x"}, {"role": "user", "content": "go on"}]}]
    monkeypatch.chdir(root)
    # the recipe's model path is a directory the demo creates; here it may not exist
    code = cli(["data", "check", write(tmp_path, rows), "--recipe", "configs/tiny/grpo_cpu.yaml",
                "--set", f"model.path={tmp_path / 'no_model'}"])
    captured = capsys.readouterr()
    assert code == 1 and "unknown_tool: 1 (rows 2)" in captured.out
    assert "token-length checks are skipped" in captured.err


def test_sampler_resumes_with_the_same_next_rows():
    a = EpochSampler(10, seed=3)
    first = a.take(7)
    state = a.state_dict()
    rest = a.take(9)  # crosses into epoch 1
    b = EpochSampler.from_state(10, 3, True, state)
    assert b.take(9) == rest
    assert sorted(first + rest[:3]) == list(range(10))  # epoch 0 is a permutation
    assert EpochSampler(10, seed=3).take(7) == first and EpochSampler(10, seed=4).take(7) != first


def test_token_budget_batches():
    bins = token_budget_batches([5, 3, 8, 2, 7], max_tokens=10)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 7][i] for i in b) <= 10 for b in bins) and len(bins) == 3
    with pytest.raises(ValueError, match="sample 1 has 12 tokens"):
        token_budget_batches([3, 12], max_tokens=10)


def test_token_counter_is_exact(tokenizer):
    import random

    from examples.tool_math import sft_row
    from megarl.data.checks import TokenCounter

    rng = random.Random(1)
    texts = [tokenizer.apply_chat_template(sft_row(rng)["messages"], tools=[CALC], tokenize=False) for _ in range(80)]
    texts += ["no special tokens at all 123", "", "<|im_start|><|im_end|>"]
    counter = TokenCounter(tokenizer)
    whole = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert counter.count(texts) == whole and counter.exact_by_pieces
    assert counter.count(texts[::-1]) == whole[::-1]  # from the cache

    class Joined:  # a tokenizer whose count is not additive over pieces: the counter must notice
        added_tokens_decoder = tokenizer.added_tokens_decoder

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[0] * (len(t) // 3 + 1) for t in texts]}

    fallback = TokenCounter(Joined())
    assert fallback.count(texts[:5]) == [len(t) // 3 + 1 for t in texts[:5]] and not fallback.exact_by_pieces


def test_prompt_dataset_renders_and_rejects(tmp_path, tokenizer):
    import random

    from examples.tool_math import rl_row
    from megarl.data.prompts import PromptDataset
    from megarl.data.readers import DatasetError
    from megarl.data.render import render_prompt

    rng = random.Random(0)
    rows = [rl_row(rng) for _ in range(3)] + [{"prompt": "x " * 400}, {"messages": 42}]
    path = write(tmp_path, rows, "rl.jsonl")
    ds = PromptDataset(path, tokenizer, max_prompt_length=300, tools={"calculator"})
    assert len(ds) == 3 and ds.report.rejected == 2
    assert ds[0].prompt_ids == render_prompt(tokenizer, rows[0]["messages"], rows[0]["tools"])
    assert tokenizer.decode(ds[0].prompt_ids).endswith("<|im_start|>assistant\n")
    assert ds[0].metadata["ground_truth"] == rows[0]["ground_truth"]
    assert {k for k in ds.report.problems} == {"prompt_too_long", "bad_schema"}
    with pytest.raises(DatasetError, match="prompt_too_long: 1"):
        PromptDataset(path, tokenizer, max_prompt_length=300, on_bad_row="fail")


def test_parquet_rows_are_read_with_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megarl.data.readers import read_rows

    rows = [{"prompt": "q1", "ground_truth": "1"}, {"prompt": "q2", "ground_truth": "2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert list(read_rows(str(tmp_path / "p.parquet"))) == [(1, rows[0]), (2, rows[1])]
    report = check_dataset(str(tmp_path / "p.parquet"), "grpo", CheckContext())
    assert report.total == 2 and report.rejected == 0


def test_bad_json_names_the_row(tmp_path):
    from megarl.data.readers import BadRow, read_rows

    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    (n1, good), (n2, bad) = read_rows(str(path))  # a bad line is a row, not an exception (see test_bad_rows)
    assert (n1, good) == (1, {"prompt": "ok"}) and n2 == 2 and isinstance(bad, BadRow)
    assert bad.kind == "bad_json" and bad.detail.startswith("not valid JSON")
